"""plan.json: the contract between the planner, distillation, the runtime and the simulator."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rocoin import __version__
from rocoin.contracts.catalog import StudentSpec
from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import dumps_json, load_validated, write_json_atomic
from rocoin.contracts.fleet import MAX_INPUT_BITS, DeviceId, Fleet
from rocoin.contracts.latency import device_latency_s

logger = logging.getLogger(__name__)

Scheme = Literal["rocoin", "rocoin-g", "nonn", "hetnonn", "optimal"]
Objective = Literal["paper", "minmax"]
SCHEMES: tuple[str, ...] = ("rocoin", "rocoin-g", "nonn", "hetnonn", "optimal")


class GroupPlan(BaseModel):
    """One device group: its replicas, the filters of its knowledge partition and its student."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: list[DeviceId] = Field(min_length=1)
    filters: list[int] = Field(min_length=1)
    student: str = Field(min_length=1)
    failure_prob: float = Field(ge=0.0, le=1.0, allow_inf_nan=False, description="product of the members' outage")
    latency_s: float = Field(gt=0, allow_inf_nan=False, description="worst member's t(d, s, k)")


class UnassignedDevice(BaseModel):
    """A device the scheme could not use, with the reason (never dropped silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: DeviceId
    reason: str


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: Scheme
    objective: Objective = "paper"
    epsilon: float = Field(gt=0.0, lt=1.0, allow_inf_nan=False)
    theta: float | None = Field(default=None, ge=0.0, allow_inf_nan=False, description="grouping distance threshold used")
    rho_min: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    num_filters: int = Field(gt=0)
    input_bits: int | None = Field(default=None, gt=0, le=MAX_INPUT_BITS)
    groups: list[GroupPlan] = Field(min_length=1)
    latency_s: float = Field(gt=0, allow_inf_nan=False, description="largest group latency (T)")
    p_complete: float = Field(ge=0.0, le=1.0, allow_inf_nan=False, description="P(every group answers) = prod(1 - failure_prob)")
    catalog: dict[str, StudentSpec]
    unassigned: list[UnassignedDevice] = Field(default_factory=list)
    seed: int | None = None
    rocoin_version: str = __version__

    @model_validator(mode="after")
    def _check_structure(self) -> Plan:
        seen_devices: set[str] = set()
        for group in self.groups:
            for device in group.devices:
                if device in seen_devices:
                    raise ValueError(f"device {device!r} appears in more than one group")
                seen_devices.add(device)
            if group.student not in self.catalog:
                raise ValueError(f"student {group.student!r} is not in the plan's catalog")
        for item in self.unassigned:
            if item.id in seen_devices:
                raise ValueError(f"device {item.id!r} is listed twice (in a group or among the unassigned)")
            seen_devices.add(item.id)
        filters = sorted(f for g in self.groups for f in g.filters)
        # the length first: a huge num_filters must not build a huge range
        if len(filters) != self.num_filters or filters != list(range(self.num_filters)):
            raise ValueError(
                f"the groups' filters must cover 0..{self.num_filters - 1} exactly once"
                f" (got {len(filters)} entries, {len(set(filters))} distinct)"
            )
        return self

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def device_ids(self) -> list[str]:
        return [d for g in self.groups for d in g.devices]

    def check_fleet(self, fleet: Fleet) -> None:
        """Raise when the plan names a device the fleet lacks, or misses one of the fleet's devices."""
        fleet_ids = set(fleet.ids)
        planned = set(self.device_ids) | {u.id for u in self.unassigned}
        missing = sorted(planned - fleet_ids)
        if missing:
            raise RocoinError(f"plan: device {missing[0]!r} is not in the fleet ({len(missing)} unknown in all)")
        extra = sorted(fleet_ids - planned)
        if extra:
            raise RocoinError(f"plan: fleet device {extra[0]!r} is in no group of the plan ({len(extra)} in all); re-plan for this fleet")

    def to_json(self) -> str:
        return dumps_json(self.model_dump(mode="json"), "plan")


def load_plan(path: str | os.PathLike[str]) -> Plan:
    return load_validated(Plan, path, "a plan object")


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> None:
    write_json_atomic(path, plan.model_dump(mode="json"))  # the same text as to_json(); errors name the file


@dataclass(frozen=True)
class PlanMembers:
    """Every grouped device of a plan on a fleet, group by group (group ``k`` is ``starts[k]:starts[k+1]``)."""

    latency_s: np.ndarray  # t(d, s_k, k) on the fleet as it is now
    outage: np.ndarray  # p_d on the fleet as it is now
    starts: np.ndarray


#: Relative difference above which a plan's stored figures count as stale for the fleet.
STALE_TOLERANCE = 1e-6


def plan_members(plan: Plan, fleet: Fleet) -> PlanMembers:
    """Latency and outage of every member, computed from ``fleet`` (not from the plan's stored figures).

    The plan may have been made with other profiles (e.g. assumed outage probabilities, paper
    Fig. 6); stored figures that differ from the fleet's are logged, not rejected.
    """
    plan.check_fleet(fleet)
    if plan.input_bits != fleet.input_bits:
        raise RocoinError(f"plan: input_bits = {plan.input_bits} but the fleet has input_bits = {fleet.input_bits}; re-plan for this fleet")
    arrays = fleet.arrays()
    position = {device_id: i for i, device_id in enumerate(arrays.ids)}
    index = np.array([position[d] for g in plan.groups for d in g.devices], dtype=np.intp)
    sizes = np.array([len(g.devices) for g in plan.groups], dtype=np.intp)
    group_of = np.repeat(np.arange(len(plan.groups)), sizes)
    student_flops = np.array([plan.catalog[g.student].flops for g in plan.groups])[group_of]
    partition = np.array([len(g.filters) for g in plan.groups])[group_of]
    bits = np.array([plan.catalog[g.student].bits_per_filter for g in plan.groups])[group_of]
    latency = device_latency_s(arrays.flops[index], arrays.rate_bps[index], arrays.input_s[index], student_flops, partition, bits)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.intp)
    members = PlanMembers(latency, arrays.outage[index], starts)
    _warn_if_stale(plan, members)
    return members


def _warn_if_stale(plan: Plan, members: PlanMembers) -> None:
    worst = np.maximum.reduceat(members.latency_s, members.starts)
    q = np.exp(np.add.reduceat(np.log(np.maximum(members.outage, 1e-300)), members.starts))
    stored_t = np.array([g.latency_s for g in plan.groups])
    stored_q = np.array([g.failure_prob for g in plan.groups])
    if not np.allclose(worst, stored_t, rtol=STALE_TOLERANCE, atol=0):
        logger.warning("the plan's group latencies differ from the fleet's profiles; simulating with the fleet's")
    if not np.allclose(q, stored_q, rtol=STALE_TOLERANCE, atol=1e-15):
        logger.warning("the plan's failure probabilities differ from the fleet's outage; simulating with the fleet's")
