"""Exact latency and completeness of a plan under independent device failures.

Same model as :func:`rocoin.simulation.simulate` without ``fail_devices``: device ``d`` never
answers with probability ``p_d``, otherwise answers after ``t_d = t(d, s_k, k)``; a group's time
``T_k`` is its first answer, or ``timeout_s`` when none comes by then; ``L = max_k T_k``.

- ``q'_k = Π_{d ∈ g_k, t_d ≤ timeout} p_d`` is the probability that group ``k`` is missing
  (members slower than the timeout count as never answering);
- ``P(complete) = Π_k (1 − q'_k)`` and ``E[#missing] = Σ_k q'_k``;
- for ``x < timeout``: ``P(L ≤ x) = Π_k (1 − Π_{d ∈ g_k, t_d ≤ x} p_d)``, and ``L = timeout``
  with the remaining probability. The CDF is piecewise constant between member latencies, so
  ``E[L] = ∫_0^timeout P(L > x) dx`` (and ``E[L²] = ∫_0^timeout 2x P(L > x) dx``) are exact sums.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fleet import Fleet
from rocoin.contracts.plan import Plan
from rocoin.simulation.montecarlo import check_timeout, member_arrays, summary_dict

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class AnalyticResult:
    """Exact statistics of one query's latency (seconds) and of the missing groups."""

    timeout_s: float
    latency_mean_s: float
    latency_std_s: float
    latency_p50_s: float
    latency_p99_s: float
    p_complete: float
    missing_groups_mean: float
    #: ``q'_k`` of each group (plan order); read-only array
    missing_rate_per_group: np.ndarray
    #: the latency CDF: ``P(L ≤ x) = cdf_p[i]`` for ``cdf_x_s[i] ≤ x < cdf_x_s[i + 1]``, 0 before
    #: ``cdf_x_s[0]``; the last point is ``(timeout_s, 1.0)``. Read-only arrays.
    cdf_x_s: np.ndarray
    cdf_p: np.ndarray

    def latency_quantile_s(self, q: float) -> float:
        """Smallest ``x`` with ``P(L ≤ x) ≥ q``, for ``0 < q ≤ 1``."""
        if not 0.0 < q <= 1.0:
            raise RocoinError(f"q = {q!r}: expected a probability in (0, 1]")
        return _quantile(self.cdf_x_s, self.cdf_p, q)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (plain Python numbers), shaped like ``SimulationResult.to_dict``."""
        return summary_dict(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AnalyticResult):
            return NotImplemented
        return (
            self.timeout_s == other.timeout_s
            and self.latency_std_s == other.latency_std_s
            and self.to_dict() == other.to_dict()
            and np.array_equal(self.cdf_x_s, other.cdf_x_s)
            and np.array_equal(self.cdf_p, other.cdf_p)
        )

    __hash__ = None  # type: ignore[assignment]


def analytic(plan: Plan, fleet: Fleet, *, timeout_s: float) -> AnalyticResult:
    """Exact statistics of ``plan`` on ``fleet`` under independent failures (module docstring)."""
    timeout = check_timeout(timeout_s)
    t, p, starts = member_arrays(plan, fleet)
    ends = np.append(starts[1:], len(t))
    k = len(starts)

    q_missing = np.empty(k)
    first = np.empty(k)  # earliest member latency strictly before the timeout (inf if none)
    per_group: list[tuple[np.ndarray, np.ndarray]] = []
    for g, (lo, hi) in enumerate(zip(starts, ends)):
        tg, pg = t[lo:hi], p[lo:hi]
        q_missing[g] = float(np.prod(pg[tg <= timeout]))
        early = tg < timeout
        order = np.argsort(tg[early], kind="stable")
        tg, pg = tg[early][order], pg[early][order]
        per_group.append((tg, pg))
        first[g] = tg[0] if len(tg) else np.inf

    p_complete = float(np.prod(1.0 - q_missing))
    x_star = float(first.max())  # P(L ≤ x) = 0 for x < x_star
    if x_star >= timeout:
        # some group cannot answer before the timeout: L = timeout surely
        xs, ps = np.array([timeout]), np.array([1.0])
    else:
        # log P(L ≤ x) = Σ_k log(1 − P_k(x)), P_k(x) = Π_{d ∈ g_k, t_d ≤ x} p_d; track it from
        # x_star on: a baseline at x_star plus a jump at each later member latency.
        base = 0.0
        ev_t: list[np.ndarray] = []
        ev_d: list[np.ndarray] = []
        for tg, pg in per_group:
            log_g = np.log1p(-np.cumprod(pg))  # after the 1st, 2nd, ... member has arrived
            j = int(np.searchsorted(tg, x_star, side="right")) - 1
            base += float(log_g[j])
            ev_t.append(tg[j + 1 :])
            ev_d.append(np.diff(log_g[j:]))
        times = np.concatenate(ev_t)
        order = np.argsort(times, kind="stable")
        times = times[order]
        log_cdf = base + np.cumsum(np.concatenate(ev_d)[order])
        # keep the value after the last event of each distinct time
        last = np.flatnonzero(np.append(times[1:] != times[:-1], True)) if len(times) else np.array([], int)
        xs = np.concatenate(([x_star], times[last], [timeout]))
        ps = np.concatenate(([np.exp(base)], np.exp(log_cdf[last]), [1.0]))
        ps = np.clip(ps, 0.0, 1.0)
        ps[-1] = 1.0
        ps = np.maximum.accumulate(ps)  # a CDF never decreases (guards against rounding)

    # E[L] = ∫_0^T P(L > x) dx: 1 on [0, xs[0]), then 1 - ps[i] on [xs[i], xs[i+1]).
    survival = 1.0 - ps[:-1]
    mean = xs[0] + float(np.sum(survival * np.diff(xs)))
    second = xs[0] ** 2 + float(np.sum(survival * np.diff(xs**2)))
    std = float(np.sqrt(max(second - mean * mean, 0.0)))

    for arr in (q_missing, xs, ps):
        arr.setflags(write=False)
    logger.debug("analytic: %d groups, %d CDF steps", k, len(xs))
    return AnalyticResult(
        timeout_s=timeout,
        latency_mean_s=mean,
        latency_std_s=std,
        latency_p50_s=_quantile(xs, ps, 0.5),
        latency_p99_s=_quantile(xs, ps, 0.99),
        p_complete=p_complete,
        missing_groups_mean=float(q_missing.sum()),
        missing_rate_per_group=q_missing,
        cdf_x_s=xs,
        cdf_p=ps,
    )


def _quantile(xs: np.ndarray, ps: np.ndarray, q: float) -> float:
    """Smallest ``xs[i]`` with ``ps[i] ≥ q`` (``ps`` non-decreasing, ending at 1)."""
    i = int(np.searchsorted(ps, q, side="left"))
    return float(xs[min(i, len(xs) - 1)])
