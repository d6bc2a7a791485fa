"""Independent student trainings of the paper's experiments, one per GPU at a time.

Table II, Figs. 2, 3, 5 and 6 (and Table III) distil one network of students per scheme (per ε in
Fig. 3, with and without dropped slots in Fig. 5); these trainings depend on the teacher and the
plans only, not on each other. When more than one CUDA device is visible and the experiments train
on CUDA (``--device cuda`` or ``auto``), :func:`train_in_parallel` trains them before the
experiments run: one worker process per GPU (``CUDA_VISIBLE_DEVICES`` set to that GPU alone), each
taking the next training as soon as it is free, largest first. The students land in the shared
content-addressed cache, where the experiments then find them. On the CPU, or with one GPU, nothing
changes: the experiments train as they go.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rocoin.contracts.errors import InfeasiblePlanError
from rocoin.contracts.plan import Plan
from rocoin.experiments.common import Training, scheme_trainings
from rocoin.experiments.setup import ExperimentSetup
from rocoin.experiments.workspace import Workspace

logger = logging.getLogger(__name__)

#: ``rocoin.distillation.training.THREADS_ENV`` (not imported: that module needs torch, this one does not).
THREADS_ENV = "ROCOIN_TORCH_THREADS"


def training_devices(device: str | None, cuda_devices: int | None = None) -> list[str]:
    """The devices to spread the trainings over: every visible GPU (``cuda_devices``, else counted:
    torch is asked only here) when the experiments train on CUDA (``cuda`` or ``auto``) and there
    are several; else none (train as the experiments go). ``cuda:N`` asks for one GPU: it is kept to."""
    if device not in ("cuda", "auto"):
        return []
    count = visible_cuda_devices() if cuda_devices is None else cuda_devices
    return [f"cuda:{i}" for i in range(count)] if count > 1 else []


def visible_cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class Pin:
    """How a worker process is started for one device: its environment and the device it trains on."""

    environment: dict[str, str]
    device: str


def pin(device: str, workers: int, environ: Mapping[str, str], cpus: int) -> Pin:
    """``cuda:i`` → a worker that sees that GPU alone (``CUDA_VISIBLE_DEVICES`` = the i-th of the
    visible ones) and trains on ``cuda``; ``cpu`` → a worker on the CPU. Each worker gets its
    share of the cores for torch's threads (not all of them each)."""
    threads = {THREADS_ENV: str(max(1, cpus // workers))}
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        visible = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        physical = visible[index] if index < len(visible) else str(index)
        return Pin({"CUDA_VISIBLE_DEVICES": physical, **threads}, "cuda")
    return Pin(threads, device)


def experiment_trainings(ws: Workspace, names: Sequence[str]) -> list[tuple[Workspace, Training]]:
    """The student trainings the experiments ``names`` need, each once (the calls of
    :func:`~rocoin.experiments.common.trained_runs` the experiments make, listed without training)."""
    from rocoin.experiments.paper import FA_SCHEMES, table3_setup

    wanted: list[tuple[Workspace, Training]] = []
    for name in names:
        if name in ("table2", "fig2"):
            wanted += [(ws, t) for t in scheme_trainings(ws, known=True)]
        elif name == "table3":
            derived = ws.derived(table3_setup(ws.setup)[0])
            wanted += [(derived, t) for t in scheme_trainings(derived, known=True)]
        elif name == "fig3":
            for eps in ws.setup.epsilons:
                try:
                    wanted += [(ws, t) for t in scheme_trainings(ws, known=True, schemes=("rocoin",), epsilon=eps)]
                except InfeasiblePlanError:
                    continue  # fig3 reports it
        elif name == "fig5":
            wanted += [(ws, t) for t in scheme_trainings(ws, known=True)]
            wanted += [(ws, t) for t in scheme_trainings(ws, known=True, schemes=FA_SCHEMES, failure_aware=True)]
        elif name == "fig6":
            wanted += [(ws, t) for t in scheme_trainings(ws, known=False)]
    unique: dict[Path, tuple[Workspace, Training]] = {}
    for space, training in wanted:
        path, _ = space.students_path(training.trained_as, failure_aware=training.failure_aware)
        unique.setdefault(path, (space, training))
    return list(unique.values())


def training_cost(plan: Plan) -> float:
    """FLOPs of one image through every student of the plan: the order of the trainings' lengths."""
    return float(sum(plan.catalog[g.student].flops for g in plan.groups))


def _start_worker(environment: dict[str, str]) -> None:
    os.environ.update(environment)  # before torch starts CUDA in this (spawned) process


def _train(setup: dict[str, Any], cache_dir: str, device: str, plan: dict[str, Any], failure_aware: bool) -> dict[str, Any]:
    """In a worker: distil one plan's students into the shared cache (the teacher, filter graph
    and catalog are there already)."""
    from rocoin.contracts.progress import silent

    started = time.perf_counter()
    ws = Workspace(ExperimentSetup.model_validate(setup), Path(cache_dir), device=device, progress=silent)
    done = ws.students(Plan.model_validate(plan), failure_aware=failure_aware)
    return {"key": done.key, "pid": os.getpid(), "seconds": time.perf_counter() - started, "reused": done.reused}


def train_in_parallel(
    ws: Workspace,
    names: Sequence[str],
    devices: Sequence[str],
) -> list[dict[str, Any]]:
    """Train the students of ``names`` on ``devices``, one worker process per device, each taking
    the next (largest first) training when free; returns one record per training (scheme, device,
    worker pid, seconds). The teacher is trained first, here. Trainings already cached are skipped."""
    ws.teacher_step()
    jobs = []
    for space, t in experiment_trainings(ws, names):
        path = space.students_path(t.trained_as, failure_aware=t.failure_aware)[0]
        if space.pipeline.cache.fresh:
            path.unlink(missing_ok=True)  # made again by a worker (which reuses the teacher made here)
        if not path.exists():
            jobs.append((space, t))
    jobs.sort(key=lambda job: training_cost(job[1].trained_as), reverse=True)
    if not jobs:
        return []
    context = multiprocessing.get_context("spawn")
    pins = [pin(device, len(devices), os.environ, os.cpu_count() or 1) for device in devices]
    pools = [ProcessPoolExecutor(1, mp_context=context, initializer=_start_worker, initargs=(p.environment,)) for p in pins]
    records: list[dict[str, Any]] = []
    running: dict[Future, tuple[int, Workspace, Training]] = {}
    pending = list(jobs)
    logger.info("training %d networks of students on %d devices: %s", len(jobs), len(devices), ", ".join(devices))
    try:
        with ws.progress(f"students on {len(devices)} devices", len(jobs)) as advance:
            while pending or running:
                busy = {slot for slot, _, _ in running.values()}
                for slot, pool in enumerate(pools):
                    if slot not in busy and pending:
                        space, t = pending.pop(0)
                        args = (
                            space.setup.model_dump(mode="json"), str(space.cache_dir), pins[slot].device,
                            t.trained_as.model_dump(mode="json"), t.failure_aware,
                        )  # fmt: skip
                        running[pool.submit(_train, *args)] = (slot, space, t)
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    slot, space, t = running.pop(future)
                    record = {**future.result(), "scheme": t.trained_as.scheme, "failure_aware": t.failure_aware, "device": devices[slot]}
                    # the experiments reuse it, also with fresh: it was made in this run
                    space.mark_students_made(t.trained_as, record["key"])
                    logger.info(
                        "students %s%s trained on %s in %.0f s (worker %d)",
                        record["scheme"], " (failure-aware)" if t.failure_aware else "", record["device"], record["seconds"], record["pid"],
                    )  # fmt: skip
                    records.append(record)
                    advance()
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
    return records
