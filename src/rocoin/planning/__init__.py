"""The offline planner: device grouping, knowledge partition, student assignment, baselines.

Names are imported lazily, so that ``rocoin.planning.plan`` (the plan contract a device reads)
does not pull in the planner's numerical dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SCHEMES": "rocoin.planning.plan",
    "GroupPlan": "rocoin.planning.plan",
    "Plan": "rocoin.planning.plan",
    "UnassignedDevice": "rocoin.planning.plan",
    "load_plan": "rocoin.planning.plan",
    "save_plan": "rocoin.planning.plan",
    "filter_graph": "rocoin.planning.partition",
    "synthetic_activations": "rocoin.planning.partition",
    "make_plan": "rocoin.planning.planner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rocoin.planning' has no attribute {name!r}")
