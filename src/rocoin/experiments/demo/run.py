"""``rocoin demo``'s course: the offline steps of :mod:`rocoin.pipeline`, then the emulated
cluster that loses devices part-way, then the report (see the package docstring)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import write_json_atomic, write_text_atomic
from rocoin.contracts.progress import Progress, log_progress
from rocoin.experiments.demo.cluster import default_deadline_s, run_cluster
from rocoin.experiments.demo.load import WARMUP_QUERIES, QueryLog, healing_summary, phase_summary, write_queries_csv
from rocoin.experiments.demo.report import DemoReport, plots
from rocoin.experiments.demo.victims import Victims, choose_victims, expected_missing
from rocoin.pipeline import steps
from rocoin.pipeline.cache import Done, StepCache
from rocoin.pipeline.config import DemoConfig, PipelineConfig, parse_options
from rocoin.pipeline.data import DataChoice, resolve_dataset

logger = logging.getLogger(__name__)

#: Random draws of J failed devices in the in-process evaluation (the paper's Figs. 5–6).
EVAL_TRIALS = 30

Say = Callable[[str], None]


def demo_config(**options: Any) -> DemoConfig:
    """Validate the options; a bad one raises one :class:`RocoinError` line naming ``--option``."""
    config = parse_options(DemoConfig, options)
    if config.kill >= config.devices:
        raise RocoinError(f"--kill = {config.kill}: expected fewer than --devices = {config.devices}")
    _require_extras()
    return config


def _require_extras() -> None:
    import importlib.util

    needed = {"torch": "train", "onnx": "train", "onnxruntime": "device", "grpc": "device", "aiohttp": "source", "matplotlib": "sim"}
    missing = [(module, extra) for module, extra in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        extras = ",".join(sorted({extra for _, extra in missing}))
        raise RocoinError(f"rocoin demo needs {', '.join(m for m, _ in missing)}: pip install -e '.[{extras}]'")


@dataclass
class Offline:
    """What the offline steps gave the runtime part and the report."""

    data: DataChoice
    settings: PipelineConfig
    cache: StepCache
    teacher: Done[steps.TeacherFile]
    fleet: Any
    activity: np.ndarray
    plan: Any
    victims: Victims
    students: Done[steps.StudentsFile]
    evaluation: dict[str, Any]


def run_offline(config: DemoConfig, *, say: Say, progress: Progress) -> Offline:
    """Steps 1-4: data, teacher, fleet, activity, catalog, plan, students, bundle, evaluation."""
    say("[1/6] data")
    data = resolve_dataset(
        config.dataset, config.data_dir, install=config.install, download=config.download, download_url=config.download_url, say=say
    )
    say(f"data set: {data.name}, {data.how}")
    say(f"[2/6] teacher {config.teacher_arch}")
    cache = StepCache(config.output, fresh=config.fresh, say=say)
    p = steps.Pipeline(config.pipeline(data.name, data.data_dir, trials=EVAL_TRIALS), cache, progress=progress, say=say)
    teacher = steps.teacher(p)
    say(f"teacher {config.teacher_arch}: {100 * teacher.value.metadata['test_accuracy']:.2f} % test accuracy")
    say("[3/6] fleet, teacher activity, student catalog, RoCoIn plan")
    fleet = steps.fleet(p)
    activity = steps.activity(p, teacher)
    dataset = teacher.value.metadata["dataset"]
    catalog = steps.catalog(p, tuple(dataset["input_shape"]), int(dataset["num_classes"]))
    plan = steps.plan(p, fleet, activity, catalog)
    say(
        f"plan: {plan.value.num_groups} groups ("
        + "; ".join(f"{g.student} on {'+'.join(g.devices)}, {len(g.filters)} filters" for g in plan.value.groups)
        + f"), T = {plan.value.latency_s:.3g} s, P(all groups answer) = {plan.value.p_complete:.3f}"
    )
    victims = choose_victims(plan.value, config.kill)  # an impossible --kill is refused before the students train
    say("[4/6] distilling the students, exporting the bundle")
    students = steps.students(p, teacher, plan.value, plan_path=config.output / "plan.json")
    steps.bundle(p, students, config.output / "plan.json")
    evaluation = steps.evaluation(p, students, [config.kill])
    say(f"students: {100 * evaluation.value['accuracy']:.2f} % with every group (in-process)")
    return Offline(data, p.config, cache, teacher, fleet.value, activity.value, plan.value, victims, students, evaluation.value)


def run_demo(config: DemoConfig, *, say: Say = logger.info, progress: Progress = log_progress) -> DemoReport:
    """Run every step (reusing finished ones), write the report, return it."""
    if config.task == "detection":
        from rocoin.experiments.demo.detection import DEFAULT_OUTPUT, run_detection_demo

        if config.output == DemoConfig.model_fields["output"].default:
            config = config.model_copy(update={"output": DEFAULT_OUTPUT})
        return run_detection_demo(config, say=say, progress=progress)
    started = time.perf_counter()
    load_at_start = _load_average()
    out = config.output
    out.mkdir(parents=True, exist_ok=True)
    offline = run_offline(config, say=say, progress=progress)

    # 5. runtime
    from rocoin.distillation.training import load_data

    loaded = load_data(steps.teacher_config(offline.settings).data)
    test = loaded.test
    count = min(config.queries or len(test), len(test))
    if count < 2:
        raise RocoinError(f"--queries = {count}: expected at least 2 (the test split has {len(test)} images)")
    images, labels = test.images[:count], test.labels[:count]
    kill_index = min(count - 1, max(1, round(config.kill_after * count)))
    plan, victims = offline.plan, offline.victims
    deadline_s = config.deadline_s or default_deadline_s(plan.latency_s, config.speedup)
    say(
        f"[5/6] local cluster: {len(plan.device_ids)} emulating device workers + the source (deadline {1e3 * deadline_s:.0f} ms);"
        f" {count} test images through the KServe v2 REST API, {config.concurrency} at a time;"
        f" SIGKILL {', '.join(victims.devices)} after {kill_index}"
    )
    log, cluster_info = run_cluster(
        out, out / "bundle", offline.fleet, plan, speedup=config.speedup, concurrency=config.concurrency, images=images,
        kill_index=kill_index, victims=victims, deadline_s=deadline_s, say=say, progress=progress,
    )  # fmt: skip

    # 6. report
    say("[6/6] report")
    runtime = _runtime_results(config, offline, log, labels, deadline_s, cluster_info)
    runtime["prediction"] = _prediction(offline, log, test.subset(np.arange(count)), loaded.info, cluster_info, say=say)
    results = _results(config, offline, runtime, len(test))
    results["machine"] = {"cpus": os.cpu_count(), "load_average_1min": {"start": load_at_start, "end": _load_average()}}
    write_queries_csv(out / "queries.csv", log, labels)
    files = ["report.md", "results.json", "queries.csv"] + plots(out, results, log)
    results["total_s"] = time.perf_counter() - started
    report = DemoReport(results, out, files)
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "report.md", report.markdown())
    return report


def _runtime_results(
    config: DemoConfig, offline: Offline, log: QueryLog, labels: np.ndarray, deadline_s: float, cluster_info: dict[str, Any]
) -> dict[str, Any]:
    plan, victims, count, kill_index = offline.plan, offline.victims, len(labels), log.kill_index
    return {
        "api": "KServe v2 REST",
        "concurrency": config.concurrency,
        "speedup": config.speedup,
        "deadline_s": deadline_s,
        "warmup_queries": min(WARMUP_QUERIES, count),
        "queries": count,
        "victims": victims.devices,
        "lost_groups": victims.lost_groups,
        "victims_reason": victims.reason,
        "kill_after_queries": kill_index,
        "kill_at_s": log.kill_s,
        "expected_missing_share": expected_missing(plan, offline.fleet, victims),
        "before": phase_summary(log, labels, slice(0, kill_index), plan.num_groups, log.phase_s[0]),
        "after": phase_summary(log, labels, slice(kill_index, count), plan.num_groups, log.phase_s[1]),
        "healing": healing_summary(log, labels, plan.num_groups, cluster_info["membership"]),
        **cluster_info,
    }


def _prediction(offline: Offline, log: QueryLog, queried, info, cluster_info: dict[str, Any], *, say: Say) -> dict[str, Any] | None:
    """What the outage model predicts for each phase, beside what was measured (None with more
    groups than every pattern of missing groups can be enumerated for)."""
    from rocoin.distillation.evaluate import MAX_PATTERN_GROUPS, correct_by_missing
    from rocoin.experiments.demo.prediction import outage_prediction

    plan = offline.plan
    if plan.num_groups > MAX_PATTERN_GROUPS:
        say(f"no outage-model prediction: {plan.num_groups} groups (at most {MAX_PATTERN_GROUPS} enumerated)")
        return None
    correct = correct_by_missing(offline.students.value.path, queried, info)
    history = cluster_info["membership"].get("history", [])
    return outage_prediction(log, plan, offline.fleet, offline.victims.devices, history, correct, queried.labels)


def _results(config: DemoConfig, offline: Offline, runtime: dict[str, Any], test_images: int) -> dict[str, Any]:
    """``results.json`` (without the machine and the total time)."""
    data, plan, fleet, evaluation = offline.data, offline.plan, offline.fleet, offline.evaluation
    teacher_meta, students_meta = offline.teacher.value.metadata, offline.students.value.metadata
    return {
        "dataset": {
            "name": data.name,
            "how": data.how,
            "notice": data.notice,
            "train_images_teacher": config.max_train_images,
            "train_images_students": config.distill_images,
            "test_images": test_images,
        },
        "teacher": {
            "arch": config.teacher_arch,
            "epochs": config.teacher_epochs,
            "filters": int(offline.activity.shape[1]),
            "test_accuracy": teacher_meta["test_accuracy"],
            "val_accuracy": teacher_meta.get("val_accuracy"),
            "test_images": test_images,
        },
        "fleet": {
            "devices": len(fleet.devices),
            "heterogeneity": config.heterogeneity,
            "success_prob": config.success_prob,
            "profiles": [d.model_dump(mode="json", exclude_none=True) for d in fleet.devices],
        },
        "plan": {
            "scheme": plan.scheme,
            "epsilon": plan.epsilon,
            "groups_count": plan.num_groups,
            "latency_s": plan.latency_s,
            "p_complete": plan.p_complete,
            "groups": [g.model_dump(mode="json") for g in plan.groups],
            "unassigned": [u.model_dump(mode="json") for u in plan.unassigned],
        },
        "students": {
            "epochs": config.distill_epochs,
            "accuracy": evaluation["accuracy"],
            "test_images": evaluation["test_images"],
            "random_failures": evaluation["failures"][0],
            "distill_val_accuracy": students_meta.get("val_accuracy"),
        },
        "runtime": runtime,
        "steps": {**offline.cache.timings, "runtime": {"seconds": runtime["runtime_s"], "reused": False}},
        "config": config.model_dump(mode="json"),
    }


def _load_average() -> float | None:
    """The 1-minute load average, to tell whether other work shared the CPU (None where unknown)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
