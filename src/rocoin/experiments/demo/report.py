"""The demo's report: the summary table (rich), ``report.md`` and the two PNG plots, all from
the ``results.json`` dictionary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rocoin.contracts.fileio import atomic_path
from rocoin.experiments.demo.cluster import DEADLINE_FACTOR, DEADLINE_SLACK_S
from rocoin.experiments.demo.load import QueryLog


@dataclass
class DemoReport:
    results: dict[str, Any]
    output: Path
    files: list[str] = field(default_factory=list)

    def table(self):
        """The summary table and its legend, for a rich console."""
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        r = self.results
        title = f"rocoin demo: {r['dataset']['name']}, {r['plan']['groups_count']} groups on {r['fleet']['devices']} devices"
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for k, column in enumerate(COLUMNS):
            table.add_column(column, justify="right" if k else "left", no_wrap=not k, min_width=7 if k else None)
        for row in _rows(r):
            table.add_row(*row)
        return Group(table, Text(_caption(r)))

    def markdown(self) -> str:
        return _markdown(self.results)


COLUMNS = ("", "acc. %", "p50 ms", "p99 ms", "queries", "with missing", "missing per query")


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _rows(r: dict[str, Any]) -> list[list[str]]:
    t, s, rt = r["teacher"], r["students"], r["runtime"]
    failed = s["random_failures"]

    def phase(label: str, p: dict[str, Any]) -> list[str]:
        return [
            label,
            _pct(p["accuracy"]),
            f"{p['latency_ms']['p50']:.1f}",
            f"{p['latency_ms']['p99']:.1f}",
            str(p["queries"]),
            str(p["queries_with_missing_groups"]),
            f"{p['missing_groups_mean']:.3f}",
        ]

    return [
        [f"teacher {t['arch']}", _pct(t["test_accuracy"]), "", "", "", "", ""],
        ["students, all groups", _pct(s["accuracy"]), "", "", "", "", "0"],
        [
            f"students, {failed['fail_devices']} random failed",
            _pct(failed["accuracy_mean"]),
            "",
            "",
            "",
            "",
            f"{failed['missing_groups_mean']:.3f}",
        ],
        phase("runtime, before kill", rt["before"]),
        phase("runtime, after kill", rt["after"]),
        *([phase("runtime, after healing", rt["healing"]["after_recovery"])] if rt.get("healing", {}).get("after_recovery") else []),
    ]


def _lost(groups: list[int]) -> str:
    if not groups:
        return "no group lost"
    return ("group " if len(groups) == 1 else "groups ") + ", ".join(map(str, groups)) + " lost"


def _caption(r: dict[str, Any]) -> str:
    s, rt = r["students"], r["runtime"]
    return (
        f"teacher and students in-process on {s['test_images']} test images ({s['random_failures']['trials']} random draws of failed devices);"
        f" runtime: {rt['queries']} test images through the source's {rt['api']} API, {rt['concurrency']} in flight, deadline"
        f" {1e3 * rt['deadline_s']:.0f} ms; SIGKILL {', '.join(rt['victims'])} after query {rt['kill_after_queries']} ({_lost(rt['lost_groups'])})."
        " 'with missing': queries answered with some group missing (zero-filled)." + _healing_caption(rt.get("healing"))
    )


def _healing_caption(h: dict[str, Any] | None) -> str:
    """The source's re-plan after the kill: when every group answered again, what the model predicted."""
    if not h or h.get("recovered_after_s") is None:
        return ""
    text = f" The source re-planned ({len(h['heal_replans'])} re-plan(s) after losses); the first query with every group present came back {1e3 * h['recovered_after_s']:.0f} ms after the kill."
    healed = h.get("after_recovery")
    if healed and h.get("predicted_complete_share") is not None:
        text += (
            f" After healing, {100 * healed['complete_share']:.1f} % of the queries had every group (the re-plan's outage model:"
            f" {100 * h['predicted_complete_share']:.1f} %)."
        )
    return text


# --------------------------------------------------------------------------------------------
# Plots and the Markdown report


def plots(out: Path, r: dict[str, Any], log: QueryLog) -> list[str]:
    """``latency.png`` and ``accuracy.png``; their names."""
    return [latency_plot(out, r, log), _accuracy_plot(out, r)]


def new_figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def latency_plot(out: Path, r: dict[str, Any], log: QueryLog) -> str:
    """Per-query latency in the order sent, the kill marked."""
    rt = r["runtime"]
    fig = new_figure((10, 4.5))
    ax = fig.add_subplot()
    index = np.arange(len(log.latency_s))
    complete = np.array([not m for m in log.missing])
    ms = 1e3 * log.latency_s
    ax.scatter(index[complete], ms[complete], s=3, color="tab:blue", label="every group answered")
    ax.scatter(index[~complete], ms[~complete], s=3, color="tab:orange", label="groups missing (zero-filled)")
    ax.axvline(log.kill_index - 0.5, color="tab:red", linestyle="--", label=f"SIGKILL {', '.join(rt['victims'])}")
    healing = rt.get("healing") or {}
    if healing.get("recovered_after_s") is not None:
        healed_at = log.kill_s + healing["recovered_after_s"]
        first = int(np.searchsorted(np.sort(log.sent_s[log.kill_index :]), healed_at)) + log.kill_index
        ax.axvline(
            first - 0.5,
            color="tab:green",
            linestyle="--",
            label=f"healed: every group back {1e3 * healing['recovered_after_s']:.0f} ms after the kill",
        )
    ax.axhline(1e3 * rt["deadline_s"], color="grey", linestyle=":", label=f"deadline {1e3 * rt['deadline_s']:.0f} ms")
    ax.set_ylim(0, 1.15 * max(float(ms.max()), 1e3 * rt["deadline_s"]))
    ax.set_xlabel("query (in the order sent)")
    ax.set_ylabel("latency at the client (ms)")
    ax.set_title(f"Per-query latency through the source's {rt['api']} API, {rt['concurrency']} in flight")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4, fontsize="small", markerscale=3)
    return save_png(fig, out / "latency.png")


def _accuracy_plot(out: Path, r: dict[str, Any]) -> str:
    """Accuracy and missing groups, before vs after the kill."""
    rt = r["runtime"]
    fig = new_figure((11, 4.5))
    left, right = fig.subplots(1, 2)
    before, after = rt["before"], rt["after"]
    bars = [
        ("teacher", r["teacher"]["test_accuracy"], "tab:grey"),
        ("students\nall groups\n(in-process)", r["students"]["accuracy"], "tab:green"),
        (
            f"students\n{r['students']['random_failures']['fail_devices']} random\nfailed\n(in-process)",
            r["students"]["random_failures"]["accuracy_mean"],
            "tab:olive",
        ),
        ("runtime\nbefore kill", before["accuracy"], "tab:blue"),
        ("runtime\nafter kill", after["accuracy"], "tab:red"),
    ]
    healed = (rt.get("healing") or {}).get("after_recovery")
    if healed:
        bars.append(("runtime\nafter healing", healed["accuracy"], "tab:purple"))
    positions = np.arange(len(bars))
    left.bar(positions, [100 * b[1] for b in bars], color=[b[2] for b in bars])
    for x, (_, value, _) in zip(positions, bars, strict=True):
        left.text(x, 100 * value, f"{100 * value:.1f}", ha="center", va="bottom", fontsize="small")
    prediction = rt.get("prediction")
    if prediction:  # the outage model's accuracy for the runtime's phases, and without the re-plan
        phases = ["before", "after"] + (["after_recovery"] if healed else [])
        at = positions[3 : 3 + len(phases)]
        left.scatter(
            at,
            [100 * prediction[k]["predicted_accuracy"] for k in phases],
            marker="_",
            s=500,
            color="black",
            zorder=3,
            label="outage model",
        )
        unhealed = prediction["after"].get("unhealed_accuracy")
        if unhealed is not None:
            left.hlines(
                100 * unhealed,
                at[1] - 0.4,
                at[-1] + 0.4,
                color="black",
                linestyle=":",
                label=f"model without the re-plan ({100 * unhealed:.1f})",
            )
        left.legend(fontsize="small", loc="upper right")
    left.set_xticks(positions, [b[0] for b in bars], fontsize="x-small")
    low = min(100 * b[1] for b in bars)
    left.set_ylim(max(0.0, low - 10), 100)
    left.set_ylabel("accuracy (%)")
    left.set_title(f"{r['dataset']['name']} test accuracy")
    groups = np.arange(r["plan"]["groups_count"])
    width = 0.4
    share_before = 100 * np.asarray(before["queries_missing_group"]) / max(1, before["queries"])
    share_after = 100 * np.asarray(after["queries_missing_group"]) / max(1, after["queries"])
    right.bar(groups - width / 2, share_before, width, color="tab:blue", label=f"before the kill ({before['queries']} queries)")
    right.bar(groups + width / 2, share_after, width, color="tab:red", label=f"after ({after['queries']} queries)")
    right.scatter(groups - width / 2, [100 * v for v in rt["expected_missing_share"]["before"]], marker="_", s=300, color="black", zorder=3)
    right.scatter(
        groups + width / 2,
        [100 * v for v in _after_model(rt)],
        marker="_",
        s=300,
        color="black",
        zorder=3,
        label="model: every replica's answer lost",
    )
    right.set_xticks(groups, [f"group {k}\n{len(g['devices'])} dev." for k, g in enumerate(r["plan"]["groups"])], fontsize="small")
    right.set_ylabel("queries with the group missing (%)")
    right.set_ylim(0, 105)
    right.set_title("Missing groups (emulated outages and killed devices)")
    right.legend(fontsize="small")
    return save_png(fig, out / "accuracy.png")


def save_png(fig, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path.name


def _markdown(r: dict[str, Any]) -> str:
    header = "| " + " | ".join(COLUMNS) + " |"
    lines = ["# rocoin end-to-end demo", ""]
    if r["dataset"]["notice"]:
        lines += [f"> {r['dataset']['notice']}", ""]
    lines += [header, "|---|---:|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(r)]
    lines += ["", _caption(r), "", "![latency](latency.png)", "", "![accuracy](accuracy.png)", ""]
    lines += _prediction_section(r) + _plan_section(r) + _settings_section(r) + _steps_section(r)
    return "\n".join(lines)


PHASES = (("before", "before the kill"), ("after", "after the kill"), ("after_recovery", "after healing"))


def _prediction_section(r: dict[str, Any]) -> list[str]:
    """Measured accuracy and complete share per phase beside the outage model's prediction."""
    prediction = r["runtime"].get("prediction")
    if not prediction:
        return []
    lines = [
        "## Measured vs the outage model",
        "",
        "| queries | n | acc. % measured (± 2 SE) | acc. % model | acc. % replayed | every group % measured (model) | acc. % model, unhealed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in PHASES:
        p = prediction[key]
        if not p.get("queries"):
            continue
        lines.append(
            f"| {label} | {p['queries']} | {_pct(p['accuracy'])} ± {200 * p['accuracy_se']:.2f} | {_pct(p['predicted_accuracy'])} |"
            f" {_pct(p['replayed_accuracy'])} | {100 * p['complete_share']:.1f} ({100 * p['predicted_complete_share']:.1f}) |"
            f" {_pct(p['unhealed_accuracy']) if key != 'before' else ''} |"
        )
    lines += [
        "",
        "Model: each query sees the assignment in force when it was sent (the bundle's plan, then each re-plan's), the killed"
        " devices dead; a group misses it when every live replica loses its answer (each with its outage probability), and the"
        " students' in-process accuracy on that image under every pattern of missing groups is weighed by the pattern's"
        " probability. Replayed: the students in-process with the groups each query actually missed (equal to the measured"
        " accuracy when the runtime answers as the students do). Unhealed: the bundle's plan without the killed devices, no re-plan.",
        "",
    ]
    verdict = _prediction_verdict(prediction.get("after_recovery") or {})
    return lines + ([verdict, ""] if verdict else [])


def _prediction_verdict(p: dict[str, Any]) -> str:
    """Whether the healed fleet's accuracy agrees with the model (within 2 standard errors of the
    measured share) and is above the unhealed prediction by more than that."""
    if not p.get("queries"):
        return ""
    margin = 2 * p["accuracy_se"]
    gap, gain = p["accuracy"] - p["predicted_accuracy"], p["accuracy"] - p["unhealed_accuracy"]
    agree = "agrees with" if abs(gap) <= margin else "differs from"
    above = "above" if gain > margin else "not clearly above"
    return (
        f"After healing: measured {_pct(p['accuracy'])} % {agree} the model's {_pct(p['predicted_accuracy'])} %"
        f" (difference {100 * gap:+.2f} points, 2 SE = {100 * margin:.2f}), and is {above} the unhealed prediction"
        f" {_pct(p['unhealed_accuracy'])} % ({100 * gain:+.2f} points)."
    )


def _after_model(rt: dict[str, Any]) -> list[float]:
    """Per group, P(missing) after the kill in the model: the assignments in force (re-plans
    included) when the demo predicted them, else the bundle's plan without the killed devices."""
    prediction = rt.get("prediction")
    return (
        prediction["after"]["missing_prob_mean"]
        if prediction and prediction["after"].get("queries")
        else rt["expected_missing_share"]["after"]
    )


def _plan_section(r: dict[str, Any]) -> list[str]:
    rt, plan = r["runtime"], r["plan"]
    lines = [
        "## Plan and missing groups",
        "",
        "| group | devices | filters | student | failure prob | latency s | missing before % (model) | missing after % (model) |",
        "|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    expected = {"before": rt["expected_missing_share"]["before"], "after": _after_model(rt)}
    for k, g in enumerate(plan["groups"]):
        lost = " (lost)" if k in rt["lost_groups"] else ""
        members = ", ".join(d + (" (killed)" if d in rt["victims"] else "") for d in g["devices"])
        shares = [
            f"{100 * rt[phase]['queries_missing_group'][k] / max(1, rt[phase]['queries']):.1f} ({100 * expected[phase][k]:.1f})"
            for phase in ("before", "after")
        ]
        lines.append(
            f"| {k}{lost} | {members} | {len(g['filters'])} | {g['student']} | {g['failure_prob']:.3g} | {g['latency_s']:.3g} | {shares[0]} | {shares[1]} |"
        )
    lines += ["", f"T = {plan['latency_s']:.3g} s, P(every group answers) = {plan['p_complete']:.3f}, ε = {plan['epsilon']}."]
    lines += [f"Device {u['id']} has no student: {u['reason']}." for u in plan["unassigned"]] + [""]
    return lines


def _settings_section(r: dict[str, Any]) -> list[str]:
    from rocoin.runtime.source.source import FAILURES_TO_MARK_DOWN, PROBE_INTERVAL_S

    rt, t, s, plan, data = r["runtime"], r["teacher"], r["students"], r["plan"], r["dataset"]
    before_q, after_q = rt["before"]["queries_per_s"], rt["after"]["queries_per_s"]
    return [
        "## Assumptions and settings",
        "",
        f"- Data: {data['name']}, {data['how']}; the teacher trains on {_count(data['train_images_teacher'])} images and the students on"
        f" {_count(data['train_images_students'])} of the training split (10 % of it held out for validation); {data['test_images']:,} test images.",
        f"- Teacher: {t['arch']}, {t['epochs']} epoch(s), AdamW (lr 0.003, cosine); its final conv layer has {t['filters']} filters"
        f" (the planner's knowledge); test accuracy {_pct(t['test_accuracy'])} %.",
        f"- Fleet: {r['fleet']['devices']} generated devices, heterogeneity level {r['fleet']['heterogeneity']} (Table IV),"
        f" mean success probability {r['fleet']['success_prob']}, seed {r['config']['seed']} (fleet.yaml).",
        f"- Students: catalog {', '.join(r['config']['students'])} measured with torch; RoCoIn plan with ε = {plan['epsilon']};"
        f" distilled for {s['epochs']} epoch(s), failure-aware; in-process accuracy on {s['test_images']:,} test images.",
        f"- Runtime: {plan['groups_count']} groups, one worker process per device and the source on loopback (127.0.0.1, ports"
        f" chosen by the OS); every worker emulates its profile — it answers after t(d, s, k) = c_s/f_d + 32·|P_k|/r_d"
        f" with f_d and r_d × {rt['speedup']:g}, and drops an answer with its outage probability (silently: the source waits"
        f" for the deadline); the source's deadline is {1e3 * rt['deadline_s']:.1f} ms"
        + (f" ({DEADLINE_FACTOR:g} × T / {rt['speedup']:g} + {1e3 * DEADLINE_SLACK_S:.0f} ms)" if r["config"]["deadline_s"] is None else "")
        + f". The source stops waiting for a device after {FAILURES_TO_MARK_DOWN} failed calls in a row (answers lost to an emulated"
        " outage count) but keeps sending it queries on trial and counts on it again from its first answer (or when its health"
        f" service, probed every {PROBE_INTERVAL_S:g} s, says SERVING); only queries sent in that window do not wait for it.",
        f"- Queries: the first {rt['queries']:,} test images{' (the whole test split)' if rt['queries'] == data['test_images'] else ''}, one image per KServe v2 REST call (`POST /v2/models/rocoin/infer`),"
        f" {rt['concurrency']} in flight, after {rt['warmup_queries']} unmeasured warm-up calls; latency is measured at the client.",
        f"- Failures: after query {rt['kill_after_queries']} (every earlier query answered; {rt['kill_at_s']:.1f} s into the run)"
        f" SIGKILL of {', '.join(rt['victims'])}: {rt['victims_reason']} ({_lost(rt['lost_groups'])}).",
        f"- Throughput: {before_q:.0f} queries/s before and {after_q:.0f} after, every process on the same machine"
        f" (cluster start-up {rt['startup_s']:.1f} s).",
        "",
    ]


def _steps_section(r: dict[str, Any]) -> list[str]:
    lines = [
        "## Steps",
        "",
        "| step | seconds | |",
        "|---|---:|---|",
    ]
    for name, step in r["steps"].items():
        lines.append(f"| {name} | {step['seconds']:.1f} | {'reused' if step.get('reused') else ''} |")
    machine = r["machine"]
    load = machine["load_average_1min"]
    lines += [
        "",
        f"Total: {r.get('total_s', 0.0):.1f} s on {machine['cpus']} CPUs (1-minute load average {load['start']} at the start,"
        f" {load['end']} at the end).",
        "Per-query rows: queries.csv; everything above: results.json.",
        "",
    ]
    return lines


def _count(value: int | None) -> str:
    return "all" if value is None else f"the first {value:,}"
