"""Distilling the network of students for a plan (SPEC.md §6, paper eq. 6).

One student per group with the architecture the plan chose, a 1×1 bridge per student mapped onto
its partition's filters, one shared FC (initialised from the teacher's) over the pooled outputs
placed in filter order. With ``failure_aware`` whole slots are dropped at random during training
with the plan's group failure probabilities (or ``drop_prob``), so the FC learns to answer when
groups are missing. Without augmentation the teacher runs once over the training set and its
logits and per-partition attention maps are cached. After each epoch the training state is saved
beside the output (``output`` + ``.resume``): a rerun with the same teacher, plan, data and
settings continues after the last finished epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.plan import Plan
from rocoin.contracts.progress import Progress, log_progress, silent
from rocoin.distillation.checkpoint import load_checkpoint, load_checkpoint_if_present, load_state, save_checkpoint
from rocoin.distillation.distributed import SINGLE, Ranks, barrier, current_ranks, gather_rows, shard_bounds, sum_across
from rocoin.distillation.losses import DistillationLoss, attention_map
from rocoin.distillation.students import StudentNetwork, sample_slot_mask
from rocoin.distillation.teacher import RESUME_SUFFIX, Teacher, info_from_json, info_to_json, load_teacher
from rocoin.distillation.training import (
    check_batch_size,
    compute_device,
    cosine_schedule,
    data_parallel,
    inference_batches,
    load_data_in_turn,
    make_optimizer,
    shared_accuracy,
    train_batches,
    training_step,
    use_all_cores,
)

logger = logging.getLogger(__name__)

STUDENTS_KIND = "students"
#: The training state saved after each epoch beside the output (``output`` + ``.resume``).
RESUME_KIND = "students-resume"
#: The attention-transfer authors' β for a 32×32 map; other map sizes scale it by H·W / 1024
#: (SPEC.md §6, "≈10³ scaled by map size"): 7×7 gives β ≈ 48.
AT_REFERENCE_BETA = 1000.0
AT_REFERENCE_POSITIONS = 32 * 32


def attention_beta(config_beta: float | None, teacher_map_size: tuple[int, int]) -> float:
    if config_beta is not None:
        return config_beta
    return AT_REFERENCE_BETA * teacher_map_size[0] * teacher_map_size[1] / AT_REFERENCE_POSITIONS


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=128, ge=1)
    optimizer: str = "adam"  # converges in fewer epochs than SGD on short CPU budgets (measured)
    lr: float = Field(default=0.003, gt=0)
    weight_decay: float = Field(default=5e-4, ge=0)
    alpha: float = Field(default=0.9, ge=0, le=1)
    temperature: float = Field(default=4.0, gt=0)
    beta: float | None = Field(default=None, ge=0, description="AT weight; None: 1000 scaled by the teacher's map size")
    failure_aware: bool = True
    drop_prob: float | None = Field(default=None, ge=0, lt=1, description="slot drop probability; None: the plan's")
    augment: bool = True
    max_train_images: int | None = Field(default=None, gt=0)
    seed: int = 0


def check_plan_fits_teacher(plan: Plan, teacher: Teacher, source: str) -> None:
    if plan.num_filters != teacher.num_filters:
        raise RocoinError(
            f"{source}: num_filters = {plan.num_filters} but the teacher {teacher.metadata['arch']} has"
            f" {teacher.num_filters} filters in its final conv layer; plan with this teacher's activations"
        )


def drop_probabilities(plan: Plan, config: DistillConfig) -> torch.Tensor:
    if not config.failure_aware:
        return torch.zeros(plan.num_groups)
    if config.drop_prob is not None:
        return torch.full((plan.num_groups,), float(config.drop_prob))
    return torch.tensor([g.failure_prob for g in plan.groups], dtype=torch.float32)


def distill(
    teacher_path: Path,
    plan: Plan,
    config: DistillConfig,
    output: Path,
    *,
    plan_source: str = "plan",
    data_dir: str | None = None,
    download: bool = False,
    device: str | None = None,
    progress: Progress = log_progress,
    resume: bool = True,
    replace_other_run: bool = False,
) -> dict[str, Any]:
    """Train the students of ``plan`` from the teacher at ``teacher_path``; save them at ``output``.

    After each epoch the training state is saved at ``output`` + ``.resume``; with ``resume`` a
    rerun continues from it when it was made with the same teacher, plan, data and settings. One
    made otherwise is a :class:`RocoinError` (delete it, or ``resume=False``), or is replaced
    with ``replace_other_run`` (the pipeline's choice: its own caching names its files).

    ``device`` picks where to train (see :func:`compute_device`); ``progress`` is told of every
    training step (one task per epoch). The history has, per epoch, the
    loss terms and the validation accuracy of the aggregated students (all present).

    Under torchrun the students are trained with DistributedDataParallel, ``config.batch_size``
    being the global batch; each process caches the teacher's outputs for its share of the
    training images and the shares are gathered; only rank 0 reads the teacher file and writes
    the students (see :mod:`rocoin.distillation.distributed`).
    """
    use_all_cores()
    ranks = current_ranks()
    check_batch_size(config.batch_size, ranks)
    on = compute_device(device)
    if not ranks.main:
        progress = silent
    teacher = load_teacher(teacher_path, ranks=ranks, device=on)
    teacher.model.to(on)
    check_plan_fits_teacher(plan, teacher, plan_source)
    update: dict[str, Any] = {"max_train_images": config.max_train_images or teacher.data_config.max_train_images}
    if data_dir is not None:
        update["data_dir"] = data_dir
    data_config = teacher.data_config.model_copy(update=update)
    data = load_data_in_turn(data_config, download, ranks)
    info = data.info
    torch.manual_seed(config.seed)
    network = StudentNetwork(plan, info.input_shape[0], info.num_classes).to(on)
    with torch.no_grad():  # the concatenated slots have the teacher's pooled layout: start from its FC
        network.fc.weight.copy_(teacher.model.fc.weight)
        network.fc.bias.copy_(teacher.model.fc.bias)
    with torch.inference_mode():
        teacher_size = tuple(teacher.model.forward_features(torch.zeros((1, *info.input_shape), device=on)).shape[-2:])
    beta = attention_beta(config.beta, teacher_size)
    loss_fn = DistillationLoss(alpha=config.alpha, temperature=config.temperature, beta=beta)
    logger.info("loss: %s", loss_fn.extra_repr())
    drop = drop_probabilities(plan, config)
    parts = [torch.tensor(g.filters, device=on) for g in plan.groups]
    augment = config.augment and info.augmentation != "none"
    cache = None if augment else _teacher_cache(teacher, data.train, info, parts, on, ranks)
    trained = data_parallel(_Students(network), on, ranks)
    optimizer = make_optimizer(network.parameters(), config.optimizer, config.lr, config.weight_decay)
    steps_per_epoch = -(-len(data.train) // config.batch_size)
    scheduler = cosine_schedule(optimizer, config.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(config.seed)
    history, best_val, best_state = [], -1.0, None
    resume_path = Path(str(output) + RESUME_SUFFIX)
    run = _run_identity(teacher, plan, config, data_config)
    first = 0
    restored = _restore(resume_path, run, replace_other_run, network, optimizer, scheduler, generator, ranks, on) if resume else None
    if restored is not None:
        first, history, best_val, best_state = restored
        logger.info("resuming %s after epoch %d", output, first)
    for epoch in range(first, config.epochs):
        network.train()
        started = time.perf_counter()
        with progress(f"distill epoch {epoch + 1}/{config.epochs}", steps_per_epoch) as advance:
            seen, totals = _train_epoch(
                trained, teacher, cache, parts, data.train, info, config, loss_fn, optimizer, scheduler, drop, generator, on, advance, ranks
            )
        throughput = seen / (time.perf_counter() - started)
        totals = dict(zip(totals, sum_across(list(totals.values()), ranks, on), strict=True))
        network.eval()
        val_acc = shared_accuracy(network, data.val, info, device=on, ranks=ranks)
        record = {
            "epoch": epoch + 1,
            **{f"loss_{k}": v / seen for k, v in totals.items()},
            "val_accuracy": val_acc,
            "images_per_s": throughput,
        }
        history.append(record)
        logger.info("distill epoch %d: loss %.4f, val accuracy %.4f, %.0f images/s", epoch + 1, record["loss_total"], val_acc, throughput)
        if val_acc > best_val:
            best_val, best_state = val_acc, {k: v.detach().clone() for k, v in network.state_dict().items()}
        if ranks.main:
            save_checkpoint(
                resume_path, RESUME_KIND, {**run, "epoch": epoch + 1, "best_val": best_val, "history": history}, network.state_dict(),
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), generator=generator.get_state(),
                best_state={k: v.detach().cpu() for k, v in best_state.items()},
            )  # fmt: skip
    network.load_state_dict(best_state)
    network.eval()
    test_acc = shared_accuracy(network, data.test, info, device=on, ranks=ranks)
    metadata = {
        "plan": plan.model_dump(mode="json"),
        "dataset": info_to_json(info),
        "data": data_config.model_dump(mode="json"),
        "teacher": {"arch": teacher.metadata["arch"], "test_accuracy": teacher.metadata.get("test_accuracy")},
        "config": config.model_dump(mode="json"),
        "beta": beta,
        "val_accuracy": best_val,
        "test_accuracy": test_acc,
        "history": history,
    }
    if ranks.main:
        save_checkpoint(output, STUDENTS_KIND, metadata, network.state_dict())
        resume_path.unlink(missing_ok=True)
    barrier(ranks)  # the file is complete when any process returns
    summary = {"val_accuracy": best_val, "test_accuracy": test_acc, "history": history, "teacher_cached": cache is not None}
    return {**summary, "processes": ranks.world_size} if ranks.active else summary


def _run_identity(teacher: Teacher, plan: Plan, config: DistillConfig, data_config) -> dict[str, Any]:
    """What a resumable run must share with the one resuming it (JSON): the teacher (its
    checkpoint's metadata, hashed), the plan, the data (wherever its folder is now) and the
    distillation settings."""
    teacher_json = json.dumps(teacher.metadata, sort_keys=True, default=str).encode()
    return {
        "teacher_sha256": hashlib.sha256(teacher_json).hexdigest(),
        "plan": plan.model_dump(mode="json"),
        "data": data_config.model_dump(mode="json", exclude={"data_dir"}),
        "config": config.model_dump(mode="json"),
    }


def _restore(path: Path, run: dict[str, Any], replace_other_run: bool, network, optimizer, scheduler, generator, ranks: Ranks, on):
    """``(epochs done, history, best validation accuracy, best state)`` of the resumable run at
    ``path``, loaded into the network, optimiser, schedule and generator; ``None`` where there is
    none (or, with ``replace_other_run``, where it was made otherwise)."""
    loaded = load_checkpoint_if_present(path, RESUME_KIND, ranks=ranks, device=on)
    if loaded is None:
        return None
    metadata, state_dict, payload = loaded
    if any(metadata.get(k) != v for k, v in run.items()):
        if replace_other_run:
            logger.info("%s: a resumable run with other settings: starting over", path)
            return None
        differs = ", ".join(k for k, v in run.items() if metadata.get(k) != v)
        raise RocoinError(f"{path}: a resumable run with another {differs} is here; delete it or rerun with the same options (or --fresh)")
    load_state(network, state_dict, path, "students")
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    generator.set_state(payload["generator"])
    return metadata["epoch"], metadata["history"], metadata["best_val"], dict(payload["best_state"])


class _Students(torch.nn.Module):
    """One training step's forward of the students: ``(logits, bridge maps)``, through one module
    call so that DistributedDataParallel sees it."""

    def __init__(self, network: StudentNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps = self.network.maps(x)
        return self.network.fc(self.network.assemble(maps, mask)), maps


def _teacher_targets(teacher: Teacher, cache: dict[str, Any] | None, x: torch.Tensor, index: torch.Tensor, parts: list[torch.Tensor]):
    """The teacher's logits, feature-map size and per-group attention maps for a batch (cached when the data is not augmented)."""
    if cache is not None:
        return cache["logits"][index], cache["size"], [a[index] for a in cache["attention"]]
    with torch.no_grad():
        teacher_map = teacher.model.forward_features(x)
        return teacher.model.forward_head(teacher_map), tuple(teacher_map.shape[-2:]), [attention_map(teacher_map[:, p]) for p in parts]


def _train_epoch(trained, teacher, cache, parts, train, info, config, loss_fn, optimizer, scheduler, drop, generator, on, advance, ranks):
    """One epoch over ``train``; returns the images seen (all processes) and this process's
    summed (image-weighted) loss terms."""
    augment = config.augment and info.augmentation != "none"
    seen, totals = 0, {"ce": 0.0, "kd": 0.0, "at": 0.0, "total": 0.0}
    for batch in train_batches(train, info, config.batch_size, augment=augment, generator=generator, device=on, ranks=ranks):
        x, y = batch.x, batch.y
        # the mask of the whole batch from the shared generator (the same draws as one process), this share of it
        mask = sample_slot_mask(batch.size, drop, generator)[batch.offset : batch.offset + len(y)].to(on) if config.failure_aware else None
        logits, maps = trained(x, mask)
        if len(y):
            teacher_logits, size, teacher_att = _teacher_targets(teacher, cache, x, batch.index, parts)
            loss, terms = loss_fn(logits, y, teacher_logits, maps, teacher_att, size)
        else:  # a share of nothing (a last batch smaller than the processes): see training_step
            loss, terms = None, dict.fromkeys(totals, 0.0)
        training_step(loss, [*maps, logits], batch, ranks, optimizer, scheduler)
        seen += batch.size
        for key in totals:
            totals[key] += terms[key] * len(y)
        advance(loss=terms["total"])
    return seen, totals


@torch.inference_mode()
def _teacher_cache(teacher: Teacher, data, info, parts: list[torch.Tensor], device: torch.device, ranks: Ranks = SINGLE) -> dict[str, Any]:
    """Teacher logits and per-partition attention maps for every training image (no augmentation);
    with several processes each computes its share and the shares are gathered."""
    started = time.perf_counter()
    total = len(data)
    if ranks.active:
        if total < ranks.world_size:
            raise RocoinError(f"{total} training images cannot be shared by {ranks.world_size} processes")
        data = data.subset(np.arange(*shard_bounds(total, ranks)))
    logits, attention, size = [], [[] for _ in parts], None
    for x, _ in inference_batches(data, info, device=device):
        teacher_map = teacher.model.forward_features(x)
        size = tuple(teacher_map.shape[-2:])
        logits.append(teacher.model.forward_head(teacher_map))
        for k, p in enumerate(parts):
            attention[k].append(attention_map(teacher_map[:, p]))
    cached = {"logits": torch.cat(logits), "attention": [torch.cat(a) for a in attention], "size": size}
    if ranks.active:
        cached["logits"] = gather_rows(cached["logits"], total, ranks)
        cached["attention"] = [gather_rows(a, total, ranks) for a in cached["attention"]]
    logger.info("teacher outputs cached for %d images in %.1f s", total, time.perf_counter() - started)
    return cached


class Students:
    """A loaded ``students.pt``: the network, its plan and the dataset description."""

    def __init__(self, path: str | Path) -> None:
        metadata, state_dict, _ = load_checkpoint(path, STUDENTS_KIND)
        try:
            self.plan = Plan.model_validate(metadata["plan"])
            self.info = info_from_json(metadata["dataset"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RocoinError(f"{path}: students metadata is incomplete or invalid ({' '.join(str(exc).split())[:160]})") from None
        self.metadata = metadata
        self.network = StudentNetwork(self.plan, self.info.input_shape[0], self.info.num_classes)
        load_state(self.network, state_dict, path, f"the students of its plan ({', '.join(g.student for g in self.plan.groups)})")
        self.network.eval()
