"""``rocoin demo`` end to end on scikit-learn's digits with tiny budgets: every step, a real
emulated cluster on loopback that loses a whole group part-way, the report, reuse on a rerun,
clean shutdown on SIGTERM, and one-line errors for bad options."""

from __future__ import annotations

import csv
import json
import os
import signal

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("aiohttp")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from conftest import write_fashion_mnist  # noqa: E402
from test_cli import bad, run  # noqa: E402

from rocoin.contracts.catalog import StudentSpec  # noqa: E402
from rocoin.contracts.plan import GroupPlan, Plan  # noqa: E402
from rocoin.experiments import demo  # noqa: E402
from rocoin.experiments.demo import load  # noqa: E402
from rocoin.pipeline import data as data_step  # noqa: E402

#: Small enough for a few seconds per step on 2 cores; 6 devices make 2-3 groups.
TINY = (
    "--dataset", "digits", "--teacher-arch", "wrn-10-1", "--teacher-epochs", 3, "--students", "wrn-10-1",
    "--distill-epochs", 3, "--devices", 6, "--queries", 60, "--concurrency", 4, "--kill", 3, "--deadline-s", 0.5,
)  # fmt: skip
OFFLINE_STEPS = ("teacher", "fleet", "activations", "catalog", "plan", "students", "bundle", "evaluation")


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "results"
    result = run("demo", "--output", out, *TINY)
    assert result.exit_code == 0, result.output
    return out, result


def test_the_demo_writes_a_report_with_sane_numbers(first_run):
    out, result = first_run
    for name in (
        "report.md",
        "results.json",
        "queries.csv",
        "latency.png",
        "accuracy.png",
        "plan.json",
        "fleet.yaml",
        "teacher.pt",
        "students.pt",
        "bundle/manifest.json",
    ):
        assert (out / name).is_file(), name
    for name in ("latency.png", "accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = json.loads((out / "results.json").read_text())
    assert r["dataset"]["name"] == "digits"
    chance = 0.1
    assert r["teacher"]["test_accuracy"] > 3 * chance
    assert r["students"]["accuracy"] > 2 * chance
    assert r["runtime"]["before"]["accuracy"] > 2 * chance
    assert r["runtime"]["before"]["queries"] + r["runtime"]["after"]["queries"] == 60
    assert r["runtime"]["kill_after_queries"] == 24  # 40 % of 60
    # the printed table and the Markdown report carry the same rows
    for label in ("teacher wrn-10-1", "students, all groups", "runtime, before kill", "runtime, after kill"):
        assert label in result.stdout
        assert label in (out / "report.md").read_text()
    assert "![latency](latency.png)" in (out / "report.md").read_text()


def test_a_group_lost_to_the_kill_is_healed_by_a_re_plan(first_run):
    out, _ = first_run
    r = json.loads((out / "results.json").read_text())
    rt = r["runtime"]
    assert len(rt["victims"]) == 3
    assert rt["lost_groups"], "with groups of at most 3 devices, killing 3 must empty one"
    lost = set(rt["lost_groups"])
    for k in lost:
        assert set(r["plan"]["groups"][k]["devices"]) <= set(rt["victims"])
    rows = list(csv.DictReader((out / "queries.csv").open()))
    after = [row for row in rows if row["phase"] == "after"]
    assert len(after) == rt["after"]["queries"] > 0
    healing = rt["healing"]
    # the source saw the group's last replica go, re-planned at once and moved a survivor into it
    assert any(m["to"] in lost for record in healing["heal_replans"] for m in record["moves"]), healing["heal_replans"]
    assert 0 < healing["recovered_after_s"] < 10
    healed_at = rt["kill_at_s"] + healing["recovered_after_s"]
    late = [row for row in after if float(row["sent_s"]) >= healed_at]
    assert late and abs(healing["after_recovery"]["queries"] - len(late)) <= 1  # sent_s is rounded in the CSV
    # from then on the lost groups answer again (missing only when an emulated outage drops the new replica's answer)
    still = sum(lost <= {int(k) for k in row["missing_groups"].split()} for row in late)
    assert still < len(late)
    assert 0 <= healing["predicted_complete_share"] <= 1
    # the outage model's prediction beside the measurement: before the kill it is the plan's own P(every
    # group answers); the students replayed with each query's missing groups answer as the runtime did
    prediction = rt["prediction"]
    history = rt["membership"]["history"]
    if all("no live replica" in h["trigger"] or h["trigger"].startswith("gone") for h in history):
        # no re-plan before the kill (one for a group above ε can come first on a loaded machine)
        assert prediction["before"]["predicted_complete_share"] == pytest.approx(r["plan"]["p_complete"], rel=1e-6)
    assert 0 < prediction["before"]["predicted_complete_share"] <= 1
    healed = prediction["after_recovery"]
    assert healed["queries"] == healing["after_recovery"]["queries"]
    assert healed["accuracy"] == pytest.approx(healing["after_recovery"]["accuracy"])
    assert abs(healed["replayed_accuracy"] - healed["accuracy"]) <= 2 / healed["queries"]  # ONNX vs torch: a tie at most
    assert healed["predicted_complete_share"] > 0 and prediction["after"]["unhealed_accuracy"] <= 1
    assert "## Measured vs the outage model" in (out / "report.md").read_text()
    assert (
        "every group back" in (out / "report.md").read_text() or "first query with every group present" in (out / "report.md").read_text()
    )
    # the cluster is gone: every worker and the source stopped, no state left behind
    assert not (out / "cluster" / "cluster.json").exists()
    assert all(_dead(pid) for pid in rt["pids"].values())


def test_sigterm_during_the_queries_stops_every_process(first_run, monkeypatch):
    out, _ = first_run

    running: list[dict] = []

    async def interrupted(*args, **kwargs):
        running.append(json.loads((out / "cluster" / "cluster.json").read_text()))
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the demo")

    monkeypatch.setattr(load, "send_queries", interrupted)
    config = demo.demo_config(
        output=out, dataset="digits", teacher_arch="wrn-10-1", teacher_epochs=3, students=("wrn-10-1",), distill_epochs=3,
        devices=6, queries=60, concurrency=4, kill=3, deadline_s=0.5,
    )  # fmt: skip
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(config, say=lambda text: None)
    assert signal.getsignal(signal.SIGTERM) is previous
    assert not (out / "cluster" / "cluster.json").exists()
    pids = [m["pid"] for m in running[0]["devices"] + [running[0]["source"]]]
    assert len(pids) == 7  # six workers and the source
    assert all(_dead(pid) for pid in pids)


def test_a_rerun_reuses_every_step_and_a_changed_option_redoes_what_follows(first_run):
    out, _ = first_run
    again = run("demo", "--output", out, *TINY)
    assert again.exit_code == 0, again.output
    for step in OFFLINE_STEPS:
        assert f"reusing {step}" in again.stderr, step
    r = json.loads((out / "results.json").read_text())
    assert all(r["steps"][step]["reused"] for step in OFFLINE_STEPS)
    # the rerun's cluster starts from the bundle's plan, not from the assignment the first run healed
    # into: no re-plan before the kill, and the kill empties the group it names again
    history = r["runtime"]["membership"]["history"]
    assert history and not any("joined" in h["trigger"] for h in history), history
    assert r["runtime"]["healing"]["heal_replans"][0]["trigger"].startswith("group ")  # the lost group, at once

    changed = run("demo", "--output", out, *TINY, "--distill-epochs", 2)
    assert changed.exit_code == 0, changed.output
    steps = json.loads((out / "results.json").read_text())["steps"]
    assert [s for s in OFFLINE_STEPS if steps[s]["reused"]] == ["teacher", "fleet", "activations", "catalog", "plan"]
    assert "students: its inputs changed" in changed.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--kill", 0), "--kill = 0"),
        (("--kill", 6, "--devices", 6), "--kill = 6: expected fewer than --devices = 6"),
        (("--kill-after", 1.5), "--kill-after = 1.5"),
        (("--teacher-epochs", 0), "--teacher-epochs = 0"),
        (("--teacher-arch", "resnet-50"), "--teacher-arch = 'resnet-50'"),
        (("--students", "wrn-16-1,wrn-7-1"), "--students = 'wrn-16-1,wrn-7-1'"),
        (("--dataset", "cifar10"), "--dataset = 'cifar10'"),
        (("--queries", 1), "--queries = 1"),
        (("--speedup", -2), "--speedup = -2"),
        (("--heterogeneity", 9), "--heterogeneity = 9"),
    ],
)
def test_bad_options_get_one_line_and_write_nothing(tmp_path, args, needle):
    out = tmp_path / "demo"
    bad(run("demo", "--output", out, *args), needle)
    assert not out.exists()


def test_an_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("x")
    bad(run("demo", "--output", tmp_path / "taken"), "--output")


def test_every_demo_setting_is_a_cli_option():
    """The options are built from DemoConfig's fields (defaults and help included); each field
    but the download URL (a test hook) is one."""
    import typer

    from rocoin.cli.main import app

    command = typer.main.get_command(app).commands["demo"]
    options = {param.name for param in command.params}
    assert set(demo.DemoConfig.model_fields) - {"download_url"} == options


# --- which devices die ---------------------------------------------------------------------------


def _plan(groups: list[list[str]]) -> Plan:
    filters = iter(range(100))
    return Plan(
        scheme="rocoin",
        epsilon=0.05,
        num_filters=len(groups),
        groups=[GroupPlan(devices=d, filters=[next(filters)], student="s", failure_prob=0.01, latency_s=0.1) for d in groups],
        latency_s=0.1,
        p_complete=0.9,
        catalog={"s": StudentSpec(flops=1e6, memory_bytes=1000, params=10, out_dim=4)},
    )


def test_the_kill_empties_the_smallest_group_and_spares_the_others():
    victims = demo.choose_victims(_plan([["a1", "a2"], ["b1", "b2", "b3"], ["c1", "c2"]]), 3)
    assert victims.lost_groups == [0]
    assert victims.devices[:2] == ["a1", "a2"] and victims.devices[2] in ("b1", "b2", "b3")
    victims = demo.choose_victims(_plan([["a1", "a2"], ["b1", "b2", "b3"]]), 1)
    assert victims.lost_groups == [] and len(victims.devices) == 1
    assert "none can be lost" in victims.reason


# --- where the data comes from -------------------------------------------------------------------


@pytest.fixture
def no_fashion_mnist(tmp_path, monkeypatch):
    import rocoin.data.datasets as datasets

    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIRS", (tmp_path / "system",))
    empty = tmp_path / "empty"
    empty.mkdir()
    return tmp_path, str(empty)


def test_missing_fashion_mnist_falls_back_to_digits_with_a_notice(no_fashion_mnist):
    _, empty = no_fashion_mnist
    said: list[str] = []
    choice = demo.resolve_dataset("fashion-mnist", empty, install=False, download_url="http://127.0.0.1:9/", say=said.append)
    assert choice.name == "digits" and choice.notice and "NOTICE" in choice.notice
    assert any("download failed" in line for line in said)


def test_apt_get_installs_fashion_mnist_when_it_can(no_fashion_mnist, monkeypatch):
    root, empty = no_fashion_mnist
    commands: list[list[str]] = []

    def fake_apt(command, say):
        commands.append(command)
        if command[:2] == ["apt-get", "install"] and ["apt-get", "update"] in commands:
            (root / "system").mkdir()
            write_fashion_mnist(root / "system", n_train=40, n_test=20)  # what the package puts there
            return 0
        return 0 if command[:2] == ["apt-get", "update"] else 100

    monkeypatch.setattr(data_step, "_can_apt_get", lambda: True)
    monkeypatch.setattr(data_step, "_run_shown", fake_apt)
    choice = demo.resolve_dataset("fashion-mnist", empty, download=False, say=lambda text: None)
    assert commands == [
        ["apt-get", "install", "-y", "dataset-fashion-mnist"],
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "dataset-fashion-mnist"],
    ]
    assert choice.name == "fashion-mnist" and "apt-get" in choice.how and choice.notice is None


def test_fashion_mnist_in_the_data_dir_is_used(tmp_path):
    write_fashion_mnist(tmp_path, n_train=40, n_test=20)
    choice = demo.resolve_dataset("fashion-mnist", str(tmp_path), install=False, download=False)
    assert choice == demo.DataChoice("fashion-mnist", str(tmp_path), f"found in {tmp_path}")


def test_the_detection_demo_serves_boxes_through_the_cluster_and_heals(tmp_path):
    """``rocoin demo --task detection``: scenes of digits, a tiny detector, its students in a
    detection bundle on the emulated cluster; the KServe answers are scored with mAP per phase."""
    out = tmp_path / "detection"
    options = (
        "--dataset", "digits", "--teacher-arch", "wrn-10-1", "--teacher-epochs", 2, "--students", "wrn-10-1", "--distill-epochs", 1,
        "--max-train-images", 256, "--devices", 4, "--queries", 40, "--concurrency", 4, "--kill", 2, "--deadline-s", 0.5,
    )  # fmt: skip
    result = run("demo", "--task", "detection", "--output", out, *options)
    assert result.exit_code == 0, result.output
    for name in ("report.md", "results.json", "latency.png", "detections.png"):
        assert (out / name).stat().st_size > 0, name
    r = json.loads((out / "results.json").read_text())
    rt = r["runtime"]
    assert r["data"]["train"] == 256 and rt["queries"] == 40 and rt["api"] == "KServe v2 REST"
    assert rt["before"]["queries"] + rt["after"]["queries"] == 40
    for phase in ("before", "after"):
        assert 0 <= rt["map_50_pct"][phase] <= 100
        assert rt[phase]["latency_ms"]["p99"] < 1e3 * rt["deadline_s"] + 1000  # answered by the deadline (+ loaded-machine slack)
    assert r["plan"]["kib_sent_per_device"] > 0 and r["plan"]["cells"] == [8, 8]
    report = (out / "report.md").read_text()
    assert "mAP@0.5" in report
    # per device: the latency of its answers and the bytes both ways; a survivor's answers are
    # feature maps of its group's channels at 8 x 8 cells, float32
    channels = {k: len(g["filters"]) for k, g in enumerate(r["plan"]["groups"])}
    survivors = [d for d in rt["devices"] if d["traffic"] is not None and d["answers"]]
    assert survivors and "| device | group | answers | p50 ms |" in report
    for d in survivors:
        t = d["traffic"]
        assert t["kib_received"] == pytest.approx(d["answers"] * channels[d["group"]] * 8 * 8 * 4 / 1024), d
        assert t["kib_sent"] > 0 and 0 < t["answer_ms_p50"] <= t["answer_ms_p99"], d
        assert f" | {d['group']} | {d['answers']} |" in report and f"| {d['device']}" in report
    checkpoints = sorted(p.name for p in out.glob("detection-*.pt"))
    again = run("demo", "--task", "detection", "--output", out, *options)  # a rerun reuses them and replaces the bundle
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in out.glob("detection-*.pt")) == checkpoints and len(checkpoints) == 2
