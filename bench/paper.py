"""Run the experiments that train students, several trainings at once (for a GPU machine).

``python bench/paper.py --size paper --device cuda --jobs 3 --output results/experiments``

The teacher, its filter graph and the catalog are made first; then table2 (Fig. 5's students),
fig6 and fig3 train in ``--jobs`` parallel processes sharing the cache (one training alone leaves
a GPU mostly idle: ten small students per step are launch-bound); finally every trained experiment
is written from the cache in this process. ``rocoin experiment`` gives the same results one at a
time.

Measured on one H200 (``--size paper``, Fashion-MNIST): the WRN-16-4 teacher trained 10 epochs
in 30 s (about 17,000 images/s, 94.5 % validation accuracy); the networks of students trained at
1,500-10,000 images/s per process with three processes at once; after 500 s, 11 of the 14
distillations had started and the last (NoNN, ten students) were still training. Budget about
15 minutes for the whole run.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from rocoin.experiments.paper import TRAINED, run_experiments  # noqa: E402
from rocoin.experiments.setup import make_setup  # noqa: E402
from rocoin.experiments.workspace import Workspace  # noqa: E402

#: What each parallel process trains (the last step writes all of TRAINED from the cache).
PARALLEL = (["table2"], ["fig6"], ["fig3"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="paper")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("results/experiments"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--max-train-images", type=int, default=None)
    parser.add_argument("--teacher-epochs", type=int, default=None)
    parser.add_argument("--student-epochs", type=int, default=None)
    parser.add_argument("--only", default=None, help="run just these experiments (comma-separated), in this process")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = {
        "data_dir": args.data_dir,
        "dataset": args.dataset,
        "max_train_images": args.max_train_images,
        "teacher_epochs": args.teacher_epochs,
        "student_epochs": args.student_epochs,
    }
    setup = make_setup(args.size, **overrides)
    if args.only:
        run_experiments(args.only.split(","), setup, args.output, device=args.device)
        return
    started = time.perf_counter()
    ws = Workspace(setup, args.output / "cache", device=args.device)
    ws.teacher()
    ws.filter_weights()
    ws.catalog()
    logging.info("teacher, filter graph and catalog ready after %.0f s", time.perf_counter() - started)
    base = [sys.executable, __file__, "--size", args.size, "--device", args.device, "--output", str(args.output)]
    for key, value in overrides.items():
        if value is not None:
            base += [f"--{key.replace('_', '-')}", str(value)]
    pending = list(PARALLEL)
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            running.append(subprocess.Popen(base + ["--only", ",".join(pending.pop(0))]))
        time.sleep(2)
        for p in [p for p in running if p.poll() is not None]:
            running.remove(p)
            if p.returncode != 0:
                logging.error("a parallel job failed with exit status %d", p.returncode)
    run_experiments(list(TRAINED), setup, args.output, device=args.device)
    logging.info("all trained experiments written after %.0f s", time.perf_counter() - started)


if __name__ == "__main__":
    main()
