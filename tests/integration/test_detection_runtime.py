"""A detection bundle served on loopback (issue 15): devices send their partitions of the split
point's map (|P_k| × h × w, float32 or float16), the source assembles them (a missing group's
channels zero), runs the rest of the detector, decodes the boxes and answers over the KServe v2
REST API with fixed-size detections and a count."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
aiohttp = pytest.importorskip("aiohttp")

import onnxruntime as ort  # noqa: E402
from conftest import device  # noqa: E402

from rocoin.contracts.catalog import StudentSpec  # noqa: E402
from rocoin.contracts.fleet import Fleet  # noqa: E402
from rocoin.contracts.manifest import (  # noqa: E402
    MANIFEST_NAME,
    DetectionSpec,
    GroupModel,
    Manifest,
    ModelFile,
    Normalization,
    TensorSpec,
    file_sha256,
)
from rocoin.contracts.plan import GroupPlan, Plan  # noqa: E402
from rocoin.models.boxes import decode, pack_detections  # noqa: E402
from rocoin.runtime.api.http import start_http  # noqa: E402
from rocoin.runtime.api.oip import result_tensors  # noqa: E402
from rocoin.runtime.device.server import start_device  # noqa: E402
from rocoin.runtime.source.source import Source  # noqa: E402

INPUT_CHW = (1, 32, 32)
STRIDE = 8
CELLS = (4, 4)
CLASSES = ["shirt", "bag", "boot"]
GROUPS = [(["a1", "a2"], [0, 3, 5]), (["b1"], [1, 2, 4])]
CHANNELS = 6
MAX_DETECTIONS = 5
SETTINGS = {"score_threshold": 0.05, "iou_threshold": 0.5, "max_detections": MAX_DETECTIONS}


class Student(torch.nn.Module):
    """A partition of the split point's map: a stride-8 convolution to |P_k| channels, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, channels, STRIDE, stride=STRIDE)

    def forward(self, x):
        return torch.relu(self.conv(x))


class Rest(torch.nn.Module):
    """The rest of the detector: heatmap logits (K × h × w) and the box map (4 × h × w)."""

    def __init__(self) -> None:
        super().__init__()
        self.heat = torch.nn.Conv2d(CHANNELS, len(CLASSES), 3, padding=1)
        self.box = torch.nn.Conv2d(CHANNELS, 4, 1)

    def forward(self, features):
        return self.heat(features), self.box(features)


def _export(module: torch.nn.Module, example, path: Path, inputs: list[str], outputs: list[str]) -> None:
    torch.onnx.export(
        module.eval(),
        (example,),
        str(path),
        input_names=inputs,
        output_names=outputs,
        dynamic_axes={name: {0: "batch"} for name in inputs + outputs},
        opset_version=17,
        dynamo=False,
    )


def make_detection_bundle(folder: Path, wire_dtype: str = "float32") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for k, (_, filters) in enumerate(GROUPS):
        _export(Student(len(filters)), torch.zeros(1, *INPUT_CHW), folder / f"group{k}.onnx", ["image"], ["features"])
    _export(Rest(), torch.zeros(1, CHANNELS, *CELLS), folder / "head.onnx", ["features"], ["heatmap", "box"])
    cells = CELLS[0] * CELLS[1]
    spec = StudentSpec(flops=1e4, memory_bytes=10_000, params=10, out_dim=CHANNELS, output_values_per_filter=cells)
    spec = StudentSpec(**{**spec.model_dump(), "output_bits_per_value": 16 if wire_dtype == "float16" else 32})
    plan = Plan(
        scheme="rocoin",
        epsilon=0.05,
        num_filters=CHANNELS,
        groups=[GroupPlan(devices=d, filters=f, student="tiny", failure_prob=0.01, latency_s=0.01) for d, f in GROUPS],
        latency_s=0.01,
        p_complete=0.98,
        catalog={"tiny": spec},
    )

    def entry(name: str) -> dict:
        return {"file": name, "sha256": file_sha256(folder / name), "size_bytes": (folder / name).stat().st_size}

    manifest = Manifest(
        plan=plan,
        dataset="fashion-scenes",
        class_names=CLASSES,
        normalization=Normalization(mean=[0.5], std=[0.25]),
        groups=[
            GroupModel(
                **entry(f"group{k}.onnx"),
                input=TensorSpec(name="image", shape=list(INPUT_CHW)),
                output=TensorSpec(name="features", shape=[len(f), *CELLS]),
                group=k,
                student="tiny",
                devices=d,
                filters=f,
                wire_dtype=wire_dtype,
            )
            for k, (d, f) in enumerate(GROUPS)
        ],
        head=ModelFile(
            **entry("head.onnx"),
            input=TensorSpec(name="features", shape=[CHANNELS, *CELLS]),
            output=TensorSpec(name="heatmap", shape=[len(CLASSES), *CELLS]),
        ),
        rocoin_version="0.1.0",
        task="detection",
        detection=DetectionSpec(split_point="backbone", stride_px=STRIDE, box_output=TensorSpec(name="box", shape=[4, *CELLS]), **SETTINGS),
    )
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest.model_dump(mode="json")))
    return folder


def head_outputs(bundle: Path, images: np.ndarray, missing: set[int] = frozenset(), wire_dtype: str = "float32"):
    """The rest of the detector run locally on the assembled maps (float16 on the wire if so)."""
    x = ((images.astype(np.float32) / 255.0) - 0.5) / 0.25
    features = np.zeros((len(x), CHANNELS, *CELLS), dtype=np.float32)
    for k, (_, filters) in enumerate(GROUPS):
        if k not in missing:
            maps = ort.InferenceSession(str(bundle / f"group{k}.onnx")).run(None, {"image": x})[0]
            features[:, filters] = maps.astype(wire_dtype).astype(np.float32)
    return ort.InferenceSession(str(bundle / "head.onnx")).run(None, {"features": features})


def expected(bundle: Path, images: np.ndarray, missing: set[int] = frozenset(), wire_dtype: str = "float32"):
    """The pipeline run locally: the maps assembled, the rest, the decoding."""
    heat, box = head_outputs(bundle, images, missing, wire_dtype)
    found = decode(heat, box, stride=STRIDE, score_threshold=0.05, max_detections=MAX_DETECTIONS, nms_iou=0.5, image_size=INPUT_CHW[1:])
    return pack_detections(found, MAX_DETECTIONS)


def images(seed: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, *INPUT_CHW), dtype=np.uint8)


@contextlib.asynccontextmanager
async def detection_source(bundle: Path):
    devices = {}
    try:
        for members, _ in GROUPS:
            for name in members:
                devices[name] = await start_device(bundle, name, insecure=True)
        fleet = Fleet(devices=[device(d, 20, 4, 300, 0.1, address=devices[d].address) for members, _ in GROUPS for d in members])
        async with Source(bundle, fleet, deadline_s=1.0, insecure=True) as source:
            yield source, devices
    finally:
        for running in devices.values():
            await running.stop(0)


def assert_same_detections(got, want, atol: float = 1e-4) -> None:
    boxes, scores, labels, count = got
    np.testing.assert_array_equal(count, want[3])
    np.testing.assert_array_equal(labels, want[2])
    np.testing.assert_allclose(scores, want[1], atol=atol)
    np.testing.assert_allclose(boxes, want[0], atol=atol * 100)  # pixels


def test_the_source_answers_detections_and_zero_fills_a_missing_group(tmp_path):
    bundle = make_detection_bundle(tmp_path / "bundle")

    async def scenario():
        async with detection_source(bundle) as (source, devices):
            batch = images(0)
            full = await source.infer(batch)
            await devices["b1"].stop(0)  # group 1's only replica
            partial = await source.infer(batch)
            return batch, full, partial

    batch, full, partial = asyncio.run(scenario())
    assert full.missing_groups == [] and partial.missing_groups == [1]
    assert full.logits.shape == (2, len(CLASSES), *CELLS)
    assert_same_detections(full.detections, expected(bundle, batch))
    assert_same_detections(partial.detections, expected(bundle, batch, missing={1}))
    boxes, scores, labels, count = full.detections
    assert boxes.shape == (2, MAX_DETECTIONS, 4) and count.max() >= 1  # the random student finds something
    for b, c in enumerate(count):  # padding rows after the detections
        assert (labels[b, c:] == -1).all() and (scores[b, c:] == 0).all() and (labels[b, :c] >= 0).all()
        assert (boxes[b, :c, 0] >= 0).all() and (boxes[b, :c, 2] <= INPUT_CHW[2]).all()


def test_float16_maps_travel_as_float16_and_cost_what_rounding_costs(tmp_path):
    bundle = make_detection_bundle(tmp_path / "bundle", wire_dtype="float16")

    async def scenario():
        async with detection_source(bundle) as (source, devices):
            batch = images(1)
            sent = await asyncio.to_thread(devices["a1"].worker.run_model, source.normalise(batch))
            return batch, await source.infer(batch), sent

    batch, result, computed = asyncio.run(scenario())
    assert computed.dtype == np.float32  # the model computes float32; the worker rounds what it sends
    assert_same_detections(result.detections, expected(bundle, batch, wire_dtype="float16"))
    rounded, exact = head_outputs(bundle, batch, wire_dtype="float16")[0], head_outputs(bundle, batch)[0]
    np.testing.assert_allclose(result.logits, rounded, atol=1e-6)  # what arrived was float16
    assert 0 < np.abs(result.logits - exact).max() < 1e-2  # and rounding costs little


def test_kserve_rest_answers_boxes_scores_labels_count_and_missing_groups(tmp_path):
    bundle = make_detection_bundle(tmp_path / "bundle")

    async def scenario():
        async with detection_source(bundle) as (source, _):
            http = await start_http(source, "127.0.0.1:0")
            try:
                async with aiohttp.ClientSession() as session:
                    base = f"http://{http.address}/v2/models/rocoin"
                    reply = await session.get(base)
                    meta = await reply.json()
                    assert reply.status == 200, meta
                    batch = images(2, batch=1)
                    body = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": list(batch.shape), "data": batch.ravel().tolist()}]}
                    answer = await (await session.post(f"{base}/infer", json=body)).json()
                    return batch, meta, answer, result_tensors(await source.infer(batch))
            finally:
                await http.close()

    batch, meta, answer, tensors = asyncio.run(scenario())
    names = ["boxes", "scores", "labels", "count", "missing_groups"]
    assert [o["name"] for o in meta.get("outputs", [])] == names, meta
    assert meta["outputs"][0]["shape"] == [-1, MAX_DETECTIONS, 4]
    assert "outputs" in answer, answer
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert list(outputs) == names and [t[0] for t in tensors] == names
    assert outputs["boxes"]["datatype"] == "FP32" and outputs["labels"]["datatype"] == "INT32"
    want = expected(bundle, batch)
    assert outputs["count"]["data"] == want[3].tolist() and outputs["labels"]["data"] == want[2].ravel().tolist()
    np.testing.assert_allclose(np.reshape(outputs["boxes"]["data"], outputs["boxes"]["shape"]), want[0], atol=1e-2)
    assert outputs["missing_groups"]["data"] == []


def test_a_detection_manifest_is_checked_against_its_maps(tmp_path):
    bundle = make_detection_bundle(tmp_path / "bundle")
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    with pytest.raises(ValueError, match=r"group 0: output shape \[3\] != \[3, 4, 4\]"):
        Manifest.model_validate(
            {**data, "groups": [{**data["groups"][0], "output": {"name": "features", "shape": [3]}}, data["groups"][1]]}
        )
    with pytest.raises(ValueError, match="a detection bundle needs its detection settings"):
        Manifest.model_validate({**data, "detection": None})
    with pytest.raises(ValueError, match="sends 16 values of 32 bits per filter but the model sends 16 of 16"):
        Manifest.model_validate({**data, "groups": [{**g, "wire_dtype": "float16"} for g in data["groups"]]})
    classifier = {**data, "task": "classification", "detection": None}
    with pytest.raises(ValueError, match="float16 is for feature maps"):
        Manifest.model_validate(
            {
                **classifier,
                "groups": [{**g, "output": {"name": "f", "shape": [len(g["filters"])]}, "wire_dtype": "float16"} for g in data["groups"]],
            }
        )
