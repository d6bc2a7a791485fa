"""Which devices the demo kills part-way: a whole group when the plan allows, spares otherwise."""

from __future__ import annotations

from dataclasses import dataclass

from rocoin.contracts.errors import RocoinError


@dataclass(frozen=True)
class Victims:
    devices: list[str]
    lost_groups: list[int]  # groups left with no replica
    reason: str


def choose_victims(plan, kill: int) -> Victims:
    """``kill`` devices: every replica of the smallest group that ``kill`` can empty (ties: the
    first such group), then one replica each of other groups with replicas to spare, so at least
    one group is lost and as many others as possible keep answering. When no group is that small,
    one device from each of ``kill`` groups, none of them lost."""
    groups = plan.groups
    if kill > len(plan.device_ids):
        raise RocoinError(f"--kill = {kill}: expected at most the plan's {len(plan.device_ids)} devices")
    sizes = [len(g.devices) for g in groups]
    emptiable = [k for k in range(len(groups)) if sizes[k] <= kill]
    chosen: list[str] = []
    lost: list[int] = []
    if emptiable:
        target = min(emptiable, key=lambda k: (sizes[k], k))
        chosen += groups[target].devices
        lost.append(target)
    left = {k: list(g.devices) for k, g in enumerate(groups) if k not in lost}
    # spare replicas first: one device from each other group that keeps at least one
    while len(chosen) < kill and any(len(d) > 1 for d in left.values()):
        for k in sorted(left, key=lambda k: (-len(left[k]), k)):
            if len(chosen) < kill and len(left[k]) > 1:
                chosen.append(left[k].pop())
    # then, only when unavoidable, the last replicas of further groups
    for k in sorted(left):
        while len(chosen) < kill and left[k]:
            chosen.append(left[k].pop())
            if not left[k]:
                lost.append(k)
    lost.sort()
    if emptiable:
        reason = (
            f"every replica of group {lost[0]} ({', '.join(groups[lost[0]].devices)}), the smallest group {kill} kills can empty, "
            "plus spare replicas of other groups"
        )
    else:
        reason = f"one replica each of {kill} groups: every group has more than {kill} replicas, so none can be lost entirely"
    return Victims(chosen, lost, reason)


def expected_missing(plan, fleet, victims: Victims) -> dict[str, list[float]]:
    """Per group, P(missing) in the system model: every replica's answer lost (SPEC.md §1)."""
    from rocoin.experiments.demo.prediction import missing_probabilities

    outage = {d.id: d.outage for d in fleet.devices}
    groups = [list(g.devices) for g in plan.groups]
    return {
        "before": missing_probabilities(groups, outage, set()).tolist(),
        "after": missing_probabilities(groups, outage, set(victims.devices)).tolist(),
    }
