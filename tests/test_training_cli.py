"""The training pipeline from the command line on tiny generated data: teacher -> activations ->
plan -> distill -> evaluate, plus its bad-input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from conftest import write_fashion_mnist  # noqa: E402
from test_cli import bad, run  # noqa: E402


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "data"
    data.mkdir()
    write_fashion_mnist(data, n_train=700, n_test=200)
    common = ["--dataset", "fashion-mnist", "--data-dir", data]
    result = run("train-teacher", *common, "--arch", "wrn-10-1", "--epochs", 3, "--batch-size", 32, "-o", root / "teacher.pt")
    assert result.exit_code == 0, result.output
    assert run("activations", "--teacher", root / "teacher.pt", "-o", root / "act.npy").exit_code == 0
    assert run("fleet", "generate", "--devices", 6, "--heterogeneity", 3, "--seed", 1, "-o", root / "fleet.yaml").exit_code == 0
    # The smallest WRN keeps the test fast; the catalog is measured like a user's would be.
    assert run("catalog", "--input-shape", "1x28x28", "--students", "wrn-10-1", "-o", root / "catalog.json").exit_code == 0
    result = run("plan", root / "fleet.yaml", "--activations", root / "act.npy", "--catalog", root / "catalog.json", "--epsilon", 0.1, "-o", root / "plan.json")
    assert result.exit_code == 0, result.output
    return root


def test_teacher_learns_and_activations_fit_the_planner(pipeline):
    teacher = json.loads(run("evaluate", "--teacher", pipeline / "teacher.pt", "--json").stdout)
    assert teacher["accuracy"] > 0.5  # ten learnable classes after three short epochs
    act = np.load(pipeline / "act.npy")
    assert act.shape == (70, 64) and act.dtype == np.float32 and (act >= 0).all()  # 10 % validation, F = 64 for WRN-10-1


def test_distill_and_evaluate_with_failures(pipeline):
    result = run("distill", "--teacher", pipeline / "teacher.pt", "--plan", pipeline / "plan.json", "--epochs", 5, "--batch-size", 32, "-o", pipeline / "students.pt")
    assert result.exit_code == 0, result.output
    assert "teacher outputs cached" in result.stdout  # Fashion-MNIST has no augmentation
    result = run("evaluate", "--students", pipeline / "students.pt", "--fail-devices", "0,6", "--trials", 5, "--json")
    data = json.loads(result.stdout)
    assert data["accuracy"] > 0.6
    rows = {r["fail_devices"]: r for r in data["failures"]}
    assert rows[0]["accuracy_mean"] == pytest.approx(data["accuracy"])
    assert rows[6]["missing_groups_mean"] == data["groups"]  # every device failed: every group missing


def test_training_bad_inputs(pipeline, tmp_path):
    plan = json.loads((pipeline / "plan.json").read_text())
    other = dict(plan, num_filters=65)
    other["groups"] = [dict(g) for g in plan["groups"]]
    other["groups"][0]["filters"] = plan["groups"][0]["filters"] + [64]
    (tmp_path / "plan65.json").write_text(json.dumps(other))
    out = tmp_path / "students.pt"
    bad(run("distill", "--teacher", pipeline / "teacher.pt", "--plan", tmp_path / "plan65.json", "-o", out), "num_filters = 65 but the teacher wrn-10-1 has 64")
    bad(run("distill", "--teacher", pipeline / "plan.json", "--plan", pipeline / "plan.json", "-o", out), "weights_only=True")
    bad(run("evaluate", "--students", pipeline / "teacher.pt"), "expected a rocoin-students checkpoint")
    broken = tmp_path / "broken"
    broken.mkdir()
    write_fashion_mnist(broken, n_train=20, n_test=10)
    (broken / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b truncated")
    bad(run("train-teacher", "--dataset", "fashion-mnist", "--data-dir", broken, "--epochs", 1, "-o", out), "train-images-idx3-ubyte.gz")
    bad(run("train-teacher", "--dataset", "imagenet", "-o", out), "imagenet")
    bad(run("activations", "-o", out), "give --teacher")
    assert not out.exists()
