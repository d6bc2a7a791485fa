"""Reading the planner's activation input: an (images × F) ``.npy`` array of filter activity."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rocoin.contracts.fileio import load_npy
from rocoin.planning.partition import check_activations


def load_activations(path: str | os.PathLike[str]) -> np.ndarray:
    """Load and validate ``ACT.npy`` (never unpickles; the header is checked first: ``load_npy``)."""
    path = Path(path)
    return check_activations(load_npy(path), source=str(path))
