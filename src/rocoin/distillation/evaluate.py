"""Accuracy of the aggregated students with every group present and with devices failed (Figs. 5–6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.plan import Plan
from rocoin.data import ArrayDataset, DatasetInfo
from rocoin.distillation.distill import Students
from rocoin.distillation.teacher import load_teacher
from rocoin.distillation.training import DataConfig, accuracy, collect, compute_device, load_data, use_all_cores


def missing_slots(plan: Plan, failed: np.ndarray) -> np.ndarray:
    """(trials, K) booleans: a group is missing when every one of its replicas failed.

    ``failed`` is (trials, N) booleans over ``plan.device_ids`` order.
    """
    sizes = [len(g.devices) for g in plan.groups]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    return np.logical_and.reduceat(failed, starts, axis=1)


def random_failures(num_devices: int, fail_devices: int, trials: int, rng: np.random.Generator) -> np.ndarray:
    """(trials, N) booleans with exactly ``fail_devices`` devices failed per trial, drawn uniformly."""
    keys = rng.random((trials, num_devices))
    ranks = keys.argsort(axis=1).argsort(axis=1)
    return ranks < fail_devices


def evaluate_students(
    students_path: str | Path,
    *,
    fail_devices: list[int] | None = None,
    trials: int = 30,
    seed: int = 0,
    data_dir: str | None = None,
    max_test_images: int | None = None,
    download: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Test accuracy with all groups, and for each J in ``fail_devices`` the mean over ``trials``
    random draws of J failed devices (missing groups zero-filled). ``device`` runs the students."""
    use_all_cores()
    on = compute_device(device)
    students = Students(students_path)
    plan = students.plan
    num_devices = len(plan.device_ids)
    for j in fail_devices or []:
        if not 0 <= j <= num_devices:
            raise RocoinError(f"fail-devices = {j}: expected 0..{num_devices} (the plan's devices)")
    if trials < 1:
        raise RocoinError(f"trials = {trials}: expected at least 1")
    data = load_data(_data_config(students.metadata, data_dir, max_test_images), download=download)
    network = students.network.to(on)
    features = collect(network.features, data.test, data.info, device=on)
    network.cpu()
    labels = torch.from_numpy(data.test.labels)
    with torch.inference_mode():
        result: dict[str, Any] = {
            "students": str(students_path),
            "scheme": plan.scheme,
            "groups": plan.num_groups,
            "devices": num_devices,
            "test_images": len(labels),
            "accuracy": accuracy(network.fc(features), labels),
            "failures": [],
        }
        rng = np.random.default_rng(seed)
        for j in fail_devices or []:
            missing = missing_slots(plan, random_failures(num_devices, j, trials, rng))
            accs = [
                accuracy(network.fc(network.mask_filters(features, torch.from_numpy(m).expand(len(labels), -1))), labels) for m in missing
            ]
            result["failures"].append(
                {
                    "fail_devices": j,
                    "trials": trials,
                    "accuracy_mean": float(np.mean(accs)),
                    "accuracy_std": float(np.std(accs)),
                    "missing_groups_mean": float(missing.sum(axis=1).mean()),
                }
            )
    return result


#: The most groups :func:`correct_by_missing` enumerates every pattern of (2**12 patterns).
MAX_PATTERN_GROUPS = 12


def correct_by_missing(students_path: str | Path, data: ArrayDataset, info: DatasetInfo, *, device: str | None = None) -> np.ndarray:
    """(2**K, N) booleans: whether the aggregated students classify image n right when the groups
    in pattern m are missing (bit k of m set: group k zero-filled). With a per-group probability of
    missing, the expected accuracy is the sum over patterns of P(pattern) times a row's mean
    (:func:`expected_accuracy`)."""
    use_all_cores()
    on = compute_device(device)
    students = Students(students_path)
    groups = students.plan.num_groups
    if groups > MAX_PATTERN_GROUPS:
        raise RocoinError(f"groups = {groups}: expected at most {MAX_PATTERN_GROUPS} to enumerate every pattern of missing groups")
    network = students.network.to(on)
    features = collect(network.features, data, info, device=on)
    network.cpu()
    labels = torch.as_tensor(data.labels)
    patterns = torch.from_numpy(missing_patterns(groups))
    with torch.inference_mode():
        rows = [(network.fc(network.mask_filters(features, m.expand(len(labels), -1))).argmax(1) == labels) for m in patterns]
    return torch.stack(rows).numpy()


def missing_patterns(groups: int) -> np.ndarray:
    """(2**K, K) booleans: row m says which groups pattern m misses (bit k of m: group k)."""
    return (np.arange(2**groups)[:, None] >> np.arange(groups)[None, :]) & 1 == 1


def pattern_probabilities(missing_prob: np.ndarray) -> np.ndarray:
    """(..., 2**K): P(exactly the groups of each pattern are missing) when group k is missing
    independently with ``missing_prob[..., k]`` (the outage model of SPEC.md §1)."""
    q = np.asarray(missing_prob, dtype=float)
    bits = missing_patterns(q.shape[-1])
    return np.prod(np.where(bits, q[..., None, :], 1.0 - q[..., None, :]), axis=-1)


def expected_accuracy(correct: np.ndarray, missing_prob: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Per query, the accuracy the outage model expects: query i classifies image ``images[i]``
    with group k missing with ``missing_prob[i, k]``; ``correct`` from :func:`correct_by_missing`."""
    return np.einsum("im,mi->i", pattern_probabilities(missing_prob), correct[:, images].astype(float))


def evaluate_teacher(
    teacher_path: str | Path,
    *,
    data_dir: str | None = None,
    max_test_images: int | None = None,
    download: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    use_all_cores()
    on = compute_device(device)
    teacher = load_teacher(teacher_path)
    data = load_data(_data_config(teacher.metadata, data_dir, max_test_images), download=download)
    logits = collect(teacher.model.to(on), data.test, data.info, device=on)
    return {"teacher": str(teacher_path), "arch": teacher.metadata["arch"], "accuracy": accuracy(logits, data.test.labels)}


def _data_config(metadata: dict[str, Any], data_dir: str | None, max_test_images: int | None) -> DataConfig:
    config = DataConfig.model_validate(metadata.get("data") or metadata["config"]["data"])
    update: dict[str, Any] = {}
    if data_dir is not None:
        update["data_dir"] = data_dir
    if max_test_images is not None:
        update["max_test_images"] = max_test_images
    return config.model_copy(update=update)
