"""Data sets (numpy, no torch): CIFAR-10/100, Fashion-MNIST, sklearn's digits.

``rocoin.data.loader`` (torch) turns them into normalised, optionally augmented mini-batches;
it is not imported here so that this package works without torch.
"""

from rocoin.data.datasets import (
    DATA_DIR_ENV,
    DATASET_NAMES,
    DOWNLOADS,
    ArrayDataset,
    DatasetInfo,
    DatasetSplits,
    canonical_name,
    dataset_present,
    default_data_dir,
    download_dataset,
    download_file,
    load_dataset,
    split_validation,
)

__all__ = [
    "DATA_DIR_ENV",
    "DATASET_NAMES",
    "DOWNLOADS",
    "ArrayDataset",
    "DatasetInfo",
    "DatasetSplits",
    "canonical_name",
    "dataset_present",
    "default_data_dir",
    "download_dataset",
    "download_file",
    "load_dataset",
    "split_validation",
]
