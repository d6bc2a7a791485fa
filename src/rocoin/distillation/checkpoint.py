"""Checkpoints that hold only tensors and JSON metadata, loaded with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import atomic_path
from rocoin.distillation.distributed import SINGLE, Ranks, broadcast_file

FORMAT_VERSION = 1


def save_checkpoint(
    path: str | os.PathLike[str], kind: str, metadata: dict[str, Any], state_dict: dict[str, torch.Tensor], **extra: Any
) -> None:
    """Write atomically: ``{"format": "rocoin-KIND", "version", "metadata": JSON text, "state_dict", **extra}``.

    ``extra`` may hold optimizer/scheduler state (tensors, numbers, strings, lists, dicts only).
    """
    payload = {
        "format": f"rocoin-{kind}",
        "version": FORMAT_VERSION,
        "metadata": json.dumps(metadata),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(
    path: str | os.PathLike[str], kind: str, *, ranks: Ranks = SINGLE, device: torch.device | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """``(metadata, state_dict, payload)``; never unpickles arbitrary objects.

    With several training processes (``ranks``) only rank 0 reads the file and the others get its
    bytes over the process group (:func:`~rocoin.distillation.distributed.broadcast_file`, tensors
    on ``device``), so every process loads the same checkpoint, or all raise the same error.
    """
    loaded = load_checkpoint_if_present(path, kind, ranks=ranks, device=device)
    if loaded is None:
        raise RocoinError(f"{Path(path)}: checkpoint not found")
    return loaded


def load_checkpoint_if_present(
    path: str | os.PathLike[str], kind: str, *, ranks: Ranks = SINGLE, device: torch.device | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]] | None:
    """:func:`load_checkpoint`, or ``None`` where there is no such file (for several processes:
    where rank 0 has none)."""
    path = Path(path)
    if ranks.active:
        data = broadcast_file(path, ranks, device)
        if data is None:
            return None
        source = io.BytesIO(data)
    elif path.is_file():
        source = path
    else:
        return None
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a checkpoint we can read safely"
        raise RocoinError(
            f"{path}: not a rocoin checkpoint that loads with weights_only=True ({' '.join(str(exc).split())[:200]})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != f"rocoin-{kind}":
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise RocoinError(f"{path}: format = {found!r}: expected a rocoin-{kind} checkpoint")
    if payload.get("version") != FORMAT_VERSION:
        raise RocoinError(f"{path}: version = {payload.get('version')!r}: expected {FORMAT_VERSION}")
    try:
        metadata = json.loads(payload["metadata"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise RocoinError(f"{path}: metadata is missing or not JSON") from None
    return metadata, payload["state_dict"], payload


def load_state(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str | os.PathLike[str], what: str) -> None:
    """``load_state_dict(strict=True)`` with one clear line when the architecture does not match."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:240]
        raise RocoinError(f"{path}: the weights do not fit {what} ({first})") from None
