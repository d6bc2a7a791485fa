"""``rocoin experiment``: the paper's tables and figures (the logic is in rocoin.experiments)."""

from __future__ import annotations

from pathlib import Path

import typer

from rocoin.cli.common import clean_errors, err, out, require


def experiment_command(
    names: list[str] = typer.Argument(
        ..., metavar="NAME...", help="table2, table3, fig2, fig3, fig4, fig5, fig6, fig7, scale, table5 (object detection), or all."
    ),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes (what the test suite runs): checks the code path, not the claims."),
    size: str = typer.Option(
        "default", "--size", help="quick, default (2-core CPU budget) or paper (the GPU budget of the README's results)."
    ),
    output: Path = typer.Option(
        Path("results/experiments"), "--output", "-o", help="Folder for NAME/NAME.{csv,json,png,md}, report.md and the cache."
    ),
    dataset: str | None = typer.Option(None, "--dataset", help="fashion-mnist (default), cifar10, cifar100 or digits."),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Where the dataset files are."),
    device: str = typer.Option("cpu", "--device", help="Where to train: cpu, cuda, cuda:N or auto."),
    teacher_arch: str | None = typer.Option(None, "--teacher-arch"),
    teacher_epochs: int | None = typer.Option(None, "--teacher-epochs"),
    student_epochs: int | None = typer.Option(None, "--student-epochs"),
    students: str | None = typer.Option(None, "--students", help="Comma-separated student architectures of the catalog."),
    max_train_images: int | None = typer.Option(None, "--max-train-images"),
    max_test_images: int | None = typer.Option(None, "--max-test-images"),
    trials: int | None = typer.Option(None, "--trials", help="Random failure draws per number of failed devices."),
    fleets: int | None = typer.Option(None, "--fleets", help="Generated fleets per point of the planner-only figures."),
    seed: int | None = typer.Option(None, "--seed"),
    rate_unit: str | None = typer.Option(
        None, "--rate-unit", help="Table IV's rates read as bps (bit/s, as printed: the default) or kbps (kbit/s)."
    ),
    detection_data: str | None = typer.Option(
        None,
        "--detection-data",
        help="table5's data: fashion-scenes (generated from --dataset, the default), visdrone or coco (their files under --data-dir).",
    ),
    fresh: bool = typer.Option(False, "--fresh", help="Retrain and recompute instead of reusing the cache."),
) -> None:
    """Reproduce the paper's evaluation: each NAME writes a CSV/JSON of its numbers, a PNG plot and a Markdown section."""
    require("matplotlib", "sim")
    from rocoin.cli.progress import rich_progress
    from rocoin.experiments.paper import EXPERIMENTS, run_experiments
    from rocoin.experiments.setup import make_setup

    wanted = list(EXPERIMENTS) if names == ["all"] else names
    setup = make_setup(
        "quick" if quick else size,
        dataset=dataset,
        data_dir=data_dir,
        teacher_arch=teacher_arch,
        teacher_epochs=teacher_epochs,
        student_epochs=student_epochs,
        students=tuple(students.split(",")) if students else None,
        max_train_images=max_train_images,
        max_test_images=max_test_images,
        trials=trials,
        fleets=fleets,
        seed=seed,
        rate_unit=rate_unit,
        detection_data=detection_data,
    )
    written = run_experiments(wanted, setup, output, device=device, fresh=fresh, progress=rich_progress)
    for name, paths in written.items():
        out.print(f"{name}: {paths['png']}  {paths['csv']}  {paths['md']}")
    err.print(f"report: {output / 'report.md'}")


def register(app: typer.Typer) -> None:
    app.command("experiment")(clean_errors(experiment_command))
