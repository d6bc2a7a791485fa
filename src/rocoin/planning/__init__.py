"""The offline planner: device grouping, knowledge partition, student assignment, baselines."""

from rocoin.planning.partition import filter_graph, synthetic_activations
from rocoin.planning.plan import SCHEMES, GroupPlan, Plan, UnassignedDevice, load_plan, save_plan
from rocoin.planning.planner import make_plan

__all__ = [
    "SCHEMES",
    "GroupPlan",
    "Plan",
    "UnassignedDevice",
    "filter_graph",
    "load_plan",
    "make_plan",
    "save_plan",
    "synthetic_activations",
]
