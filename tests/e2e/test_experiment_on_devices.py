"""The experiments' independent student trainings spread over several devices, run on the CPU
with a list of two fake devices (``["cpu", "cpu"]``: two worker processes, as two GPUs would
have): both workers train, the students land in the shared cache, the experiment then trains
nothing more."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from rocoin.experiments.paper import run_experiments  # noqa: E402
from rocoin.experiments.parallel import experiment_trainings, train_in_parallel  # noqa: E402
from rocoin.experiments.setup import make_setup  # noqa: E402
from rocoin.experiments.workspace import Workspace  # noqa: E402


def test_two_workers_train_the_students_that_table2_then_reuses(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("ROCOIN_TORCH_THREADS", "1")
    setup = make_setup("quick", dataset="digits")
    ws = Workspace(setup, tmp_path / "cache")
    wanted = experiment_trainings(ws, ["table2"])
    assert len(wanted) >= 2  # the distinct networks of students of the four schemes
    records = train_in_parallel(ws, ["table2"], ["cpu", "cpu"])
    assert len(records) == len(wanted)
    assert len({r["pid"] for r in records}) == 2  # two worker processes, one per device
    assert all(ws.students_path(t.trained_as, failure_aware=False)[0].exists() for _, t in wanted)
    assert train_in_parallel(ws, ["table2"], ["cpu", "cpu"]) == []  # nothing left to train

    caplog.set_level(logging.INFO, logger="rocoin")
    run_experiments(["table2"], setup, tmp_path / "out", cache_dir=tmp_path / "cache", devices=["cpu", "cpu"])
    messages = [r.getMessage() for r in caplog.records]
    assert not any(m.startswith("distilling") for m in messages)  # the experiment found every network trained
    assert sum(m.startswith("reusing students") for m in messages) >= len(wanted)
    assert (tmp_path / "out" / "table2" / "table2.csv").exists()
