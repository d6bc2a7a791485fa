"""What the outage model (SPEC.md §1) predicts for the demo's queries, to set beside what they
measured: per query, the assignment in force when it was sent (the bundle's plan, then each
re-plan's) with the killed devices dead, each group missing with the product of its live
replicas' outage probabilities, and the students' accuracy under every pattern of missing
groups (:func:`rocoin.distillation.evaluate.correct_by_missing`) weighed by it."""

from __future__ import annotations

from typing import Any

import numpy as np

from rocoin.experiments.demo.load import QueryLog, healed_mask


def assignment_timeline(plan, history: list[dict[str, Any]]) -> tuple[np.ndarray, list[list[list[str]]]]:
    """The re-plans' times (seconds since the epoch) and, from each, who serves which group;
    entry 0 is the bundle's plan (in force from the start)."""
    records = sorted((r for r in history if r.get("groups_after")), key=lambda r: r["at"])
    times = np.array([-np.inf] + [float(r["at"]) for r in records])
    return times, [[list(g.devices) for g in plan.groups]] + [r["groups_after"] for r in records]


def missing_probabilities(groups: list[list[str]], outage: dict[str, float], dead: set[str]) -> np.ndarray:
    """(K,): group k misses a query when each of its live replicas loses its answer."""
    return np.array([float(np.prod([outage[d] for d in g if d not in dead])) for g in groups])


def outage_prediction(
    log: QueryLog, plan, fleet, victims: list[str], history: list[dict[str, Any]], correct: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    """Predicted and measured accuracy and complete share per phase (before the kill, after it,
    after the first complete answer), and what the unhealed assignment would have given.
    ``correct`` is (2**K, N) over the queried images in order; the query ``i`` shows image ``i``."""
    outage = {d.id: d.outage for d in fleet.devices}
    times, assignments = assignment_timeline(plan, history)
    n = len(log.latency_s)
    sent_wall = log.origin_wall_s + log.sent_s
    in_force = np.searchsorted(times, sent_wall, side="right") - 1
    killed = np.arange(n) >= log.kill_index
    table = {
        (a, dead): missing_probabilities(assignments[a], outage, set(victims) if dead else set())
        for a in range(len(assignments))
        for dead in (False, True)
    }
    q = np.stack([table[(int(in_force[i]), bool(killed[i]))] for i in range(n)])  # (N, K)
    unhealed = np.tile(table[(0, True)], (n, 1))
    from rocoin.distillation.evaluate import expected_accuracy

    images = np.arange(n)
    expected, expected_unhealed = expected_accuracy(correct, q, images), expected_accuracy(correct, unhealed, images)
    observed = np.array([sum(1 << k for k in m) for m in log.missing])
    replayed = correct[observed, images]  # the students in-process with each query's missing groups
    right = log.prediction == labels
    complete = observed == 0

    def phase(part: np.ndarray) -> dict[str, Any]:
        count = int(part.sum())
        if count == 0:
            return {"queries": 0}
        measured = float(right[part].mean())
        return {
            "queries": count,
            "accuracy": measured,
            "accuracy_se": float(np.sqrt(measured * (1 - measured) / count)),
            "predicted_accuracy": float(expected[part].mean()),
            "replayed_accuracy": float(replayed[part].mean()),
            "unhealed_accuracy": float(expected_unhealed[part].mean()),
            "complete_share": float(complete[part].mean()),
            "predicted_complete_share": float(np.prod(1 - q[part], axis=1).mean()),
            "missing_prob_mean": q[part].mean(axis=0).tolist(),
        }

    return {"before": phase(~killed), "after": phase(killed), "after_recovery": phase(healed_mask(log))}
