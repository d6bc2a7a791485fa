"""`rocoin experiment`: every table and figure at its --quick size (the real planner, distillation
and simulator on scikit-learn's digits), the files each one leaves, the shared cache, and bad input."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rocoin.cli.main import app
from rocoin.contracts.errors import RocoinError
from rocoin.experiments.paper import EXPERIMENTS
from rocoin.experiments.report import ExperimentResult, markdown_table, to_csv
from rocoin.experiments.setup import make_setup
from rocoin.experiments.workspace import Workspace, assumed_outage_fleet
from rocoin.planning import make_plan

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rows_of(folder: Path, name: str) -> list[dict[str, str]]:
    with open(folder / name / f"{name}.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("experiments")
    started = time.perf_counter()
    result = runner.invoke(app, ["experiment", "all", "--quick", "--dataset", "digits", "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out, time.perf_counter() - started


def test_every_experiment_writes_csv_json_png_and_markdown(experiments):
    out, _ = experiments
    report = (out / "report.md").read_text()
    for name in EXPERIMENTS:
        folder = out / name
        assert (folder / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
        data = json.loads((folder / f"{name}.json").read_text())
        assert data["rows"] and data["caption"] and data["setup"]["size"] == "quick"
        assert len(rows_of(out, name)) == len(data["rows"])
        assert f"({name}/{name}.png)" in report  # the index links each figure
        assert "Compared with the paper" in (folder / f"{name}.md").read_text() or name == "fig2"


def test_table2_lists_the_teacher_and_every_scheme_with_sane_accuracy(experiments):
    out, _ = experiments
    rows = rows_of(out, "table2")
    assert [r["scheme"] for r in rows] == ["Teacher", "RoCoIn", "RoCoIn-G", "HetNoNN", "NoNN"]
    for r in rows:
        assert 0.0 <= float(r["accuracy_pct"]) <= 100.0
        assert int(r["params_per_device"]) > 0
    setup = make_setup("quick")
    nonn = next(r for r in rows if r["scheme"] == "NoNN")
    assert int(nonn["groups"]) == setup.devices  # NoNN: one partition per device, no replicas


def test_failure_curves_cover_zero_to_half_the_fleet_for_every_scheme(experiments):
    out, _ = experiments
    setup = make_setup("quick")
    for name in ("fig5", "fig6"):
        rows = rows_of(out, name)
        for scheme in ("RoCoIn", "RoCoIn-G", "HetNoNN", "NoNN"):
            failed = [int(r["failed_devices"]) for r in rows if r["scheme"] == scheme]
            assert failed == setup.fail_counts
        # NoNN has no replicas: every failed device is a missing group
        nonn = [(int(r["failed_devices"]), float(r["missing_groups_mean"])) for r in rows if r["scheme"] == "NoNN"]
        assert all(missing == failed for failed, missing in nonn)
    # Fig. 5: the paper's setting (no dropped slots) plus failure-aware training as extra series.
    fig5 = {r["scheme"] for r in rows_of(out, "fig5")}
    assert fig5 == {"RoCoIn", "RoCoIn-G", "HetNoNN", "NoNN", "RoCoIn + FA", "NoNN + FA"}
    assert not any("+ FA" in r["scheme"] for r in rows_of(out, "fig6"))
    # the paper's claim is checked against its baselines, never against RoCoIn-G (RoCoIn with another matching)
    for name in ("fig5", "fig6"):
        findings = json.loads((out / name / f"{name}.json").read_text())["findings"]
        claim = next(f for f in findings if f.startswith("Paper: RoCoIn degrades least"))
        assert "the best baseline, NoNN" in claim or "the best baseline, HetNoNN" in claim


def test_training_curves_have_one_point_per_epoch_and_scheme(experiments):
    out, _ = experiments
    rows = rows_of(out, "fig2")
    setup = make_setup("quick")
    assert len(rows) == 4 * setup.student_epochs
    assert all(float(r["loss_total"]) > 0 for r in rows)


def test_fig3_has_both_panels_and_fig7_every_heterogeneity_level(experiments):
    out, _ = experiments
    setup = make_setup("quick")
    fig3 = rows_of(out, "fig3")
    assert len([r for r in fig3 if r["panel"] == "a"]) == len(setup.epsilons) * len(setup.success_probs)
    assert {float(r["epsilon"]) for r in fig3 if r["panel"] == "b"} <= set(setup.epsilons)
    for r in (r for r in fig3 if r["panel"] == "a" and r["mean_latency_s"]):
        assert 0 < float(r["planned_latency_s"]) and float(r["mean_latency_s"]) <= float(r["deadline_s"])
    fig7 = rows_of(out, "fig7")
    assert sorted({int(r["level"]) for r in fig7}) == list(range(6))
    assert {r["scheme"] for r in fig7} == {"rocoin", "rocoin-g", "nonn", "hetnonn", "rocoin-minmax"}
    for r in fig7:  # the paper's quantity beside planned T; a missing group waits at most until the deadline
        assert float(r["mean_latency_s"]) <= float(r["deadline_s"]) and float(r["planned_latency_s"]) > 0
    fig4 = rows_of(out, "fig4")
    for r in fig4:  # replicas: all deployed students cost at least the distinct ones
        assert float(r["total_mflops"]) >= float(r["valid_mflops"]) > 0
        assert float(r["ncut"]) < min(float(r["ncut_random"]), float(r["ncut_contiguous"]))


def test_scale_plans_every_fleet_size(experiments):
    out, _ = experiments
    rows = rows_of(out, "scale")
    assert sorted({int(r["devices"]) for r in rows}) == list(make_setup("quick").scale_devices)
    assert all(0.0 <= float(r["p_all_groups"]) <= 1.0 for r in rows)


def test_a_rerun_reuses_the_trained_students(experiments):
    out, first_s = experiments
    cache = sorted((out / "cache").glob("students-*.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in cache}
    started = time.perf_counter()
    result = runner.invoke(app, ["experiment", "table2", "fig5", "--quick", "--dataset", "digits", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in cache} == stamps  # nothing retrained
    assert sorted((out / "cache").glob("students-*.pt")) == cache
    assert time.perf_counter() - started < first_s


def test_the_cache_key_follows_what_changes_the_students(experiments):
    out, _ = experiments
    ws = Workspace(make_setup("quick", dataset="digits"), out / "cache")
    more_epochs = Workspace(make_setup("quick", dataset="digits", student_epochs=2), out / "cache")
    fleet = ws.fleet()
    plan = make_plan(fleet, ws.filter_weights(), ws.catalog(), scheme="rocoin", epsilon=0.05)
    path, _ = ws.students_path(plan, failure_aware=True)
    assert path.exists()  # the experiments trained exactly this
    assert ws.students_path(plan, failure_aware=True)[0] == path
    assert ws.students_path(plan, failure_aware=False)[0] != path
    assert more_epochs.students_path(plan, failure_aware=True)[0] != path
    other = make_plan(fleet, ws.filter_weights(), ws.catalog(), scheme="rocoin", epsilon=0.2)
    assert ws.students_path(other, failure_aware=True)[0] != path
    unknown = assumed_outage_fleet(fleet, 0.2)  # Fig. 6: the planner sees one assumed outage
    assert {d.outage for d in unknown.devices} == {0.2}
    assert [d.flops for d in unknown.devices] == [d.flops for d in fleet.devices]


def test_plans_with_the_same_groups_share_students_unless_trained_failure_aware(experiments):
    from rocoin.experiments.common import same_assignment, trained_runs

    out, _ = experiments
    ws = Workspace(make_setup("quick", dataset="digits"), out / "cache")
    known = {run.scheme: run for run in trained_runs(ws, known=True, train=False)}
    unknown = trained_runs(ws, known=False, train=False)
    assert {run.scheme for run in unknown} == set(known)  # all cached: Fig. 6 trained nothing of its own
    for run in unknown:
        twin = known[run.trained_for.scheme]
        if run.shares_students:
            assert same_assignment(run.plan, twin.plan) and run.trained_for == twin.plan
            assert run.students.key == twin.students.key and run.evaluation == twin.evaluation
            assert run.plan != twin.plan  # reported with its own (assumed) failure probabilities
        else:
            assert run.trained_for == run.plan and not same_assignment(run.plan, twin.plan)
            assert run.students.key != twin.students.key
    assert known["nonn"].shares_students is False
    assert next(run for run in unknown if run.scheme == "nonn").shares_students  # no replicas: outages change nothing
    if same_assignment(known["rocoin"].plan, known["rocoin-g"].plan):
        assert known["rocoin-g"].students.key == known["rocoin"].students.key
        assert "RoCoIn-G (from RoCoIn's known-outage plan)" in (out / "fig5" / "fig5.md").read_text()
    fa = trained_runs(ws, known=True, schemes=("rocoin",), failure_aware=True, train=False)
    assert fa and fa[0].students.key != known["rocoin"].students.key and not fa[0].shares_students


def test_unknown_experiment_and_bad_settings_give_one_line_and_exit_2(tmp_path):
    for args, needle in (
        (["experiment", "fig9", "--quick"], "fig9"),
        (["experiment", "fig4", "--size", "huge"], "huge"),
        (["experiment", "fig4", "--quick", "--trials", "0"], "trials"),
        (["experiment", "fig4", "--quick", "--device", "tpu"], "tpu"),
    ):
        result = runner.invoke(app, [*args, "--output", str(tmp_path / "x")])
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x" / "report.md").exists()


def test_compute_device_names(monkeypatch):
    import torch

    from rocoin.distillation.training import compute_device

    assert compute_device(None).type == "cpu"
    assert compute_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RocoinError, match="no CUDA"):
            compute_device("cuda")
    with pytest.raises(RocoinError, match="expected cpu"):
        compute_device("tpu")


def test_csv_and_markdown_keep_every_column_of_mixed_rows():
    rows = [{"a": 1, "b": 2.5}, {"a": 2, "c": "x"}]
    assert to_csv(rows).splitlines() == ["a,b,c", "1,2.5,", "2,,x"]
    table = markdown_table(rows)
    assert table[0] == "| a | b | c |" and table[3] == "| 2 |  | x |"


def test_a_result_is_written_atomically_with_its_caption(tmp_path):
    def plot(fig):
        fig.subplots(1, 1).plot([0, 1], [1, 0])

    result = ExperimentResult("demo", "A title", "The assumptions.", [{"x": 1}], plot, ["a finding"])
    paths = result.write(tmp_path / "demo", {"size": "quick"}, 0.5)
    assert set(paths) == {"csv", "json", "png", "md"}
    md = paths["md"].read_text()
    assert "*The assumptions.*" in md and "- a finding" in md
    assert not list(tmp_path.rglob("*.tmp*"))


def test_a_setting_with_no_feasible_fleet_is_written_as_json_null(tmp_path):
    from rocoin.experiments.report import ExperimentResult

    result = ExperimentResult(
        name="x", title="x", caption="", rows=[{"level": 1, "latency_s_mean": float("nan")}], plot=lambda figure: None
    )
    paths = result.write(tmp_path, {}, 0.0)
    assert json.loads(paths["json"].read_text())["rows"][0]["latency_s_mean"] is None


def test_table3_says_which_configuration_it_ran(experiments):
    out, _ = experiments
    data = json.loads((out / "table3" / "table3.json").read_text())
    assert "CIFAR-100 is not present here" in data["caption"]  # no CIFAR-100 files in the test's data folder
    assert {r["scheme"] for r in data["rows"]} >= {"Teacher", "RoCoIn", "RoCoIn-G", "NoNN", "HetNoNN"}


def test_table5_compares_the_detector_with_its_bc_and_bnc_students(experiments):
    out, _ = experiments
    data = json.loads((out / "table5" / "table5.json").read_text())
    rows = data["rows"]
    assert [(r["scheme"], r["split"], r["devices"]) for r in rows[:4]] == [
        ("Teacher", "", 1),
        ("RoCoIn BC", "backbone", 2),
        ("RoCoIn BNC", "neck", 2),
        ("RoCoIn BNC", "neck", 3),
    ]
    assert {r["scheme"] for r in rows[4:]} == {"NoNN BC (ours)", "RoCoIn BC + FA (ours)", "RoCoIn BC, replicated (ours)"}
    for r in rows[1:]:
        assert r["groups"] == r["devices"] or "replicated" in r["scheme"]  # K = N, the paper's rows
        assert 0 <= r["map_50_pct"] <= 100 and 0 <= r["map_50_one_failed_pct"] <= 100 and r["kib_sent_per_device"] > 0
        assert r["params_per_device"] < rows[0]["params_per_device"]  # every student smaller than the teacher
    assert "digits-scenes" in data["caption"] and "Paper (VisDrone)" in data["findings"][0]


def test_table5_runs_on_a_users_visdrone_files(tmp_path):
    """A user's own detection data: a VisDrone-DET folder (RGB JPEGs, annotation text files) is
    letterboxed and runs through the same Table V."""
    import numpy as np
    from PIL import Image

    from rocoin.data.detection import write_visdrone_annotations

    rng = np.random.default_rng(0)
    root = tmp_path / "visdrone"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i in range(112):  # the quick size's 64 training, 16 validation and 32 test images
        image = rng.integers(0, 40, size=(48, 64, 3), dtype=np.uint8)
        boxes, labels = [], []
        for _ in range(int(rng.integers(1, 4))):
            w, h, label = int(rng.integers(10, 20)), int(rng.integers(10, 20)), int(rng.integers(0, 3))
            x, y = int(rng.integers(0, 64 - w)), int(rng.integers(0, 48 - h))
            image[y : y + h, x : x + w, label] = 230  # a red, green or blue object
            boxes.append([x, y, x + w, y + h])
            labels.append(label)
        Image.fromarray(image).save(root / "images" / f"{i:07d}.jpg", quality=95)
        write_visdrone_annotations(root / "annotations" / f"{i:07d}.txt", np.array(boxes, dtype=np.float32), np.array(labels))
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["experiment", "table5", "--quick", "--detection-data", "visdrone", "--data-dir", str(tmp_path), "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "table5" / "table5.json").read_text())
    assert data["setup"]["detection_data"] == "visdrone" and "real data" in data["caption"]
    assert len(data["rows"]) == 7 and all(0 <= r["map_50_pct"] <= 100 for r in data["rows"])
