"""``rocoin train-teacher`` and ``rocoin distill`` under torchrun: two gloo processes on the CPU
(``python -m torch.distributed.run --nproc-per-node 2 --standalone``) against one process, on
scikit-learn's digits.

How close two processes must come to one, and why:

* **exactly, up to float sums** (``exact``): ``--batch-size`` is the global batch, every process
  draws the same batches and the failure-aware slot masks and keeps its share, each share's loss
  weighted by its size. Where nothing else differs — batch norm kept in eval mode — the loss and
  accuracy histories of teacher and students match one process to 1e-5 relative (float32 sums in
  another order), also with a last batch of one image (a process with a share of nothing).
* **within 4 points of test accuracy** (the command line): on the CPU torch has no
  SyncBatchNorm, so each process normalises over its half of the batch (16 images instead of 32);
  that alone moves the runs apart, by about as much as another seed does. Measured on digits, 5
  seeds each (teacher wrn-10-1 3 epochs, students 2 epochs, batch 32): two processes minus one,
  in points of test accuracy, teacher +0.3, -2.8, 0, +0.6, 0; students +0.8, -0.3, -1.1, +1.7,
  -0.8; one process alone spans 2.2 (teacher) and 3.3 (students) points over the seeds. 4 points
  = 14 of the 360 test images; chance is 10 %.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from test_cli import run  # noqa: E402
from test_training_cli import interrupt_teacher_in_epoch_two  # noqa: E402

JOB = Path(__file__).with_name("torchrun_job.py")
TEACHER = ["--dataset", "digits", "--arch", "wrn-10-1", "--epochs", "3", "--batch-size", "32"]
DISTILL = ["--epochs", "2", "--batch-size", "32"]
#: Test accuracy, one process vs two (see the module docstring).
TOLERANCE = 0.04


def torchrun(root: Path, steps: list[list]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROCOIN_TORCH_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(JOB), str(root)]
    steps = [[str(arg) for arg in step] for step in steps]
    result = subprocess.run([*command, json.dumps(steps)], capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metadata(path: Path) -> dict:
    return json.loads(torch.load(path, weights_only=True)["metadata"])


@contextmanager
def one_thread():
    before = torch.get_num_threads()
    os.environ["ROCOIN_TORCH_THREADS"] = "1"
    try:
        yield
    finally:
        os.environ.pop("ROCOIN_TORCH_THREADS")
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """One process: teacher, activations, plan, students; and a two-epoch teacher run interrupted
    after its first epoch, left in the folder of the two-process run's rank 0 to resume."""
    root = tmp_path_factory.mktemp("one")
    with one_thread():
        assert run("train-teacher", *TEACHER, "-o", root / "teacher.pt").exit_code == 0
        assert run("activations", "--teacher", root / "teacher.pt", "-o", root / "act.npy").exit_code == 0
        assert run("fleet", "generate", "--devices", 4, "--seed", 1, "-o", root / "fleet.yaml").exit_code == 0
        assert run("catalog", "--input-shape", "1x8x8", "--students", "wrn-10-1", "-o", root / "catalog.json").exit_code == 0
        plan = ["--activations", root / "act.npy", "--catalog", root / "catalog.json", "--epsilon", 0.5, "-o", root / "plan.json"]
        assert run("plan", root / "fleet.yaml", *plan).exit_code == 0
        result = run("distill", "--teacher", root / "teacher.pt", "--plan", root / "plan.json", *DISTILL, "-o", root / "students.pt")
        assert result.exit_code == 0, result.output
        _interrupted_teacher(root / "two" / "rank0" / "teacher.pt")
    return root


def _interrupted_teacher(path: Path) -> None:
    from rocoin.distillation.teacher import TeacherConfig
    from rocoin.distillation.training import DataConfig

    path.parent.mkdir(parents=True)
    config = TeacherConfig(arch="wrn-10-1", data=DataConfig(dataset="digits"), epochs=3, batch_size=32)  # what TEACHER gives
    interrupt_teacher_in_epoch_two(config, path)
    assert path.with_name("teacher.pt.resume").exists()


@pytest.fixture(scope="module")
def two(one):
    """The same in one torchrun job of two processes (one start: it costs seconds): the teacher
    resumed from the interrupted run (rank 1's folder has no resume file: the state travels over
    the process group), the students, and the exact runs."""
    root = one / "two"
    result = torchrun(
        root,
        [
            ["cli", "train-teacher", *TEACHER, "-o", "teacher.pt"],
            ["cli", "distill", "--teacher", one / "teacher.pt", "--plan", one / "plan.json", *DISTILL, "-o", "students.pt"],
            ["exact", one / "plan.json", one / "teacher.pt"],
        ],
    )
    assert list((root / "rank1").iterdir()) == []  # only rank 0 wrote files
    return root / "rank0", result.stdout


def test_two_processes_resume_the_teacher_and_match_one(one, two):
    folder, stdout = two
    assert stdout.count("test accuracy") == 2 and stdout.count("(2 processes)") == 2  # printed by rank 0 only
    assert not (folder / "teacher.pt.resume").exists()
    single, double = metadata(one / "teacher.pt"), metadata(folder / "teacher.pt")
    assert [h["epoch"] for h in double["history"]] == [1, 2, 3]
    for key in ("train_loss", "val_accuracy"):  # epoch 1 came from the resume file, not trained again
        assert double["history"][0][key] == single["history"][0][key]
    assert double["test_accuracy"] > 0.8  # ten classes: chance is 0.1
    assert abs(double["test_accuracy"] - single["test_accuracy"]) <= TOLERANCE


def test_two_processes_distill_like_one(one, two):
    folder, stdout = two
    assert "teacher outputs cached" in stdout
    single, double = metadata(one / "students.pt"), metadata(folder / "students.pt")
    assert double["test_accuracy"] > 0.7
    assert abs(double["test_accuracy"] - single["test_accuracy"]) <= TOLERANCE
    assert double["config"] == single["config"]  # the same settings: the batch size is the global one


def test_without_batch_norm_differences_two_processes_train_as_one(one, two):
    from torchrun_job import exact_runs

    double = json.loads((two[0] / "exact.json").read_text())
    train = torch.nn.modules.batchnorm._BatchNorm.train
    try:
        with one_thread():
            single = exact_runs(one / "plan.json", one / "teacher.pt", one)
    finally:
        torch.nn.modules.batchnorm._BatchNorm.train = train
    for part in ("teacher", "students"):
        assert double[part]["processes"] == 2
        for a, b in zip(single[part]["history"], double[part]["history"], strict=True):
            for key, value in a.items():
                if key != "images_per_s":
                    assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (part, key)
        assert double[part]["test_accuracy"] == pytest.approx(single[part]["test_accuracy"], abs=1e-6)


def test_a_bad_input_stops_every_process_with_its_message(one, tmp_path):
    """The command line itself under torchrun (it starts the process group, and destroys it on
    the error): the teacher file is missing on rank 0, so every process stops at once."""
    rocoin = Path(sys.executable).with_name("rocoin")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(rocoin)]
    args = ["distill", "--teacher", tmp_path / "missing.pt", "--plan", one / "plan.json", "-o", tmp_path / "students.pt"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROCOIN_TORCH_THREADS": "1"}
    result = subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("missing.pt: checkpoint not found") == 2  # one line from each process, no traceback of theirs
    assert "[rank0]: Traceback" not in output and "[rank1]: Traceback" not in output
    assert not (tmp_path / "students.pt").exists()
