"""Weight initialisation shared by the architectures."""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module, *, fc_std: float | None = None) -> None:
    """Kaiming-normal convolutions (fan-out), BN weight 1 / bias 0, FC bias 0; FC weight
    N(0, ``fc_std``) when given (MobileNetV2's reference), else PyTorch's default."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if fc_std is not None:
                nn.init.normal_(module.weight, 0.0, fc_std)
            nn.init.zeros_(module.bias)
