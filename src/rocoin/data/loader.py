"""Mini-batches of normalised float tensors from an :class:`~rocoin.data.datasets.ArrayDataset`.

The data stay uint8 in memory; each batch is gathered, augmented (numpy, vectorised over the
batch, seeded) and only then converted to float32 and normalised with the data set's mean/std.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from rocoin.contracts.errors import RocoinError
from rocoin.data.datasets import ArrayDataset, DatasetInfo

CROP_PADDING = 4
AUGMENTATIONS = ("crop-flip", "none")


def to_tensor(images: np.ndarray | torch.Tensor, info: DatasetInfo, *, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 images ``(N, C, H, W)`` (or one ``(C, H, W)``) → float32 ``(N, C, H, W)``, ``(x/255 - mean)/std``."""
    if isinstance(images, torch.Tensor):
        x = images
    else:
        array = np.asarray(images)
        if array.dtype != np.uint8:
            raise RocoinError(f"to_tensor expects uint8 images, got {array.dtype}")
        if not (array.flags.c_contiguous and array.flags.writeable):
            array = np.ascontiguousarray(array).copy()
        x = torch.from_numpy(array)
    if x.dtype != torch.uint8:
        raise RocoinError(f"to_tensor expects uint8 images, got {x.dtype}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if tuple(x.shape[1:]) != tuple(info.input_shape):
        raise RocoinError(f"{info.name}: images of shape {tuple(x.shape[1:])}, expected {tuple(info.input_shape)}")
    x = x.to(device=device).to(torch.float32).div_(255.0)
    mean = torch.tensor(info.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, padding: int = CROP_PADDING) -> np.ndarray:
    """Per image: zero-pad by ``padding``, crop a random ``H×W`` window, flip horizontally with p = 1/2."""
    b, c, h, w = images.shape
    padded = np.zeros((b, c, h + 2 * padding, w + 2 * padding), dtype=images.dtype)
    padded[:, :, padding : padding + h, padding : padding + w] = images
    top = rng.integers(0, 2 * padding + 1, size=b)
    left = rng.integers(0, 2 * padding + 1, size=b)
    flip = rng.random(b) < 0.5
    windows = sliding_window_view(padded, (h, w), axis=(2, 3))  # (B, C, 2p+1, 2p+1, H, W), a view
    out = windows[np.arange(b), :, top, left]  # (B, C, H, W), a copy
    out[flip] = out[flip][..., ::-1]
    return out


def _numpy_rng(seed: int | np.random.Generator | torch.Generator | None) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (), generator=seed)))
    return np.random.default_rng(seed)


def batches(
    dataset: ArrayDataset,
    info: DatasetInfo,
    *,
    batch_size: int,
    shuffle: bool = False,
    augment: bool = False,
    seed: int | np.random.Generator | torch.Generator | None = None,
    drop_last: bool = False,
    device: torch.device | str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)``: x float32 ``(B, C, H, W)`` normalised, y int64 ``(B,)``.

    ``augment`` applies the data set's augmentation (``info.augmentation``: ``"crop-flip"`` for
    CIFAR, ``"none"`` otherwise, which leaves the images unchanged). ``seed`` (an int, a numpy or a
    torch generator) drives the shuffle and the augmentation; the same seed gives the same batches.
    """
    if batch_size < 1:
        raise RocoinError(f"batch_size must be at least 1, got {batch_size}")
    if info.augmentation not in AUGMENTATIONS:
        raise RocoinError(f"{info.name}: unknown augmentation {info.augmentation!r}; expected one of {', '.join(AUGMENTATIONS)}")
    rng = _numpy_rng(seed)
    n = len(dataset)
    order = rng.permutation(n) if shuffle else None
    crop_flip = augment and info.augmentation == "crop-flip"
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        index = order[start:end] if order is not None else slice(start, end)
        images = dataset.images[index]
        if crop_flip:
            images = random_crop_flip(images, rng)
        labels = np.array(dataset.labels[index], dtype=np.int64)
        yield to_tensor(images, info, device=device), torch.from_numpy(labels).to(device=device)
