"""Data sets (numpy, no torch): CIFAR-10/100, Fashion-MNIST, sklearn's digits; detection data sets
(synthetic Fashion-MNIST scenes, VisDrone-DET, COCO) in :mod:`rocoin.data.detection`, their mAP in
:mod:`rocoin.data.detection_metrics`.

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
from rocoin.data.detection import (
    DETECTION_DATASET_NAMES,
    DetectionDataset,
    DetectionSplits,
    generate_scenes,
    load_detection_dataset,
)

__all__ = [
    "DATA_DIR_ENV",
    "DATASET_NAMES",
    "DETECTION_DATASET_NAMES",
    "DOWNLOADS",
    "ArrayDataset",
    "DatasetInfo",
    "DatasetSplits",
    "DetectionDataset",
    "DetectionSplits",
    "canonical_name",
    "dataset_present",
    "default_data_dir",
    "download_dataset",
    "download_file",
    "generate_scenes",
    "load_dataset",
    "load_detection_dataset",
    "split_validation",
]
