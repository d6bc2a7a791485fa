"""``rocoin``: the command line. Each command parses its options and calls the library."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer
from rich.table import Table

from rocoin import __version__
from rocoin.cli import experiment, runtime, train
from rocoin.cli.common import clean_errors, err, flag, out
from rocoin.contracts.errors import RocoinError
from rocoin.pipeline.config import DemoConfig

app = typer.Typer(
    help="rocoin: failure-resilient cooperative DNN inference over heterogeneous edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
fleet_app = typer.Typer(help="Make and check fleet files (device profiles).", no_args_is_help=True)
app.add_typer(fleet_app, name="fleet")
train.register(app)
runtime.register(app)
experiment.register(app)

#: Groups shown in a plan summary before the rest is elided.
SUMMARY_MAX_GROUPS = 20


def _print_version(value: bool) -> None:
    if value:
        out.print(f"rocoin {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log output (-v info, -vv debug)."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    log_json: bool = typer.Option(
        False, "--log-json", help="Log one JSON object per line (with query_id where an event concerns a query)."
    ),
) -> None:
    from rocoin.logs import configure

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    configure(level, json_lines=log_json)


# --- fleet -----------------------------------------------------------------------------------


@fleet_app.command("generate")
@clean_errors
def fleet_generate(
    devices: int = typer.Option(10, "--devices", "-n", help="Number of devices N."),
    heterogeneity: int = typer.Option(
        3,
        "--heterogeneity",
        help="Table IV level 0-5: FLOP/s uniform in 20M ± W/2 with W = 0,10,15,20,25,30 MFLOP/s; rate uniform in"
        " 300 kbit/s ± W/2 with W = 0,100,...,500 kbit/s; memory log-uniform in 4 MiB ×/÷ (1 + 0.5·level).",
    ),
    success_prob: float = typer.Option(
        0.8, "--success-prob", help="Mean success probability 1 - outage; each device draws P ± --success-spread."
    ),
    success_spread: float = typer.Option(0.1, "--success-spread", help="Half-width of the success-probability range."),
    input_bits: int | None = typer.Option(None, "--input-bits", help="Size of one broadcast input (e.g. 6272 for 28×28×8 bit)."),
    downlink_bps: float | None = typer.Option(None, "--downlink-bps", help="Downlink rate of every device for the input broadcast."),
    rate_unit: str = typer.Option(
        "kbps", "--rate-unit", help="Unit of Table IV's rates: kbps (kbit/s, SPEC.md's reading) or bps (bit/s, as the table prints)."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    output: Path = typer.Option(..., "--output", "-o", help="Fleet file to write (YAML; .json for JSON)."),
) -> None:
    """Generate a fleet like the paper's simulations (Table IV heterogeneity; SPEC.md §7 assumptions)."""
    from rocoin.contracts.fileio import write_json_atomic
    from rocoin.contracts.fleet import save_fleet
    from rocoin.profiles.generate import generate_fleet

    fleet = generate_fleet(
        devices,
        heterogeneity,
        success_prob,
        success_spread=success_spread,
        input_bits=input_bits,
        downlink_bps=downlink_bps,
        rate_unit=rate_unit,
        random_state=seed,
    )
    if output.suffix.lower() == ".json":
        write_json_atomic(output, fleet.model_dump(mode="json", exclude_none=True))
    else:
        save_fleet(fleet, output)
    err.print(f"wrote {output}: {devices} devices, heterogeneity {heterogeneity}, mean success ≈ {success_prob}")


@fleet_app.command("collect")
@clean_errors
def fleet_collect(
    entries: list[Path] = typer.Argument(..., metavar="ENTRY...", help="Fleet entries written by `rocoin device profile`."),
    input_bits: int | None = typer.Option(None, "--input-bits", help="Size of one broadcast input."),
    output: Path = typer.Option(..., "--output", "-o", help="Fleet file to write."),
) -> None:
    """Assemble a fleet file from the devices' measured entries."""
    from rocoin.contracts.fileio import load_document, validate
    from rocoin.contracts.fleet import Fleet, save_fleet

    devices = []
    for path in entries:
        data = load_document(path)
        if not isinstance(data, dict):
            raise RocoinError(f"{path}: expected one device entry (a mapping)")
        devices.append(data)
    fleet = validate(Fleet, {"devices": devices, "input_bits": input_bits}, "fleet entries")
    save_fleet(fleet, output)
    err.print(f"wrote {output}: {len(fleet.devices)} devices")


#: The fleet commands that talk to a running source's REST API.
SOURCE_REST_HELP = "The source's REST API: host:port or http[s]://host:port (source serve --http-listen)."
API_TOKEN_FILE_HELP = "The client API's token (default: $ROCOIN_API_TOKEN)."


@fleet_app.command("status")
@clean_errors
def fleet_status(
    source: str = typer.Option(..., "--source", help=SOURCE_REST_HELP),
    api_token_file: Path | None = typer.Option(None, "--api-token-file", help=API_TOKEN_FILE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON document instead of tables."),
) -> None:
    """Show a running source's membership: each group's live replicas, each device's state, the last re-plans."""
    from rocoin.runtime.api.client import fetch_fleet_status
    from rocoin.runtime.transport.auth import API_TOKEN_ENV, load_token

    status = fetch_fleet_status(source, token=load_token(api_token_file, env=API_TOKEN_ENV))
    if as_json:
        out.print_json(data=status)
        return
    groups = Table(title=f"groups ({status.get('replans', 0)} re-plans)")
    for column in ("group", "live replicas", "failure prob."):
        groups.add_column(column)
    for g in status.get("groups", []):
        groups.add_row(str(g["group"]), ", ".join(g["live_replicas"]) or "-", f"{g['failure_prob']:.3g}" if "failure_prob" in g else "")
    out.print(groups)
    members = Table(title="devices")
    for column in ("device", "state", "group", "serving", "connected", "model"):
        members.add_column(column)
    for m in status.get("members", []):
        members.add_row(
            str(m.get("device_id", m.get("device"))),
            str(m.get("state", "up" if m.get("up") else "down")),
            str(m.get("group")),
            str(m.get("serving_group", m.get("group") if m.get("up") else None)),
            str(m.get("connected", m.get("up"))),
            (m.get("model_sha256") or "")[:12],
        )
    out.print(members)
    for record in status.get("history", [])[-5:]:
        out.print(f"re-plan ({record['trigger']}): {len(record['moves'])} moves; {record['reason']}")


@fleet_app.command("forget")
@clean_errors
def fleet_forget(
    device_id: str = typer.Argument(..., metavar="DEVICE", help="The id of a gone device."),
    source: str = typer.Option(..., "--source", help=SOURCE_REST_HELP),
    reason: str | None = typer.Option(None, "--reason", help="Recorded in the membership's events (default: 'forgotten by an operator')."),
    api_token_file: Path | None = typer.Option(None, "--api-token-file", help=API_TOKEN_FILE_HELP),
) -> None:
    """Forget a gone device and the binding of its id to its key or certificate, so another device may join under the id (a
    replaced device, a lost key). Gone devices are forgotten on their own after source serve --forget-after-s."""
    from rocoin.runtime.api.client import forget_member
    from rocoin.runtime.transport.auth import API_TOKEN_ENV, load_token

    member = forget_member(source, device_id, reason=reason, token=load_token(api_token_file, env=API_TOKEN_ENV))
    err.print(f"forgot {member['device_id']} (was {member['state']}): the next device to join as {member['device_id']} is bound afresh")


@fleet_app.command("drain")
@clean_errors
def fleet_drain(
    device_id: str = typer.Argument(..., metavar="DEVICE", help="The id of a joined device."),
    source: str = typer.Option(..., "--source", help=SOURCE_REST_HELP),
    api_token_file: Path | None = typer.Option(None, "--api-token-file", help=API_TOKEN_FILE_HELP),
) -> None:
    """Take a joined device out of service before its maintenance: the source re-plans without it (its group gets other
    devices first) and keeps it as a spare until it joins again (after a reboot, say)."""
    from rocoin.runtime.api.client import drain_member
    from rocoin.runtime.transport.auth import API_TOKEN_ENV, load_token

    record = drain_member(source, device_id, token=load_token(api_token_file, env=API_TOKEN_ENV))
    where = lambda group: "spare" if group is None else f"group {group}"  # noqa: E731
    moves = ", ".join(f"{m['device']} {where(m['from'])} -> {where(m['to'])}" for m in record["moves"]) or "none"
    err.print(f"drained {device_id}: it serves no group now (moves: {moves}); P(every group answers) {record['p_complete_after']:.3f}")


@fleet_app.command("show")
@clean_errors
def fleet_show(fleet_path: Path = typer.Argument(..., metavar="FLEET", help="Fleet file (YAML or JSON).")) -> None:
    """Validate a fleet file and print its devices."""
    from rocoin.contracts.fleet import load_fleet

    fleet = load_fleet(fleet_path)
    table = Table(title=f"{fleet_path} ({len(fleet.devices)} devices)")
    for column in ("id", "MFLOP/s", "memory MiB", "rate kbit/s", "outage", "address"):
        table.add_column(column)
    for d in fleet.devices:
        table.add_row(
            d.id, f"{d.flops / 1e6:.2f}", f"{d.memory_bytes / 2**20:.2f}", f"{d.rate_bps / 1e3:.1f}", f"{d.outage:.4f}", d.address or ""
        )
    out.print(table)


# --- catalog ---------------------------------------------------------------------------------


@app.command("catalog")
@clean_errors
def catalog_command(
    input_shape: str = typer.Option("3x32x32", "--input-shape", help="CxHxW of one input (3x32x32 CIFAR, 1x28x28 Fashion-MNIST)."),
    num_classes: int = typer.Option(10, "--num-classes", help="Classes of the task."),
    students: str | None = typer.Option(None, "--students", help="Comma-separated architectures (default: the built-in students)."),
    method: str = typer.Option(
        "auto", "--method", help="measured (torch: FLOP counter, profiled memory), analytic (shape arithmetic), or auto."
    ),
    int8: bool = typer.Option(False, "--int8", help="Memory of int8 students (rocoin export --int8): 1 byte per weight instead of 4."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Catalog JSON to write (default: print)."),
) -> None:
    """Student catalog for an input shape: FLOPs, memory (weights + peak activations), parameters, output size.

    measured: one batch-1 forward of each model with torch's FLOP counter (2 × multiply-accumulates)
    and the profiler's allocation events (peak activation bytes); analytic: counted from the shapes.
    """
    from rocoin.contracts.catalog import int8_catalog, parse_input_shape, save_catalog
    from rocoin.models.analytic import DEFAULT_STUDENTS
    from rocoin.profiles.generate import analytic_catalog

    if num_classes < 1:
        raise RocoinError(f"num-classes = {num_classes}: expected at least 1")
    if method not in ("auto", "measured", "analytic"):
        raise RocoinError(f"method = {method!r}: expected measured, analytic or auto")
    shape = parse_input_shape(input_shape)
    names = [n.strip() for n in students.split(",") if n.strip()] if students else list(DEFAULT_STUDENTS)
    if method == "auto":
        method = "measured" if _has_torch() else "analytic"
        if method == "analytic":
            err.print("torch is not installed: counting from the shapes (install the train extra to measure)")
    if method == "measured":
        if not _has_torch():
            raise RocoinError("method = measured needs torch: pip install -e '.[train]'")
        from rocoin.models.measure import measure_catalog

        catalog = measure_catalog(shape, num_classes, names)
    else:
        catalog = analytic_catalog(shape, num_classes, names)
    if int8:
        catalog = int8_catalog(catalog)
    if output is None:
        out.print_json(catalog.to_json())
    else:
        save_catalog(catalog, output)
        err.print(f"wrote {output}: {len(catalog)} students ({method})")


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


# --- activations -----------------------------------------------------------------------------


@app.command("activations")
@clean_errors
def activations_command(
    teacher: Path | None = typer.Option(None, "--teacher", help="teacher.pt: measure its final conv filters' activity."),
    split: str = typer.Option("val", "--split", help="With --teacher: val (the teacher's validation split), train or test."),
    data_dir: str | None = typer.Option(None, "--data-dir", help="With --teacher: where the dataset is."),
    download: bool = typer.Option(False, "--download", help="With --teacher: download the dataset if missing."),
    synthetic: bool = typer.Option(False, "--synthetic", help="Instead: class-structured stand-in activity (no teacher needed)."),
    images: int = typer.Option(500, "--images", help="With --synthetic: images (rows)."),
    filters: int = typer.Option(256, "--filters", help="With --synthetic: filters F of the final conv layer."),
    num_classes: int = typer.Option(10, "--num-classes", help="With --synthetic: classes the filters prefer."),
    seed: int = typer.Option(0, "--seed", help="With --synthetic: random seed."),
    output: Path = typer.Option(..., "--output", "-o", help="ACT.npy to write (images × F float32)."),
) -> None:
    """Write the planner's input: per-image average activity of the teacher's final conv filters."""
    if (teacher is None) == (not synthetic):
        raise RocoinError("activations: give --teacher teacher.pt, or --synthetic for a stand-in")
    if teacher is not None:
        train.activations_from_teacher(teacher, split, data_dir, download, output)
        return
    import numpy as np

    from rocoin.contracts.fileio import atomic_path
    from rocoin.planning.partition import synthetic_activations

    if images < 1 or filters < 1 or num_classes < 1:
        raise RocoinError(f"images = {images}, filters = {filters}, num-classes = {num_classes}: expected positive counts")
    act = synthetic_activations(images, filters, num_classes, random_state=seed)
    with atomic_path(output) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, act, allow_pickle=False)
    err.print(f"wrote {output}: {images} images × {filters} filters")


# --- plan ------------------------------------------------------------------------------------


def _parse_theta(text: str) -> float | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise RocoinError(f"theta = {text!r}: expected a non-negative number or 'auto'") from None


@app.command("plan")
@clean_errors
def plan_command(
    fleet_path: Path = typer.Argument(..., metavar="FLEET", help="Fleet file (YAML or JSON)."),
    activations: Path = typer.Option(..., "--activations", help="ACT.npy: images × F average filter activity of the teacher."),
    scheme: str = typer.Option("rocoin", "--scheme", help="rocoin, rocoin-g, nonn, hetnonn, or optimal (exact, ≤ 10 devices)."),
    epsilon: float = typer.Option(0.05, "--epsilon", help="Reliability target ε: every group fails with probability ≤ ε."),
    theta: str = typer.Option("auto", "--theta", help="Grouping distance threshold θ, or 'auto' to search it."),
    objective: str = typer.Option("paper", "--objective", help="paper (eq. 5 weights, Kuhn–Munkres) or minmax (exact bottleneck)."),
    rho_min: float | None = typer.Option(None, "--rho-min", help="Minimum student parameters per filter (accuracy constraint)."),
    catalog_path: Path | None = typer.Option(None, "--catalog", help="Student catalog JSON (default: built-in, see --input-shape)."),
    input_shape: str = typer.Option("3x32x32", "--input-shape", help="Input shape for the built-in catalog."),
    include_rate: bool = typer.Option(False, "--include-rate", help="Group by (FLOP/s, memory, rate) instead of (FLOP/s, memory)."),
    optimal_gap: bool = typer.Option(False, "--optimal-gap", help="Also solve exactly (≤ 10 devices) and report the gap."),
    seed: int = typer.Option(0, "--seed", help="Random seed (k-means of the normalised cut)."),
    output: Path = typer.Option(..., "--output", "-o", help="plan.json to write."),
) -> None:
    """Plan groups, knowledge partition and students for a fleet (SPEC.md §3-5)."""
    from rocoin.contracts.catalog import load_catalog, parse_input_shape
    from rocoin.contracts.fleet import load_fleet
    from rocoin.contracts.plan import save_plan
    from rocoin.planning import filter_graph, make_plan
    from rocoin.planning.activations import load_activations
    from rocoin.profiles.generate import default_catalog

    fleet = load_fleet(fleet_path)
    catalog = load_catalog(catalog_path) if catalog_path else default_catalog(parse_input_shape(input_shape))
    weights = filter_graph(load_activations(activations))
    options = dict(epsilon=epsilon, theta=_parse_theta(theta), objective=objective, rho_min=rho_min, include_rate=include_rate, seed=seed)
    plan = make_plan(fleet, weights, catalog, scheme=scheme, **options)
    gap_line = None
    if optimal_gap:
        best = make_plan(fleet, weights, catalog, scheme="optimal", **options)
        gap_line = f"exact optimum T* = {best.latency_s:.4g} s; this plan is {100 * (plan.latency_s / best.latency_s - 1):.2f} % above it"
    save_plan(plan, output)
    print_plan_summary(plan)
    if gap_line:
        out.print(gap_line)
    err.print(f"wrote {output}")


#: Moves listed one by one in the replan summary before the rest is counted.
SUMMARY_MAX_MOVES = 10


@app.command("replan")
@clean_errors
def replan_command(
    plan_path: Path = typer.Argument(..., metavar="PLAN", help="plan.json to re-plan: its students and partitions stay."),
    fleet_path: Path = typer.Option(
        ..., "--fleet", help="The live fleet (YAML or JSON): plan devices missing from it are gone, devices not in the plan are new."
    ),
    epsilon: float | None = typer.Option(None, "--epsilon", help="Reliability target ε (default: the plan's)."),
    margin: float | None = typer.Option(
        None,
        "--margin",
        help="Hysteresis: devices move only when a re-plan is better by more than this, relatively (default 0.05).",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="New plan.json to write."),
) -> None:
    """Re-assign a changed fleet's devices to a plan's groups (students and partitions fixed): lowest
    T with ε in every group (else the highest P(every group answers)), few moves, no thrash."""
    from rocoin.contracts.fleet import load_fleet
    from rocoin.contracts.plan import load_plan, save_plan
    from rocoin.planning.replan import replan

    plan = load_plan(plan_path)
    fleet = load_fleet(fleet_path)
    result = replan(plan, fleet, epsilon=epsilon, **({} if margin is None else {"margin": margin}))
    save_plan(result.plan, output)
    print_replan_summary(result)
    err.print(f"wrote {output}", markup=False, highlight=False)


def print_replan_summary(result) -> None:
    before, after = result.objective_before, result.objective_after

    def group(k: int | None) -> str:
        return "standby" if k is None else f"group {k}"

    moves = ", ".join(f"{m.device}: {group(m.from_group)} -> {group(m.to_group)}" for m in result.moves[:SUMMARY_MAX_MOVES])
    if len(result.moves) > SUMMARY_MAX_MOVES:
        moves += f", +{len(result.moves) - SUMMARY_MAX_MOVES} more"
    lines = [
        f"replan: {'kept the current assignment' if result.kept_current else 'repaired the lost group(s) with the fewest moves' if result.repaired else 're-planned'}"
        f" ({'exact' if result.exact else 'heuristic'} search, best T found {result.objective_best.latency_s:.4g} s)",
        f"T: {before.latency_s:.4g} s -> {after.latency_s:.4g} s; P(all groups answer): {before.p_complete:.4f} -> {after.p_complete:.4f}",
        f"epsilon = {result.plan.epsilon:g}: {'met in every group' if result.epsilon_met else 'NOT met in every group (P maximised)'}",
        f"moves: {len(result.moves)}" + (f" ({moves})" if moves else "") + f"; added {len(result.added)}, removed {len(result.removed)},"
        f" {len(result.plan.unassigned)} on standby",
    ]
    for line in lines:
        out.print(line, markup=False, highlight=False, soft_wrap=True)


def print_plan_summary(plan) -> None:
    table = Table(
        title=f"{plan.scheme} plan: {plan.num_groups} groups, T = {plan.latency_s:.4g} s, "
        f"P(all groups answer) = {plan.p_complete:.4f}" + (f", θ = {plan.theta:g}" if plan.theta is not None else "")
    )
    for column in ("group", "devices", "filters", "student", "failure prob", "latency s"):
        table.add_column(column, overflow="fold")
    for k, group in enumerate(plan.groups[:SUMMARY_MAX_GROUPS]):
        shown = ", ".join(group.devices[:4]) + (f" +{len(group.devices) - 4}" if len(group.devices) > 4 else "")
        table.add_row(str(k), shown, str(len(group.filters)), group.student, f"{group.failure_prob:.3g}", f"{group.latency_s:.4g}")
    if plan.num_groups > SUMMARY_MAX_GROUPS:
        table.add_row("…", f"{plan.num_groups - SUMMARY_MAX_GROUPS} more groups", "", "", "", "")
    out.print(table)
    if plan.unassigned:
        err.print(
            f"[yellow]{len(plan.unassigned)} device(s) without a student[/yellow], e.g. {plan.unassigned[0].id}: {plan.unassigned[0].reason}"
        )


# --- simulate --------------------------------------------------------------------------------


@app.command("simulate")
@clean_errors
def simulate_command(
    plan_path: Path = typer.Argument(..., metavar="PLAN", help="plan.json"),
    fleet_path: Path = typer.Argument(..., metavar="FLEET", help="Fleet file the plan was made for."),
    trials: int = typer.Option(10000, "--trials", help="Monte-Carlo queries."),
    timeout_s: float = typer.Option(..., "--timeout-s", help="Deadline: a group with no answer by then is missing."),
    fail_devices: int | None = typer.Option(
        None, "--fail-devices", help="Fail exactly J random devices per query instead of each device's outage."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Monte-Carlo of the plan under independent device failures (SPEC.md §1), with exact values beside it."""
    from rocoin.cli.progress import rich_counter
    from rocoin.contracts.fleet import load_fleet
    from rocoin.contracts.plan import load_plan
    from rocoin.simulation import analytic, simulate

    plan = load_plan(plan_path)
    fleet = load_fleet(fleet_path)
    plan.check_fleet(fleet)
    with rich_counter("simulating", trials) as progress:
        result = simulate(plan, fleet, trials=trials, timeout_s=timeout_s, random_state=seed, fail_devices=fail_devices, progress=progress)
    exact = analytic(plan, fleet, timeout_s=timeout_s) if fail_devices is None else None
    if as_json:
        data = result.to_dict()
        if exact is not None:
            data["exact"] = exact.to_dict()
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(title=f"{plan.scheme} plan, {result.trials} queries, timeout {timeout_s:g} s")
    table.add_column("")
    table.add_column("Monte-Carlo")
    table.add_column("exact")
    ex = exact.to_dict() if exact is not None else {}
    mc = result.to_dict()
    table.add_row("mean latency s", f"{mc['latency_s']['mean']:.4g}", _fmt(ex.get("latency_s", {}).get("mean")))
    table.add_row("p50 latency s", f"{mc['latency_s']['p50']:.4g}", _fmt(ex.get("latency_s", {}).get("p50")))
    table.add_row("p99 latency s", f"{mc['latency_s']['p99']:.4g}", _fmt(ex.get("latency_s", {}).get("p99")))
    table.add_row("P(every group answered)", f"{mc['p_complete']:.4f}", _fmt(ex.get("p_complete")))
    table.add_row("mean missing groups", f"{mc['missing_groups_mean']:.4f}", _fmt(ex.get("missing_groups_mean")))
    out.print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


# --- demo ------------------------------------------------------------------------------------
# Every option's default and help are DemoConfig's (rocoin.pipeline.config): one default per setting.


def _students_flag() -> typer.Option:
    info = DemoConfig.model_fields["students"]
    return typer.Option(",".join(info.default), "--students", help=info.description)


@app.command("demo")
@clean_errors
def demo_command(
    task: str = flag(DemoConfig, "task", "--task"),
    output: Path = flag(DemoConfig, "output", "--output", "-o"),
    fresh: bool = flag(DemoConfig, "fresh", "--fresh"),
    dataset: str = flag(DemoConfig, "dataset", "--dataset"),
    data_dir: str | None = flag(DemoConfig, "data_dir", "--data-dir"),
    install: bool = flag(DemoConfig, "install", "--install/--no-install"),
    download: bool = flag(DemoConfig, "download", "--download/--no-download"),
    teacher_arch: str = flag(DemoConfig, "teacher_arch", "--teacher-arch"),
    teacher_epochs: int = flag(DemoConfig, "teacher_epochs", "--teacher-epochs"),
    max_train_images: int | None = flag(DemoConfig, "max_train_images", "--max-train-images"),
    students: str = _students_flag(),
    distill_epochs: int = flag(DemoConfig, "distill_epochs", "--distill-epochs"),
    distill_images: int | None = flag(DemoConfig, "distill_images", "--distill-images"),
    devices: int = flag(DemoConfig, "devices", "--devices"),
    heterogeneity: int = flag(DemoConfig, "heterogeneity", "--heterogeneity"),
    success_prob: float = flag(DemoConfig, "success_prob", "--success-prob"),
    epsilon: float = flag(DemoConfig, "epsilon", "--epsilon"),
    queries: int | None = flag(DemoConfig, "queries", "--queries"),
    concurrency: int = flag(DemoConfig, "concurrency", "--concurrency"),
    kill: int = flag(DemoConfig, "kill", "--kill"),
    kill_after: float = flag(DemoConfig, "kill_after", "--kill-after"),
    speedup: float = flag(DemoConfig, "speedup", "--speedup"),
    deadline_s: float | None = flag(DemoConfig, "deadline_s", "--deadline-s"),
    seed: int = flag(DemoConfig, "seed", "--seed"),
) -> None:
    """The whole pipeline: data, teacher, plan, students, bundle, an emulated cluster that loses
    devices part-way, and a report (table, report.md, results.json, plots)."""
    from rocoin.cli.progress import rich_progress
    from rocoin.experiments.demo import demo_config, run_demo

    options = {k: v for k, v in locals().items() if k in DemoConfig.model_fields}
    options["students"] = tuple(name.strip() for name in students.split(",") if name.strip())
    config = demo_config(**options)
    report = run_demo(config, say=lambda text: err.print(text, markup=False, highlight=False), progress=rich_progress)
    out.print(report.table())
    err.print(f"wrote {output}/: {', '.join(report.files)} (total {report.results['total_s']:.0f} s)", markup=False, highlight=False)


if __name__ == "__main__":  # pragma: no cover
    app()
