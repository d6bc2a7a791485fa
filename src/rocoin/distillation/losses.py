"""The distillation loss of SPEC.md §6 (paper eq. 6), one small named module per term.

``L = (1 − α)·CE(y, z_s) + α·T²·KL(σ(z_t/T) ‖ σ(z_s/T)) + β·Σ_k AT(student_k, teacher[P_k])``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossEntropyTerm(nn.Module):
    """``CE(y, z_s)``: hard-label cross-entropy, averaged over the batch."""

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student_logits, labels)

    def extra_repr(self) -> str:
        return "CE(y, z_s)"


class SoftTargetTerm(nn.Module):
    """``T²·KL(σ(z_t/T) ‖ σ(z_s/T))`` (Hinton et al.), batch mean; ``T²`` keeps gradients comparable to CE."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature = {temperature}: expected > 0")
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        log_p_student = F.log_softmax(student_logits / t, dim=1)
        log_p_teacher = F.log_softmax(teacher_logits / t, dim=1)
        return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t

    def extra_repr(self) -> str:
        return f"T²·KL(σ(z_t/T) ‖ σ(z_s/T)), T={self.temperature:g}"


def attention_map(features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``v = vec(mean_c A_c²)`` normalised to unit L2 length, (B, H·W); resized to ``size`` first if given."""
    att = features.pow(2).mean(dim=1, keepdim=True)
    if size is not None and tuple(att.shape[-2:]) != tuple(size):
        att = F.interpolate(att, size=size, mode="bilinear", align_corners=False)
    return F.normalize(att.flatten(1), dim=1)


class AttentionTransferTerm(nn.Module):
    """``AT = ‖v_s/‖v_s‖ − v_t/‖v_t‖‖²`` averaged over batch and map positions (Zagoruyko & Komodakis).

    The average over the ``H·W`` positions is the "scaled by map size" of SPEC.md §6, which makes
    ``β ≈ 10³`` the right order. Student maps of another size are resized to the teacher's.
    """

    def forward(self, student_map: torch.Tensor, teacher_attention: torch.Tensor, teacher_size: tuple[int, int]) -> torch.Tensor:
        return (attention_map(student_map, teacher_size) - teacher_attention).pow(2).mean()

    def extra_repr(self) -> str:
        return "‖v_s/‖v_s‖ − v_t/‖v_t‖‖², v = vec(Σ_c A_c²)"


class DistillationLoss(nn.Module):
    """The weighted sum of the three terms; ``forward`` returns the total and each term's value."""

    def __init__(self, *, alpha: float = 0.9, temperature: float = 4.0, beta: float = 1000.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha = {alpha}: expected a weight in [0, 1]")
        if beta < 0:
            raise ValueError(f"beta = {beta}: expected ≥ 0")
        self.alpha, self.beta = alpha, beta
        self.ce = CrossEntropyTerm()
        self.kd = SoftTargetTerm(temperature)
        self.at = AttentionTransferTerm()

    def forward(
        self,
        student_logits: torch.Tensor,
        labels: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_maps: list[torch.Tensor],
        teacher_attentions: list[torch.Tensor],
        teacher_size: tuple[int, int],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        ce = self.ce(student_logits, labels)
        kd = self.kd(student_logits, teacher_logits)
        at = sum((self.at(s, t, teacher_size) for s, t in zip(student_maps, teacher_attentions)), torch.zeros((), device=labels.device))
        total = (1.0 - self.alpha) * ce + self.alpha * kd + self.beta * at
        values = {"ce": ce, "kd": kd, "at": at, "total": total}
        return total, {k: float(v.detach()) for k, v in values.items()}

    def extra_repr(self) -> str:
        return f"L = (1 − {self.alpha:g})·CE + {self.alpha:g}·T²·KL + {self.beta:g}·Σ_k AT_k"
