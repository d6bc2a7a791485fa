"""Accuracy benchmark on Fashion-MNIST: teacher, RoCoIn / NoNN / HetNoNN students, and failures.

Run: ``.venv/bin/python bench/accuracy.py [--out results/bench-accuracy] [--docs docs/bench/accuracy]``. Finished steps are
reused when rerun (rocoin.pipeline's step cache, ``steps.json``; delete the folder, or pass
--fresh, to redo them). The default budget is sized for about 35 minutes on a 2-core CPU: a
WRN-16-2 teacher for 4 epochs, each scheme's students for 2 epochs, on the full training split
(54,000 images after the 10 % validation split), evaluated on the 10,000 test images; 1..5 of 10
devices failed, 30 random draws each.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from pydantic import Field

from rocoin.contracts.fileio import write_json_atomic, write_text_atomic
from rocoin.pipeline import steps
from rocoin.pipeline.cache import StepCache
from rocoin.pipeline.config import PipelineConfig

logger = logging.getLogger("bench.accuracy")

RUNS = (  # (label, scheme, failure-aware)
    ("rocoin", "rocoin", True),
    ("rocoin (no failure-aware)", "rocoin", False),
    ("nonn", "nonn", False),
    ("hetnonn", "hetnonn", False),
)
FAIL_DEVICES = [1, 2, 3, 4, 5]
#: The settings given on the command line (``--teacher-arch`` for ``teacher_arch``, ...).
OPTIONS = ("teacher_arch", "teacher_epochs", "student_epochs", "students", "devices", "epsilon", "max_train_images", "trials", "seed")


class AccuracyBench(PipelineConfig):
    """The pipeline's settings with this benchmark's defaults, and where its files go."""

    out: Path = Field(default=Path("results/bench-accuracy"), description="folder for every step's output and results.{json,md}")
    student_max_train_images: int | None = Field(default=None, gt=0, description="training images of the students (None: the teacher's)")
    fresh: bool = Field(default=False, description="redo every step instead of reusing the finished ones")
    docs: Path | None = Field(default=Path("docs/bench/accuracy"), description="also write results.{json,md} here (the README's source)")


def parse_args() -> AccuracyBench:
    """argparse options built from :class:`AccuracyBench`'s fields (defaults and help included)."""
    parser = argparse.ArgumentParser(description=__doc__)
    fields = AccuracyBench.model_fields
    parser.add_argument("--out", type=Path, default=fields["out"].default, help=fields["out"].description)
    for name in OPTIONS:
        info = fields[name]
        default = ",".join(info.default) if name == "students" else info.default
        kind = str if name in ("students", "teacher_arch") else float if isinstance(info.default, float) else int
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=info.description)
    parser.add_argument("--fresh", action="store_true", help=fields["fresh"].description)
    parser.add_argument("--docs", type=Path, default=fields["docs"].default, help=fields["docs"].description)
    args = vars(parser.parse_args())
    args["students"] = tuple(args["students"].split(","))
    return AccuracyBench(**args)


def main() -> None:
    bench = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from rocoin.distillation.evaluate import evaluate_teacher

    bench.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cache = StepCache(bench.out, fresh=bench.fresh)
    p = steps.Pipeline(bench, cache)
    teacher = steps.teacher(p)
    activity, fleet = steps.activity(p, teacher), steps.fleet(p)
    dataset = teacher.value.metadata["dataset"]
    catalog = steps.catalog(p, tuple(dataset["input_shape"]), int(dataset["num_classes"]))
    settings = {k: str(v) for k, v in bench.model_dump().items()}
    results: dict = {"teacher": evaluate_teacher(teacher.value.path), "runs": []}
    for label, scheme, failure_aware in RUNS:
        plan = steps.plan(p, fleet, activity, catalog, scheme=scheme, name=f"plan {scheme}", stem=f"plan-{scheme}")
        stem = f"students-{label.split()[0]}{'' if failure_aware or scheme != 'rocoin' else '-nofa'}"
        students = steps.students(
            p,
            teacher,
            plan.value,
            failure_aware=failure_aware,
            plan_path=bench.out / f"plan-{scheme}.json",
            name=f"distill {label}",
            stem=stem,
        )
        evaluation = steps.evaluation(
            p, students, FAIL_DEVICES, name=f"evaluation {label}", stem=f"evaluation-{stem.removeprefix('students-')}"
        )
        architectures = sorted({g.student for g in plan.value.groups})
        results["runs"].append(
            {"label": label, "scheme": scheme, "failure_aware": failure_aware, **evaluation.value, "architectures": architectures}
        )
        write_json_atomic(bench.out / "results.json", {**results, "timings_s": _timings(cache), "args": settings})
    results["timings_s"] = _timings(cache)
    results["total_s"] = time.perf_counter() - started
    table = markdown_table(results)
    for folder in (bench.out, bench.docs) if bench.docs else (bench.out,):
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "results.json", {**results, "args": settings})
        write_text_atomic(folder / "results.md", table)
    print(table)


def _timings(cache: StepCache) -> dict[str, float]:
    """Seconds of each step made in this run (reused steps are left out)."""
    return {name: t["seconds"] for name, t in cache.timings.items() if not t["reused"]}


def markdown_table(results: dict) -> str:
    teacher = results["teacher"]["accuracy"]
    lines = [
        f"Teacher {results['teacher']['arch']}: {100 * teacher:.2f} % test accuracy",
        "",
        "| scheme | groups | students | all present | 1 failed | 2 failed | 3 failed | 4 failed | 5 failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        cells = [f"{100 * f['accuracy_mean']:.2f}" for f in run["failures"]]
        lines.append(
            f"| {run['label']} | {run['groups']} | {', '.join(run['architectures'])} | {100 * run['accuracy']:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
