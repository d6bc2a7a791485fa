"""Pieces shared by teacher training and distillation: data, optimiser, schedule, accuracy."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from rocoin.contracts.errors import RocoinError
from rocoin.data import ArrayDataset, DatasetInfo, load_dataset, split_validation
from rocoin.data.loader import batches, to_tensor
from rocoin.distillation.distributed import SINGLE, Ranks, barrier, broadcast_buffers, current_ranks, shard_bounds, sum_across

logger = logging.getLogger(__name__)

#: Batch size for inference passes (evaluation, caching the teacher).
EVAL_BATCH_SIZE = 500


class DataConfig(BaseModel):
    """Which data to train on; stored in checkpoints so later steps use the very same split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    data_dir: str | None = None
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    split_seed: int = 0
    max_train_images: int | None = Field(default=None, gt=0, description="use only the first N training images")
    max_test_images: int | None = Field(default=None, gt=0, description="use only the first N test images")


@dataclass(frozen=True)
class Data:
    info: DatasetInfo
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset


def load_data(config: DataConfig, *, download: bool = False) -> Data:
    splits = load_dataset(config.dataset, Path(config.data_dir) if config.data_dir else None, download=download)
    train, val = split_validation(splits.train, fraction=config.val_fraction, seed=config.split_seed)
    if config.max_train_images is not None:
        train = train.subset(np.arange(min(len(train), config.max_train_images)))
    test = splits.test
    if config.max_test_images is not None:
        test = test.subset(np.arange(min(len(test), config.max_test_images)))
    for name, part in (("train", train), ("validation", val), ("test", test)):
        if len(part) == 0:
            raise RocoinError(f"{config.dataset}: the {name} split is empty")
    return Data(splits.info, train, val, test)


#: Caps torch's threads (e.g. ``ROCOIN_TORCH_THREADS=1`` for each of two jobs sharing two cores:
#: two jobs of two threads each on two cores run many times slower than one).
THREADS_ENV = "ROCOIN_TORCH_THREADS"


def use_all_cores() -> None:
    """Train with every core, or with ``$ROCOIN_TORCH_THREADS`` threads when it is set; under
    torchrun each of the machine's processes (``LOCAL_WORLD_SIZE``) takes its share of the cores."""
    wanted = os.environ.get(THREADS_ENV, "").strip()
    if wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            raise RocoinError(f"{THREADS_ENV} = {wanted!r}: expected a positive number of threads")
        torch.set_num_threads(int(wanted))
        return
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip() if current_ranks().active else ""
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))


def make_optimizer(parameters, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    raise RocoinError(f"optimizer = {name!r}: expected sgd or adam")


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero over ``total_steps`` optimiser steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Batch(NamedTuple):
    """One training step's images for this process: its share of a global batch."""

    x: torch.Tensor
    y: torch.Tensor
    #: the images' indices in the training set
    index: torch.Tensor
    #: where this share starts in the global batch, and the global batch's size (all processes)
    offset: int
    size: int


def train_batches(
    data: ArrayDataset,
    info: DatasetInfo,
    batch_size: int,
    *,
    augment: bool,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    ranks: Ranks = SINGLE,
) -> Iterator[Batch]:
    """Shuffled batches on ``device``; augmentation (when the dataset has one) if ``augment``.

    ``batch_size`` is the global batch: with several processes (``ranks``) each draws the same
    batches from ``generator`` (seeded alike) and keeps its contiguous share of each.
    """
    order = torch.randperm(len(data), generator=generator).numpy()
    if augment and info.augmentation != "none":
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        shuffled = data.subset(order)
        start = 0
        # several processes augment the whole batch (the same crops and flips as one process), then share it
        on = None if ranks.active else device
        for x, y in batches(shuffled, info, batch_size=batch_size, shuffle=False, augment=True, seed=seed, device=on):
            a, b = shard_bounds(len(y), ranks)
            index = torch.from_numpy(order[start + a : start + b])
            yield Batch(x[a:b].to(device=device), y[a:b].to(device=device), index.to(device=device), a, len(y))
            start += len(y)
        return
    for start in range(0, len(order), batch_size):
        whole = order[start : start + batch_size]
        a, b = shard_bounds(len(whole), ranks)
        index = whole[a:b]
        yield Batch(
            to_tensor(data.images[index], info, device=device),
            torch.from_numpy(data.labels[index]).to(device=device),
            torch.from_numpy(index).to(device=device),
            a,
            len(whole),
        )


def check_batch_size(batch_size: int, ranks: Ranks) -> None:
    if batch_size < ranks.world_size:
        raise RocoinError(
            f"batch_size = {batch_size} is the global batch, shared by {ranks.world_size} processes: give at least {ranks.world_size}"
        )


def share_weight(batch: Batch, ranks: Ranks) -> float:
    """What this process's mean loss is multiplied by so that DDP's average of the gradients is the
    gradient of the global batch's mean loss (shares of unequal size: the last batch)."""
    return ranks.world_size * len(batch.y) / batch.size


def training_step(
    loss: torch.Tensor | None,
    outputs: Sequence[torch.Tensor],
    batch: Batch,
    ranks: Ranks,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """One optimiser and schedule step on this process's mean ``loss`` over its share of ``batch``,
    weighted by :func:`share_weight` (exactly 1 for one process). A share of nothing (``loss`` is
    ``None``: a last batch smaller than the processes) steps on a zero loss over the ``outputs``
    of the forward pass, so that it still joins DDP's all-reduce."""
    weighted = sum(output.sum() for output in outputs) * 0.0 if loss is None else loss * share_weight(batch, ranks)
    optimizer.zero_grad(set_to_none=True)
    weighted.backward()
    optimizer.step()
    scheduler.step()


def inference_batches(
    data: ArrayDataset, info: DatasetInfo, batch_size: int = EVAL_BATCH_SIZE, *, device: torch.device | str | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(data), batch_size):
        yield (
            to_tensor(data.images[start : start + batch_size], info, device=device),
            torch.from_numpy(data.labels[start : start + batch_size]),
        )


@torch.inference_mode()
def collect(
    function: Callable[[torch.Tensor], torch.Tensor], data: ArrayDataset, info: DatasetInfo, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """``function`` over the whole dataset in inference batches (run on ``device``), concatenated on the CPU."""
    return torch.cat([function(x).cpu() for x, _ in inference_batches(data, info, device=device)])


def compute_device(name: str | None) -> torch.device:
    """The torch device to train on: ``cpu`` (default), ``cuda``, ``cuda:N`` or ``auto`` (CUDA when present)."""
    if name in (None, "", "cpu"):
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RocoinError(f"device = {name!r}: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RocoinError(f"device = {name!r}: this torch build sees no CUDA device; use cpu")
    if device.type not in ("cpu", "cuda"):
        raise RocoinError(f"device = {name!r}: expected cpu, cuda, cuda:N or auto")
    return device


def accuracy(logits: torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    labels = torch.as_tensor(labels)
    return float((logits.argmax(dim=1) == labels).float().mean())


def shared_accuracy(model: torch.nn.Module, data: ArrayDataset, info: DatasetInfo, *, device: torch.device, ranks: Ranks = SINGLE) -> float:
    """:func:`accuracy` of ``model`` on ``data``; with several processes each evaluates its share
    (with rank 0's batch-norm statistics) and the correct counts are summed, so all agree."""
    if not ranks.active:
        return accuracy(collect(model, data, info, device=device), data.labels)
    broadcast_buffers(model, ranks)
    start, stop = shard_bounds(len(data), ranks)
    part = data.subset(np.arange(start, stop))
    correct = float((collect(model, part, info, device=device).argmax(dim=1) == torch.as_tensor(part.labels)).sum()) if len(part) else 0.0
    correct, total = sum_across([correct, float(stop - start)], ranks, device)
    return correct / total


def load_data_in_turn(config: DataConfig, download: bool, ranks: Ranks) -> Data:
    """:func:`load_data`; with several processes and ``download``, the first process of each
    machine (``LOCAL_RANK`` 0) downloads while the others wait, then they read what it wrote."""
    if not (download and ranks.active):
        return load_data(config, download=download)
    data = load_data(config, download=True) if ranks.local_rank == 0 else None
    barrier(ranks)
    return data if data is not None else load_data(config, download=False)


def data_parallel(model: torch.nn.Module, on: torch.device, ranks: Ranks) -> torch.nn.Module:
    """``model`` itself for one process; else DistributedDataParallel over it (gradients averaged;
    on CUDA the batch-norm statistics of the global batch, as in one process, with SyncBatchNorm)."""
    if not ranks.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if on.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the BN layers in place, same state_dict
        return DistributedDataParallel(model, device_ids=[on])
    return DistributedDataParallel(model)
