"""The offline steps, shared by ``rocoin demo``, ``rocoin experiment`` and ``bench/accuracy.py``:
teacher → activity → catalog → plan → students → bundle → evaluation (and the generated fleet).

Each step is one function of a :class:`Pipeline` (the settings, the :class:`StepCache`, where the
outputs go, the compute device and the progress callback) and of the upstream steps' results; it
returns the cache's :class:`~rocoin.pipeline.cache.Done` (key, value, reused). Outputs are either
*named* (``teacher.pt``: the demo, the accuracy bench) or *content-addressed*
(``teacher-wrn-16-2-<key>.pt``: the experiments' shared cache), as :attr:`Pipeline.addressed` says.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rocoin.contracts.catalog import Catalog
from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import atomic_path, load_document, load_npy, write_json_atomic
from rocoin.contracts.fleet import Fleet
from rocoin.contracts.plan import Plan
from rocoin.contracts.progress import Progress, log_progress
from rocoin.pipeline.cache import CannotReuse, Done, Outputs, StepCache, file_key, step_key, unreadable_as_stale
from rocoin.pipeline.config import PipelineConfig

logger = logging.getLogger(__name__)


@dataclass
class Pipeline:
    """What every step needs besides its upstream results."""

    config: PipelineConfig
    cache: StepCache
    addressed: bool = False  # content-addressed outputs (the key in the file name)
    device: str | None = None  # where to train: cpu, cuda, cuda:N, auto
    progress: Progress = log_progress
    say: Callable[[str], None] = field(default=logger.info)

    @property
    def folder(self) -> Path:
        return self.cache.folder

    def outputs(self, stem: str, suffix: str) -> Outputs:
        """``stem`` + ``suffix`` in the folder, with ``-<key>`` before the suffix when addressed."""
        if self.addressed:
            return lambda key: [self.folder / f"{stem}-{key}{suffix}"]
        return [self.folder / f"{stem}{suffix}"]

    def path(self, outputs: Outputs, key: str) -> Path:
        return Path((outputs(key) if callable(outputs) else outputs)[0])


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)


# --- teacher ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherFile:
    path: Path
    metadata: dict[str, Any]


def teacher_config(config: PipelineConfig):
    from rocoin.distillation.teacher import TeacherConfig
    from rocoin.distillation.training import DataConfig

    data = DataConfig(
        dataset=config.dataset,
        data_dir=config.data_dir,
        max_train_images=config.max_train_images,
        max_test_images=config.max_test_images,
        split_seed=config.seed,
    )
    return TeacherConfig(
        arch=config.teacher_arch, data=data, epochs=config.teacher_epochs, batch_size=config.teacher_batch_size,
        optimizer=config.teacher_optimizer, lr=config.teacher_lr, seed=config.seed,
    )  # fmt: skip


def _without_data_dir(stored: Any) -> Any:
    """A training config (as JSON) as a key: where the data lies does not change what is trained."""
    if not isinstance(stored, dict) or not isinstance(stored.get("data"), dict):
        return stored
    return {**stored, "data": {k: v for k, v in stored["data"].items() if k != "data_dir"}}


def teacher(p: Pipeline, *, name: str = "teacher") -> Done[TeacherFile]:
    """Train the teacher (resuming an interrupted training with the same settings)."""
    from rocoin.distillation.teacher import load_teacher, train_teacher

    config = teacher_config(p.config)
    outputs = p.outputs(f"teacher-{config.arch}" if p.addressed else "teacher", ".pt")
    inputs = {"config": _without_data_dir(config.model_dump(mode="json"))}
    path = p.path(outputs, step_key(inputs))

    def make() -> TeacherFile:
        _clear_stale_resume(path, config, fresh=p.cache.fresh, say=p.say)
        logger.info("training the teacher %s (%d epochs) -> %s", config.arch, config.epochs, path)
        train_teacher(config, path, device=p.device, progress=p.progress)
        return TeacherFile(path, load_teacher(path).metadata)

    def load() -> TeacherFile:
        with unreadable_as_stale():
            metadata = load_teacher(path).metadata
        if _without_data_dir(metadata.get("config")) != inputs["config"] or "test_accuracy" not in metadata:
            raise CannotReuse("it was trained with other settings")
        return TeacherFile(path, metadata)

    return p.cache.run(name, inputs, outputs, make, load)


def _clear_stale_resume(teacher_path: Path, config, *, fresh: bool, say: Callable[[str], None]) -> None:
    """Keep an interrupted training's resume file only when it is for these very settings."""
    from rocoin.distillation.checkpoint import load_checkpoint
    from rocoin.distillation.teacher import RESUME_SUFFIX

    resume = Path(str(teacher_path) + RESUME_SUFFIX)
    if not resume.exists():
        return
    keep = False
    if not fresh:
        try:
            metadata, _, _ = load_checkpoint(resume, "teacher-resume")
            keep = metadata.get("config") == config.model_dump(mode="json")
        except RocoinError:
            keep = False
    if keep:
        say(f"resuming the interrupted teacher training ({resume.name})")
    else:
        resume.unlink()


# --- fleet, activity, catalog, plan -------------------------------------------------------------


def generate(
    config: PipelineConfig,
    *,
    devices: int | None = None,
    heterogeneity: int | None = None,
    success_prob: float | None = None,
    seed: int | None = None,
) -> Fleet:
    """The settings' generated fleet, or one with some of them changed."""
    from rocoin.profiles.generate import generate_fleet

    return generate_fleet(
        devices or config.devices,
        config.heterogeneity if heterogeneity is None else heterogeneity,
        config.success_prob if success_prob is None else success_prob,
        rate_unit=config.rate_unit,
        random_state=config.seed if seed is None else seed,
    )


def fleet(p: Pipeline, *, name: str = "fleet") -> Done[Fleet]:
    from rocoin.contracts.fleet import load_fleet, save_fleet

    c = p.config
    inputs = {"devices": c.devices, "heterogeneity": c.heterogeneity, "success_prob": c.success_prob, "seed": c.seed}
    outputs = p.outputs("fleet", ".yaml")
    path = p.path(outputs, step_key(inputs))

    def make() -> Fleet:
        made = generate(c)
        save_fleet(made, path)
        return made

    def load() -> Fleet:
        with unreadable_as_stale():
            return load_fleet(path)

    return p.cache.run(name, inputs, outputs, make, load)


def _measure_activity(p: Pipeline, teacher_path: Path) -> np.ndarray:
    from rocoin.distillation.activity import teacher_activations

    with p.progress("teacher activity on the validation split", 1) as advance:
        activity = teacher_activations(teacher_path, data_dir=p.config.data_dir)
        advance()
    return activity


def activity(p: Pipeline, teacher_done: Done[TeacherFile], *, name: str = "activations") -> Done[np.ndarray]:
    """The teacher's filter activity on its validation split (images × F), the planner's input."""
    from rocoin.planning.activations import load_activations

    outputs = p.outputs("activations", ".npy")
    inputs = {"teacher": teacher_done.key}
    path = p.path(outputs, step_key(inputs))

    def make() -> np.ndarray:
        measured = _measure_activity(p, teacher_done.value.path)
        _save_npy(path, measured)
        return measured

    def load() -> np.ndarray:
        with unreadable_as_stale():
            return load_activations(path)

    return p.cache.run(name, inputs, outputs, make, load)


def filter_graph(p: Pipeline, teacher_path: Path, *, name: str = "filter graph") -> Done[np.ndarray]:
    """The NoNN filter graph (F × F) of the activity, keyed by the teacher file alone. A cached
    graph that the header-checked reader refuses is reported, not silently replaced."""
    from rocoin.planning import filter_graph as graph_of

    outputs = p.outputs("filter-graph", ".npy")
    key = file_key(teacher_path)
    path = p.path(outputs, key)

    def make() -> np.ndarray:
        graph = graph_of(_measure_activity(p, teacher_path))
        _save_npy(path, graph)
        return graph

    return p.cache.run(name, key, outputs, make, lambda: load_npy(path))


def catalog(p: Pipeline, input_shape: tuple[int, ...], num_classes: int, *, name: str = "catalog") -> Done[Catalog]:
    """The students measured with torch (FLOPs, memory, parameters)."""
    from rocoin.contracts.catalog import load_catalog, save_catalog
    from rocoin.models.measure import measure_catalog

    students = list(p.config.students)
    inputs = {"input_shape": list(input_shape), "num_classes": num_classes, "students": students}
    outputs = p.outputs("catalog", ".json")
    path = p.path(outputs, step_key(inputs))

    def make() -> Catalog:
        with p.progress("measuring the students", len(students)) as advance:
            measured = measure_catalog(tuple(input_shape), num_classes, students, progress=lambda name, spec: advance())
        save_catalog(measured, path)
        return measured

    def load() -> Catalog:
        with unreadable_as_stale():
            stored = load_catalog(path)
        if sorted(stored.names) != sorted(students):
            raise CannotReuse("it holds other students")
        return stored

    return p.cache.run(name, inputs, outputs, make, load)


def plan(
    p: Pipeline,
    fleet_done: Done[Fleet],
    activity_done: Done[np.ndarray],
    catalog_done: Done[Catalog],
    *,
    scheme: str = "rocoin",
    name: str = "plan",
    stem: str = "plan",
) -> Done[Plan]:
    from rocoin.contracts.plan import load_plan, save_plan
    from rocoin.planning import filter_graph as graph_of
    from rocoin.planning import make_plan

    c = p.config
    inputs = {
        "fleet": fleet_done.key,
        "activations": activity_done.key,
        "catalog": catalog_done.key,
        "scheme": scheme,
        "epsilon": c.epsilon,
        "seed": c.seed,
    }
    outputs = p.outputs(stem, ".json")
    path = p.path(outputs, step_key(inputs))

    def make() -> Plan:
        made = make_plan(fleet_done.value, graph_of(activity_done.value), catalog_done.value, scheme=scheme, epsilon=c.epsilon, seed=c.seed)
        save_plan(made, path)
        return made

    def load() -> Plan:
        with unreadable_as_stale():
            return load_plan(path)

    return p.cache.run(name, inputs, outputs, make, load)


# --- students, bundle, evaluation ---------------------------------------------------------------


@dataclass(frozen=True)
class StudentsFile:
    path: Path
    metadata: dict[str, Any]


def distill_config(config: PipelineConfig, *, failure_aware: bool = True):
    from rocoin.distillation.distill import DistillConfig

    return DistillConfig(
        epochs=config.student_epochs, batch_size=config.student_batch_size, failure_aware=failure_aware,
        max_train_images=config.student_max_train_images, seed=config.seed,
    )  # fmt: skip


def students_inputs(teacher_key: str, plan_: Plan, config: PipelineConfig, *, failure_aware: bool) -> dict[str, Any]:
    """What decides the students: the teacher, the plan (not the version that wrote it), the
    distillation settings and the test images their accuracy is measured on."""
    return {
        "teacher": teacher_key,
        "plan": plan_.model_dump(mode="json", exclude={"rocoin_version"}),
        "config": distill_config(config, failure_aware=failure_aware).model_dump(mode="json"),
        "test": config.max_test_images,
    }


def students(
    p: Pipeline,
    teacher_done: Done[TeacherFile],
    plan_: Plan,
    *,
    failure_aware: bool = True,
    plan_path: Path | None = None,
    name: str = "students",
    stem: str = "students",
) -> Done[StudentsFile]:
    """Distil the plan's students from the teacher (failure-aware: with the plan's q_k)."""
    from rocoin.distillation.distill import Students, distill

    config = distill_config(p.config, failure_aware=failure_aware)
    inputs = students_inputs(teacher_done.key, plan_, p.config, failure_aware=failure_aware)
    outputs = p.outputs(stem, ".pt")
    path = p.path(outputs, step_key(inputs))

    def make() -> StudentsFile:
        logger.info("distilling %d %s students (%d epochs) -> %s", plan_.num_groups, plan_.scheme, config.epochs, path)
        source = str(plan_path) if plan_path else "plan"
        distill(
            teacher_done.value.path,
            plan_,
            config,
            path,
            plan_source=source,
            data_dir=p.config.data_dir,
            device=p.device,
            progress=p.progress,
            resume=not p.cache.fresh,
            replace_other_run=True,  # the cache names the file by its inputs: another run's state is stale
        )
        return StudentsFile(path, Students(path).metadata)

    def load() -> StudentsFile:
        with unreadable_as_stale():
            made = Students(path)
        if made.metadata.get("config") != config.model_dump(mode="json") or made.plan != plan_:
            raise CannotReuse("it was distilled with other settings")
        return StudentsFile(path, made.metadata)

    return p.cache.run(name, inputs, outputs, make, load)


def students_path(p: Pipeline, teacher_done: Done[TeacherFile], plan_: Plan, *, failure_aware: bool = True, stem: str = "students") -> Path:
    """Where :func:`students` keeps (or would keep) the students of ``plan_``."""
    return p.path(p.outputs(stem, ".pt"), step_key(students_inputs(teacher_done.key, plan_, p.config, failure_aware=failure_aware)))


def bundle(p: Pipeline, students_done: Done[StudentsFile], plan_path: Path, *, name: str = "bundle"):
    """Export the students to an ONNX bundle (parity-checked against torch)."""
    from rocoin.contracts.manifest import load_manifest
    from rocoin.export import export_bundle

    inputs = {"students": students_done.key}
    folder = p.folder / (f"bundle-{step_key(inputs)}" if p.addressed else "bundle")

    def make():
        with p.progress("exporting to ONNX (parity-checked)", 1) as advance:
            manifest = export_bundle(students_done.value.path, folder, plan_path=plan_path, overwrite=True)
            advance()
        return manifest

    def load():
        with unreadable_as_stale():
            return load_manifest(folder)

    return p.cache.run(name, inputs, [folder / "manifest.json"], make, load)


def evaluation(
    p: Pipeline, students_done: Done[StudentsFile], fail_devices: list[int], *, name: str = "evaluation", stem: str = "evaluation"
) -> Done[dict[str, Any]]:
    """Accuracy in-process with every group, and with each count of failed devices
    (``trials`` random draws each)."""
    from rocoin.distillation.evaluate import evaluate_students

    c = p.config
    inputs = {
        "students": students_done.key,
        "fail_devices": list(fail_devices),
        "trials": c.trials,
        "seed": c.seed,
        "test": c.max_test_images,
    }
    outputs = p.outputs(stem, ".json")
    path = p.path(outputs, step_key(inputs))

    def make() -> dict[str, Any]:
        with p.progress("in-process evaluation of the students", 1) as advance:
            result = evaluate_students(
                students_done.value.path, fail_devices=list(fail_devices), trials=c.trials, seed=c.seed,
                data_dir=c.data_dir, max_test_images=c.max_test_images, device=p.device,
            )  # fmt: skip
            advance()
        write_json_atomic(path, result)
        return result

    def load() -> dict[str, Any]:
        with unreadable_as_stale():
            return load_document(path)

    return p.cache.run(name, inputs, outputs, make, load)
