"""Trained artefacts shared by the experiments, cached by the content hash of what made them.

A teacher is keyed by its training settings; students by the teacher file's SHA-256, the plan and
the distillation settings; an evaluation by the students file's SHA-256 and the failure draws.
Experiments that need the same students (Table II, Fig. 2, Fig. 5) train them once; a rerun
reuses them; ``fresh`` retrains each artefact once in this process. Writes are atomic, so two
processes sharing a cache folder at worst train the same thing twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from rocoin.experiments.setup import ExperimentSetup
from rocoin.contracts.fileio import atomic_path, load_document, load_npy, write_json_atomic
from rocoin.contracts.plan import Plan
from rocoin.contracts.catalog import Catalog, load_catalog, save_catalog
from rocoin.contracts.fleet import Fleet
from rocoin.profiles.generate import generate_fleet

logger = logging.getLogger(__name__)

def digest(value: Any) -> str:
    """A short content hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:16]


def plan_key(plan: Plan) -> dict[str, Any]:
    """What about a plan changes the students trained for it (not the version that wrote it)."""
    return plan.model_dump(mode="json", exclude={"rocoin_version"})


def assumed_outage_fleet(fleet: Fleet, outage: float) -> Fleet:
    """``fleet`` as a planner that does not know the devices' failure probabilities sees it:
    every device with the same assumed ``outage`` (Fig. 6)."""
    return fleet.model_copy(update={"devices": [d.model_copy(update={"outage": outage}) for d in fleet.devices]})


class Workspace:
    """Produces (or reuses) the teacher, catalog, plans, students and evaluations for a setup."""

    def __init__(self, setup: ExperimentSetup, cache_dir: Path, *, device: str | None = None, fresh: bool = False) -> None:
        self.setup = setup
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.fresh = fresh
        self._redone: set[Path] = set()

    def _reuse(self, path: Path) -> bool:
        if path.exists() and (not self.fresh or path in self._redone):
            logger.info("reusing %s", path)
            return True
        self._redone.add(path)
        return False

    # --- data-independent pieces --------------------------------------------------------------

    def fleet(self, *, heterogeneity: int | None = None, success_prob: float | None = None, seed: int | None = None, devices: int | None = None) -> Fleet:
        s = self.setup
        return generate_fleet(
            devices or s.devices,
            s.heterogeneity if heterogeneity is None else heterogeneity,
            s.success_prob if success_prob is None else success_prob,
            random_state=s.seed if seed is None else seed,
        )

    # --- trained pieces -------------------------------------------------------------------------

    def data_config(self):
        from rocoin.distillation.training import DataConfig

        s = self.setup
        return DataConfig(dataset=s.dataset, data_dir=s.data_dir, max_train_images=s.max_train_images, max_test_images=s.max_test_images, split_seed=s.seed)

    def teacher(self) -> Path:
        from rocoin.distillation.teacher import TeacherConfig, train_teacher

        s = self.setup
        config = TeacherConfig(arch=s.teacher_arch, data=self.data_config(), epochs=s.teacher_epochs, batch_size=s.teacher_batch_size, seed=s.seed)
        key = config.model_dump(mode="json", exclude={"data": {"data_dir"}})
        path = self.cache_dir / f"teacher-{s.teacher_arch}-{digest(key)}.pt"
        if not self._reuse(path):
            logger.info("training the teacher %s (%d epochs) -> %s", s.teacher_arch, s.teacher_epochs, path)
            train_teacher(config, path, device=self.device)
        return path

    def teacher_summary(self) -> dict[str, Any]:
        """Architecture, parameters, FLOPs, test accuracy and training history of the teacher."""
        from rocoin.distillation.checkpoint import load_checkpoint
        from rocoin.models.measure import measure_model

        path = self.teacher()
        metadata, _, _ = load_checkpoint(path, "teacher")
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
        from rocoin.distillation.activity import teacher_activations
        from rocoin.planning import filter_graph

        teacher = self.teacher()
        path = self.cache_dir / f"filter-graph-{file_digest(teacher)}.npy"
        if not self._reuse(path):
            activity = teacher_activations(teacher, data_dir=self.setup.data_dir)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, filter_graph(activity), allow_pickle=False)
        return load_npy(path)  # header checked before reading; never unpickles

    def catalog(self) -> Catalog:
        """The students measured (FLOPs with torch's counter, memory from the profiler)."""
        from rocoin.models.measure import measure_catalog

        teacher = self.teacher_summary()
        shape, classes = tuple(teacher["input_shape"]), int(teacher["num_classes"])
        path = self.cache_dir / f"catalog-{digest([list(shape), classes, list(self.setup.students)])}.json"
        if not self._reuse(path):
            save_catalog(measure_catalog(shape, classes, list(self.setup.students)), path)
        return load_catalog(path)

    def students_path(self, plan: Plan, *, failure_aware: bool):
        """Where the students of ``plan`` are cached, and the distillation settings that make them."""
        from rocoin.distillation.distill import DistillConfig

        s = self.setup
        config = DistillConfig(
            epochs=s.student_epochs, batch_size=s.student_batch_size, failure_aware=failure_aware, max_train_images=s.student_max_train_images, seed=s.seed
        )
        key = {"teacher": file_digest(self.teacher()), "plan": plan_key(plan), "config": config.model_dump(mode="json"), "test": s.max_test_images}
        return self.cache_dir / f"students-{plan.scheme}-{digest(key)}.pt", config

    def students(self, plan: Plan, *, failure_aware: bool, train: bool = True) -> Path | None:
        """The distilled students of ``plan`` (failure-aware training with the plan's q_k or not);
        with ``train=False`` only what is already cached (else ``None``)."""
        from rocoin.distillation.distill import distill

        s = self.setup
        teacher = self.teacher()
        path, config = self.students_path(plan, failure_aware=failure_aware)
        if not train:
            return path if path.exists() else None
        if not self._reuse(path):
            logger.info("distilling %d %s students (%d epochs) -> %s", plan.num_groups, plan.scheme, s.student_epochs, path)
            distill(teacher, plan, config, path, data_dir=s.data_dir, device=self.device)
        return path

    def students_summary(self, path: Path) -> dict[str, Any]:
        from rocoin.distillation.checkpoint import load_checkpoint

        metadata, _, _ = load_checkpoint(path, "students")
        return {"test_accuracy": metadata["test_accuracy"], "history": metadata["history"], "config": metadata["config"]}

    def evaluation(self, students: Path) -> dict[str, Any]:
        """Accuracy with all groups and with 1..N/2 devices failed (``trials`` draws each)."""
        from rocoin.distillation.evaluate import evaluate_students

        s = self.setup
        fails = [j for j in s.fail_counts if j > 0]
        path = self.cache_dir / f"evaluation-{digest([file_digest(students), fails, s.trials, s.seed, s.max_test_images])}.json"
        if not self._reuse(path):
            result = evaluate_students(students, fail_devices=fails, trials=s.trials, seed=s.seed, data_dir=s.data_dir, max_test_images=s.max_test_images, device=self.device)
            write_json_atomic(path, result)
        return load_document(path)
