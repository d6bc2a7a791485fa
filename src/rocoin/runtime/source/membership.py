"""Who serves which group, while the fleet changes: devices join (:mod:`.join_service`), go away,
come back; the source re-plans with the bundle's students and partition fixed
(:func:`rocoin.planning.replan`) and moves devices between groups.

:class:`Membership` ties three things together: the :class:`~.registry.MembershipRegistry` (the
persisted record: profile, state, group, model hash), the links of the devices that dialed the
source (:class:`~.joined.JoinedLink`) and the :class:`~.source.Source`'s replicas (who gets each
query). The assignment lives here and in the registry, not in the bundle's manifest.

Triggers of a re-plan, each logged with its reason and the objective before and after:

- a device joins that the current plan does not name (a plan device goes back to its group);
- a device is gone: suspect (its stream broke) for longer than the grace period; one that comes
  back within it resumes its group and is not a membership change;
- a group has no live replica (at once, without waiting for the grace period);
- periodically (``check_interval_s``), a group whose failure probability is above the plan's ε.

A restarted source resumes the assignment its registry recorded (the last run's re-plans, spares
as spares, gone devices out) instead of the manifest's, and waits for its devices to rejoin there.

A moved device is sent the new group's model (if it lacks it), verifies and loads it, and counts
for the new group only after a health check on its stream names the new model's hash; queries
gathered meanwhile stay with the replicas they were sent to (:meth:`Source.retire` ends the old
replica's part in them, as a non-failure). Devices the source dials are moved the same way over
``Device.Assign`` (their bundle holds every group's model; one they lack is sent in chunks), but
never made spares.

An operator drains a joined device before maintenance (:meth:`Membership.drain`): a re-plan
without it moves others into its group first, and it stays a spare until it joins again.

Gone devices stay in the registry, their ids bound to their credentials, for ``forget_after_s``
(then pruned: a fleet whose phones come and go under new ids does not fill the registry); an
operator forgets one sooner with :meth:`Membership.forget` (a replaced device, a lost key).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from rocoin.contracts.errors import InfeasiblePlanError, RocoinError
from rocoin.contracts.fleet import DeviceProfile, Fleet
from rocoin.contracts.manifest import GroupModel
from rocoin.planning.replan import DEFAULT_MARGIN, Replan, assign_devices, replan
from rocoin.runtime.source.joined import JoinedLink
from rocoin.runtime.source.registry import DEFAULT_FORGET_AFTER_S, MembershipRegistry
from rocoin.runtime.source.source import Source
from rocoin.runtime.transport.join import SPARE

logger = logging.getLogger(__name__)

#: How often the membership looks for expired devices and groups above ε.
CHECK_INTERVAL_S = 1.0
#: How often gone devices older than ``forget_after_s`` are pruned.
PRUNE_INTERVAL_S = 60.0
#: Moves of one re-plan carried out at once (each sends at most one model and waits for a health check).
MAX_PARALLEL_MOVES = 8


class MemberConflict(RocoinError):
    """An operator's request that the member's state does not allow (HTTP 409)."""


@dataclass
class ReplanRecord:
    """One re-plan, as ``/v2/fleet`` and ``rocoin fleet status`` show it."""

    at: float
    trigger: str
    reason: str
    moves: list[dict[str, Any]]
    latency_before_s: float
    latency_after_s: float
    p_complete_before: float
    p_complete_after: float
    seconds: float
    #: who serves each group from then on (device ids per group of the bundle's plan)
    groups_after: list[list[str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: an infinite latency (a group with no replica) is ``null``."""
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in self.__dict__.items()}


@dataclass
class _Joined:
    link: JoinedLink
    profile: DeviceProfile
    cached: set[str] = field(default_factory=set)


class Membership:
    """The changing fleet of ``source``, recorded in ``registry``."""

    def __init__(
        self,
        source: Source,
        registry: MembershipRegistry,
        *,
        margin: float = DEFAULT_MARGIN,
        check_interval_s: float = CHECK_INTERVAL_S,
        forget_after_s: float = DEFAULT_FORGET_AFTER_S,
    ) -> None:
        check_forget_after_s(forget_after_s)
        self.source = source
        self.registry = registry
        self.margin = margin
        self.check_interval_s = check_interval_s
        self.forget_after_s = forget_after_s
        self._pruned_at = -math.inf
        self.joined: dict[str, _Joined] = {}
        self.history: list[ReplanRecord] = []
        self.replans = 0
        self._lock = asyncio.Lock()  # one assignment or re-plan at a time
        self._task: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()
        self._models = {m.group: m for m in source.manifest.groups}
        self._replanned_for: tuple = ()  # the live fleet the last re-plan saw
        self._stopping = False
        #: joined devices told to serve no group for now
        self.spares: set[str] = set()
        #: joined devices an operator drained: left out of re-plans until they join again
        self.draining: set[str] = set()
        self._started = time.monotonic()
        #: devices that joined (or are dialed) since the source started
        self._seen: set[str] = {d.id for d in source.fleet.devices if d.address}
        #: the models a dialed device has (its bundle holds every group's), by device
        self._dialed_cache: dict[str, set[str]] = {}
        self._models_in_bundle = {m.sha256 for m in source.manifest.groups}
        source.on_device_down = self._device_down
        for device in source.fleet.devices:  # the devices the source dials are members too
            if device.address:
                self.registry.join(device, credential=None)
        self._restore()

    def _restore(self) -> None:
        """A restarted source: the devices that dialed it before (suspect now, until they rejoin)
        are awaited in the groups the registry recorded — the last run's re-plans, spares as
        spares, gone devices out — rather than the manifest's, so nobody moves back and forth."""
        plan_devices = {d for g in self.source.plan.groups for d in g.devices}
        known = [m for m in self.registry.members() if not m.dialed and (m.live or m.device_id in plan_devices)]
        if not any(m.live for m in known):
            return  # a first start
        groups = {m.device_id: m.group if m.live else None for m in known}
        devices = {d.id: d for d in self.source.fleet.devices} | {m.device_id: m.profile for m in known}
        try:
            plan = assign_devices(self.source.plan, Fleet(devices=list(devices.values()), input_bits=self.source.fleet.input_bits), groups)
        except RocoinError as exc:
            logger.warning("membership: the recorded assignment cannot be resumed (%s); starting from the manifest's plan", exc)
            return
        self.source.follow(plan)
        logger.info(
            "membership: resumed the recorded assignment of %d devices (T %.4g s, P(all groups) %.4f)",
            len(groups),
            plan.latency_s,
            plan.p_complete,
            extra={"groups": [g.devices for g in plan.groups]},
        )

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._watch())

    def stopping(self) -> None:
        """The source is shutting down: no more re-plans or moves. Its devices' streams are about
        to end, which says nothing about the devices; the registry keeps the assignment as it was
        for the next start."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()

    async def close(self) -> None:
        for task in (self._task, *self._pending):
            if task is not None:
                task.cancel()
        for task in (self._task, *self._pending):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for joined in list(self.joined.values()):
            await joined.link.close()
        self.joined.clear()

    # --- a device's stream ----------------------------------------------------------------

    def admit(self, profile: DeviceProfile, credential: str, link: JoinedLink, cached: list[str]) -> Coroutine[Any, Any, None]:
        """A device dialed the source (``profile`` from its hello): register it now (the registry
        raises :class:`~.registry.IdentityError` for another credential under its id, or
        :class:`~.registry.DeviceLimitError`); the coroutine returned gives it its group, or keeps
        it as a spare, once its stream is being written."""
        self.registry.join(profile, credential=credential)
        device_id = profile.id
        old = self.joined.get(device_id)
        self.joined[device_id] = _Joined(link, profile, set(cached))
        self._seen.add(device_id)
        self.draining.discard(device_id)  # back (after its maintenance): it may serve again
        if old is not None and old.link is not link:  # a new stream replaces the old one
            self._spawn(old.link.close())
        return self._place(device_id)

    async def _place(self, device_id: str) -> None:
        async with self._lock:
            group = self._planned_group(device_id)
            if group is not None:
                await self._assign(device_id, group)
            elif self._unseen():  # the plan's own devices are still coming: a spare until they are here
                await self._assign(device_id, SPARE)
            else:
                await self._replan(f"device {device_id} joined")
                if self._serving_group(device_id) == SPARE and device_id in self.joined:
                    await self._assign(device_id, SPARE)
            self.update_metrics()

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def left(self, device_id: str, link: JoinedLink, reason: str) -> None:
        """A device's stream ended: suspect; gone after the grace period (see :meth:`_watch`)."""
        joined = self.joined.get(device_id)
        if joined is None or joined.link is not link:
            return  # an older stream of a device that has rejoined
        del self.joined[device_id]
        self.spares.discard(device_id)
        self.draining.discard(device_id)
        with contextlib.suppress(RocoinError):
            self.registry.mark_suspect(device_id, reason)

    # --- assignment ------------------------------------------------------------------------

    def _unseen(self) -> list[str]:
        """Devices of the current plan that have not joined since the source started, within
        the grace period after the start (one that never comes is then simply gone)."""
        if time.monotonic() - self._started > self.registry.grace_s:
            return []
        return [d for g in self.source.plan.groups for d in g.devices if d not in self._seen]

    def _serving_group(self, device_id: str) -> int:
        """The group a joined device serves over its current stream (``SPARE``: none; a plan
        device's placeholder, waiting for it to join, does not count)."""
        replica, joined = self.source.replica(device_id), self.joined.get(device_id)
        if replica is None or joined is None or replica.link is not joined.link:
            return SPARE
        return replica.state.group

    def _planned_group(self, device_id: str) -> int | None:
        return next((k for k, g in enumerate(self.source.plan.groups) if device_id in g.devices), None)

    async def _assign(self, device_id: str, group: int) -> bool:
        """Move a device to ``group`` (a joined one may also become a spare): its model,
        verified and loaded, then a health check naming its hash, then queries. A joined device
        gets the model over its stream; one the source dials over ``Device.Assign``, taking the
        model from its own bundle (every group's model is in it) unless it lacks it. True when the
        device serves ``group`` (or is a spare) afterwards."""
        joined = self.joined.get(device_id)
        current = self.source.replica(device_id)
        if joined is not None:
            link, cached = joined.link, joined.cached
        elif current is not None and hasattr(current.link, "assign") and group != SPARE:
            link, cached = current.link, self._dialed_cache.setdefault(device_id, set(self._models_in_bundle))
        else:
            return False
        if current is not None and current.state.group == group and current.link is link and current.state.up:
            return True
        await self.source.retire(device_id)
        self.spares.discard(device_id)
        if group == SPARE:
            try:
                await link.assign(SPARE, None, None, send_model=False)
            except (RocoinError, ConnectionError):
                return False
            self.spares.add(device_id)
            with contextlib.suppress(RocoinError):
                self.registry.standby(device_id, "a spare: no group needs it now")
            return True
        model: GroupModel = self._models[group]
        started = time.perf_counter()
        send = model.sha256 not in cached
        member = self.registry.get(device_id)
        if member is not None and member.state == "serving" and member.group != group:
            self.registry.assign(device_id, group, model.sha256)  # a move: joining until the health check
        try:
            sha = await link.assign(
                group,
                model,
                self.source.bundle / model.file,
                send_model=send,
                student_flops=self.source.manifest.plan.catalog[model.student].flops,
            )
            if await link.check() != sha:
                raise RocoinError(f"device {device_id}: its health check does not name group {group}'s model {sha[:12]}")
        except (RocoinError, ConnectionError) as exc:
            logger.warning("device %s: not assigned to group %d: %s", device_id, group, exc)
            with contextlib.suppress(RocoinError):
                self.registry.mark_suspect(device_id, str(exc))
            return False
        cached.add(sha)
        self.registry.mark_serving(device_id, group, sha)
        await self.source.attach(device_id, group, link)
        logger.info(
            "device %s serves group %d (%s model in %.2f s)",
            device_id,
            group,
            "sent" if send else "cached",
            time.perf_counter() - started,
            extra={"device": device_id, "group": group},
        )
        return True

    # --- re-planning -----------------------------------------------------------------------

    def live_fleet(self) -> Fleet | None:
        """The devices that can serve now: dialed ones that are up, and joined ones with a stream."""
        devices = []
        for device in self.source.fleet.devices:
            replica = self.source.replica(device.id)
            if device.address and replica is not None and replica.state.up:
                devices.append(device)
        devices += [j.profile for d, j in self.joined.items() if j.link.connected and d not in self.draining]
        if not devices:
            return None
        return Fleet(devices=devices, input_bits=self.source.fleet.input_bits)

    async def _replan(self, trigger: str) -> Replan | None:
        """Re-assign the live devices to the bundle's groups; move the joined ones."""
        if self._stopping:
            logger.info("replan (%s): skipped, the source is stopping", trigger)
            return None
        fleet = self.live_fleet()
        if fleet is None:
            logger.warning("replan (%s): no live device", trigger)
            return None
        started = time.perf_counter()
        try:
            result = replan(self.source.plan, fleet, margin=self.margin)
        except InfeasiblePlanError as exc:
            logger.warning("replan (%s): %s", trigger, exc)
            return None
        target = {d: k for k, g in enumerate(result.plan.groups) for d in g.devices}
        moves: list[tuple[str, int, int]] = []  # (device, from, to); SPARE: no group
        for device_id, joined in list(self.joined.items()):
            if not joined.link.connected:
                continue  # its stream just ended: it is leaving
            want, have = target.get(device_id, SPARE), self._serving_group(device_id)
            if want != have:
                moves.append((device_id, have, want))
        for device in fleet.devices:  # the devices the source dials: moved over Device.Assign, never made spares
            if device.id in self.joined or device.id not in target:
                continue
            replica = self.source.replica(device.id)
            if replica is not None and replica.state.group != target[device.id]:
                moves.append((device.id, replica.state.group, target[device.id]))
        failed = await self._move(moves)
        moved = [{"device": d, "from": None if have == SPARE else have, "to": None if want == SPARE else want} for d, have, want in moves]
        self.source.plan = self._as_served(result.plan, fleet, failed)
        self._replanned_for = self._fleet_key()
        self.replans += 1
        record = ReplanRecord(
            at=time.time(),
            trigger=trigger,
            reason=result.reason,
            moves=moved,
            latency_before_s=result.objective_before.latency_s,
            latency_after_s=result.objective_after.latency_s,
            p_complete_before=result.objective_before.p_complete,
            p_complete_after=result.objective_after.p_complete,
            seconds=time.perf_counter() - started,
            groups_after=[list(g.devices) for g in self.source.plan.groups],
        )
        self.history = [*self.history[-99:], record]
        self.source.metrics.replans.labels(_trigger_kind(trigger)).inc()
        logger.warning(
            "replan (%s): %d moves; T %.4g -> %.4g s, P(all groups) %.4f -> %.4f",
            trigger,
            len(moved),
            record.latency_before_s,
            record.latency_after_s,
            record.p_complete_before,
            record.p_complete_after,
            extra={"trigger": trigger, "moves": moved},
        )
        return result

    async def _move(self, moves: list[tuple[str, int, int]]) -> dict[str, None]:
        """Carry out a re-plan's moves side by side (at most :data:`MAX_PARALLEL_MOVES` at once), those
        into a group with no live replica first: they end an outage. Returns the devices whose
        move failed."""
        empty = {k for k in range(self.source.num_groups) if not any(d.up for d in self.source.devices if d.group == k)}
        order = sorted(moves, key=lambda m: (m[2] not in empty, m[2] == SPARE))
        limit = asyncio.Semaphore(MAX_PARALLEL_MOVES)

        async def one(device_id: str, group: int) -> bool:
            async with limit:
                return await self._assign(device_id, group)

        done = await asyncio.gather(*(one(d, want) for d, _, want in order), return_exceptions=True)
        for (device_id, _, want), outcome in zip(order, done, strict=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                logger.error("device %s: move to group %s failed", device_id, want, exc_info=outcome)
        return {d: None for (d, _, _), outcome in zip(order, done, strict=True) if outcome is not True}

    def _as_served(self, plan, fleet: Fleet, failed: dict[str, None]):
        """``plan`` without the devices whose move failed (they serve nothing now: on standby), so
        the plan names only what serves; ``plan`` itself when nothing failed or a group would be
        left without a device (the next re-plan, at once for an empty group, settles it)."""
        if not failed:
            return plan
        logger.warning("replan: %d move(s) failed (%s): the plan lists them on standby", len(failed), ", ".join(failed))
        try:
            return assign_devices(plan, fleet, failed)
        except RocoinError as exc:
            logger.warning("replan: kept the plan as decided (%s)", exc)
            return plan

    def _device_down(self, device_id: str, group: int) -> None:
        """The source marked a device down: a group with no live replica is re-planned at once —
        when the device is gone (its stream broke). One marked down for missed answers while its
        stream stays open is still the best the fleet has (its outage is in the model): the
        source keeps it on trial, and a re-plan could not do better."""
        if any(d.up for d in self.source.devices if d.group == group):
            return
        replica, joined = self.source.replica(device_id), self.joined.get(device_id)
        if joined is not None and joined.link.connected:
            return
        if joined is None and replica is not None and replica.link is not None and replica.link.is_open:
            return
        self._spawn(self._locked_replan(f"group {group} has no live replica (device {device_id} down)"))

    async def _locked_replan(self, trigger: str, *, still: Callable[[], bool] | None = None) -> None:
        """Re-plan once the lock is taken; with ``still``, only if it still holds then: checked
        while an assignment was under way (a device between its old group and its new one looks
        like a spare), the condition may be gone once that assignment is done."""
        async with self._lock:
            if still is not None and not still():
                return
            try:
                await self._replan(trigger)
            except (RocoinError, ConnectionError) as exc:
                logger.error("replan (%s) failed: %s", trigger, exc)
            self.update_metrics()

    async def _watch(self) -> None:
        """Expire devices suspect beyond the grace period; re-plan when that changes the fleet
        or a group is above ε."""
        while True:
            await asyncio.sleep(self.check_interval_s)
            self.update_metrics()
            try:
                self._sync_dialed()
                if time.monotonic() - self._pruned_at >= PRUNE_INTERVAL_S:
                    self._pruned_at = time.monotonic()
                    self.registry.prune(self.forget_after_s)
                gone = self.registry.expire()
                if gone:
                    await self._locked_replan("gone: " + ", ".join(m.device_id for m in gone))
                elif self._needs_epsilon_replan():
                    await self._locked_replan("a group is above its failure target", still=self._needs_epsilon_replan)
            except RocoinError as exc:
                logger.error("membership check failed: %s", exc)

    def _sync_dialed(self) -> None:
        """Record what the source sees of the devices it dials (they have no join stream to tell):
        ``serving`` in its group while up, ``suspect`` when the source cannot reach it (its link is
        closed; missed answers alone are its outage, not a change), ``gone`` after the grace period
        (by :meth:`MembershipRegistry.expire`), and back again once it answers."""
        dialed = {m.device_id: m for m in self.registry.members() if m.dialed}  # one read a check, not one per device
        for device in self.source.fleet.devices:
            member = dialed.get(device.id)
            replica = self.source.replica(device.id) if member is not None else None
            if replica is None:
                continue
            group = replica.state.group
            if replica.state.up:
                if member.state == "gone":
                    self.registry.join(device, credential=None)
                if member.state != "serving" or member.group != group:
                    self.registry.mark_serving(device.id, group, self._models[group].sha256)
            elif (replica.link is None or not replica.link.is_open) and member.state in ("joining", "serving"):
                self.registry.mark_suspect(device.id, "the source cannot reach it")

    def forget(self, device_id: str, reason: str) -> dict[str, Any]:
        """An operator removes a gone device from the registry now, with the binding of its id to
        its credential (a device replaced, its key lost: the next device joining under the id is
        bound afresh). A device still in the fleet is refused: a connected or suspect one must be
        gone first (after the grace period); one the source dials is removed from the fleet file.
        Returns the member as it was."""
        member = self.registry.get(device_id)
        if member is None:
            raise LookupError(f"device {device_id!r}: not in the membership")
        if member.dialed:
            raise MemberConflict(f"device {device_id!r}: the source dials it (fleet file): remove it from the fleet file instead")
        if member.live or device_id in self.joined:
            raise MemberConflict(
                f"device {device_id!r}: {member.state}: only a gone device can be forgotten (a device is gone"
                f" {self.registry.grace_s:g} s after its stream ends)"
            )
        self.spares.discard(device_id)
        return self.registry.forget(device_id, reason).to_json()

    async def drain(self, device_id: str) -> dict[str, Any]:
        """An operator takes a joined device out of service before maintenance: a re-plan
        without it (its group is given other devices first, so no query misses it), then it
        waits as a spare, still connected, until it joins again (after a reboot) or is stopped.
        Returns the re-plan's record; :class:`MemberConflict` when the device cannot be drained
        (dialed, not connected) or no assignment of the other devices serves every group."""
        member = self.registry.get(device_id)
        if member is None:
            raise LookupError(f"device {device_id!r}: not in the membership")
        if member.dialed:
            raise MemberConflict(f"device {device_id!r}: the source dials it (fleet file): stop its worker; the source notices")
        joined = self.joined.get(device_id)
        if joined is None or not joined.link.connected:
            raise MemberConflict(f"device {device_id!r}: {member.state}, not connected: there is nothing to drain")
        async with self._lock:
            self.draining.add(device_id)
            before = self.replans
            try:
                await self._replan(f"drain: {device_id}")
            except (RocoinError, ConnectionError) as exc:
                logger.error("replan (drain: %s) failed: %s", device_id, exc)
            self.update_metrics()
            if self._serving_group(device_id) != SPARE or self.replans == before:
                self.draining.discard(device_id)
                raise MemberConflict(
                    f"device {device_id!r}: the other devices cannot serve every group without it: it keeps serving"
                    f" group {self._serving_group(device_id)}"
                )
        return self.history[-1].to_json()

    def _fleet_key(self) -> tuple:
        """What a re-plan depends on: the live devices and who serves which group."""
        fleet = self.live_fleet()
        ids = tuple(sorted(d.id for d in fleet.devices)) if fleet is not None else ()
        return ids, tuple(sorted((d.device_id, d.group, d.up) for d in self.source.devices))

    def _needs_epsilon_replan(self) -> bool:
        """The periodic check: the fleet changed since the last re-plan and a group is above ε."""
        return not self._unseen() and self._fleet_key() != self._replanned_for and self._above_epsilon()

    def _above_epsilon(self) -> bool:
        """A group whose live replicas fail together more often than ε, while a spare is live
        that could help it (without a spare a re-plan could only take from other groups, which
        the re-plan after the loss already weighed)."""
        if not any(self.source.replica(d) is None and j.link.connected and d not in self.draining for d, j in self.joined.items()):
            return False
        return any(g["failure_prob"] > self.source.plan.epsilon for g in self.groups())

    def update_metrics(self) -> None:
        """The per-group gauges of ``/metrics``."""
        metrics = self.source.metrics
        for group in self.groups():
            metrics.group_live_replicas.labels(str(group["group"])).set(len(group["live_replicas"]))
            metrics.group_failure_prob.labels(str(group["group"])).set(group["failure_prob"])
        metrics.joined_devices.set(len(self.joined))

    def groups(self) -> list[dict[str, Any]]:
        """Each group's live replicas and their joint failure probability (1 with none)."""
        outage = {d.id: d.outage for d in self.source.fleet.devices} | {d: j.profile.outage for d, j in self.joined.items()}
        groups = []
        for k in range(self.source.num_groups):
            live = [d.device_id for d in self.source.devices if d.group == k and d.up]
            groups.append({"group": k, "live_replicas": live, "failure_prob": math.prod(outage.get(d, 1.0) for d in live)})
        return groups

    def status(self) -> dict[str, Any]:
        """The membership and the current assignment (``/v2/fleet``, ``rocoin fleet status``)."""
        replicas = {d.device_id: d for d in self.source.devices}
        members = []
        for member in self.registry.members():
            replica = replicas.get(member.device_id)
            entry = member.to_json()
            entry["connected"] = member.device_id in self.joined or (member.dialed and replica is not None and replica.up)
            entry["serving_group"] = replica.group if replica is not None and replica.up else None
            entry["spare"] = member.device_id in self.spares and member.device_id in self.joined
            entry["draining"] = member.device_id in self.draining
            entry["answers"] = replica.answers if replica is not None else None
            entry["traffic"] = replica.traffic() if replica is not None else None
            members.append(entry)
        return {
            "groups": self.groups(),
            "members": members,
            "plan": {
                "epsilon": self.source.plan.epsilon,
                "latency_s": self.source.plan.latency_s,
                "p_complete": self.source.plan.p_complete,
            },
            "replans": self.replans,
            "busy": self._lock.locked(),  # an assignment or a re-plan is under way
            "history": [r.to_json() for r in self.history[-20:]],
        }


def check_forget_after_s(value: float) -> float:
    """``value`` when it is a usable ``forget_after_s``, else one :class:`RocoinError` line."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise RocoinError(f"forget_after_s: {value!r}: expected a positive number of seconds")
    return value


def _trigger_kind(trigger: str) -> str:
    for kind in ("joined", "gone", "no live replica", "above"):
        if kind in trigger:
            return kind.replace(" ", "_")
    return "other"
