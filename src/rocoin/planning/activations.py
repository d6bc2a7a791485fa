"""Reading the planner's activation input: an (images × F) ``.npy`` array of filter activity."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rocoin.errors import RocoinError
from rocoin.planning.partition import check_activations


def load_activations(path: str | os.PathLike[str]) -> np.ndarray:
    """Load and validate ``ACT.npy`` (never unpickles: ``allow_pickle=False``)."""
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise RocoinError(f"{path}: file not found") from None
    except (ValueError, OSError, EOFError) as exc:
        raise RocoinError(f"{path}: not a readable .npy array ({' '.join(str(exc).split())})") from None
    if isinstance(array, np.lib.npyio.NpzFile):  # np.load of an .npz archive
        raise RocoinError(f"{path}: expected a single .npy array (images × filters), got an .npz archive")
    return check_activations(array, source=str(path))
