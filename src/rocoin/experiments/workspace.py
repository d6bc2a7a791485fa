"""The experiments' view of :mod:`rocoin.pipeline`: the teacher, filter graph, catalog, students
and evaluations of one setup, made by the pipeline's steps in a shared content-addressed cache.

Every output's file name carries the key of its inputs (the teacher's settings; the teacher file's
SHA-256 for the filter graph; the teacher, plan and distillation settings for students; the
students and failure draws for an evaluation). Experiments that need the same students (Table II,
Fig. 2, Fig. 5) train them once; a rerun reuses them; ``fresh`` retrains each artefact once in
this process. Writes are atomic, so two processes sharing a cache folder (``bench/paper.py``) at
worst train the same thing twice.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from rocoin.contracts.catalog import Catalog
from rocoin.contracts.fleet import Fleet
from rocoin.contracts.plan import Plan
from rocoin.contracts.progress import Progress, log_progress
from rocoin.experiments.setup import ExperimentSetup
from rocoin.pipeline import steps
from rocoin.pipeline.cache import Done, StepCache, digest, file_key
from rocoin.pipeline.steps import Pipeline, StudentsFile

logger = logging.getLogger(__name__)

#: The short SHA-256 of a file (the key of the filter graph is the teacher file's).
file_digest = file_key

__all__ = ["Workspace", "assumed_outage_fleet", "digest", "file_digest"]


def assumed_outage_fleet(fleet: Fleet, outage: float) -> Fleet:
    """``fleet`` as a planner that does not know the devices' failure probabilities sees it:
    every device with the same assumed ``outage`` (Fig. 6)."""
    return fleet.model_copy(update={"devices": [d.model_copy(update={"outage": outage}) for d in fleet.devices]})


class Workspace:
    """Produces (or reuses) the teacher, catalog, plans' students and evaluations for a setup."""

    def __init__(
        self, setup: ExperimentSetup, cache_dir: Path, *, device: str | None = None, fresh: bool = False, progress: Progress = log_progress
    ) -> None:
        self.setup = setup
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.pipeline = Pipeline(setup, StepCache(self.cache_dir, fresh=fresh), addressed=True, device=device, progress=progress)
        self._teacher: Done[steps.TeacherFile] | None = None

    @property
    def progress(self) -> Progress:
        return self.pipeline.progress

    def derived(self, setup: ExperimentSetup) -> Workspace:
        """A workspace for other settings that shares this one's cache folder, ``fresh`` and device."""
        other = copy.copy(self)
        other.setup = setup
        other.pipeline = dataclasses.replace(self.pipeline, config=setup)
        other._teacher = None
        return other

    def fleet(
        self, *, heterogeneity: int | None = None, success_prob: float | None = None, seed: int | None = None, devices: int | None = None
    ) -> Fleet:
        """The setup's generated fleet, or one with some settings changed (not cached: it is cheap)."""
        return steps.generate(self.setup, devices=devices, heterogeneity=heterogeneity, success_prob=success_prob, seed=seed)

    def teacher_step(self) -> Done[steps.TeacherFile]:
        if self._teacher is None:
            self._teacher = steps.teacher(self.pipeline)
        return self._teacher

    def teacher(self) -> Path:
        return self.teacher_step().value.path

    def teacher_summary(self) -> dict[str, Any]:
        """Architecture, parameters, FLOPs, test accuracy and training history of the teacher."""
        from rocoin.models.measure import measure_model

        metadata = self.teacher_step().value.metadata
        dataset = metadata["dataset"]
        spec = measure_model(metadata["arch"], tuple(dataset["input_shape"]), int(dataset["num_classes"]))
        return {
            "arch": metadata["arch"],
            "params": spec.params,
            "flops": spec.flops,
            "memory_bytes": spec.memory_bytes,
            "accuracy": metadata["test_accuracy"],
            "history": metadata.get("history", []),
            "input_shape": dataset["input_shape"],
            "num_classes": dataset["num_classes"],
        }

    def filter_weights(self) -> np.ndarray:
        """The NoNN filter graph of the teacher's final layer (F × F)."""
        return steps.filter_graph(self.pipeline, self.teacher()).value

    def catalog(self) -> Catalog:
        """The students measured (FLOPs with torch's counter, memory from the profiler)."""
        dataset = self.teacher_step().value.metadata["dataset"]
        return steps.catalog(self.pipeline, tuple(dataset["input_shape"]), int(dataset["num_classes"])).value

    def students_path(self, plan: Plan, *, failure_aware: bool):
        """Where the students of ``plan`` are cached, and the distillation settings that make them."""
        path = steps.students_path(self.pipeline, self.teacher_step(), plan, failure_aware=failure_aware, stem=f"students-{plan.scheme}")
        return path, steps.distill_config(self.setup, failure_aware=failure_aware)

    def students(self, plan: Plan, *, failure_aware: bool, train: bool = True) -> Done[StudentsFile] | None:
        """The distilled students of ``plan`` (failure-aware training with the plan's q_k or not);
        with ``train=False`` only what is already cached (else ``None``)."""
        if not train and not self.students_path(plan, failure_aware=failure_aware)[0].exists():
            return None
        return steps.students(
            self.pipeline,
            self.teacher_step(),
            plan,
            failure_aware=failure_aware,
            name=_students_step(plan),
            stem=f"students-{plan.scheme}",
        )

    def mark_students_made(self, plan: Plan, key: str) -> None:
        """The students of ``plan`` under ``key`` were made in this run (by a worker process): reuse
        them, also with ``fresh``."""
        self.pipeline.cache.mark_made(_students_step(plan), key)

    def students_summary(self, students: Done[StudentsFile]) -> dict[str, Any]:
        metadata = students.value.metadata
        return {"test_accuracy": metadata["test_accuracy"], "history": metadata["history"], "config": metadata["config"]}

    def evaluation(self, students: Done[StudentsFile]) -> dict[str, Any]:
        """Accuracy with all groups and with 1..N/2 devices failed (``trials`` draws each)."""
        fails = [j for j in self.setup.fail_counts if j > 0]
        return steps.evaluation(self.pipeline, students, fails).value


def _students_step(plan: Plan) -> str:
    """The cache step that makes ``plan``'s students (one name for :meth:`Workspace.students` and
    :meth:`Workspace.mark_students_made`)."""
    return f"students {plan.scheme}"
