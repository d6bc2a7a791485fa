"""Model names -> PyTorch modules: ``wrn-D-K`` and ``mobilenetv2-W``.

A name is a family prefix and its arguments (``wrn-16-4``: depth 16, widening 4;
``mobilenetv2-0.5``: width multiplier 0.5). :data:`FAMILIES` maps each prefix to how its
arguments are read and to the builder; nothing is registered as an import side effect.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from rocoin.contracts.errors import RocoinError
from rocoin.models.analytic import DEFAULT_STUDENTS
from rocoin.models.mobilenetv2 import MAX_WIDTH_MULT, MobileNetV2
from rocoin.models.wrn import WideResNet

#: Teachers used in the paper (CIFAR-10/100).
TEACHERS = ("wrn-16-4", "wrn-28-10")


@dataclass(frozen=True)
class Family:
    """One architecture family: the arguments after ``prefix-`` and how to build it."""

    form: str  # shown in error messages
    pattern: re.Pattern[str]  # matches the arguments after "prefix-"
    parse: Callable[[re.Match[str]], tuple | None]  # arguments -> builder arguments, None if out of range
    build: Callable[..., nn.Module]  # build(*args, in_channels=, num_classes=)


def _wrn_args(match: re.Match[str]) -> tuple[int, int] | None:
    depth, widen = int(match[1]), int(match[2])
    valid = depth >= 10 and (depth - 4) % 6 == 0 and widen >= 1
    return (depth, widen) if valid else None


def _mobilenetv2_args(match: re.Match[str]) -> tuple[float] | None:
    width = float(match[1])
    return (width,) if 0 < width <= MAX_WIDTH_MULT else None


FAMILIES: dict[str, Family] = {
    "wrn": Family("wrn-D-K (D = 6n+4 >= 10, K >= 1, e.g. wrn-16-1)", re.compile(r"(\d+)-(\d+)"), _wrn_args, WideResNet),
    "mobilenetv2": Family(
        "mobilenetv2-W (0 < W <= 4, e.g. mobilenetv2-0.5)", re.compile(r"(\d+(?:\.\d+)?)"), _mobilenetv2_args, MobileNetV2
    ),
}


def _accepted_forms() -> str:
    return " or ".join(family.form for family in FAMILIES.values())


def parse_model_name(name: str) -> tuple[str, tuple]:
    """``"wrn-16-4"`` -> ``("wrn", (16, 4))``; ``"mobilenetv2-0.5"`` -> ``("mobilenetv2", (0.5,))``."""
    prefix, sep, rest = str(name).partition("-")
    family = FAMILIES.get(prefix)
    match = family.pattern.fullmatch(rest) if family is not None and sep else None
    if match is None:
        raise RocoinError(f"model = {name!r}: expected {_accepted_forms()}")
    args = family.parse(match)
    if args is None:
        raise RocoinError(f"model = {name!r}: expected {family.form}")
    return prefix, args


def create_model(name: str, *, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """A freshly initialised model; it exposes ``forward_features``, ``forward_head``,
    ``num_features`` and ``fc``."""
    prefix, args = parse_model_name(name)
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise RocoinError(f"in_channels = {in_channels!r}: expected a positive integer")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise RocoinError(f"num_classes = {num_classes!r}: expected a positive integer")
    return FAMILIES[prefix].build(*args, in_channels=in_channels, num_classes=num_classes)


def model_names() -> tuple[str, ...]:
    """The built-in students followed by the paper's teachers."""
    return tuple(DEFAULT_STUDENTS) + tuple(name for name in TEACHERS if name not in DEFAULT_STUDENTS)
