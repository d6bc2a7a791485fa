"""The offline planner: device grouping, knowledge partition, student assignment, baselines.

The plan it writes is a contract (:mod:`rocoin.contracts.plan`); this package holds the algorithms.
"""

from rocoin.planning.partition import filter_graph, synthetic_activations
from rocoin.planning.planner import make_plan
from rocoin.planning.replan import Replan, replan

__all__ = ["Replan", "filter_graph", "make_plan", "replan", "synthetic_activations"]
