"""Training in several processes started by ``torchrun`` (DistributedDataParallel).

``rocoin train-teacher`` and ``rocoin distill`` run unchanged under
``torchrun --nproc-per-node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT]``:
:func:`training_processes` reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, starts the
process group (gloo on the CPU, NCCL on CUDA with each process on ``cuda:LOCAL_RANK``) and
destroys it at the end, also after an error. Without torchrun (or with ``WORLD_SIZE=1``) nothing
changes: no process group, the same numbers as before.

What the processes share:

* **batches** — ``--batch-size`` is the *global* batch. Every process draws the same shuffled
  global batches from the same seeded generator and keeps its contiguous share
  (:func:`shard_bounds`); each share's mean loss is weighted by its share of the batch, so the
  gradient DDP averages is the gradient of the global batch's mean loss, as in one process. The
  training order is a function of the seed alone, whatever the number of processes.
* **evaluation** — each process evaluates a contiguous share of the images and the correct
  counts are summed (:func:`sum_across`), so every process sees the same accuracy and takes the
  same best-checkpoint decision.
* **files** — only rank 0 reads checkpoints from disk and writes them; the others get the bytes
  over the process group (:func:`broadcast_file`), so machines need no shared file system for
  the checkpoints (each needs the data set). Progress bars and log lines come from rank 0 only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from rocoin.contracts.errors import RocoinError

logger = logging.getLogger(__name__)

#: The variables torchrun sets for every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that reads and writes files, logs and draws progress bars."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: a process group is running."""
        return self.world_size > 1


SINGLE = Ranks()


def _number(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name, "").strip()
    if not value.isdigit():
        raise RocoinError(
            f"{name} = {value!r}: torchrun sets {', '.join(TORCHRUN_VARIABLES)} to numbers; start the command with torchrun or unset WORLD_SIZE"
        )
    return int(value)


def torchrun_ranks(environ: Mapping[str, str] | None = None) -> Ranks:
    """The ranks torchrun gave this process; :data:`SINGLE` when ``WORLD_SIZE`` is unset or 1."""
    environ = os.environ if environ is None else environ
    if environ.get("WORLD_SIZE", "").strip() in ("", "1"):
        return SINGLE
    ranks = Ranks(_number(environ, "RANK"), _number(environ, "WORLD_SIZE"), _number(environ, "LOCAL_RANK"))
    if ranks.world_size < 1 or ranks.rank >= ranks.world_size:
        raise RocoinError(f"RANK = {ranks.rank}, WORLD_SIZE = {ranks.world_size}: expected 0 <= RANK < WORLD_SIZE")
    return ranks


def current_ranks() -> Ranks:
    """The ranks of the running process group (:func:`training_processes`), else :data:`SINGLE`."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    local = os.environ.get("LOCAL_RANK", "0").strip()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(local) if local.isdigit() else 0)


def process_device(name: str | None, ranks: Ranks) -> str | None:
    """The device of this process: under torchrun, ``cuda``/``auto`` (with CUDA present) mean
    ``cuda:LOCAL_RANK``; one process keeps ``name`` as it is."""
    if not ranks.active or name in (None, "", "cpu"):
        return name
    if name == "auto" and not torch.cuda.is_available():
        return "cpu"
    if name not in ("cuda", "auto"):
        raise RocoinError(f"device = {name!r}: under torchrun each process trains on cuda:LOCAL_RANK; give --device cuda (or cpu, auto)")
    if not torch.cuda.is_available():
        raise RocoinError(f"device = {name!r}: this torch build sees no CUDA device; use cpu")
    if ranks.local_rank >= torch.cuda.device_count():
        raise RocoinError(
            f"LOCAL_RANK = {ranks.local_rank} but this machine has {torch.cuda.device_count()} CUDA devices:"
            " start at most that many processes per node (--nproc-per-node)"
        )
    return f"cuda:{ranks.local_rank}"


@contextmanager
def training_processes(device: str | None = None, environ: Mapping[str, str] | None = None) -> Iterator[tuple[Ranks, str | None]]:
    """Under torchrun: start the process group (gloo on the CPU, NCCL on CUDA), quiet the logs of
    ranks other than 0, and yield ``(ranks, this process's device)``; the group is destroyed on
    the way out, also after an error. Otherwise yield ``(SINGLE, device)`` and do nothing.

    A group the caller started already is used as it is and left to the caller to destroy
    (torch cannot start a second group in a process under torchrun reliably: one per process)."""
    ranks = torchrun_ranks(environ)
    if not ranks.active:
        yield SINGLE, device
        return
    if not dist.is_available():
        raise RocoinError("this torch build has no torch.distributed; run without torchrun")
    mine = process_device(device, ranks)
    if dist.is_initialized():
        yield ranks, mine
        return
    cuda = mine is not None and mine.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(mine))
    dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device(mine) if cuda else None)
    package = logging.getLogger("rocoin")
    level = package.level
    if not ranks.main:
        package.setLevel(logging.WARNING)
    try:
        logger.info("process group: %d processes (%s)", ranks.world_size, "nccl" if cuda else "gloo")
        yield ranks, mine
    finally:
        dist.destroy_process_group()
        package.setLevel(level)


def shard_bounds(n: int, ranks: Ranks) -> tuple[int, int]:
    """``[start, stop)`` of this rank's contiguous share of ``n`` items; shares differ by at most
    one item, the first ranks take the extra ones (one process: ``(0, n)``)."""
    base, extra = divmod(n, ranks.world_size)
    start = ranks.rank * base + min(ranks.rank, extra)
    return start, start + base + (1 if ranks.rank < extra else 0)


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        dist.barrier()


def sum_across(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    """Each value summed over the processes (float64; one process: unchanged)."""
    if not ranks.active:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast_file(path: Path, ranks: Ranks, device: torch.device) -> bytes | None:
    """The bytes of ``path`` as rank 0 reads them (``None`` where it has no such file), on every rank."""
    if not ranks.active:
        return path.read_bytes() if path.is_file() else None
    data = (path.read_bytes() if path.is_file() else None) if ranks.main else None
    size = torch.tensor([-1 if data is None else len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    if int(size) < 0:
        return None
    buffer = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        if ranks.main
        else torch.empty(int(size), dtype=torch.uint8, device=device)
    )
    dist.broadcast(buffer, src=0)
    return data if ranks.main else buffer.cpu().numpy().tobytes()


def broadcast_buffers(module: torch.nn.Module, ranks: Ranks) -> None:
    """Rank 0's buffers (batch-norm statistics) on every rank, e.g. before evaluating."""
    if ranks.active:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def gather_rows(local: torch.Tensor, total: int, ranks: Ranks) -> torch.Tensor:
    """Every rank's rows, each rank holding its :func:`shard_bounds` share of ``total``, in order."""
    if not ranks.active:
        return local
    shares = [shard_bounds(total, Ranks(r, ranks.world_size)) for r in range(ranks.world_size)]
    longest = max(stop - start for start, stop in shares)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in shares]
    dist.all_gather(parts, padded)
    return torch.cat([part[: stop - start] for part, (start, stop) in zip(parts, shares, strict=True)])
