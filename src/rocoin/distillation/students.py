"""The network of students (SPEC.md §6): one student per group, a bridge each, one shared FC."""

from __future__ import annotations

import torch
from torch import nn

from rocoin.contracts.plan import Plan
from rocoin.models.registry import create_model


class DeviceStudent(nn.Module):
    """What every device of a group runs: the student's feature extractor and its 1×1 bridge.

    ``forward(x)`` returns the bridge map ``(B, |P_k|, h, w)``; a device sends its spatial mean,
    ``|P_k|`` float32 values — its portion of the teacher's pooled final-layer output.
    """

    def __init__(self, arch: str, in_channels: int, partition_size: int) -> None:
        super().__init__()
        self.arch = arch
        self.backbone = create_model(arch, in_channels=in_channels, num_classes=1)
        self.backbone.fc = nn.Identity()  # the head runs at the source, not here
        self.bridge = nn.Conv2d(self.backbone.num_features, partition_size, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bridge(self.backbone.forward_features(x))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The ``|P_k|`` values a device sends back, (B, |P_k|)."""
        return self.forward(x).mean(dim=(2, 3))


class StudentNetwork(nn.Module):
    """All groups' students; their pooled outputs, placed in filter order, feed one FC layer.

    ``slot_mask`` (B, K) of booleans marks the slots that are *missing* (zero-filled), as the
    source does at its deadline.
    """

    def __init__(self, plan: Plan, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.num_filters = plan.num_filters
        self.students = nn.ModuleList(DeviceStudent(g.student, in_channels, len(g.filters)) for g in plan.groups)
        order = torch.tensor([f for g in plan.groups for f in g.filters], dtype=torch.long)
        slot = torch.cat([torch.full((len(g.filters),), k, dtype=torch.long) for k, g in enumerate(plan.groups)])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        self.register_buffer("gather_index", inverse, persistent=False)  # filter f <- concatenated position
        self.register_buffer("slot_of_filter", slot[inverse], persistent=False)  # group of filter f
        self.fc = nn.Linear(plan.num_filters, num_classes)

    @property
    def num_slots(self) -> int:
        return len(self.students)

    def maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [student(x) for student in self.students]

    def assemble(self, maps: list[torch.Tensor], slot_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pool each bridge map, concatenate in filter order, zero the missing slots: (B, F)."""
        pooled = torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1)[:, self.gather_index]
        if slot_mask is not None:
            pooled = pooled * (~slot_mask[:, self.slot_of_filter]).to(pooled.dtype)
        return pooled

    def features(self, x: torch.Tensor, slot_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.assemble(self.maps(x), slot_mask)

    def forward(self, x: torch.Tensor, slot_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.features(x, slot_mask))

    def mask_filters(self, features: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
        """Zero the filters of missing slots in pre-computed features (B, F)."""
        return features * (~slot_mask[:, self.slot_of_filter]).to(features.dtype)


def sample_slot_mask(batch: int, probabilities: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Failure-aware training: each slot of each sample is missing with its own probability, (B, K)."""
    return torch.rand((batch, len(probabilities)), generator=generator) < probabilities[None, :]
