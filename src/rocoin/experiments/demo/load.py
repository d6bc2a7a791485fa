"""The demo's load: each test image as one KServe v2 REST call through
:mod:`rocoin.runtime.api.client`, a kill between two phases, and one record per query."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rocoin.contracts.fileio import write_text_atomic

#: Queries sent (and not counted) before the measured ones, so channel set-up is not measured.
WARMUP_QUERIES = 5


@dataclass
class QueryLog:
    """One row per measured query, in the order sent."""

    sent_s: np.ndarray
    latency_s: np.ndarray
    source_latency_s: np.ndarray
    prediction: np.ndarray
    missing: list[list[int]]
    kill_index: int  # queries [0, kill_index) ran before the kill
    kill_s: float  # when the kill happened, seconds since the first measured query
    phase_s: tuple[float, float]  # wall time of the two phases
    #: a detection bundle's answers: per query the boxes, scores and labels (None for a classifier)
    detections: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] | None = None
    origin_wall_s: float = 0.0  # the first measured query's send time, seconds since the epoch (to place re-plans)

    @classmethod
    def empty(cls, n: int, kill_index: int) -> QueryLog:
        return cls(
            np.zeros(n),
            np.zeros(n),
            np.zeros(n),
            np.zeros(n, dtype=np.int64),
            [[] for _ in range(n)],
            kill_index,
            0.0,
            (0.0, 0.0),
            [None] * n,
        )


async def send_queries(
    url: str,
    images: np.ndarray,
    *,
    concurrency: int,
    kill_index: int,
    kill: Callable[[], None],
    advance: Callable[..., None] = lambda *a, **k: None,
    warmup: int = WARMUP_QUERIES,
) -> QueryLog:
    """Send each image as one KServe v2 ``infer`` call, ``concurrency`` at a time. The queries
    before ``kill_index`` all finish, then ``kill()`` runs, then the rest are sent."""

    from rocoin.runtime.api.client import for_each, http_infer

    log = QueryLog.empty(len(images), kill_index)
    async with http_infer(url) as infer:

        async def one(i: int, query_id: str):
            return await infer(images[i : i + 1], query_id)

        for i in range(min(warmup, len(images))):
            await one(i, f"warmup-{i}")
        origin = time.perf_counter()
        log.origin_wall_s = time.time()

        async def measured(i: int) -> None:
            started = time.perf_counter()
            answer = await one(i, f"q-{i}")
            log.latency_s[i] = time.perf_counter() - started
            log.sent_s[i] = started - origin
            log.prediction[i] = answer.prediction
            log.detections[i] = answer.detections
            log.missing[i] = list(answer.missing_groups)
            log.source_latency_s[i] = answer.latency_s
            advance()

        before_s = await for_each(range(0, kill_index), concurrency, measured)
        log.kill_s = time.perf_counter() - origin
        await asyncio.to_thread(kill)
        after_s = await for_each(range(kill_index, len(images)), concurrency, measured)
    log.phase_s = (before_s, after_s)
    return log


def phase_summary(log: QueryLog, labels: np.ndarray | None, part: slice | np.ndarray, num_groups: int, wall_s: float) -> dict[str, Any]:
    """Accuracy (``labels`` None: a detector's, measured apart), latency and missing groups of the
    queries ``part`` (a slice, or a mask or indices)."""
    part = np.arange(len(log.latency_s))[part]
    latency = log.latency_s[part]
    missing = [log.missing[i] for i in part]
    counts = [sum(k in m for m in missing) for k in range(num_groups)]
    return {
        "queries": int(len(latency)),
        "accuracy": float((log.prediction[part] == labels[part]).mean()) if labels is not None else None,
        "latency_ms": {
            "p50": float(1e3 * np.percentile(latency, 50)),
            "p99": float(1e3 * np.percentile(latency, 99)),
            "mean": float(1e3 * latency.mean()),
        },
        "source_latency_ms": {
            "p50": float(1e3 * np.percentile(log.source_latency_s[part], 50)),
            "p99": float(1e3 * np.percentile(log.source_latency_s[part], 99)),
        },
        "queries_per_s": float(len(latency) / wall_s) if wall_s > 0 else None,
        "queries_with_missing_groups": int(sum(1 for m in missing if m)),
        "missing_groups_mean": float(np.mean([len(m) for m in missing])),
        "queries_missing_group": counts,
    }


def recovery_s(log: QueryLog) -> float | None:
    """When the first query sent after the kill came back with every group present (seconds since
    the first measured query), None when none did."""
    after = np.arange(log.kill_index, len(log.latency_s))
    complete = np.array([not log.missing[i] for i in after], dtype=bool)
    if not complete.any():
        return None
    return float((log.sent_s[after] + log.latency_s[after])[complete].min())


def healed_mask(log: QueryLog) -> np.ndarray:
    """The queries sent after the kill and after the first complete answer: the healed fleet's."""
    first = recovery_s(log)
    healed = np.zeros(len(log.latency_s), dtype=bool)
    if first is not None:
        healed[log.kill_index :] = log.sent_s[log.kill_index :] >= first
    return healed


def healing_summary(log: QueryLog, labels: np.ndarray | None, num_groups: int, membership: dict[str, Any]) -> dict[str, Any]:
    """After the kill: when the first query came back with every group present (the source
    re-planned and a surviving device took the lost group over), and the queries sent from then
    on, with what the re-plan's outage model predicted for them (P(every group answers))."""
    heals = [r for r in membership.get("history", []) if "no live replica" in r["trigger"] or r["trigger"].startswith("gone")]
    result: dict[str, Any] = {
        "replans": membership.get("replans", 0),
        "heal_replans": heals,
        "predicted_complete_share": heals[-1]["p_complete_after"] if heals else None,
        "recovered_after_s": None,
        "after_recovery": None,
    }
    first = recovery_s(log)
    if first is None:
        return result
    result["recovered_after_s"] = first - log.kill_s
    healed = healed_mask(log)
    if healed.any():  # queries sent after the first complete answer (in order sent): the healed fleet's
        result["healed_from_query"] = int(np.flatnonzero(healed).min())
    if healed.sum() >= 2:
        summary = phase_summary(log, labels, healed, num_groups, 0.0)
        summary["complete_share"] = 1.0 - summary["queries_with_missing_groups"] / summary["queries"]
        result["after_recovery"] = summary
    return result


def write_queries_csv(path: Path, log: QueryLog, labels: np.ndarray) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["query", "phase", "sent_s", "latency_ms", "source_latency_ms", "label", "prediction", "missing_groups"])
    for i in range(len(log.latency_s)):
        writer.writerow(
            [
                i,
                "before" if i < log.kill_index else "after",
                f"{log.sent_s[i]:.4f}",
                f"{1e3 * log.latency_s[i]:.3f}",
                f"{1e3 * log.source_latency_s[i]:.3f}",
                int(labels[i]),
                int(log.prediction[i]),
                " ".join(map(str, log.missing[i])),
            ]
        )
    write_text_atomic(path, buffer.getvalue())
