"""Commands that need torch (the ``train`` extra): teacher, activations, distillation, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from rocoin.cli.common import clean_errors, err, out, require
from rocoin.cli.progress import rich_progress
from rocoin.contracts.errors import RocoinError

DATASETS_HELP = "cifar10, cifar100, fashion-mnist or digits."
DEVICE_HELP = "Where to train: cpu, cuda, cuda:N or auto. Under torchrun, cuda (or auto) puts each process on cuda:LOCAL_RANK."
BATCH_HELP = "Images per optimiser step; under torchrun the global batch, shared by the processes."


def _require_torch() -> None:
    require("torch", "train")


def _parse_ints(text: str | None, option: str) -> list[int]:
    if not text:
        return []
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RocoinError(f"{option} = {text!r}: expected integers separated by commas, e.g. 1,2,3") from None


@clean_errors
def train_teacher_command(
    dataset: str = typer.Option("fashion-mnist", "--dataset", help=DATASETS_HELP),
    arch: str = typer.Option("wrn-16-2", "--arch", help="Teacher architecture, e.g. wrn-16-2, wrn-16-4."),
    epochs: int = typer.Option(10, "--epochs", help="Training epochs."),
    batch_size: int = typer.Option(128, "--batch-size", help=BATCH_HELP),
    lr: float = typer.Option(0.1, "--lr", help="Peak learning rate (cosine schedule)."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (Nesterov) or adam."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Share of the training set held out for validation."),
    max_train_images: int | None = typer.Option(None, "--max-train-images", help="Train on the first N images only (quick runs)."),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Where the dataset files are."),
    download: bool = typer.Option(False, "--download", help="Download the dataset (checksummed) if it is missing."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore an interrupted run's state and start over."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="teacher.pt to write (best validation checkpoint)."),
) -> None:
    """Train a teacher; the best checkpoint is kept and an interrupted run resumes. Runs as is under torchrun (DDP)."""
    _require_torch()
    from rocoin.distillation.distributed import training_processes
    from rocoin.distillation.teacher import TeacherConfig, train_teacher
    from rocoin.distillation.training import DataConfig

    config = TeacherConfig(
        arch=arch,
        data=DataConfig(dataset=dataset, data_dir=data_dir, val_fraction=val_fraction, split_seed=seed, max_train_images=max_train_images),
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        seed=seed,
    )
    with training_processes(device) as (ranks, mine):
        summary = train_teacher(config, output, resume=not fresh, download=download, device=mine, progress=rich_progress)
    if not ranks.main:
        return
    last = summary["history"][-1]
    out.print(
        f"teacher {arch} on {summary['dataset']}: validation accuracy {summary['val_accuracy']:.4f} (epoch {summary['best_epoch']}),"
        f" test accuracy {summary['test_accuracy']:.4f}, {last['images_per_s']:.0f} images/s" + _processes(summary)
    )
    err.print(f"wrote {output}")


def _processes(summary: dict) -> str:
    return f" ({summary['processes']} processes)" if summary.get("processes") else ""


@clean_errors
def activations_from_teacher(teacher: Path, split: str, data_dir: str | None, download: bool, output: Path) -> None:
    _require_torch()
    import numpy as np

    from rocoin.contracts.fileio import atomic_path
    from rocoin.distillation.activity import teacher_activations

    act = teacher_activations(teacher, split=split, data_dir=data_dir, download=download)
    with atomic_path(output) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, act, allow_pickle=False)
    err.print(f"wrote {output}: {act.shape[0]} images × {act.shape[1]} filters ({split} split of the teacher's dataset)")


@clean_errors
def distill_command(
    teacher: Path = typer.Option(..., "--teacher", help="teacher.pt from rocoin train-teacher."),
    plan_path: Path = typer.Option(..., "--plan", help="plan.json from rocoin plan (made from this teacher's activations)."),
    epochs: int = typer.Option(10, "--epochs"),
    batch_size: int = typer.Option(128, "--batch-size", help=BATCH_HELP),
    lr: float = typer.Option(0.003, "--lr", help="Peak learning rate (cosine schedule)."),
    optimizer: str = typer.Option("adam", "--optimizer", help="adam (AdamW) or sgd (Nesterov)."),
    alpha: float = typer.Option(0.9, "--alpha", help="Weight of the soft-target term."),
    temperature: float = typer.Option(4.0, "--temperature", help="KD temperature T."),
    beta: float | None = typer.Option(
        None, "--beta", help="Weight of the attention-transfer terms (default: 1000 × H·W/1024 of the teacher's map)."
    ),
    failure_aware: bool | None = typer.Option(
        None, "--failure-aware/--no-failure-aware", help="Drop whole student slots during training (default: on for RoCoIn plans)."
    ),
    drop_prob: float | None = typer.Option(
        None, "--drop-prob", help="Slot drop probability (default: each group's failure_prob from the plan)."
    ),
    max_train_images: int | None = typer.Option(None, "--max-train-images", help="Distill on the first N training images only."),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Where the dataset is (default: where the teacher found it)."),
    download: bool = typer.Option(False, "--download"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore an interrupted run's state and start over."),
    output: Path = typer.Option(..., "--output", "-o", help="students.pt to write."),
) -> None:
    """Distill the network of students of a plan from a teacher (SPEC.md §6); an interrupted run resumes. Runs as is under torchrun (DDP)."""
    _require_torch()
    from rocoin.contracts.plan import load_plan
    from rocoin.distillation.distill import DistillConfig, distill
    from rocoin.distillation.distributed import training_processes

    plan = load_plan(plan_path)
    if failure_aware is None:
        failure_aware = plan.scheme in ("rocoin", "rocoin-g", "optimal")
    config = DistillConfig(
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        alpha=alpha,
        temperature=temperature,
        beta=beta,
        failure_aware=failure_aware,
        drop_prob=drop_prob,
        max_train_images=max_train_images,
        seed=seed,
    )
    with training_processes(device) as (ranks, mine):
        summary = distill(
            teacher, plan, config, output, plan_source=str(plan_path), data_dir=data_dir, download=download, device=mine,
            progress=rich_progress, resume=not fresh,
        )  # fmt: skip
    if not ranks.main:
        return
    last = summary["history"][-1]
    out.print(
        f"{plan.scheme} students ({plan.num_groups} groups): validation accuracy {summary['val_accuracy']:.4f},"
        f" test accuracy {summary['test_accuracy']:.4f}, {last['images_per_s']:.0f} images/s"
        + (" (teacher outputs cached)" if summary["teacher_cached"] else "")
        + _processes(summary)
    )
    err.print(f"wrote {output}")


@clean_errors
def evaluate_command(
    students: Path | None = typer.Option(None, "--students", help="students.pt to evaluate."),
    teacher: Path | None = typer.Option(None, "--teacher", help="Evaluate a teacher.pt instead."),
    fail_devices: str | None = typer.Option(None, "--fail-devices", help="J failed devices per trial; several as 1,2,3."),
    trials: int = typer.Option(30, "--trials", help="Random draws of failed devices per J."),
    max_test_images: int | None = typer.Option(None, "--max-test-images"),
    data_dir: str | None = typer.Option(None, "--data-dir"),
    download: bool = typer.Option(False, "--download"),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Test accuracy, with every group present and with J random devices failed (Figs. 5–6 method)."""
    _require_torch()
    from rocoin.distillation.evaluate import evaluate_students, evaluate_teacher

    if (students is None) == (teacher is None):
        raise RocoinError("evaluate: give exactly one of --students or --teacher")
    if teacher is not None:
        result = evaluate_teacher(teacher, data_dir=data_dir, max_test_images=max_test_images, download=download)
    else:
        result = evaluate_students(
            students,
            fail_devices=_parse_ints(fail_devices, "fail-devices"),
            trials=trials,
            seed=seed,
            data_dir=data_dir,
            max_test_images=max_test_images,
            download=download,
        )
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    out.print(f"accuracy with every group present: {result['accuracy']:.4f}")
    if result.get("failures"):
        table = Table(title=f"{result['devices']} devices, {result['groups']} groups")
        for column in ("failed devices", "trials", "accuracy", "± std", "missing groups"):
            table.add_column(column)
        for row in result["failures"]:
            table.add_row(
                str(row["fail_devices"]),
                str(row["trials"]),
                f"{row['accuracy_mean']:.4f}",
                f"{row['accuracy_std']:.4f}",
                f"{row['missing_groups_mean']:.2f}",
            )
        out.print(table)


def register(app: typer.Typer) -> None:
    app.command("train-teacher")(train_teacher_command)
    app.command("distill")(distill_command)
    app.command("evaluate")(evaluate_command)
