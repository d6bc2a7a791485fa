"""Accuracy benchmark on Fashion-MNIST: teacher, RoCoIn / NoNN / HetNoNN students, and failures.

Run: ``.venv/bin/python bench/accuracy.py [--out results/bench-accuracy]``. Finished steps are
reused when rerun (delete the folder, or pass --fresh, to redo them). The default budget is sized
for about 35 minutes on a 2-core CPU: a WRN-16-2 teacher for 4 epochs, each scheme's students for
2 epochs, on the full training split (54,000 images after the 10 % validation split), evaluated
on the 10,000 test images; 1..5 of 10 devices failed, 30 random draws each.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from rocoin.distillation.activity import teacher_activations
from rocoin.distillation.distill import DistillConfig, distill
from rocoin.distillation.evaluate import evaluate_students, evaluate_teacher
from rocoin.distillation.teacher import TeacherConfig, train_teacher
from rocoin.distillation.training import DataConfig
from rocoin.contracts.fileio import write_json_atomic, write_text_atomic
from rocoin.models.measure import measure_catalog
from rocoin.planning import filter_graph, make_plan
from rocoin.contracts.plan import load_plan, save_plan
from rocoin.contracts.catalog import load_catalog, save_catalog
from rocoin.contracts.fleet import load_fleet, save_fleet
from rocoin.profiles.generate import generate_fleet

logger = logging.getLogger("bench.accuracy")

RUNS = (  # (label, scheme, failure-aware)
    ("rocoin", "rocoin", True),
    ("rocoin (no failure-aware)", "rocoin", False),
    ("nonn", "nonn", False),
    ("hetnonn", "hetnonn", False),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("results/bench-accuracy"))
    parser.add_argument("--teacher-arch", default="wrn-16-2")
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--student-epochs", type=int, default=2)
    parser.add_argument("--students", default="wrn-10-1,wrn-16-1", help="catalog of students (measured)")
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--max-train-images", type=int, default=None)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str, path: Path, action) -> None:
        if path.exists() and not args.fresh:
            logger.info("reusing %s", path)
            return
        t = time.perf_counter()
        action()
        timings[name] = time.perf_counter() - t

    data = DataConfig(dataset="fashion-mnist", max_train_images=args.max_train_images, split_seed=args.seed)
    teacher_path = out / "teacher.pt"
    step(
        "teacher",
        teacher_path,
        lambda: train_teacher(TeacherConfig(arch=args.teacher_arch, data=data, epochs=args.teacher_epochs, seed=args.seed), teacher_path),
    )

    def write_activations() -> None:
        np.save(out / "activations.npy", teacher_activations(teacher_path), allow_pickle=False)

    step("activations", out / "activations.npy", write_activations)
    step("fleet", out / "fleet.yaml", lambda: save_fleet(generate_fleet(args.devices, 4, 0.8, random_state=args.seed), out / "fleet.yaml"))
    step("catalog", out / "catalog.json", lambda: save_catalog(measure_catalog((1, 28, 28), 10, args.students.split(",")), out / "catalog.json"))
    fleet, catalog = load_fleet(out / "fleet.yaml"), load_catalog(out / "catalog.json")
    weights = filter_graph(np.load(out / "activations.npy"))
    results = {"teacher": evaluate_teacher(teacher_path), "runs": []}
    for label, scheme, failure_aware in RUNS:
        plan_path = out / f"plan-{scheme}.json"
        step(f"plan {scheme}", plan_path, lambda: save_plan(make_plan(fleet, weights, catalog, scheme=scheme, epsilon=args.epsilon, seed=args.seed), plan_path))
        plan = load_plan(plan_path)
        students_path = out / f"students-{label.split()[0]}{'' if failure_aware or scheme != 'rocoin' else '-nofa'}.pt"
        config = DistillConfig(epochs=args.student_epochs, failure_aware=failure_aware, seed=args.seed)
        step(f"distill {label}", students_path, lambda: distill(teacher_path, plan, config, students_path))
        evaluation = evaluate_students(students_path, fail_devices=[1, 2, 3, 4, 5], trials=args.trials, seed=args.seed)
        results["runs"].append({"label": label, "scheme": scheme, "failure_aware": failure_aware, **evaluation, "architectures": sorted({g.student for g in plan.groups})})
        write_json_atomic(out / "results.json", {**results, "timings_s": timings, "args": {k: str(v) for k, v in vars(args).items()}})
    results["timings_s"] = timings
    results["total_s"] = time.perf_counter() - started
    write_json_atomic(out / "results.json", {**results, "args": {k: str(v) for k, v in vars(args).items()}})
    table = markdown_table(results)
    write_text_atomic(out / "results.md", table)
    print(table)


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
        lines.append(f"| {run['label']} | {run['groups']} | {', '.join(run['architectures'])} | {100 * run['accuracy']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
