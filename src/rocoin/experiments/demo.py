"""The end-to-end demo (``make demo`` = ``rocoin demo``): from a data set to failures at runtime.

1. **Data**: Fashion-MNIST — found where :mod:`rocoin.data` looks (Debian's
   ``dataset-fashion-mnist`` included); if absent, installed with ``apt-get`` (as root on Debian),
   else downloaded with an MD5 check; else scikit-learn's digits, with a notice.
2. **Teacher**: a small WRN trained on a subset of the training split.
3. **Plan**: a generated heterogeneous fleet, the teacher's filter activity (validation split), a
   measured catalog of small students, and the RoCoIn planner.
4. **Students**: distilled for the plan (failure-aware), exported to an ONNX bundle.
5. **Runtime**: a local cluster — one device-worker process per device, emulating its profile
   (FLOP/s and rates sped up so a query takes tens of milliseconds), and the source — serves the
   test images through the source's KServe v2 REST API; part-way through, devices are killed
   with SIGKILL (a whole group among them when the plan allows).
6. **Report**: accuracy and latency before and after the failures, in a table, ``report.md``,
   ``results.json``, ``queries.csv`` and two PNG plots.

Finished offline steps are recorded in ``steps.json`` with a key of their inputs; a rerun with
the same options reuses every step whose output is still there and loads, and redoes a step (and
everything after it) whose inputs changed. ``fresh=True`` redoes them all. The runtime part
always runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import atomic_path, write_json_atomic, write_text_atomic
from rocoin.contracts.progress import log_progress as progress_bar  # TODO(issue 12): take progress from the caller

logger = logging.getLogger(__name__)

#: Default per-query deadline of the source: this multiple of the plan's failure-free latency T
#: under emulation, plus a fixed slack for the loopback overhead of every process sharing a
#: 2-core machine [decision: measured p99 of complete answers ≈ 1.8 × T at 8 queries in flight].
DEADLINE_FACTOR = 2.0
DEADLINE_SLACK_S = 0.05
#: Queries sent (and not counted) before the measured ones, so channel set-up is not measured.
WARMUP_QUERIES = 5
#: Random draws of J failed devices in the in-process evaluation (the paper's Figs. 5–6).
EVAL_TRIALS = 30
DEBIAN_PACKAGE = "dataset-fashion-mnist"
STEPS_FILE = "steps.json"
#: Seconds one REST call may take before the demo gives up on the source.
CALL_TIMEOUT_S = 30.0

Say = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Options


class DemoConfig(BaseModel):
    """Everything the demo can be told; the defaults take about 5 minutes on a 2-core CPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: Path = Path("results/demo")
    dataset: Literal["fashion-mnist", "digits"] = "fashion-mnist"
    data_dir: str | None = None
    install: bool = Field(default=True, description="allow apt-get install of Debian's dataset-fashion-mnist (as root)")
    download: bool = Field(default=True, description="allow downloading Fashion-MNIST")
    download_url: str | None = None
    teacher_arch: str = "wrn-10-2"
    teacher_epochs: int = Field(default=2, ge=1)
    max_train_images: int | None = Field(default=30_000, gt=0, description="training images for the teacher")
    students: tuple[str, ...] = ("wrn-10-1", "wrn-16-1")
    distill_epochs: int = Field(default=1, ge=1)
    distill_images: int | None = Field(default=20_000, gt=0, description="training images for the students")
    devices: int = Field(default=10, ge=2)
    heterogeneity: int = Field(default=4, ge=0, le=5)
    success_prob: float = Field(default=0.8, gt=0.0, le=1.0)
    epsilon: float = Field(default=0.05, gt=0.0, lt=1.0)
    queries: int | None = Field(default=None, ge=2, description="test images sent to the source (default: the whole test split)")
    concurrency: int = Field(default=8, ge=1, le=64)
    kill: int = Field(default=3, ge=1, description="devices killed part-way")
    kill_after: float = Field(default=0.4, gt=0.0, lt=1.0, description="fraction of the queries sent before the kill")
    speedup: float = Field(default=100.0, gt=0.0, allow_inf_nan=False, description="emulated FLOP/s and rates x this")
    deadline_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    seed: int = 0
    fresh: bool = False

    @field_validator("teacher_arch")
    @classmethod
    def _known_teacher(cls, value: str) -> str:
        _check_arch(value)
        return value

    @field_validator("students")
    @classmethod
    def _known_students(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("expected at least one student architecture")
        for name in value:
            _check_arch(name)
        if len(set(value)) != len(value):
            raise ValueError("expected distinct names")
        return value

    @field_validator("output")
    @classmethod
    def _folder(cls, value: Path) -> Path:
        if value.exists() and not value.is_dir():
            raise ValueError("exists and is not a folder")
        return value


def _check_arch(name: str) -> None:
    from rocoin.models.registry import parse_model_name

    try:
        parse_model_name(name)
    except RocoinError as exc:
        raise ValueError(str(exc).split(": ", 1)[-1]) from None


def demo_config(**options: Any) -> DemoConfig:
    """Validate the options; a bad one raises one :class:`RocoinError` line naming ``--option``."""
    try:
        config = DemoConfig(**options)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = "--" + "-".join(str(part) for part in first.get("loc", ()) if isinstance(part, str)).replace("_", "-")
        message = first.get("msg", "invalid value").removeprefix("Value error, ")
        raise RocoinError(f"{name} = {_short(first.get('input'))}: {message}") from None
    if config.kill >= config.devices:
        raise RocoinError(f"--kill = {config.kill}: expected fewer than --devices = {config.devices}")
    _require_extras()
    return config


def _short(value: Any) -> str:
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    text = repr(value) if not isinstance(value, (int, float)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _require_extras() -> None:
    import importlib.util

    needed = {"torch": "train", "onnx": "train", "onnxruntime": "device", "grpc": "device", "aiohttp": "source", "matplotlib": "sim"}
    missing = [(module, extra) for module, extra in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        extras = ",".join(sorted({extra for _, extra in missing}))
        raise RocoinError(f"rocoin demo needs {', '.join(m for m, _ in missing)}: pip install -e '.[{extras}]'")


# --------------------------------------------------------------------------------------------
# Step 1: the data


@dataclass(frozen=True)
class DataChoice:
    name: str  # "fashion-mnist" or "digits"
    data_dir: str | None
    how: str  # how it was obtained, for the report
    notice: str | None = None  # set when the demo fell back to another data set


def resolve_dataset(
    requested: str,
    data_dir: str | None = None,
    *,
    install: bool = True,
    download: bool = True,
    download_url: str | None = None,
    say: Say = logger.info,
) -> DataChoice:
    """Fashion-MNIST where it is; else apt-get (root on Debian); else a download; else digits."""
    from rocoin.data import load_dataset

    if requested == "digits":
        load_dataset("digits")
        return DataChoice("digits", None, "scikit-learn's bundled digits (asked for with --dataset digits)")
    root = Path(data_dir) if data_dir else None
    try:
        load_dataset("fashion-mnist", root)
        return DataChoice("fashion-mnist", data_dir, _where_fashion_mnist(root))
    except RocoinError as exc:
        say(f"Fashion-MNIST is not here ({_first_sentence(exc)})")
    if install and _can_apt_get():
        if _apt_install(say):
            try:
                load_dataset("fashion-mnist", root)
                return DataChoice("fashion-mnist", data_dir, f"installed now with apt-get install {DEBIAN_PACKAGE}")
            except RocoinError as exc:
                say(f"{DEBIAN_PACKAGE} is installed but not readable: {exc}")
    elif install:
        say(f"not installing {DEBIAN_PACKAGE}: " + ("not running as root" if _is_debian() and shutil.which("apt-get") else "no apt-get (not Debian)"))
    if download:
        from rocoin.data import default_data_dir

        target = root or default_data_dir()
        say(f"downloading Fashion-MNIST into {target} (MD5-checked)")
        try:
            load_dataset("fashion-mnist", target, download=True, base_url=download_url)
            return DataChoice("fashion-mnist", str(target), f"downloaded into {target} (MD5-checked)")
        except RocoinError as exc:
            say(f"download failed: {exc}")
    notice = (
        "NOTICE: Fashion-MNIST is not available here, so the demo runs on scikit-learn's digits"
        " (1,797 8x8 images, 20 % of them for testing); its numbers are not Fashion-MNIST's"
    )
    say(notice)
    load_dataset("digits")
    return DataChoice("digits", None, "scikit-learn's bundled digits (fallback)", notice)


def _first_sentence(exc: Exception) -> str:
    return str(exc).split(";")[0]


def _where_fashion_mnist(root: Path | None) -> str:
    from rocoin.data.datasets import FASHION_MNIST_SYSTEM_DIRS, default_data_dir

    base = root or default_data_dir()
    for folder in (base, base / "fashion-mnist", base / "FashionMNIST" / "raw"):
        if any((folder / f"train-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz")):
            return f"found in {folder}"
    for folder in FASHION_MNIST_SYSTEM_DIRS:
        if folder.is_dir():
            return f"found in {folder} (Debian's {DEBIAN_PACKAGE})"
    return "found by rocoin.data"


def _is_debian() -> bool:
    return Path("/etc/debian_version").exists()


def _can_apt_get() -> bool:
    return _is_debian() and shutil.which("apt-get") is not None and hasattr(os, "geteuid") and os.geteuid() == 0


def _apt_install(say: Say) -> bool:
    """``apt-get install -y dataset-fashion-mnist`` (after ``apt-get update`` if it fails), shown line by line."""
    install = ["apt-get", "install", "-y", DEBIAN_PACKAGE]
    if _run_shown(install, say) == 0:
        return True
    say("apt-get install failed; refreshing the package lists and trying again")
    return _run_shown(["apt-get", "update"], say) == 0 and _run_shown(install, say) == 0


def _run_shown(command: list[str], say: Say) -> int:
    say("$ " + " ".join(command))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, text=True, errors="replace") as process:
            assert process.stdout is not None
            for line in process.stdout:
                say("  " + line.rstrip())
            return process.wait()
    except OSError as exc:
        say(f"cannot run {command[0]}: {exc}")
        return 1


# --------------------------------------------------------------------------------------------
# The record of finished steps


class StepLedger:
    """``steps.json``: for each finished step the key of its inputs, so a rerun can reuse it."""

    def __init__(self, folder: Path, *, fresh: bool, say: Say) -> None:
        self.path = folder / STEPS_FILE
        self.fresh = fresh
        self.say = say
        self.entries: dict[str, dict[str, Any]] = {}
        self.timings: dict[str, dict[str, Any]] = {}
        if not fresh and self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.entries = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self.entries = {}

    @staticmethod
    def key(inputs: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def run(self, name: str, inputs: dict[str, Any], outputs: list[Path], make: Callable[[], Any], load: Callable[[], Any]) -> tuple[str, Any]:
        """Reuse ``name`` if its key and outputs are unchanged and ``load()`` succeeds; else ``make()``.

        Returns the step's key (downstream steps include it in theirs) and what ``make``/``load`` gave.
        """
        key = self.key(inputs)
        entry = self.entries.get(name)
        shown = ", ".join(p.name for p in outputs)
        if not self.fresh and entry is not None:
            if entry.get("key") == key and all(p.exists() for p in outputs):
                try:
                    value = load()
                except RocoinError as exc:
                    self.say(f"{name}: {shown} cannot be reused ({exc}); redoing it")
                else:
                    self.say(f"reusing {name} ({shown})")
                    self.timings[name] = {"seconds": 0.0, "reused": True, "made_in_s": entry.get("seconds")}
                    return key, value
            elif entry.get("key") != key:
                self.say(f"{name}: its inputs changed since the last run; redoing it")
        self.entries.pop(name, None)
        self._save()
        started = time.perf_counter()
        value = make()
        seconds = time.perf_counter() - started
        self.entries[name] = {"key": key, "inputs": inputs, "seconds": round(seconds, 3)}
        self._save()
        self.timings[name] = {"seconds": seconds, "reused": False}
        return key, value

    def _save(self) -> None:
        write_json_atomic(self.path, self.entries)


# --------------------------------------------------------------------------------------------
# Which devices to kill


@dataclass(frozen=True)
class Victims:
    devices: list[str]
    lost_groups: list[int]  # groups left with no replica
    reason: str


def choose_victims(plan, kill: int) -> Victims:
    """``kill`` devices: every replica of the smallest group that ``kill`` can empty (ties: the
    first such group), then one replica each of other groups with replicas to spare, so at least
    one group is lost and as many others as possible keep answering. When no group is that small,
    one device from each of ``kill`` groups, none of them lost."""
    groups = plan.groups
    if kill > len(plan.device_ids):
        raise RocoinError(f"--kill = {kill}: expected at most the plan's {len(plan.device_ids)} devices")
    sizes = [len(g.devices) for g in groups]
    emptiable = [k for k in range(len(groups)) if sizes[k] <= kill]
    chosen: list[str] = []
    lost: list[int] = []
    if emptiable:
        target = min(emptiable, key=lambda k: (sizes[k], k))
        chosen += groups[target].devices
        lost.append(target)
    left = {k: list(g.devices) for k, g in enumerate(groups) if k not in lost}
    # spare replicas first: one device from each other group that keeps at least one
    while len(chosen) < kill and any(len(d) > 1 for d in left.values()):
        for k in sorted(left, key=lambda k: (-len(left[k]), k)):
            if len(chosen) < kill and len(left[k]) > 1:
                chosen.append(left[k].pop())
    # then, only when unavoidable, the last replicas of further groups
    for k in sorted(left):
        while len(chosen) < kill and left[k]:
            chosen.append(left[k].pop())
            if not left[k]:
                lost.append(k)
    lost.sort()
    if emptiable:
        reason = (
            f"every replica of group {lost[0]} ({', '.join(groups[lost[0]].devices)}), the smallest group {kill} kills can empty, "
            "plus spare replicas of other groups"
        )
    else:
        reason = f"one replica each of {kill} groups: every group has more than {kill} replicas, so none can be lost entirely"
    return Victims(chosen, lost, reason)


# --------------------------------------------------------------------------------------------
# Queries through the source's REST API


@dataclass
class QueryLog:
    """One row per measured query, in the order sent."""

    sent_s: np.ndarray
    latency_s: np.ndarray
    source_latency_s: np.ndarray
    prediction: np.ndarray
    missing: list[list[int]]
    kill_index: int  # queries [0, kill_index) ran before the kill
    kill_s: float  # when the kill happened, seconds since the first measured query
    phase_s: tuple[float, float]  # wall time of the two phases


async def send_queries(
    url: str,
    images: np.ndarray,
    *,
    concurrency: int,
    kill_index: int,
    kill: Callable[[], None],
    advance: Callable[..., None] = lambda *a, **k: None,
    warmup: int = WARMUP_QUERIES,
) -> QueryLog:
    """Send each image as one KServe v2 ``infer`` call, ``concurrency`` at a time. The queries
    before ``kill_index`` all finish, then ``kill()`` runs, then the rest are sent."""
    import aiohttp

    n = len(images)
    endpoint = f"{url.rstrip('/')}/v2/models/rocoin/infer"
    sent, latency, source_latency = np.zeros(n), np.zeros(n), np.zeros(n)
    prediction = np.zeros(n, dtype=np.int64)
    missing: list[list[int]] = [[] for _ in range(n)]
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(i: int, query_id: str) -> dict[str, Any]:
            image = images[i : i + 1]
            body = {"id": query_id, "inputs": [{"name": "input", "shape": list(image.shape), "datatype": "UINT8", "data": image.ravel().tolist()}]}
            try:
                async with session.post(endpoint, json=body) as response:
                    reply = await response.json()
                    if response.status != 200:
                        raise RocoinError(f"{endpoint}: HTTP {response.status}: {reply.get('error', reply)}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise RocoinError(f"{endpoint}: query {query_id} got no answer ({type(exc).__name__}: {exc})") from None
            return reply

        for i in range(min(warmup, n)):
            await one(i, f"warmup-{i}")
        origin = time.perf_counter()

        async def run_phase(indices: range) -> float:
            queue = iter(indices)

            async def worker() -> None:
                for i in queue:
                    started = time.perf_counter()
                    reply = await one(i, f"q-{i}")
                    latency[i] = time.perf_counter() - started
                    sent[i] = started - origin
                    outputs = {o["name"]: o for o in reply["outputs"]}
                    logits = np.asarray(outputs["logits"]["data"], dtype=np.float32).reshape(outputs["logits"]["shape"])
                    prediction[i] = int(logits.argmax(axis=1)[0])
                    missing[i] = [int(k) for k in outputs["missing_groups"]["data"]]
                    source_latency[i] = float(reply["parameters"]["latency_s"])
                    advance()

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.perf_counter() - started

        before_s = await run_phase(range(0, kill_index))
        kill_s = time.perf_counter() - origin
        await asyncio.to_thread(kill)
        after_s = await run_phase(range(kill_index, n))
    return QueryLog(sent, latency, source_latency, prediction, missing, kill_index, kill_s, (before_s, after_s))


def phase_summary(log: QueryLog, labels: np.ndarray, part: slice, num_groups: int, wall_s: float) -> dict[str, Any]:
    latency = log.latency_s[part]
    missing = log.missing[part]
    counts = [sum(k in m for m in missing) for k in range(num_groups)]
    return {
        "queries": int(len(latency)),
        "accuracy": float((log.prediction[part] == labels[part]).mean()),
        "latency_ms": {
            "p50": float(1e3 * np.percentile(latency, 50)),
            "p99": float(1e3 * np.percentile(latency, 99)),
            "mean": float(1e3 * latency.mean()),
        },
        "source_latency_ms": {"p50": float(1e3 * np.percentile(log.source_latency_s[part], 50)), "p99": float(1e3 * np.percentile(log.source_latency_s[part], 99))},
        "queries_per_s": float(len(latency) / wall_s) if wall_s > 0 else None,
        "queries_with_missing_groups": int(sum(1 for m in missing if m)),
        "missing_groups_mean": float(np.mean([len(m) for m in missing])),
        "queries_missing_group": counts,
    }


# --------------------------------------------------------------------------------------------
# The demo


@dataclass
class DemoReport:
    results: dict[str, Any]
    output: Path
    files: list[str] = field(default_factory=list)

    def table(self):
        """The summary table and its legend, for a rich console."""
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        r = self.results
        title = f"rocoin demo: {r['dataset']['name']}, {r['plan']['groups_count']} groups on {r['fleet']['devices']} devices"
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for k, column in enumerate(COLUMNS):
            table.add_column(column, justify="right" if k else "left", no_wrap=not k, min_width=7 if k else None)
        for row in _rows(r):
            table.add_row(*row)
        return Group(table, Text(_caption(r)))

    def markdown(self) -> str:
        return _markdown(self.results)


COLUMNS = ("", "acc. %", "p50 ms", "p99 ms", "queries", "with missing", "missing per query")


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _rows(r: dict[str, Any]) -> list[list[str]]:
    t, s, rt = r["teacher"], r["students"], r["runtime"]
    failed = s["random_failures"]

    def phase(label: str, p: dict[str, Any]) -> list[str]:
        return [label, _pct(p["accuracy"]), f"{p['latency_ms']['p50']:.1f}", f"{p['latency_ms']['p99']:.1f}", str(p["queries"]), str(p["queries_with_missing_groups"]), f"{p['missing_groups_mean']:.3f}"]

    return [
        [f"teacher {t['arch']}", _pct(t["test_accuracy"]), "", "", "", "", ""],
        ["students, all groups", _pct(s["accuracy"]), "", "", "", "", "0"],
        [f"students, {failed['fail_devices']} random failed", _pct(failed["accuracy_mean"]), "", "", "", "", f"{failed['missing_groups_mean']:.3f}"],
        phase("runtime, before kill", rt["before"]),
        phase("runtime, after kill", rt["after"]),
    ]


def _lost(groups: list[int]) -> str:
    if not groups:
        return "no group lost"
    return ("group " if len(groups) == 1 else "groups ") + ", ".join(map(str, groups)) + " lost"


def _caption(r: dict[str, Any]) -> str:
    s, rt = r["students"], r["runtime"]
    return (
        f"teacher and students in-process on {s['test_images']} test images ({s['random_failures']['trials']} random draws of failed devices);"
        f" runtime: {rt['queries']} test images through the source's {rt['api']} API, {rt['concurrency']} in flight, deadline"
        f" {1e3 * rt['deadline_s']:.0f} ms; SIGKILL {', '.join(rt['victims'])} after query {rt['kill_after_queries']} ({_lost(rt['lost_groups'])})."
        " 'with missing': queries answered with some group missing (zero-filled)."
    )


def run_demo(config: DemoConfig, *, say: Say = logger.info) -> DemoReport:
    """Run every step (reusing finished ones), write the report, return it."""
    started = time.perf_counter()
    load_at_start = _load_average()
    out = config.output
    out.mkdir(parents=True, exist_ok=True)
    ledger = StepLedger(out, fresh=config.fresh, say=say)

    # 1. data
    say("[1/6] data")
    data = resolve_dataset(config.dataset, config.data_dir, install=config.install, download=config.download, download_url=config.download_url, say=say)
    say(f"data set: {data.name}, {data.how}")

    # 2. teacher
    say(f"[2/6] teacher {config.teacher_arch}")
    from rocoin.distillation.teacher import TeacherConfig, load_teacher, train_teacher
    from rocoin.distillation.training import DataConfig

    data_config = DataConfig(dataset=data.name, data_dir=data.data_dir, max_train_images=config.max_train_images, split_seed=config.seed)
    teacher_config = TeacherConfig(
        arch=config.teacher_arch, data=data_config, epochs=config.teacher_epochs, optimizer="adam", lr=0.003, seed=config.seed
    )
    teacher_path = out / "teacher.pt"

    def make_teacher() -> dict[str, Any]:
        _clear_stale_resume(teacher_path, teacher_config, fresh=config.fresh, say=say)
        train_teacher(teacher_config, teacher_path)
        return load_teacher(teacher_path).metadata

    def load_teacher_metadata() -> dict[str, Any]:
        metadata = load_teacher(teacher_path).metadata
        if metadata.get("config") != teacher_config.model_dump(mode="json") or "test_accuracy" not in metadata:
            raise RocoinError("it was trained with other settings")
        return metadata

    teacher_key, teacher_meta = ledger.run("teacher", {"config": teacher_config.model_dump(mode="json")}, [teacher_path], make_teacher, load_teacher_metadata)
    say(f"teacher {config.teacher_arch}: {100 * teacher_meta['test_accuracy']:.2f} % test accuracy")

    # 3. fleet, activations, catalog, plan
    say("[3/6] fleet, teacher activity, student catalog, RoCoIn plan")
    from rocoin.distillation.activity import teacher_activations
    from rocoin.models.measure import measure_catalog
    from rocoin.planning import filter_graph, make_plan
    from rocoin.contracts.plan import load_plan, save_plan
    from rocoin.planning.activations import load_activations
    from rocoin.contracts.catalog import load_catalog, save_catalog
    from rocoin.contracts.fleet import load_fleet, save_fleet
    from rocoin.profiles.generate import generate_fleet

    fleet_path, act_path, catalog_path, plan_path = out / "fleet.yaml", out / "activations.npy", out / "catalog.json", out / "plan.json"
    fleet_inputs = {"devices": config.devices, "heterogeneity": config.heterogeneity, "success_prob": config.success_prob, "seed": config.seed}

    def make_fleet():
        fleet = generate_fleet(config.devices, config.heterogeneity, config.success_prob, random_state=config.seed)
        save_fleet(fleet, fleet_path)
        return fleet

    fleet_key, fleet = ledger.run("fleet", fleet_inputs, [fleet_path], make_fleet, lambda: load_fleet(fleet_path))

    def make_activations() -> np.ndarray:
        with progress_bar("teacher activity on the validation split", 1) as advance:
            activity = teacher_activations(teacher_path)
            advance()
        with atomic_path(act_path) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, activity, allow_pickle=False)
        return activity

    act_key, activity = ledger.run("activations", {"teacher": teacher_key}, [act_path], make_activations, lambda: load_activations(act_path))
    input_shape = tuple(teacher_meta["dataset"]["input_shape"])
    num_classes = int(teacher_meta["dataset"]["num_classes"])

    def make_catalog():
        with progress_bar("measuring the students", len(config.students)) as advance:
            catalog = measure_catalog(input_shape, num_classes, list(config.students), progress=lambda name, spec: advance())
        save_catalog(catalog, catalog_path)
        return catalog

    def load_same_catalog():
        catalog = load_catalog(catalog_path)
        if sorted(catalog.names) != sorted(config.students):
            raise RocoinError("it holds other students")
        return catalog

    catalog_inputs = {"input_shape": list(input_shape), "num_classes": num_classes, "students": list(config.students)}
    catalog_key, catalog = ledger.run("catalog", catalog_inputs, [catalog_path], make_catalog, load_same_catalog)

    def make_the_plan():
        plan = make_plan(fleet, filter_graph(activity), catalog, scheme="rocoin", epsilon=config.epsilon, seed=config.seed)
        save_plan(plan, plan_path)
        return plan

    plan_inputs = {"fleet": fleet_key, "activations": act_key, "catalog": catalog_key, "epsilon": config.epsilon, "seed": config.seed}
    plan_key, plan = ledger.run("plan", plan_inputs, [plan_path], make_the_plan, lambda: load_plan(plan_path))
    say(
        f"plan: {plan.num_groups} groups ("
        + "; ".join(f"{g.student} on {'+'.join(g.devices)}, {len(g.filters)} filters" for g in plan.groups)
        + f"), T = {plan.latency_s:.3g} s, P(all groups answer) = {plan.p_complete:.3f}"
    )
    victims = choose_victims(plan, config.kill)

    # 4. students, bundle, in-process evaluation
    say("[4/6] distilling the students, exporting the bundle")
    from rocoin.distillation.distill import DistillConfig, Students, distill
    from rocoin.distillation.evaluate import evaluate_students
    from rocoin.export import export_bundle
    from rocoin.contracts.manifest import load_manifest

    students_path, bundle, eval_path = out / "students.pt", out / "bundle", out / "evaluation.json"
    distill_config = DistillConfig(epochs=config.distill_epochs, max_train_images=config.distill_images, seed=config.seed)

    def load_students() -> dict[str, Any]:
        students = Students(students_path)
        if students.metadata.get("config") != distill_config.model_dump(mode="json") or students.plan != plan:
            raise RocoinError("it was distilled with other settings")
        return students.metadata

    def make_students() -> dict[str, Any]:
        distill(teacher_path, plan, distill_config, students_path, plan_source=str(plan_path))
        return Students(students_path).metadata

    students_key, students_meta = ledger.run(
        "students", {"teacher": teacher_key, "plan": plan_key, "config": distill_config.model_dump(mode="json")}, [students_path], make_students, load_students
    )

    def make_bundle():
        with progress_bar("exporting to ONNX (parity-checked)", 1) as advance:
            manifest = export_bundle(students_path, bundle, plan_path=plan_path, overwrite=True)
            advance()
        return manifest

    bundle_key, _ = ledger.run("bundle", {"students": students_key}, [bundle / "manifest.json"], make_bundle, lambda: load_manifest(bundle))

    def make_evaluation() -> dict[str, Any]:
        with progress_bar("in-process evaluation of the students", 1) as advance:
            result = evaluate_students(students_path, fail_devices=[config.kill], trials=EVAL_TRIALS, seed=config.seed)
            advance()
        write_json_atomic(eval_path, result)
        return result

    def load_evaluation() -> dict[str, Any]:
        return json.loads(eval_path.read_text(encoding="utf-8"))

    _, evaluation = ledger.run("evaluation", {"students": students_key, "kill": config.kill, "seed": config.seed}, [eval_path], make_evaluation, load_evaluation)
    say(f"students: {100 * evaluation['accuracy']:.2f} % with every group (in-process)")

    # 5. runtime
    from rocoin.distillation.training import load_data

    test = load_data(data_config).test
    count = min(config.queries or len(test), len(test))
    if count < 2:
        raise RocoinError(f"--queries = {count}: expected at least 2 (the test split has {len(test)} images)")
    images, labels = test.images[:count], test.labels[:count]
    kill_index = min(count - 1, max(1, round(config.kill_after * count)))
    deadline_s = config.deadline_s or DEADLINE_FACTOR * plan.latency_s / config.speedup + DEADLINE_SLACK_S
    say(
        f"[5/6] local cluster: {len(plan.device_ids)} emulating device workers + the source (deadline {1e3 * deadline_s:.0f} ms);"
        f" {count} test images through the KServe v2 REST API, {config.concurrency} at a time;"
        f" SIGKILL {', '.join(victims.devices)} after {kill_index}"
    )
    log, cluster_info = _run_cluster(out, bundle, fleet, plan, config, images, kill_index, victims, deadline_s, say)

    # 6. report
    say("[6/6] report")
    runtime = {
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
        "expected_missing_share": _expected_missing(plan, fleet, victims),
        "before": phase_summary(log, labels, slice(0, kill_index), plan.num_groups, log.phase_s[0]),
        "after": phase_summary(log, labels, slice(kill_index, count), plan.num_groups, log.phase_s[1]),
        **cluster_info,
    }
    failures = evaluation["failures"][0]
    results = {
        "dataset": {
            "name": data.name,
            "how": data.how,
            "notice": data.notice,
            "train_images_teacher": config.max_train_images,
            "train_images_students": distill_config.max_train_images,
            "test_images": len(test),
        },
        "teacher": {
            "arch": config.teacher_arch,
            "epochs": config.teacher_epochs,
            "filters": int(activity.shape[1]),
            "test_accuracy": teacher_meta["test_accuracy"],
            "val_accuracy": teacher_meta.get("val_accuracy"),
            "test_images": len(test),
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
            "random_failures": failures,
            "distill_val_accuracy": students_meta.get("val_accuracy"),
        },
        "runtime": runtime,
        "steps": {**ledger.timings, "runtime": {"seconds": cluster_info["runtime_s"], "reused": False}},
        "config": config.model_dump(mode="json"),
        "machine": {"cpus": os.cpu_count(), "load_average_1min": {"start": load_at_start, "end": _load_average()}},
    }
    _write_queries_csv(out / "queries.csv", log, labels)
    files = ["report.md", "results.json", "queries.csv"] + _plots(out, results, log)
    results["total_s"] = time.perf_counter() - started
    report = DemoReport(results, out, files)
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "report.md", report.markdown())
    return report


def _load_average() -> float | None:
    """The 1-minute load average, to tell whether other work shared the CPU (None where unknown)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _expected_missing(plan, fleet, victims: Victims) -> dict[str, list[float]]:
    """Per group, P(missing) in the system model: every replica's answer lost (SPEC.md §1)."""
    outage = {d.id: d.outage for d in fleet.devices}
    after = [float(np.prod([outage[d] for d in g.devices if d not in victims.devices])) for g in plan.groups]
    return {"before": [float(np.prod([outage[d] for d in g.devices])) for g in plan.groups], "after": after}


def _clear_stale_resume(teacher_path: Path, config, *, fresh: bool, say: Say) -> None:
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


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While the cluster runs, SIGTERM stops the demo like Ctrl-C, so the workers are stopped too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_cluster(out: Path, bundle: Path, fleet, plan, config: DemoConfig, images: np.ndarray, kill_index: int, victims: Victims, deadline_s: float, say: Say):
    from rocoin.contracts.fleet import Fleet
    from rocoin.runtime.cluster.local import STATE_FILE, LocalCluster, cluster_down

    state_dir = out / "cluster"
    if (state_dir / STATE_FILE).exists():
        say(f"stopping the cluster an interrupted run left in {state_dir}")
        cluster_down(state_dir)
    if state_dir.is_dir():
        for old_log in state_dir.glob("*.log"):
            old_log.unlink()
    # Emulation: every device answers after t(d, s, k) of its profile and drops answers with its
    # outage probability; FLOP/s and rates are multiplied by --speedup so a query takes ms, not s.
    emulated = Fleet(
        devices=[d.model_copy(update={"flops": d.flops * config.speedup, "rate_bps": d.rate_bps * config.speedup, "address": None}) for d in fleet.devices],
        input_bits=fleet.input_bits,
    )
    cluster = LocalCluster(bundle, emulated, state_dir, emulate=True, deadline_s=deadline_s, http=True)
    started = time.perf_counter()
    with _sigterm_as_interrupt():
        try:
            with progress_bar(f"starting {len(plan.device_ids)} device workers and the source", 1) as advance:
                state = cluster.start()
                advance()
            startup_s = time.perf_counter() - started
            url = f"http://{state.source.http_address}"
            pids = {m.name: m.pid for m in [*state.devices, state.source]}

            def kill() -> None:
                for device_id in victims.devices:
                    cluster.kill_device(device_id)
                logger.info("killed %s", ", ".join(victims.devices))

            with progress_bar(f"queries (SIGKILL {len(victims.devices)} devices after {kill_index})", len(images)) as advance:
                log = asyncio.run(send_queries(url, images, concurrency=config.concurrency, kill_index=kill_index, kill=kill, advance=advance))
        finally:
            cluster.stop()
    say(f"cluster stopped; worker logs in {state_dir}")
    return log, {"startup_s": startup_s, "runtime_s": time.perf_counter() - started, "cluster_logs": str(state_dir), "pids": pids}


def _write_queries_csv(path: Path, log: QueryLog, labels: np.ndarray) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["query", "phase", "sent_s", "latency_ms", "source_latency_ms", "label", "prediction", "missing_groups"])
    for i in range(len(log.latency_s)):
        writer.writerow(
            [
                i,
                "before" if i < log.kill_index else "after",
                f"{log.sent_s[i]:.4f}",
                f"{1e3 * log.latency_s[i]:.3f}",
                f"{1e3 * log.source_latency_s[i]:.3f}",
                int(labels[i]),
                int(log.prediction[i]),
                " ".join(map(str, log.missing[i])),
            ]
        )
    write_text_atomic(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------
# Plots and the Markdown report


def _plots(out: Path, r: dict[str, Any], log: QueryLog) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rt = r["runtime"]
    files = []

    # per-query latency in the order sent, the kill marked
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    index = np.arange(len(log.latency_s))
    complete = np.array([not m for m in log.missing])
    ms = 1e3 * log.latency_s
    ax.scatter(index[complete], ms[complete], s=3, color="tab:blue", label="every group answered")
    ax.scatter(index[~complete], ms[~complete], s=3, color="tab:orange", label="groups missing (zero-filled)")
    ax.axvline(log.kill_index - 0.5, color="tab:red", linestyle="--", label=f"SIGKILL {', '.join(rt['victims'])}")
    ax.axhline(1e3 * rt["deadline_s"], color="grey", linestyle=":", label=f"deadline {1e3 * rt['deadline_s']:.0f} ms")
    ax.set_ylim(0, 1.15 * max(float(ms.max()), 1e3 * rt["deadline_s"]))
    ax.set_xlabel("query (in the order sent)")
    ax.set_ylabel("latency at the client (ms)")
    ax.set_title(f"Per-query latency through the source's {rt['api']} API, {rt['concurrency']} in flight")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4, fontsize="small", markerscale=3)
    files.append(_save_png(fig, out / "latency.png"))

    # accuracy and missing groups, before vs after
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    before, after = rt["before"], rt["after"]
    bars = [
        ("teacher", r["teacher"]["test_accuracy"], "tab:grey"),
        ("students\nall groups\n(in-process)", r["students"]["accuracy"], "tab:green"),
        (f"students\n{r['students']['random_failures']['fail_devices']} random failed\n(in-process)", r["students"]["random_failures"]["accuracy_mean"], "tab:olive"),
        ("runtime\nbefore kill", before["accuracy"], "tab:blue"),
        ("runtime\nafter kill", after["accuracy"], "tab:red"),
    ]
    positions = np.arange(len(bars))
    left.bar(positions, [100 * b[1] for b in bars], color=[b[2] for b in bars])
    for x, (_, value, _) in zip(positions, bars):
        left.text(x, 100 * value, f"{100 * value:.1f}", ha="center", va="bottom", fontsize="small")
    left.set_xticks(positions, [b[0] for b in bars], fontsize="small")
    low = min(100 * b[1] for b in bars)
    left.set_ylim(max(0.0, low - 10), 100)
    left.set_ylabel("accuracy (%)")
    left.set_title(f"{r['dataset']['name']} test accuracy")
    groups = np.arange(r["plan"]["groups_count"])
    width = 0.4
    share_before = 100 * np.asarray(before["queries_missing_group"]) / max(1, before["queries"])
    share_after = 100 * np.asarray(after["queries_missing_group"]) / max(1, after["queries"])
    right.bar(groups - width / 2, share_before, width, color="tab:blue", label=f"before the kill ({before['queries']} queries)")
    right.bar(groups + width / 2, share_after, width, color="tab:red", label=f"after ({after['queries']} queries)")
    expected = rt["expected_missing_share"]
    right.scatter(groups - width / 2, [100 * v for v in expected["before"]], marker="_", s=300, color="black", zorder=3)
    right.scatter(groups + width / 2, [100 * v for v in expected["after"]], marker="_", s=300, color="black", zorder=3, label="model: every replica's answer lost")
    right.set_xticks(groups, [f"group {k}\n{len(g['devices'])} dev." for k, g in enumerate(r["plan"]["groups"])], fontsize="small")
    right.set_ylabel("queries with the group missing (%)")
    right.set_ylim(0, 105)
    right.set_title("Missing groups (emulated outages and killed devices)")
    right.legend(fontsize="small")
    files.append(_save_png(fig, out / "accuracy.png"))
    return files


def _save_png(fig, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path.name


def _markdown(r: dict[str, Any]) -> str:
    from rocoin.runtime.source.source import FAILURES_TO_MARK_DOWN, PROBE_INTERVAL_S

    rt, t, s, plan, data = r["runtime"], r["teacher"], r["students"], r["plan"], r["dataset"]
    header = "| " + " | ".join(COLUMNS) + " |"
    lines = ["# rocoin end-to-end demo", ""]
    if data["notice"]:
        lines += [f"> {data['notice']}", ""]
    lines += [header, "|---|---:|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(r)]
    lines += ["", _caption(r), "", "![latency](latency.png)", "", "![accuracy](accuracy.png)", ""]
    lines += [
        "## Plan and missing groups",
        "",
        "| group | devices | filters | student | failure prob | latency s | missing before % (model) | missing after % (model) |",
        "|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    expected = rt["expected_missing_share"]
    for k, g in enumerate(plan["groups"]):
        lost = " (lost)" if k in rt["lost_groups"] else ""
        members = ", ".join(d + (" (killed)" if d in rt["victims"] else "") for d in g["devices"])
        shares = [
            f"{100 * rt[phase]['queries_missing_group'][k] / max(1, rt[phase]['queries']):.1f} ({100 * expected[phase][k]:.1f})"
            for phase in ("before", "after")
        ]
        lines.append(f"| {k}{lost} | {members} | {len(g['filters'])} | {g['student']} | {g['failure_prob']:.3g} | {g['latency_s']:.3g} | {shares[0]} | {shares[1]} |")
    lines += ["", f"T = {plan['latency_s']:.3g} s, P(every group answers) = {plan['p_complete']:.3f}, ε = {plan['epsilon']}."]
    lines += [f"Device {u['id']} has no student: {u['reason']}." for u in plan["unassigned"]] + [""]
    before_q, after_q = rt["before"]["queries_per_s"], rt["after"]["queries_per_s"]
    lines += [
        "## Assumptions and settings",
        "",
        f"- Data: {data['name']}, {data['how']}; the teacher trains on {_count(data['train_images_teacher'])} images and the students on"
        f" {_count(data['train_images_students'])} of the training split (10 % of it held out for validation); {data['test_images']:,} test images.",
        f"- Teacher: {t['arch']}, {t['epochs']} epoch(s), AdamW (lr 0.003, cosine); its final conv layer has {t['filters']} filters"
        f" (the planner's knowledge); test accuracy {_pct(t['test_accuracy'])} %.",
        f"- Fleet: {r['fleet']['devices']} generated devices, heterogeneity level {r['fleet']['heterogeneity']} (Table IV),"
        f" mean success probability {r['fleet']['success_prob']}, seed {r['config']['seed']} (fleet.yaml).",
        f"- Students: catalog {', '.join(r['config']['students'])} measured with torch; RoCoIn plan with ε = {plan['epsilon']};"
        f" distilled for {s['epochs']} epoch(s), failure-aware; in-process accuracy on {s['test_images']:,} test images.",
        f"- Runtime: {plan['groups_count']} groups, one worker process per device and the source on loopback (127.0.0.1, ports"
        f" chosen by the OS); every worker emulates its profile — it answers after t(d, s, k) = c_s/f_d + 32·|P_k|/r_d"
        f" with f_d and r_d × {rt['speedup']:g}, and drops an answer with its outage probability (silently: the source waits"
        f" for the deadline); the source's deadline is {1e3 * rt['deadline_s']:.1f} ms"
        + (f" ({DEADLINE_FACTOR:g} × T / {rt['speedup']:g} + {1e3 * DEADLINE_SLACK_S:.0f} ms)" if r["config"]["deadline_s"] is None else "")
        + f". The source stops waiting for a device after {FAILURES_TO_MARK_DOWN} failed calls in a row (answers lost to an emulated"
        " outage count) but keeps sending it queries on trial and counts on it again from its first answer (or when its health"
        f" service, probed every {PROBE_INTERVAL_S:g} s, says SERVING); only queries sent in that window do not wait for it.",
        f"- Queries: the first {rt['queries']:,} test images{' (the whole test split)' if rt['queries'] == data['test_images'] else ''}, one image per KServe v2 REST call (`POST /v2/models/rocoin/infer`),"
        f" {rt['concurrency']} in flight, after {rt['warmup_queries']} unmeasured warm-up calls; latency is measured at the client.",
        f"- Failures: after query {rt['kill_after_queries']} (every earlier query answered; {rt['kill_at_s']:.1f} s into the run)"
        f" SIGKILL of {', '.join(rt['victims'])}: {rt['victims_reason']} ({_lost(rt['lost_groups'])}).",
        f"- Throughput: {before_q:.0f} queries/s before and {after_q:.0f} after, every process on the same machine"
        f" (cluster start-up {rt['startup_s']:.1f} s).",
        "",
        "## Steps",
        "",
        "| step | seconds | |",
        "|---|---:|---|",
    ]
    for name, step in r["steps"].items():
        lines.append(f"| {name} | {step['seconds']:.1f} | {'reused' if step.get('reused') else ''} |")
    machine = r["machine"]
    load = machine["load_average_1min"]
    lines += [
        "",
        f"Total: {r.get('total_s', 0.0):.1f} s on {machine['cpus']} CPUs (1-minute load average {load['start']} at the start,"
        f" {load['end']} at the end).",
        "Per-query rows: queries.csv; everything above: results.json.",
        "",
    ]
    return "\n".join(lines)


def _count(value: int | None) -> str:
    return "all" if value is None else f"the first {value:,}"
