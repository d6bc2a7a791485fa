"""Training the teacher: SGD with a cosine schedule, a validation split, best checkpoint kept, resumable."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.progress import Progress, log_progress, silent
from rocoin.data import DatasetInfo
from rocoin.distillation.checkpoint import load_checkpoint, load_checkpoint_if_present, load_state, save_checkpoint
from rocoin.distillation.distributed import SINGLE, Ranks, barrier, current_ranks, sum_across
from rocoin.distillation.training import (
    DataConfig,
    check_batch_size,
    compute_device,
    cosine_schedule,
    data_parallel,
    load_data_in_turn,
    make_optimizer,
    shared_accuracy,
    train_batches,
    training_step,
    use_all_cores,
)
from rocoin.models.registry import create_model

logger = logging.getLogger(__name__)

TEACHER_KIND = "teacher"
RESUME_SUFFIX = ".resume"


class TeacherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = "wrn-16-2"
    data: DataConfig
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=128, ge=1)
    optimizer: str = "sgd"
    lr: float = Field(default=0.1, gt=0)
    weight_decay: float = Field(default=5e-4, ge=0)
    warmup_epochs: float = Field(default=0.0, ge=0)
    seed: int = 0


@dataclass(frozen=True)
class Teacher:
    """A trained teacher and everything needed to use it."""

    model: torch.nn.Module
    info: DatasetInfo
    metadata: dict[str, Any]

    @property
    def num_filters(self) -> int:
        return self.model.num_features

    @property
    def data_config(self) -> DataConfig:
        return DataConfig.model_validate(self.metadata["config"]["data"])


def info_to_json(info: DatasetInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "num_classes": info.num_classes,
        "input_shape": list(info.input_shape),
        "mean": list(info.mean),
        "std": list(info.std),
        "class_names": list(info.class_names),
        "augmentation": info.augmentation,
    }


def info_from_json(data: dict[str, Any]) -> DatasetInfo:
    return DatasetInfo(
        name=data["name"],
        num_classes=int(data["num_classes"]),
        input_shape=tuple(data["input_shape"]),
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        class_names=tuple(data["class_names"]),
        augmentation=data["augmentation"],
    )


def train_teacher(
    config: TeacherConfig,
    output: Path,
    *,
    resume: bool = True,
    download: bool = False,
    device: str | None = None,
    progress: Progress = log_progress,
) -> dict[str, Any]:
    """Train ``config.arch`` and keep the checkpoint with the best validation accuracy at ``output``.

    After each epoch the full training state is saved beside it (``output`` + ``.resume``); a
    rerun with the same config continues from there. Returns a summary (accuracies, images/s).
    ``device`` picks where to train (see :func:`compute_device`); checkpoints are the same.
    ``progress`` is told of every training step (one task per epoch).

    Under torchrun (a process group started by
    :func:`~rocoin.distillation.distributed.training_processes`) the model is wrapped in
    DistributedDataParallel, ``config.batch_size`` is the global batch shared by the processes,
    and only rank 0 writes files, logs and reports progress (see :mod:`rocoin.distillation.distributed`).
    """
    use_all_cores()
    ranks = current_ranks()
    check_batch_size(config.batch_size, ranks)
    on = compute_device(device)
    if not ranks.main:
        progress = silent
    data = load_data_in_turn(config.data, download, ranks)
    info = data.info
    torch.manual_seed(config.seed)
    model = create_model(config.arch, in_channels=info.input_shape[0], num_classes=info.num_classes).to(on)
    optimizer = make_optimizer(model.parameters(), config.optimizer, config.lr, config.weight_decay)
    steps_per_epoch = -(-len(data.train) // config.batch_size)
    scheduler = cosine_schedule(optimizer, config.epochs * steps_per_epoch, int(config.warmup_epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(config.seed)
    state = {"epoch": 0, "best_val": -1.0, "history": []}
    resume_path = Path(str(output) + RESUME_SUFFIX)
    restored = _restore(resume_path, config, model, optimizer, scheduler, generator, ranks, on) if resume else None
    if restored is not None:
        state = restored
        logger.info("resuming %s from epoch %d", output, state["epoch"])
    trained = data_parallel(model, on, ranks)
    metadata = {"arch": config.arch, "config": config.model_dump(mode="json"), "dataset": info_to_json(info)}
    for epoch in range(state["epoch"], config.epochs):
        model.train()
        started, seen, loss_sum = time.perf_counter(), 0, 0.0
        with progress(f"teacher epoch {epoch + 1}/{config.epochs}", steps_per_epoch) as advance:
            for batch in train_batches(data.train, info, config.batch_size, augment=True, generator=generator, device=on, ranks=ranks):
                logits = trained(batch.x)
                loss = F.cross_entropy(logits, batch.y) if len(batch.y) else None
                training_step(loss, [logits], batch, ranks, optimizer, scheduler)
                value = 0.0 if loss is None else loss.item()
                seen += batch.size
                loss_sum += value * len(batch.y)
                advance(loss=value)
        throughput = seen / (time.perf_counter() - started)
        (loss_sum,) = sum_across([loss_sum], ranks, on)
        model.eval()
        val_acc = shared_accuracy(model, data.val, info, device=on, ranks=ranks)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "val_accuracy": val_acc, "images_per_s": throughput}
        state["history"].append(record)
        logger.info("teacher epoch %d: loss %.4f, val accuracy %.4f, %.0f images/s", epoch + 1, record["train_loss"], val_acc, throughput)
        if val_acc > state["best_val"]:
            state["best_val"] = val_acc
            if ranks.main:
                save_checkpoint(output, TEACHER_KIND, {**metadata, "epoch": epoch + 1, "val_accuracy": val_acc}, model.state_dict())
        state["epoch"] = epoch + 1
        if ranks.main:
            save_checkpoint(
                resume_path,
                "teacher-resume",
                {**metadata, **{k: v for k, v in state.items()}},
                model.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                generator=generator.get_state(),
            )
    teacher = load_teacher(output, ranks=ranks, device=on)
    test_acc = shared_accuracy(teacher.model.to(on), data.test, info, device=on, ranks=ranks)
    summary = {
        "arch": config.arch,
        "dataset": info.name,
        "epochs": config.epochs,
        "best_epoch": teacher.metadata["epoch"],
        "val_accuracy": teacher.metadata["val_accuracy"],
        "test_accuracy": test_acc,
        "history": state["history"],
    }
    if ranks.active:
        summary["processes"] = ranks.world_size
    if ranks.main:
        resume_path.unlink(missing_ok=True)
        save_checkpoint(
            output, TEACHER_KIND, {**teacher.metadata, "test_accuracy": test_acc, "history": state["history"]}, teacher.model.state_dict()
        )
    barrier(ranks)  # the files are complete when any process returns
    return summary


def _restore(
    path: Path, config: TeacherConfig, model, optimizer, scheduler, generator, ranks: Ranks, on: torch.device
) -> dict[str, Any] | None:
    """The training state of the resumable run at ``path``, loaded into the model, optimiser,
    schedule and generator; ``None`` where there is none."""
    loaded = load_checkpoint_if_present(path, "teacher-resume", ranks=ranks, device=on)
    if loaded is None:
        return None
    metadata, state_dict, payload = loaded
    if metadata.get("config") != config.model_dump(mode="json"):
        raise RocoinError(f"{path}: a resumable run with other settings is here; delete it or rerun with the same options (or --fresh)")
    load_state(model, state_dict, path, f"teacher {config.arch}")
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    generator.set_state(payload["generator"])
    return {"epoch": metadata["epoch"], "best_val": metadata["best_val"], "history": metadata["history"]}


def load_teacher(path: str | Path, *, ranks: Ranks = SINGLE, device: torch.device | None = None) -> Teacher:
    """The teacher at ``path``; with several processes (``ranks``) rank 0 reads it for all (see :func:`load_checkpoint`)."""
    metadata, state_dict, _ = load_checkpoint(path, TEACHER_KIND, ranks=ranks, device=device)
    try:
        info = info_from_json(metadata["dataset"])
        arch = metadata["arch"]
    except (KeyError, TypeError, ValueError):
        raise RocoinError(f"{path}: teacher metadata is incomplete (expected arch and dataset)") from None
    model = create_model(arch, in_channels=info.input_shape[0], num_classes=info.num_classes)
    load_state(model, state_dict, path, f"teacher {arch}")
    model.eval()
    return Teacher(model, info, metadata)
