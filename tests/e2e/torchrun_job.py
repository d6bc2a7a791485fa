"""Run by test_distributed_training.py under ``python -m torch.distributed.run``: each process
works in its own folder (``ROOT/rank0``, ``ROOT/rank1``), so files written by any rank but 0 are
seen, then runs the steps given as JSON:

* ``["cli", ARGS...]``: the rocoin command line as a user runs it under torchrun;
* ``["exact", PLAN, TEACHER]``: teacher training and distillation with every batch-norm layer kept in
  eval mode (its statistics then do not depend on how a batch is shared), written to
  ``exact.json`` by rank 0: the only difference left between one and two processes is the order
  of floating-point sums, so the test compares them tightly.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

#: A tiny training on digits whose last global batch holds one image (321 = 10 × 32 + 1): one
#: process gets it, the other a share of nothing.
EXACT_IMAGES, EXACT_BATCH = 321, 32


def freeze_batch_norm() -> None:
    """Keep every batch-norm layer in eval mode (running statistics, never updated)."""

    def train(self, mode: bool = True):
        return torch.nn.Module.train(self, False)

    torch.nn.modules.batchnorm._BatchNorm.train = train


def exact_runs(plan_path: Path, teacher_path: Path, output: Path) -> dict:
    """The teacher's and the students' loss and accuracy histories with frozen batch norm."""
    from rocoin.contracts.plan import load_plan
    from rocoin.distillation.distill import DistillConfig, distill
    from rocoin.distillation.teacher import TeacherConfig, train_teacher
    from rocoin.distillation.training import DataConfig

    freeze_batch_norm()
    data = DataConfig(dataset="digits", max_train_images=EXACT_IMAGES)
    teacher = train_teacher(
        TeacherConfig(arch="wrn-10-1", data=data, epochs=2, batch_size=EXACT_BATCH, lr=0.02), output / "exact-teacher.pt", resume=False
    )
    students = distill(
        teacher_path,
        load_plan(plan_path),
        DistillConfig(epochs=2, batch_size=EXACT_BATCH, drop_prob=0.3, max_train_images=EXACT_IMAGES),
        output / "exact-students.pt",
    )
    return {"teacher": teacher, "students": students}


def main(root: Path, steps: list[list[str]]) -> int:
    """Each step in one process group started here (the commands use it as they find it: torch
    cannot start a second group in a process under torchrun reliably, and a start costs seconds)."""
    from rocoin.cli.main import app
    from rocoin.distillation.distributed import training_processes

    work = root / f"rank{os.environ.get('RANK', '0')}"
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    with training_processes() as (ranks, _):
        for step, *args in steps:
            if step == "exact":
                result = exact_runs(Path(args[0]), Path(args[1]), Path("."))
                if ranks.main:
                    Path("exact.json").write_text(json.dumps(result))
                continue
            try:
                app(args, prog_name="rocoin")
            except SystemExit as exc:
                if exc.code:
                    return int(exc.code)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), json.loads(sys.argv[2])))
