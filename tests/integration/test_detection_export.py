"""A distilled detector exported to a detection bundle (issue 15): every part's ONNX matches
PyTorch, the manifest prices what is sent, the real runtime serves it and answers what the torch
pipeline (students -> assembled map -> the detector's rest -> numpy decoding) gives, also with a
group missing and with float16 on the wire; bad input leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from test_detection_runtime import detection_source  # noqa: E402

from rocoin.contracts.catalog import Catalog, StudentSpec  # noqa: E402
from rocoin.contracts.errors import RocoinError  # noqa: E402
from rocoin.contracts.manifest import MANIFEST_NAME, load_manifest  # noqa: E402
from rocoin.contracts.plan import GroupPlan, Plan  # noqa: E402
from rocoin.export import detection_bundle  # noqa: E402
from rocoin.export.detection_bundle import check_detection_parity, export_detection_bundle  # noqa: E402
from rocoin.models.boxes import decode  # noqa: E402
from rocoin.models.detector import assemble_features, build_detector, build_detector_student  # noqa: E402

INPUT = (1, 32, 32)
CELLS = (4, 4)
CLASSES = ["a", "b", "c"]
MEAN, STD = [0.2], [0.3]


def setup(point: str, wire_dtype: str = "float32"):
    torch.manual_seed(0)
    detector = build_detector("det-wrn-10-1", in_channels=1, num_classes=len(CLASSES)).eval()
    channels = detector.split_channels(point)
    sizes = [channels // 2, channels - channels // 2]
    students = [build_detector_student("wrn-10-1", point, n, 1, CELLS).eval() for n in sizes]
    spec = StudentSpec(
        flops=1e6,
        memory_bytes=10**6,
        params=10**5,
        out_dim=channels,
        output_values_per_filter=16,
        output_bits_per_value=16 if wire_dtype == "float16" else 32,
    )
    starts = np.cumsum([0, *sizes])
    plan = Plan(
        scheme="rocoin",
        epsilon=0.99,
        num_filters=channels,
        groups=[
            GroupPlan(
                devices=devices,
                filters=list(range(int(starts[k]), int(starts[k + 1]))),
                student="wrn-10-1",
                failure_prob=0.1,
                latency_s=0.01,
            )
            for k, devices in enumerate([["a1", "a2"], ["b1"]])
        ],
        latency_s=0.01,
        p_complete=0.81,
        catalog=Catalog({"wrn-10-1": spec}).root,
    )
    return detector, students, plan


def torch_pipeline(detector, students, plan, point, images: np.ndarray, missing=frozenset(), wire_dtype="float32"):
    x = (torch.from_numpy(images).float() / 255.0 - MEAN[0]) / STD[0]
    with torch.no_grad():
        maps = [s(x) for s in students]
        if wire_dtype == "float16":
            maps = [m.half().float() for m in maps]
        mask = torch.tensor([[k in missing for k in range(len(maps))]] * len(x))
        features = assemble_features(maps, [g.filters for g in plan.groups], plan.num_filters, mask)
        out = detector.rest(features, point)
    box = torch.cat([out["size"], out["offset"]], 1).numpy()
    return decode(out["heatmap"].numpy(), box, stride=8, score_threshold=0.05, max_detections=20, nms_iou=0.5, image_size=INPUT[1:])


@pytest.mark.parametrize(
    ("point", "wire_dtype"), [("backbone", "float32"), ("backbone", "float16"), ("neck", "float32"), ("neck", "float16")]
)
def test_an_exported_detector_is_served_as_torch_computes_it(tmp_path, point, wire_dtype):
    detector, students, plan = setup(point, wire_dtype)
    bundle = tmp_path / "bundle"
    manifest = export_detection_bundle(
        detector, students, plan, point, bundle, class_names=CLASSES, mean=MEAN, std=STD, dataset="scenes", wire_dtype=wire_dtype
    )
    assert load_manifest(bundle) == manifest and manifest.task == "detection" and manifest.detection.split_point == point
    assert manifest.plan == plan and manifest.detection.stride_px == 8 and manifest.head.input.shape == [plan.num_filters, *CELLS]
    assert [m.output.shape for m in manifest.groups] == [[len(g.filters), *CELLS] for g in plan.groups]
    assert {m.wire_dtype for m in manifest.groups} == {wire_dtype}
    differences = check_detection_parity(bundle, manifest, detector, students)
    assert sorted(differences) == ["group-0.onnx", "group-1.onnx", "head.onnx"] and max(differences.values()) < 1e-4
    images = np.random.default_rng(3).integers(0, 256, size=(2, *INPUT), dtype=np.uint8)

    async def scenario():
        async with detection_source(bundle) as (source, devices):
            full = await source.infer(images)
            await devices["b1"].stop(0)
            return full, await source.infer(images)

    full, partial = asyncio.run(scenario())
    assert partial.missing_groups == [1]
    for result, missing in ((full, set()), (partial, {1})):
        want = torch_pipeline(detector, students, plan, point, images, missing, wire_dtype)
        boxes, scores, labels, count = result.detections
        assert count.tolist() == [len(w[1]) for w in want]
        for b, (wb, ws, wl) in enumerate(want):
            np.testing.assert_allclose(scores[b, : count[b]], ws, atol=1e-3)
            np.testing.assert_array_equal(labels[b, : count[b]], wl)
            np.testing.assert_allclose(boxes[b, : count[b]], wb, atol=0.05)


def test_bad_input_is_one_clear_error_and_leaves_nothing(tmp_path):
    detector, students, plan = setup("backbone")
    options = {"class_names": CLASSES, "mean": MEAN, "std": STD, "dataset": "scenes"}
    valid = (detector, students, plan, "backbone")
    cases = [
        ((detector, students[:1], plan, "backbone"), {}, "students: 1 for a plan of 2 groups"),
        ((detector, students, plan, "head"), {}, "point = 'head'"),
        (valid, {"wire_dtype": "int8"}, "wire_dtype = 'int8'"),
        (valid, {"score_threshold": 1.0}, "score_threshold = 1.0"),
        (valid, {"iou_threshold": 0.0}, "iou_threshold = 0.0"),
        (valid, {"max_detections": 0}, "max_detections = 0"),
        (valid, {"parity_atol": float("nan")}, "parity_atol = nan"),
        (valid, {"class_names": ["a", "b"]}, "class_names: 2 names for a detector of 3 classes"),
        (valid, {"mean": [0.1, 0.2]}, "mean: 2 values for a detector of 1 input channels"),
        (
            (detector, [build_detector_student("wrn-10-1", "backbone", 5, 1, CELLS), students[1]], plan, "backbone"),
            {},
            "students\\[0\\]: 5 output channels",
        ),
        (
            (detector, [students[0], build_detector_student("wrn-10-1", "neck", len(plan.groups[1].filters), 1, CELLS)], plan, "backbone"),
            {},
            "students\\[1\\]: distilled for split point 'neck'",
        ),
        (
            (detector, [students[0], build_detector_student("wrn-10-1", "backbone", len(plan.groups[1].filters), 1)], plan, "backbone"),
            {},
            "students\\[1\\]: built without feature_size",
        ),
        (valid, {"wire_dtype": "float16"}, "prices 16 values of 32 bits per filter, but the bundle sends 16 of 16"),
    ]
    for args, extra, message in cases:
        with pytest.raises(RocoinError, match=message):
            export_detection_bundle(*args, tmp_path / "bundle", **{**options, **extra})
        assert list(tmp_path.iterdir()) == []  # no bundle, no temporary folder
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    with pytest.raises(RocoinError, match="not empty"):
        export_detection_bundle(*valid, tmp_path / "notes", **options)
    with pytest.raises(RocoinError, match="not a rocoin bundle"):
        export_detection_bundle(*valid, tmp_path / "notes", **options, overwrite=True)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep"
    manifest = export_detection_bundle(*valid, tmp_path / "bundle", **options)
    again = export_detection_bundle(*valid, tmp_path / "bundle", **options, overwrite=True)
    assert again == manifest and json.loads((tmp_path / "bundle" / MANIFEST_NAME).read_text())["task"] == "detection"
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["bundle", "notes"]


class _Shifted(torch.nn.Module):
    """``module``'s outputs + 0.01: what a wrong export would give."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        out = self.module(x)
        return tuple(o + 0.01 for o in out) if isinstance(out, tuple) else out + 0.01


@pytest.mark.parametrize(("part", "what"), [("group-1.onnx", "maps"), ("head.onnx", "heatmap \\(head alone")], ids=["group", "head"])
def test_a_part_unlike_torch_is_named_and_nothing_is_written(tmp_path, monkeypatch, part, what):
    detector, students, plan = setup("neck")
    export = detection_bundle._export_onnx

    def wrong(module, example, path, *args):
        export(_Shifted(module) if Path(path).name == part else module, example, path, *args)

    monkeypatch.setattr(detection_bundle, "_export_onnx", wrong)
    with pytest.raises(RocoinError, match=f"{part}: onnxruntime's {what}.* differ from PyTorch's"):
        export_detection_bundle(detector, students, plan, "neck", tmp_path / "bundle", class_names=CLASSES, mean=MEAN, std=STD, dataset="d")
    assert list(tmp_path.iterdir()) == []
