"""Measure students on real PyTorch modules: parameters, FLOPs and memory of one inference.

For a model and an input shape ``C×H×W``, with a batch of 1 in eval mode:

- ``params``: ``sum(p.numel())`` over the parameters.
- ``flops``: counted by ``torch.utils.flop_counter.FlopCounterMode`` during one forward. It
  counts ``2 × multiply-accumulates`` of convolutions (grouped and depthwise included) and of the
  FC matrix product; BN, activations, additions, pooling and the FC bias are not counted. This is
  the convention of :mod:`rocoin.models.analytic`, so the two agree exactly.
- ``memory_bytes``: bytes of all parameters and buffers (BN running statistics included) plus the
  *measured* peak of activation memory during one forward under ``torch.inference_mode()``. The
  peak comes from the CPU allocator itself: ``torch.profiler`` with ``profile_memory=True``
  records every allocation (+bytes) and free (−bytes) of the profiled region as a ``[memory]``
  event; summing them in time order gives the bytes live at each moment, and the peak is the
  running maximum. The input tensor is allocated inside the region, so the peak covers the
  input, every intermediate map, the temporary buffers of the kernels (e.g. im2col workspaces)
  and the logits. One warm-up forward runs first so that one-time caches are not counted.
- ``out_dim``: the model's ``num_features`` (channels of the final feature map).

Measuring takes well under a second per student on a CPU after the profiler's first start
(about one second).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from rocoin.contracts.catalog import Catalog, StudentSpec
from rocoin.contracts.errors import RocoinError
from rocoin.models.analytic import DEFAULT_STUDENTS
from rocoin.models.registry import create_model

log = logging.getLogger(__name__)

#: Name of the profiler events that carry one allocation (+bytes) or free (-bytes).
MEMORY_EVENT = "[memory]"
#: Kineto's log threshold: above its highest level (5, "USDT"), which otherwise prints
#: "profiler_start" / "profiler_stop" on stderr for every profile. Read when kineto starts.
KINETO_QUIET_LEVEL = "6"


@dataclass(frozen=True)
class Measurement:
    """What one batch-1 inference of a module costs."""

    params: int
    flops: int
    weight_bytes: int  # parameters and buffers
    peak_activation_bytes: int  # measured peak of memory allocated during the forward
    out_dim: int

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.peak_activation_bytes

    def spec(self) -> StudentSpec:
        return StudentSpec(flops=float(self.flops), memory_bytes=self.memory_bytes, params=self.params, out_dim=self.out_dim)


def _check_input_shape(input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape):
        raise RocoinError(f"input_shape = {input_shape!r}: expected (channels, height, width) with positive integers")
    return shape  # type: ignore[return-value]


def count_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """FLOPs (2 × MACs of convolutions and matrix products) of one batch-1 forward."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, *input_shape))
    return int(counter.get_total_flops())


def peak_activation_bytes(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Measured peak of CPU memory allocated during one batch-1 forward (input included)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_QUIET_LEVEL)  # a user's own setting wins
    with torch.inference_mode():
        model(torch.zeros(1, *input_shape))  # warm-up
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            x = torch.zeros(1, *input_shape)
            logits = model(x)
            del x, logits
    events = getattr(prof.profiler, "kineto_results", None)
    if events is None:
        raise RuntimeError("torch.profiler gave no raw events: memory cannot be measured with this torch build")
    changes = sorted(
        ((event.start_ns(), event.nbytes()) for event in events.events() if event.name() == MEMORY_EVENT),
        key=lambda item: item[0],
    )
    if not changes:
        raise RuntimeError("torch.profiler recorded no allocation: memory cannot be measured with this torch build")
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_module(model: nn.Module, input_shape: tuple[int, int, int]) -> Measurement:
    """Measure a model exposing ``num_features`` on one input of ``input_shape`` (C, H, W)."""
    shape = _check_input_shape(input_shape)
    model.eval()
    tensors = [*model.parameters(), *model.buffers()]
    return Measurement(
        params=sum(p.numel() for p in model.parameters()),
        flops=count_flops(model, shape),
        weight_bytes=sum(t.numel() * t.element_size() for t in tensors),
        peak_activation_bytes=peak_activation_bytes(model, shape),
        out_dim=int(model.num_features),
    )


def measure_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> StudentSpec:
    """The catalog entry of registry model ``name`` for inputs of ``input_shape`` (C, H, W)."""
    shape = _check_input_shape(input_shape)
    model = create_model(name, in_channels=shape[0], num_classes=num_classes)
    return measure_module(model, shape).spec()


def measure_catalog(
    input_shape: tuple[int, int, int],
    num_classes: int,
    names: Iterable[str] = DEFAULT_STUDENTS,
    progress: Callable[[str, StudentSpec], None] | None = None,
) -> Catalog:
    """Measure every student of ``names``; ``progress(name, spec)`` is called after each one."""
    entries: dict[str, StudentSpec] = {}
    for name in names:
        spec = measure_model(name, input_shape, num_classes)
        log.debug("measured %s on %s: %s", name, input_shape, spec)
        entries[name] = spec
        if progress is not None:
            progress(name, spec)
    return Catalog(entries)
