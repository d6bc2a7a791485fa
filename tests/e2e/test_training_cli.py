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
    result = run(
        "plan",
        root / "fleet.yaml",
        "--activations",
        root / "act.npy",
        "--catalog",
        root / "catalog.json",
        "--epsilon",
        0.1,
        "-o",
        root / "plan.json",
    )
    assert result.exit_code == 0, result.output
    return root


def test_teacher_learns_and_activations_fit_the_planner(pipeline):
    teacher = json.loads(run("evaluate", "--teacher", pipeline / "teacher.pt", "--json").stdout)
    assert teacher["accuracy"] > 0.5  # ten learnable classes after three short epochs
    act = np.load(pipeline / "act.npy")
    assert act.shape == (70, 64) and act.dtype == np.float32 and (act >= 0).all()  # 10 % validation, F = 64 for WRN-10-1


def test_distill_and_evaluate_with_failures(pipeline):
    result = run(
        "distill",
        "--teacher",
        pipeline / "teacher.pt",
        "--plan",
        pipeline / "plan.json",
        "--epochs",
        5,
        "--batch-size",
        32,
        "-o",
        pipeline / "students.pt",
    )
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
    bad(
        run("distill", "--teacher", pipeline / "teacher.pt", "--plan", tmp_path / "plan65.json", "-o", out),
        "num_filters = 65 but the teacher wrn-10-1 has 64",
    )
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


def test_distill_a_baseline_plan(pipeline):
    assert (
        run(
            "plan",
            pipeline / "fleet.yaml",
            "--activations",
            pipeline / "act.npy",
            "--catalog",
            pipeline / "catalog.json",
            "--scheme",
            "nonn",
            "-o",
            pipeline / "nonn.json",
        ).exit_code
        == 0
    )
    result = run(
        "distill", "--teacher", pipeline / "teacher.pt", "--plan", pipeline / "nonn.json", "--epochs", 1, "-o", pipeline / "nonn.pt"
    )
    assert result.exit_code == 0, result.output
    assert "nonn students (6 groups)" in result.stdout
    data = json.loads(run("evaluate", "--students", pipeline / "nonn.pt", "--fail-devices", 6, "--trials", 2, "--json").stdout)
    assert data["failures"][0]["missing_groups_mean"] == 6


def test_a_checkpoint_of_another_architecture_is_refused(pipeline, tmp_path):
    import torch

    payload = torch.load(pipeline / "students.pt", weights_only=True)
    metadata = json.loads(payload["metadata"])
    for group in metadata["plan"]["groups"]:
        group["student"] = "wrn-16-1"
    metadata["plan"]["catalog"] = {"wrn-16-1": next(iter(metadata["plan"]["catalog"].values()))}
    payload["metadata"] = json.dumps(metadata)
    torch.save(payload, tmp_path / "lying.pt")
    bad(run("evaluate", "--students", tmp_path / "lying.pt"), "the weights do not fit the students of its plan (wrn-16-1")


def crash_as(prefix: str, seen: list[str] | None = None):
    """A progress callback that stops the training (Ctrl-C) as the task named ``prefix…`` starts;
    it lists every task it is told of in ``seen``."""
    from contextlib import contextmanager

    from rocoin.contracts.progress import log_progress

    @contextmanager
    def progress(label, total):
        if seen is not None:
            seen.append(label)
        if label.startswith(prefix):
            raise KeyboardInterrupt
        with log_progress(label, total) as advance:
            yield advance

    return progress


def interrupt_teacher_in_epoch_two(config, path) -> None:
    """Train the teacher of ``config`` to ``path`` and stop it (Ctrl-C) as epoch 2 starts."""
    from rocoin.distillation.teacher import train_teacher

    with pytest.raises(KeyboardInterrupt):
        train_teacher(config, path, progress=crash_as("teacher epoch 2/"))


def test_an_interrupted_teacher_run_resumes(tmp_path, monkeypatch):
    from rocoin.distillation.teacher import TeacherConfig, load_teacher, train_teacher
    from rocoin.distillation.training import DataConfig

    write_fashion_mnist(tmp_path, n_train=200, n_test=50)
    config = TeacherConfig(arch="wrn-10-1", data=DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path)), epochs=3, batch_size=50)
    interrupt_teacher_in_epoch_two(config, tmp_path / "teacher.pt")
    assert (tmp_path / "teacher.pt.resume").exists() and load_teacher(tmp_path / "teacher.pt").metadata["epoch"] == 1
    summary = train_teacher(config, tmp_path / "teacher.pt")
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]  # epoch 1 was not trained again
    assert not (tmp_path / "teacher.pt.resume").exists()
    # The state of a run with other settings is not silently mixed in.
    from rocoin.contracts.errors import RocoinError
    from rocoin.distillation.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "teacher.pt.resume", "teacher-resume", {"config": {"arch": "x"}, "epoch": 1}, {})
    with pytest.raises(RocoinError, match="other settings"):
        train_teacher(config, tmp_path / "teacher.pt")


def test_cifar_with_augmentation_trains_without_the_teacher_cache(tmp_path):
    from test_data import CIFAR10_NAMES, cifar_binary_records, random_images, write_files

    rng = np.random.default_rng(0)
    labels, test_labels = rng.integers(0, 10, 60), rng.integers(0, 10, 20)
    files = {
        "data_batch_1.bin": cifar_binary_records(random_images(rng, 60), labels),
        "test_batch.bin": cifar_binary_records(random_images(rng, 20), test_labels),
        "batches.meta.txt": ("\n".join(CIFAR10_NAMES) + "\n").encode(),
    }
    write_files(files, tmp_path, False, "cifar-10-batches-bin")
    result = run(
        "train-teacher",
        "--dataset",
        "cifar10",
        "--data-dir",
        tmp_path,
        "--arch",
        "wrn-10-1",
        "--epochs",
        1,
        "--batch-size",
        16,
        "-o",
        tmp_path / "teacher.pt",
    )
    assert result.exit_code == 0, result.output
    assert run("activations", "--teacher", tmp_path / "teacher.pt", "-o", tmp_path / "act.npy").exit_code == 0
    run("fleet", "generate", "--devices", 3, "-o", tmp_path / "fleet.yaml")
    assert run("catalog", "--input-shape", "3x32x32", "--students", "wrn-10-1", "-o", tmp_path / "catalog.json").exit_code == 0
    assert (
        run(
            "plan",
            tmp_path / "fleet.yaml",
            "--activations",
            tmp_path / "act.npy",
            "--catalog",
            tmp_path / "catalog.json",
            "--epsilon",
            0.5,
            "-o",
            tmp_path / "plan.json",
        ).exit_code
        == 0
    )
    result = run(
        "distill",
        "--teacher",
        tmp_path / "teacher.pt",
        "--plan",
        tmp_path / "plan.json",
        "--epochs",
        1,
        "--batch-size",
        16,
        "-o",
        tmp_path / "students.pt",
    )
    assert result.exit_code == 0, result.output
    assert "teacher outputs cached" not in result.stdout  # crop+flip changes every epoch's inputs
    assert json.loads(run("evaluate", "--students", tmp_path / "students.pt", "--json").stdout)["test_images"] == 20


def test_export_int8_reports_size_speed_and_accuracy(pipeline):
    if not (pipeline / "students.pt").exists():  # when run alone
        assert (
            run(
                "distill",
                "--teacher",
                pipeline / "teacher.pt",
                "--plan",
                pipeline / "plan.json",
                "--epochs",
                5,
                "--batch-size",
                32,
                "-o",
                pipeline / "students.pt",
            ).exit_code
            == 0
        )
    result = run(
        "export",
        "--students",
        pipeline / "students.pt",
        "--int8",
        "--calibration-images",
        64,
        "--eval-images",
        100,
        "-o",
        pipeline / "bundle-int8",
    )
    assert result.exit_code == 0, result.output
    assert "fp32 vs int8" in result.stdout
    report = json.loads((pipeline / "bundle-int8" / "int8-report.json").read_text())
    assert report["int8"]["size_bytes"] < 0.5 * report["fp32"]["size_bytes"]  # int8 weights
    assert abs(report["int8"]["accuracy"] - report["fp32"]["accuracy"]) < 0.1
    manifest = json.loads((pipeline / "bundle-int8" / "manifest.json").read_text())
    assert manifest["quantization"] == "int8"
    from rocoin.contracts.manifest import load_manifest, verify_file

    loaded = load_manifest(pipeline / "bundle-int8")
    for model in loaded.groups:
        verify_file(pipeline / "bundle-int8", model)  # hashes of the quantised files


def test_an_interrupted_distillation_resumes_after_its_last_epoch(pipeline, tmp_path):
    """Ctrl-C in epoch 2: the next run trains epochs 2 and 3 only and ends where an uninterrupted
    run ends; a resumable run of another plan or settings is refused (or, with --fresh, ignored)."""

    import torch

    from rocoin.contracts.errors import RocoinError
    from rocoin.contracts.plan import load_plan
    from rocoin.distillation.distill import DistillConfig, distill

    plan = load_plan(pipeline / "plan.json")
    config = DistillConfig(epochs=3, batch_size=50, max_train_images=300, failure_aware=True)
    teacher, out = pipeline / "teacher.pt", tmp_path / "students.pt"
    resume = tmp_path / "students.pt.resume"

    with pytest.raises(KeyboardInterrupt):
        distill(teacher, plan, config, out, progress=crash_as("distill epoch 2/"))
    assert resume.exists() and not out.exists()
    trained: list[str] = []
    resumed = distill(teacher, plan, config, out, progress=crash_as("no such task", trained))
    assert trained == ["distill epoch 2/3", "distill epoch 3/3"] and [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert not resume.exists()
    whole = distill(teacher, plan, config, tmp_path / "whole.pt")  # the same run, never interrupted
    assert resumed["val_accuracy"] == whole["val_accuracy"] and resumed["test_accuracy"] == whole["test_accuracy"]
    a, b = torch.load(out, weights_only=True)["state_dict"], torch.load(tmp_path / "whole.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)

    with pytest.raises(KeyboardInterrupt):
        distill(teacher, plan, config, out, progress=crash_as("distill epoch 2/"))
    other = config.model_copy(update={"epochs": 2})
    with pytest.raises(RocoinError, match="a resumable run with another config is here"):
        distill(teacher, plan, other, out)
    assert resume.exists()  # nothing was overwritten
    result = run(
        "distill", "--teacher", teacher, "--plan", pipeline / "plan.json", "--epochs", 2, "--batch-size", 50,
        "--max-train-images", 300, "--fresh", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not resume.exists()
