"""Training under torchrun without starting processes: torchrun's variables, each process's share
of a global batch, the device of each process, the weights of unequal shares."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rocoin.contracts.errors import RocoinError  # noqa: E402
from rocoin.data import load_dataset  # noqa: E402
from rocoin.distillation.distributed import SINGLE, Ranks, process_device, shard_bounds, torchrun_ranks, training_processes  # noqa: E402
from rocoin.distillation.training import check_batch_size, share_weight, train_batches  # noqa: E402


def test_torchrun_variables():
    assert torchrun_ranks({}) is SINGLE
    assert torchrun_ranks({"WORLD_SIZE": "1", "RANK": "0"}) is SINGLE  # one process: no process group
    assert torchrun_ranks({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1)
    with pytest.raises(RocoinError, match=r"RANK = '': torchrun sets RANK, WORLD_SIZE, LOCAL_RANK"):
        torchrun_ranks({"WORLD_SIZE": "2"})
    with pytest.raises(RocoinError, match=r"RANK = 2, WORLD_SIZE = 2: expected 0 <= RANK < WORLD_SIZE"):
        torchrun_ranks({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})


def test_one_process_starts_no_group():
    with training_processes("cpu", environ={}) as (ranks, device):
        assert ranks is SINGLE and device == "cpu"
        assert not torch.distributed.is_initialized()


def test_each_process_gets_its_device():
    two = Ranks(1, 2, 1)
    assert process_device("cpu", two) == "cpu" and process_device(None, two) is None
    assert process_device("cuda:3", SINGLE) == "cuda:3"  # one process: as given
    with pytest.raises(RocoinError, match="under torchrun each process trains on cuda:LOCAL_RANK; give --device cuda"):
        process_device("cuda:1", two)
    if not torch.cuda.is_available():
        assert process_device("auto", two) == "cpu"
        with pytest.raises(RocoinError, match="sees no CUDA device"):
            process_device("cuda", two)


@pytest.mark.parametrize(("n", "world"), [(10, 2), (11, 2), (7, 3), (1, 2), (0, 4)])
def test_shares_cover_the_items_once_and_differ_by_one_at_most(n, world):
    bounds = [shard_bounds(n, Ranks(r, world)) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("augment", [False, True])
def test_the_shares_of_a_global_batch_are_the_batch_of_one_process(augment):
    splits = load_dataset("digits")
    info = dataclasses.replace(splits.info, augmentation="crop-flip") if augment else splits.info
    data = splits.train.subset(np.arange(70))  # 70 = 2 × 32 + 6

    def run(ranks):
        return list(train_batches(data, info, 32, augment=augment, generator=torch.Generator().manual_seed(5), ranks=ranks))

    single, shares = run(SINGLE), [run(Ranks(r, 2)) for r in range(2)]
    assert [b.size for b in single] == [32, 32, 6] and all(len(s) == 3 for s in shares)
    for whole, first, second in zip(single, *shares, strict=True):
        assert first.offset == 0 and second.offset == len(first.y) == whole.size - len(second.y)
        assert torch.equal(torch.cat([first.x, second.x]), whole.x)  # the same images, crops and flips
        assert torch.equal(torch.cat([first.index, second.index]), whole.index)
        assert torch.equal(torch.cat([first.y, second.y]), whole.y)
        weights = [share_weight(first, Ranks(0, 2)), share_weight(second, Ranks(1, 2))]
        assert sum(weights) / 2 == pytest.approx(1.0)  # DDP's mean of the weighted means is the batch mean


def test_the_global_batch_must_give_every_process_an_image():
    check_batch_size(2, Ranks(0, 2))
    with pytest.raises(RocoinError, match="batch_size = 3 is the global batch, shared by 4 processes: give at least 4"):
        check_batch_size(3, Ranks(0, 4))


def test_processes_of_one_machine_share_its_cores(monkeypatch):
    import rocoin.distillation.training as training

    before = torch.get_num_threads()
    monkeypatch.delenv("ROCOIN_TORCH_THREADS", raising=False)
    monkeypatch.setattr(training.os, "cpu_count", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    try:
        training.use_all_cores()  # no process group: one process, every core
        assert torch.get_num_threads() == 8
        monkeypatch.setattr(training, "current_ranks", lambda: Ranks(1, 4, 1))
        training.use_all_cores()
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("ROCOIN_TORCH_THREADS", "3")  # said explicitly: kept
        training.use_all_cores()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_on_cuda_each_process_starts_nccl_on_its_own_gpu(monkeypatch):
    """The CUDA wiring without GPUs (none here): torchrun's LOCAL_RANK picks the GPU the process
    sets as its own and hands to NCCL; the CPU takes gloo (tests/e2e/test_distributed_training.py
    runs that for real)."""
    calls: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda backend, device_id=None: calls.append(("init", backend, str(device_id)))
    )
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: calls.append(("destroy",)))
    environ = {"WORLD_SIZE": "8", "RANK": "6", "LOCAL_RANK": "2"}  # second machine, third GPU
    with training_processes("cuda", environ=environ) as (ranks, device):
        assert ranks == Ranks(6, 8, 2) and device == "cuda:2"
    assert calls == [("set_device", "cuda:2"), ("init", "nccl", "cuda:2"), ("destroy",)]
    calls.clear()
    with training_processes("cpu", environ=environ) as (_, device):
        assert device == "cpu"
    assert calls == [("init", "gloo", "None"), ("destroy",)]
