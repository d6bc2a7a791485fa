"""The gather: which answers a query takes, and what each answer (or its absence) says about a
device. Pure bookkeeping — no networking, no clock of its own, no logging: the source
(:mod:`.source`) feeds it events and acts on the plain values it returns (count a failure, mark a
device down, use it again), and the unit tests drive it by hand.

One query (:class:`Query`) has a slot per group. The first replica of a group to answer fills the
slot; later replicas are ignored. The query waits only for the groups that have a *counted* call
(one to a device that is up); a group whose counted calls all failed is decided (empty), and at
the deadline the source expires the query: every empty slot is zero-filled by the head.

One device (:class:`DeviceState`) is marked down after :data:`FAILURES_TO_MARK_DOWN` failures in
a row, or at once when its link is lost. No query waits for a down device, but while its link
stays open it still gets every query, on trial: an answer that comes before the head runs fills an
empty slot, and any answer brings it back at once — so a device that drops a few answers in a row
(a flaky link) is not left out for a whole probe interval.

Whose fault is it? The source checks every query before it sends it, so a device that still
refuses a query as invalid (``INVALID_ARGUMENT``) is misconfigured, not down: its group misses
that answer, the refusal is counted and it never counts towards marking the device down — else a
client could knock every device out with three bad requests. Likewise a deadline miss counts
against a device only when the query was *fair*: its budget was at least the source's own
deadline (a client may ask for 1 ms; no device meets that, and none should be marked down for
it). A device answer with the wrong shape or dtype, or non-finite values, is that device's failure.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rocoin.runtime.source.messages import OK, Answer

#: Consecutive failed calls after which a device is marked down.
FAILURES_TO_MARK_DOWN = 3
#: At most one WARNING per device this often about devices refusing queries as invalid.
REFUSAL_LOG_INTERVAL_S = 10.0
#: How many of a device's last valid answers its latency percentiles are taken over.
LATENCY_WINDOW = 1000

#: gRPC's status codes by number, as answers carry them (``grpc.StatusCode`` without grpc).
STATUS_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
    "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip
INVALID_ARGUMENT = STATUS_NAMES.index("INVALID_ARGUMENT")
DEADLINE_EXCEEDED = STATUS_NAMES.index("DEADLINE_EXCEEDED")
#: What an answer holds unless the manifest says float16 (a detector's map on a narrow link).
FLOAT32 = np.dtype(np.float32)


def code_name(value: int) -> str:
    """``3`` -> ``"INVALID_ARGUMENT"``; an unknown number -> ``"status 99"``."""
    return STATUS_NAMES[value] if 0 <= value < len(STATUS_NAMES) else f"status {value}"


class Query:
    """One query in flight: the groups' slots, and the calls it waits for in each group.

    A call is *counted* when the query waits for it (its device is up); a down device's call is
    not, but its answer still fills an empty slot if it comes before the head runs. ``decided`` is
    called once, when the query needs nothing more: every group it waits for is decided, or the
    deadline came (:meth:`expire`).
    """

    __slots__ = (
        "wire_id",
        "query_id",
        "batch",
        "started",
        "slots",
        "answered_by",
        "open_calls",
        "pending",
        "undecided",
        "fair",
        "expired",
        "done",
        "_decided_cb",
    )

    def __init__(
        self,
        wire_id: str,
        query_id: str,
        batch: int,
        num_groups: int,
        started: float,
        *,
        fair: bool = True,
        decided: Callable[[], None] | None = None,
    ) -> None:
        self.wire_id = wire_id
        self.query_id = query_id
        self.batch = batch
        self.started = started
        #: the deadline is one a healthy device must meet (the source's own, or longer): a miss is
        #: the device's failure; a client's shorter deadline is the client's choice, not evidence
        self.fair = fair
        self.slots: list[np.ndarray | None] = [None] * num_groups
        self.answered_by = [""] * num_groups
        self.open_calls = [0] * num_groups  # counted calls not answered yet
        self.pending = [False] * num_groups  # groups the query still waits for
        self.undecided = 0  # how many of them
        self.expired = False  # the deadline came before every group was decided
        self.done = False
        self._decided_cb = decided

    @property
    def missing(self) -> list[int]:
        """The groups without an answer (zero-filled by the head)."""
        return [k for k, s in enumerate(self.slots) if s is None]

    def start_waiting(self) -> None:
        """After the query went out: wait for every group with a counted call (decided at once
        when there is none: no device is up)."""
        self.pending = [calls > 0 for calls in self.open_calls]
        self.undecided = sum(self.pending)
        if self.undecided == 0 and not self.done:
            self._finish()

    def expire(self) -> None:
        """The deadline: stop waiting; the groups still empty are missing."""
        if not self.done:
            self.expired = True
            self._finish()

    def answered(self, group: int, features: np.ndarray, device_id: str, counted: bool) -> bool:
        """Take a replica's answer; True when it filled the group's slot (the first one did)."""
        if counted:
            self.open_calls[group] -= 1
        if self.slots[group] is not None:
            return False
        self.slots[group] = features
        self.answered_by[group] = device_id
        self._decided(group)
        return True

    def call_failed(self, group: int, counted: bool) -> None:
        if counted:
            self.open_calls[group] -= 1
            if self.open_calls[group] == 0:
                self._decided(group)  # no replica left to answer: stop waiting for this group

    def _decided(self, group: int) -> None:
        if not self.pending[group]:
            return
        self.pending[group] = False
        self.undecided -= 1
        if self.undecided == 0 and not self.done:
            self._finish()

    def _finish(self) -> None:
        self.done = True
        if self._decided_cb is not None:
            self._decided_cb()


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one answer means, for the source to act on."""

    #: the query the answer belongs to; None when that query had ended (a late answer)
    query: Query | None = None
    #: the answer filled its group's slot
    filled: bool = False
    #: the device failed the query: why (count it with :meth:`DeviceState.failed`)
    failure: str = ""
    #: the device refused the checked query as invalid: what it said (:meth:`DeviceState.refused`)
    refused: str | None = None
    #: the device is down and answered: use it again
    revive: bool = False
    #: the answer was valid features for its query (whether or not its group's slot was still empty)
    answered: bool = False


#: The verdict on an answer nobody is waiting for, from a device that is up.
IGNORED = Verdict()


@dataclass(eq=False)
class DeviceState:
    """One device as the source sees it: its place in the plan, whether it is used, its record,
    and the queries it owes an answer to."""

    device_id: str
    address: str
    group: int
    up: bool = True
    consecutive_failures: int = 0
    failures: int = 0
    answers: int = 0
    #: queries the device refused as invalid although the source had checked them
    refusals: int = 0
    refusals_logged_at: float = float("-inf")
    #: queries sent to the device and not answered yet, by wire id, and whether they wait for it
    #: (False while the device is down: it still gets queries, on trial, and nobody waits)
    waiting: dict[str, tuple[Query, bool]] = field(default_factory=dict)
    #: seconds from a query's arrival at the source to the device's valid answer, its last :data:`LATENCY_WINDOW`
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    #: tensor bytes sent to the device (images) and received in its valid answers (features)
    bytes_sent: int = 0
    bytes_received: int = 0

    def sent(self, query: Query) -> None:
        """The query went out to the device: counted when the device is up."""
        self.waiting[query.wire_id] = (query, self.up)
        if self.up:
            query.open_calls[self.group] += 1

    def take(self, answer: Answer, shape: int | tuple[int, ...], dtype: np.dtype = FLOAT32) -> Verdict:
        """Judge the device's answer (its group's slot holds ``shape`` features per image —
        ``|P_k|`` pooled values, or a ``(|P_k|, h, w)`` map — sent as ``dtype``) and give it to
        its query; the device's record is updated, the decisions are returned."""
        entry = self.waiting.pop(answer.wire_id, None)
        if entry is None:  # an answer after its query ended
            return Verdict(revive=not self.up and answer.code == OK)
        query, counted = entry
        if answer.code == INVALID_ARGUMENT:
            query.call_failed(self.group, counted)
            return Verdict(query, refused=answer.error)
        if answer.code == DEADLINE_EXCEEDED and not query.fair:
            query.call_failed(self.group, counted)  # it had no free slot within the client's short deadline
            return Verdict(query)
        try:
            features = _checked_features(answer, query.batch, (shape,) if isinstance(shape, int) else tuple(shape), dtype)
        except ValueError as exc:
            query.call_failed(self.group, counted)
            return Verdict(query, failure=str(exc))
        self.consecutive_failures = 0
        self.answers += 1
        revive = not self.up
        return Verdict(query, filled=query.answered(self.group, features, self.device_id, counted), revive=revive, answered=True)

    def answered_in(self, latency_s: float, nbytes: int) -> None:
        """Record a valid answer: its latency and its tensor bytes."""
        self.latencies_s.append(latency_s)
        self.bytes_received += nbytes

    def traffic(self) -> dict[str, float | int | None]:
        """What the device exchanged with the source: its answers' latency (median and 99th
        percentile over its last :data:`LATENCY_WINDOW` valid answers, ms) and the tensor bytes
        both ways (KiB, since the source started using it)."""
        latencies = np.asarray(self.latencies_s, dtype=float)
        p50, p99 = (None, None) if latencies.size == 0 else (1e3 * float(np.percentile(latencies, q)) for q in (50, 99))
        return {
            "answer_ms_p50": p50,
            "answer_ms_p99": p99,
            "kib_sent": self.bytes_sent / 1024,
            "kib_received": self.bytes_received / 1024,
        }

    def settle(self, query: Query) -> tuple[bool, bool]:
        """The query ended: ``(owed, failed)`` — whether the device still owed it an answer (tell
        it to drop the query), and whether missing it is the device's failure (a fair query whose
        group went unanswered until the deadline)."""
        if self.waiting.pop(query.wire_id, None) is None:
            return False, False
        return True, query.expired and query.fair and query.slots[self.group] is None

    def failed(self) -> bool:
        """Count a failed call; True when the device is to be marked down now."""
        self.failures += 1
        self.consecutive_failures += 1
        return self.up and self.consecutive_failures >= FAILURES_TO_MARK_DOWN

    def refused(self, now: float) -> bool:
        """Count a refusal (never a failure); True when it is to be logged (at most one per
        :data:`REFUSAL_LOG_INTERVAL_S`)."""
        self.refusals += 1
        if now - self.refusals_logged_at >= REFUSAL_LOG_INTERVAL_S:
            self.refusals_logged_at = now
            return True
        return False

    def lost(self) -> None:
        """The device's link broke (it died, or the connection was lost): a failure, and nothing it
        owed will come (see :meth:`disconnected`). The source marks it down at once."""
        self.failures += 1
        self.disconnected()

    def disconnected(self) -> None:
        """Nothing the device owes will come: its queries stop waiting for it."""
        waiting, self.waiting = self.waiting, {}
        for query, counted in waiting.values():
            query.call_failed(self.group, counted)

    def mark_down(self) -> bool:
        """New queries stop waiting for the device (those in flight still do); True when it was up."""
        was_up, self.up = self.up, False
        return was_up

    def revive(self) -> None:
        self.consecutive_failures = 0
        self.up = True


def _checked_features(answer: Answer, batch: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if answer.code != OK:
        raise ValueError(f"{code_name(answer.code)}: {answer.error[:300]}")
    features = answer.features()
    expected = (batch, *shape)
    if features.shape != expected or features.dtype != dtype:
        raise ValueError(f"features {features.dtype}{features.shape}: expected {dtype}{expected}")
    if not np.isfinite(features).all():
        raise ValueError("features: not finite (the device's model gave NaN or Inf)")
    return features
