"""``rocoin demo --task detection``: the detection pipeline end to end on the local cluster (issue 15).

1. **Data**: scenes generated from the demo's data set (Fashion-MNIST garments pasted at random
   positions and scales on 64 × 64 canvases, 1-4 per image; :func:`rocoin.experiments.detection.detection_splits`).
2. **Teacher**: a CenterNet-style detector (:mod:`rocoin.models.detector`), cached in the output folder.
3. **Plan**: a generated fleet, the filter activity of the teacher's backbone map (the split
   point: BC), a measured catalog whose students send ``|P_k| × h × w`` maps, the RoCoIn planner.
4. **Students**: distilled for the plan (feature imitation + detection loss), exported to a
   detection bundle (ONNX per group, the rest of the detector for the source).
5. **Runtime**: the same emulated cluster as the classification demo (devices dial the source;
   a whole group killed part-way, the source heals it), each test image through the KServe v2
   REST API, which answers boxes, scores, labels and a count.
6. **Report**: COCO mAP (pycocotools) of the answers before the kill, after it and after healing,
   latency, bytes on the wire per device, ``report.md``, ``results.json``, plots.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import write_json_atomic, write_text_atomic
from rocoin.contracts.progress import Progress, log_progress
from rocoin.experiments.demo.cluster import default_deadline_s, run_cluster
from rocoin.experiments.demo.load import WARMUP_QUERIES, healing_summary, phase_summary
from rocoin.experiments.demo.report import latency_plot, new_figure, save_png
from rocoin.experiments.demo.victims import choose_victims, expected_missing
from rocoin.experiments.detection import DetectionSetup, detection_splits, draw_detections, settings_digest
from rocoin.pipeline.config import DemoConfig
from rocoin.pipeline.data import resolve_dataset

logger = logging.getLogger(__name__)

#: The demo's detection scenes; the teacher, the students, their epochs and the number of
#: training scenes (at most ``--max-train-images``) come from the demo's options: at the defaults
#: (det-wrn-10-2, 2 epochs on 4,000 scenes; students 1 epoch) a few minutes on 2 cores.
DEMO_SCENES = {"image_size": (64, 64), "num_train": 4000, "num_val": 200, "num_test": 1000, "batch_size": 64}
#: Where the detection demo writes unless told otherwise (the classification demo owns results/demo).
DEFAULT_OUTPUT = Path("results/demo-detection")
SPLIT_POINT = "backbone"


@dataclass
class DetectionDemoReport:
    results: dict[str, Any]
    output: Path
    files: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, str, str, str, str, str]]:
        r = self.results
        rt = r["runtime"]

        def phase(name: str, p: dict[str, Any] | None, map_50: float | None) -> tuple[str, ...]:
            if p is None:
                return (name, "", "", "", "", "")
            return (
                name,
                _pct(map_50),
                f"{p['latency_ms']['p50']:.1f}",
                f"{p['latency_ms']['p99']:.1f}",
                str(p["queries"]),
                f"{p['missing_groups_mean']:.3f}",
            )

        return [
            (f"teacher {r['teacher']['arch']}", _pct(r["teacher"]["map_50_pct"]), "", "", "", ""),
            ("students, all groups", _pct(r["students"]["map_50_pct"]), "", "", "", "0"),
            phase("runtime, before kill", rt["before"], rt["map_50_pct"]["before"]),
            phase("runtime, after kill", rt["after"], rt["map_50_pct"]["after"]),
            phase("runtime, after healing", (rt.get("healing") or {}).get("after_recovery"), rt["map_50_pct"].get("healed")),
        ]

    def table(self):
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        r = self.results
        table = Table(
            title=f"rocoin demo --task detection: {r['dataset']}, {r['plan']['groups_count']} groups on {r['fleet']['devices']} devices",
            box=box.SIMPLE_HEAD,
        )
        for k, column in enumerate(COLUMNS):
            table.add_column(column, justify="right" if k else "left")
        for row in self.rows():
            table.add_row(*row)
        return Group(table, Text(_caption(r)))

    def markdown(self) -> str:
        r = self.results
        lines = [f"# rocoin demo --task detection ({r['dataset']})", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        lines += ["", _caption(r), "", *_device_lines(r), "![latency](latency.png)", "", "![detections](detections.png)", ""]
        return "\n".join(lines)


COLUMNS = ("", "mAP@0.5 %", "p50 ms", "p99 ms", "queries", "missing per query")


def _device_lines(r: dict[str, Any]) -> list[str]:
    """Per device: its answers' latency at the source and the tensor bytes both ways (the source's
    ``/v2/fleet`` at the end of the run)."""
    devices = r["runtime"].get("devices") or []
    if not devices:
        return []
    lines = [
        "Per device (the source's `/v2/fleet` at the end, for the group each serves then, since it joined that group;"
        " latency: from a query's arrival at the source to the device's answer; bytes: tensor bytes, float32 images to the"
        " device and feature maps back):",
        "",
        "| device | group | answers | p50 ms | p99 ms | KiB sent to it | KiB received | KiB per answer (one image) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    killed = set(r["runtime"].get("victims") or [])
    for d in devices:
        t, answers = d.get("traffic"), d.get("answers")
        name = f"{d['device']} (killed)" if d["device"] in killed else d["device"]
        if t is None:
            lines.append(f"| {name} | {d['group']} | – (not serving at the end) | | | | | |")
            continue
        per_image = t["kib_received"] / answers if answers else None
        lines.append(
            f"| {name} | {d['group']} | {answers} | {_ms(t['answer_ms_p50'])} | {_ms(t['answer_ms_p99'])} |"
            f" {t['kib_sent']:.0f} | {t['kib_received']:.0f} | {'' if per_image is None else f'{per_image:.1f}'} |"
        )
    return [*lines, ""]


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _caption(r: dict[str, Any]) -> str:
    rt = r["runtime"]
    healing = rt.get("healing") or {}
    healed = healing.get("recovered_after_s")
    return (
        f"{r['dataset']}: generated scenes ({r['data']['how']}); split point after the backbone (BC), "
        f"{r['plan']['channels']} channels at {r['plan']['cells'][0]}x{r['plan']['cells'][1]} cells; "
        f"each device sends at most {r['plan']['kib_sent_per_device']:.1f} KiB of float32 map per image. "
        f"SIGKILL {', '.join(rt['victims'])} after query {rt['kill_after_queries']} (groups lost: {rt['lost_groups'] or 'none'}); "
        + (f"the first answer with every group came {1e3 * healed:.0f} ms after the kill. " if healed is not None else "")
        + f"Deadline {1e3 * rt['deadline_s']:.0f} ms, missing groups zero-filled; mAP by pycocotools on the images of each phase."
    )


def run_detection_demo(config: DemoConfig, *, say=logger.info, progress: Progress = log_progress) -> DetectionDemoReport:
    """Every step of the detection demo (the teacher and students cached in the output folder)."""
    from rocoin.data.detection_metrics import mean_average_precision
    from rocoin.distillation.detection import (
        DetectionDistillConfig,
        DetectionTrainConfig,
        detection_catalog,
        distill_detection,
        evaluate_detection,
        split_activations,
        train_detection_teacher,
    )
    from rocoin.export.detection_bundle import export_detection_bundle
    from rocoin.planning import filter_graph, make_plan
    from rocoin.profiles.generate import generate_fleet

    started = time.perf_counter()
    out = config.output
    out.mkdir(parents=True, exist_ok=True)
    if config.fresh:
        for stale in out.glob("detection-*.pt"):
            stale.unlink()
    s = DetectionSetup(
        **{**DEMO_SCENES, "num_train": min(DEMO_SCENES["num_train"], config.max_train_images or DEMO_SCENES["num_train"])},
        teacher_arch=f"det-{config.teacher_arch}",
        teacher_epochs=config.teacher_epochs,
        students=tuple(config.students),
        student_epochs=config.distill_epochs,
        seed=config.seed,
    )

    say("[1/6] data")
    data = resolve_dataset(
        config.dataset, config.data_dir, install=config.install, download=config.download, download_url=config.download_url, say=say
    )
    splits = detection_splits(data.name, data.data_dir, s)
    say(f"scenes of {data.name} ({data.how}): {len(splits.train)} training, {len(splits.test)} test images of {s.image_size}")

    say(f"[2/6] teacher {s.teacher_arch}")
    train_config = DetectionTrainConfig(epochs=s.teacher_epochs, batch_size=s.batch_size, seed=s.seed)
    # checkpoints named by what made them: changed settings train anew, a rerun reuses them
    teacher_key = settings_digest(data.name, s.model_dump(mode="json"), train_config.model_dump())
    teacher = train_detection_teacher(
        s.teacher_arch, splits, train_config, path=out / f"detection-teacher-{teacher_key}.pt", progress=progress
    )
    teacher_map = evaluate_detection(teacher, None, splits.test)[0]
    say(f"teacher {s.teacher_arch}: mAP@0.5 {teacher_map['map_50_pct']:.2f} %")

    say("[3/6] fleet, split-point activity, student catalog, RoCoIn plan")
    fleet = generate_fleet(config.devices, config.heterogeneity, config.success_prob, random_state=config.seed)
    graph = filter_graph(split_activations(teacher, splits.val.images, SPLIT_POINT))
    catalog = detection_catalog(list(s.students), SPLIT_POINT, teacher)
    plan = make_plan(fleet, graph, catalog, scheme="rocoin", epsilon=config.epsilon, seed=config.seed)
    victims = choose_victims(plan, config.kill)
    say(
        f"plan: {plan.num_groups} groups ("
        + "; ".join(f"{g.student} on {'+'.join(g.devices)}, {len(g.filters)} channels" for g in plan.groups)
        + f"), T = {plan.latency_s:.3g} s"
    )

    say("[4/6] distilling the students, exporting the bundle")
    distill_config = DetectionDistillConfig(epochs=s.student_epochs, batch_size=s.batch_size, seed=s.seed)
    students_key = settings_digest(teacher_key, plan.model_dump(mode="json"), distill_config.model_dump())
    students = distill_detection(
        teacher, plan, SPLIT_POINT, splits, distill_config, path=out / f"detection-students-{students_key}.pt", progress=progress
    )
    export_detection_bundle(
        teacher.model, students.modules, plan, SPLIT_POINT, out / "bundle",
        class_names=list(teacher.class_names), mean=list(teacher.mean), std=list(teacher.std), dataset=f"{data.name}-scenes", overwrite=True,
    )  # fmt: skip
    offline = {r["failed_devices"]: r for r in evaluate_detection(teacher, students, splits.test, fail_devices=[0, config.kill], trials=5)}
    say(f"students: mAP@0.5 {offline[0]['map_50_pct']:.2f} % with every group (in-process)")

    test = splits.test
    count = min(config.queries or len(test), len(test))
    if count < 2:
        raise RocoinError(f"--queries = {count}: expected at least 2 (the test set has {len(test)} scenes)")
    kill_index = min(count - 1, max(1, round(config.kill_after * count)))
    deadline_s = config.deadline_s or default_deadline_s(plan.latency_s, config.speedup)
    say(
        f"[5/6] local cluster: {len(plan.device_ids)} emulating device workers + the source (deadline {1e3 * deadline_s:.0f} ms);"
        f" {count} scenes through the KServe v2 REST API; SIGKILL {', '.join(victims.devices)} after {kill_index}"
    )
    log, cluster_info = run_cluster(
        out, out / "bundle", fleet, plan, speedup=config.speedup, concurrency=config.concurrency, images=test.images[:count],
        kill_index=kill_index, victims=victims, deadline_s=deadline_s, say=say, progress=progress,
    )  # fmt: skip

    say("[6/6] report")

    def map_of(indices: np.ndarray) -> float | None:
        if len(indices) == 0:
            return None
        return mean_average_precision(test.subset(indices), [log.detections[i] for i in indices])["map_50_pct"]

    healing = healing_summary(log, None, plan.num_groups, cluster_info["membership"])
    healed_from = healing.get("healed_from_query")
    channels, cells = teacher.model.split_channels(SPLIT_POINT), teacher.model.feature_size(s.image_size)
    results = {
        "dataset": f"{data.name}-scenes",
        "data": {"how": data.how, "train": len(splits.train), "test": len(test), "image_size": list(s.image_size)},
        "teacher": {"arch": s.teacher_arch, "epochs": s.teacher_epochs, "map_50_pct": teacher_map["map_50_pct"]},
        "students": {
            "epochs": s.student_epochs,
            "map_50_pct": offline[0]["map_50_pct"],
            "map_50_95_pct": offline[0]["map_50_95_pct"],
            "random_failures": offline[config.kill],
        },
        "fleet": {"devices": len(fleet.devices), "heterogeneity": config.heterogeneity, "success_prob": config.success_prob},
        "plan": {
            "groups_count": plan.num_groups,
            "groups": [g.model_dump(mode="json") for g in plan.groups],
            "latency_s": plan.latency_s,
            "p_complete": plan.p_complete,
            "channels": channels,
            "cells": list(cells),
            "kib_sent_per_device": max(len(g.filters) for g in plan.groups) * cells[0] * cells[1] * 4 / 1024,
        },
        "runtime": {
            "api": "KServe v2 REST",
            "concurrency": config.concurrency,
            "queries": count,
            "warmup_queries": min(WARMUP_QUERIES, count),
            "deadline_s": deadline_s,
            "victims": victims.devices,
            "lost_groups": victims.lost_groups,
            "kill_after_queries": kill_index,
            "expected_missing_share": expected_missing(plan, fleet, victims),
            "before": phase_summary(log, None, slice(0, kill_index), plan.num_groups, log.phase_s[0]),
            "after": phase_summary(log, None, slice(kill_index, count), plan.num_groups, log.phase_s[1]),
            "healing": healing,
            "map_50_pct": {
                "before": map_of(np.arange(kill_index)),
                "after": map_of(np.arange(kill_index, count)),
                "healed": map_of(np.arange(healed_from, count)) if healed_from is not None else None,
            },
            **cluster_info,
        },
    }
    files = ["report.md", "results.json", latency_plot(out, results, log), _pictures(out, teacher, students, test, plan)]
    results["total_s"] = time.perf_counter() - started
    report = DetectionDemoReport(results, out, files)
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "report.md", report.markdown())
    return report


def _pictures(out: Path, teacher, students, test, plan, count: int = 3) -> str:
    """Detections on a few test scenes: teacher, students, students with group 0 missing."""
    from rocoin.distillation.detection import predict

    images = test.images[:count]
    missing = np.zeros(plan.num_groups, dtype=bool)
    missing[0] = True
    panels = [
        ("teacher", predict(teacher, None, images)),
        ("students, every group", predict(teacher, students, images)),
        ("students, group 0 missing", predict(teacher, students, images, missing=missing)),
    ]
    fig = new_figure((9, 3 * count))
    axes = fig.subplots(count, len(panels), squeeze=False)
    for i in range(count):
        for j, (title, found) in enumerate(panels):
            ax = axes[i, j]
            draw_detections(ax, images[i], test.boxes[i], found[i], test.class_names)
            if i == 0:
                ax.set_title(title, fontsize=9)
    return save_png(fig, out / "detections.png")
