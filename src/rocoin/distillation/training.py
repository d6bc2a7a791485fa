"""Pieces shared by teacher training and distillation: data, optimiser, schedule, accuracy."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from rocoin.contracts.errors import RocoinError
from rocoin.data import ArrayDataset, DatasetInfo, load_dataset, split_validation
from rocoin.data.loader import batches, to_tensor

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
    """Train with every core, or with ``$ROCOIN_TORCH_THREADS`` threads when it is set."""
    wanted = os.environ.get(THREADS_ENV, "").strip()
    if wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            raise RocoinError(f"{THREADS_ENV} = {wanted!r}: expected a positive number of threads")
        torch.set_num_threads(int(wanted))
        return
    torch.set_num_threads(max(1, os.cpu_count() or 1))


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


def train_batches(
    data: ArrayDataset,
    info: DatasetInfo,
    batch_size: int,
    *,
    augment: bool,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Shuffled ``(x, y, index)`` batches on ``device``; augmentation (when the dataset has one) if ``augment``."""
    order = torch.randperm(len(data), generator=generator).numpy()
    if augment and info.augmentation != "none":
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        shuffled = data.subset(order)
        start = 0
        for x, y in batches(shuffled, info, batch_size=batch_size, shuffle=False, augment=True, seed=seed, device=device):
            yield x, y, torch.from_numpy(order[start : start + len(y)]).to(device=device)
            start += len(y)
        return
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield (
            to_tensor(data.images[index], info, device=device),
            torch.from_numpy(data.labels[index]).to(device=device),
            torch.from_numpy(index).to(device=device),
        )


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
