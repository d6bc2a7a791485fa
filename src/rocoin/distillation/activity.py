"""The planner's input from a real teacher: per-image average activity of its final conv filters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rocoin.contracts.errors import RocoinError
from rocoin.distillation.teacher import load_teacher
from rocoin.distillation.training import collect, load_data, use_all_cores

SPLITS = ("val", "train", "test")


def teacher_activations(teacher_path: str | Path, *, split: str = "val", data_dir: str | None = None, download: bool = False) -> np.ndarray:
    """(images × F) float32: the spatial mean of each final-layer filter's post-ReLU map per image.

    The default split is the teacher's own validation split (the paper's "validation set").
    """
    if split not in SPLITS:
        raise RocoinError(f"split = {split!r}: expected one of {', '.join(SPLITS)}")
    use_all_cores()
    teacher = load_teacher(teacher_path)
    config = teacher.data_config
    if data_dir is not None:
        config = config.model_copy(update={"data_dir": data_dir})
    data = load_data(config, download=download)
    part = {"val": data.val, "train": data.train, "test": data.test}[split]
    activity = collect(lambda x: teacher.model.forward_features(x).mean(dim=(2, 3)), part, data.info)
    return activity.to(torch.float32).numpy()
