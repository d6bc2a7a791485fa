"""The experiments' scheduler of independent trainings, without GPUs: which devices are used,
how a worker is pinned to its GPU, the order of the trainings."""

from __future__ import annotations

from rocoin.experiments.parallel import pin, training_cost, training_devices
from rocoin.profiles.generate import default_catalog


def test_several_gpus_are_used_only_when_training_on_cuda():
    assert training_devices("cuda", 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert training_devices("auto", 2) == ["cuda:0", "cuda:1"]
    assert training_devices("cuda", 1) == []  # one GPU: the experiments train as they go
    assert training_devices("cpu", 4) == [] and training_devices(None, 4) == []  # the CPU: unchanged
    assert training_devices("cuda:1", 4) == []  # one GPU asked for: kept to


def test_a_worker_sees_its_gpu_alone():
    assert pin("cuda:1", 2, {}, 16).environment == {"CUDA_VISIBLE_DEVICES": "1", "ROCOIN_TORCH_THREADS": "8"}
    assert pin("cuda:1", 2, {}, 16).device == "cuda"
    # the i-th of the GPUs this process was given, not the machine's i-th
    assert pin("cuda:1", 4, {"CUDA_VISIBLE_DEVICES": "4, 6"}, 16).environment["CUDA_VISIBLE_DEVICES"] == "6"
    # workers on the CPU share its cores instead of each taking them all
    assert pin("cpu", 2, {}, 2) == pin("cpu", 2, {}, 3)
    assert pin("cpu", 2, {}, 2).environment == {"ROCOIN_TORCH_THREADS": "1"} and pin("cpu", 2, {}, 2).device == "cpu"
    assert pin("cpu", 4, {}, 2).environment == {"ROCOIN_TORCH_THREADS": "1"}


def test_larger_networks_of_students_are_costlier():
    from test_distillation import tiny_plan

    small = tiny_plan([(["a"], [0, 1], 0.1)])
    large = tiny_plan([(["a"], [0], 0.1), (["b"], [1], 0.1), (["c"], [2], 0.1)])
    catalog = default_catalog((1, 28, 28))
    assert training_cost(large) == 3 * training_cost(small) == 3 * catalog["wrn-16-1"].flops


def test_the_workers_thread_variable_is_the_trainings():
    import pytest

    pytest.importorskip("torch")
    from rocoin.distillation.training import THREADS_ENV
    from rocoin.experiments.parallel import THREADS_ENV as WORKERS

    assert WORKERS == THREADS_ENV
