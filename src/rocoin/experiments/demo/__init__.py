"""The end-to-end demo (``make demo`` = ``rocoin demo``): from a data set to failures at runtime.

1. **Data**: Fashion-MNIST — found where :mod:`rocoin.data` looks (Debian's
   ``dataset-fashion-mnist`` included); if absent, installed with ``apt-get`` (as root on Debian),
   else downloaded with an MD5 check; else scikit-learn's digits, with a notice
   (:mod:`rocoin.pipeline.data`).
2. **Teacher**: a small WRN trained on a subset of the training split.
3. **Plan**: a generated heterogeneous fleet, the teacher's filter activity (validation split), a
   measured catalog of small students, and the RoCoIn planner.
4. **Students**: distilled for the plan (failure-aware), exported to an ONNX bundle.
5. **Runtime**: a local cluster — one device-worker process per device, emulating its profile
   (FLOP/s and rates sped up so a query takes tens of milliseconds), and the source — serves the
   test images through the source's KServe v2 REST API; part-way through, devices are killed
   with SIGKILL (a whole group among them when the plan allows).
6. **Report**: accuracy and latency before and after the failures, in a table, ``report.md``,
   ``results.json``, ``queries.csv`` and two PNG plots.

Steps 2-4 are :mod:`rocoin.pipeline`'s: finished ones are recorded in ``steps.json`` with a key
of their inputs; a rerun with the same options reuses every step whose output is still there and
loads, and redoes a step (and everything after it) whose inputs changed. ``fresh=True`` redoes
them all. The runtime part always runs again.

Modules: :mod:`.run` (the course of the demo), :mod:`.victims` (which devices die),
:mod:`.load` (the queries, through :mod:`rocoin.runtime.api.client`), :mod:`.cluster` (the
emulated cluster), :mod:`.report` (table, report.md, plots).
"""

from rocoin.experiments.demo.report import DemoReport
from rocoin.experiments.demo.run import EVAL_TRIALS, demo_config, run_demo
from rocoin.experiments.demo.victims import Victims, choose_victims
from rocoin.pipeline.config import DemoConfig
from rocoin.pipeline.data import DataChoice, resolve_dataset

__all__ = [
    "EVAL_TRIALS",
    "DataChoice",
    "DemoConfig",
    "DemoReport",
    "Victims",
    "choose_victims",
    "demo_config",
    "resolve_dataset",
    "run_demo",
]
