"""Detector models, box decoding/NMS/packing and the detection losses (fast: tiny models, few steps)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from rocoin.contracts.errors import RocoinError
from rocoin.distillation.detection_losses import (
    DetectionLoss,
    FeatureImitationLoss,
    encode_targets,
    gaussian_radius,
    object_weights,
)
from rocoin.models.boxes import (
    assemble_partitions,
    batched_nms,
    box_iou,
    decode,
    nms,
    pack_detections,
    unpack_detections,
)
from rocoin.models.detector import (
    OUTPUT_STRIDE,
    SPLIT_POINTS,
    DetectorRest,
    assemble_features,
    build_detector,
    build_detector_student,
    count_flops_params,
)

STRIDE = OUTPUT_STRIDE


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = build_detector("det-wrn-10-2", in_channels=1, num_classes=10)
    # Non-trivial BN statistics so that eval mode is not the identity.
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 1, 64, 64))
    return model.eval()


def random_scene(rng: np.random.Generator, count: int, size: int = 64, min_side: int = 14, max_side: int = 32):
    """Up to ``count`` boxes whose centre cells are at least 2 cells apart (no shared peak neighbourhood)."""
    boxes, cells = [], []
    for _ in range(200):
        if len(boxes) == count:
            break
        bw, bh = rng.integers(min_side, max_side + 1, size=2)
        x1, y1 = rng.integers(0, size - bw + 1), rng.integers(0, size - bh + 1)
        cell = (int((y1 + bh / 2) // STRIDE), int((x1 + bw / 2) // STRIDE))
        if all(max(abs(cell[0] - c[0]), abs(cell[1] - c[1])) >= 2 for c in cells):
            cells.append(cell)
            boxes.append([x1, y1, x1 + bw, y1 + bh])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


# ----------------------------------------------------------------------------------------------
# Models


def test_teacher_and_students_shapes_at_both_points(teacher) -> None:
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        out = teacher(x)
        assert out["heatmap"].shape == (2, 10, 8, 8)
        assert out["size"].shape == (2, 2, 8, 8) and out["offset"].shape == (2, 2, 8, 8)
        for point in SPLIT_POINTS:
            assert teacher.features(x, point).shape == (2, 128, 8, 8)
            student = build_detector_student("wrn-10-1", point, 40, in_channels=1, feature_size=(8, 8)).eval()
            assert student(x).shape == (2, 40, 8, 8)
    # Any channel count, size divisible by the stride, and number of classes.
    other = build_detector("det-wrn-10-1", in_channels=3, num_classes=4).eval()
    with torch.no_grad():
        out = other(torch.randn(1, 3, 48, 80))
    assert out["heatmap"].shape == (1, 4, 6, 10) and other.feature_size((48, 80)) == (6, 10)
    student = build_detector_student("wrn-16-1", "neck", 5, in_channels=3).eval()
    assert student(torch.randn(1, 3, 48, 80)).shape == (1, 5, 6, 10)


def test_bad_names_are_refused() -> None:
    for name in ("det-wrn-12-2", "wrn-16-2", "det-wrn-16-0"):
        with pytest.raises(RocoinError):
            build_detector(name)
    with pytest.raises(RocoinError):
        build_detector_student("mobilenetv2-0.5", "backbone", 8)
    with pytest.raises(RocoinError):
        build_detector_student("wrn-10-1", "head", 8)


def test_rest_of_features_is_forward(teacher) -> None:
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        full = teacher(x)
        for point in SPLIT_POINTS:
            split = teacher.rest(teacher.features(x, point), point)
            for key in full:
                torch.testing.assert_close(split[key], full[key], rtol=1e-5, atol=1e-5)
            heatmap, box = DetectorRest(teacher, point)(teacher.front(point)(x))
            torch.testing.assert_close(heatmap, full["heatmap"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(box, torch.cat([full["size"], full["offset"]], 1), rtol=1e-5, atol=1e-5)


def test_zero_filling_a_partition_acts_only_through_the_rest(teacher) -> None:
    x = torch.randn(2, 1, 64, 64)
    partitions = [list(range(0, 128, 2)), list(range(1, 128, 4)), list(range(3, 128, 4))]
    with torch.no_grad():
        for point in SPLIT_POINTS:
            features = teacher.features(x, point)
            maps = [features[:, p] for p in partitions]
            assert torch.equal(assemble_features(maps, partitions, 128), features)
            missing = torch.tensor([[False, True, False], [False, False, False]])
            assembled = assemble_features(maps, partitions, 128, missing)
            expected = features.clone()
            expected[0, partitions[1]] = 0
            assert torch.equal(assembled, expected)  # only the missing group's channels of that sample are zero
            np.testing.assert_array_equal(
                assemble_partitions([m[:1].numpy() for m in maps[:1]] + [None] + [maps[2][:1].numpy()], partitions, 128),
                expected[:1].numpy(),
            )
            full, filled = teacher.rest(features, point), teacher.rest(assembled, point)
            for key in full:
                torch.testing.assert_close(filled[key][1], full[key][1])  # the complete sample is unchanged
                assert not torch.allclose(filled[key][0], full[key][0])  # the zero-filled one changes through the rest


def test_flops_and_params_of_the_parts_add_up(teacher) -> None:
    flops, params = count_flops_params(teacher, (1, 64, 64))
    assert params == sum(p.numel() for p in teacher.parameters()) and flops > 0
    for point in SPLIT_POINTS:
        front_flops, front_params = count_flops_params(teacher.front(point), (1, 64, 64))
        rest_flops, rest_params = count_flops_params(teacher.rest_module(point), (128, 8, 8))
        assert front_params + rest_params == params
        assert front_flops + rest_flops == flops
        student_flops, _ = count_flops_params(build_detector_student("wrn-10-1", point, 32), (1, 64, 64))
        assert student_flops < front_flops


# ----------------------------------------------------------------------------------------------
# Boxes


def test_box_iou_and_nms_by_hand() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10], [0, 0, 0, 5]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.95], dtype=np.float32)
    iou = box_iou(boxes, boxes)
    assert iou[0, 1] == pytest.approx(81 / 119) and iou[0, 2] == 0 and iou[0, 3] == 1 and iou[4, 4] == 0
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [4, 0, 2])  # box 1 (0.68) and the duplicate 3 go
    np.testing.assert_array_equal(nms(boxes, scores, 0.7), [4, 0, 1, 2])
    labels = np.array([0, 1, 0, 0, 2])
    np.testing.assert_array_equal(batched_nms(boxes, scores, labels, 0.5), [4, 0, 1, 2])  # 1 is another class
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).shape == (0,)


def _brute_force_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
        return iw * ih / union if union > 0 else 0.0

    kept: list[int] = []
    for index in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        if all(iou(boxes[index], boxes[k]) <= threshold for k in kept):
            kept.append(index)
    return kept


def test_nms_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    for trial in range(30):
        n = int(rng.integers(0, 40))
        xy = rng.uniform(0, 50, size=(n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(1, 20, size=(n, 2))], axis=1)
        scores = rng.uniform(size=n).round(2)  # ties happen
        labels = rng.integers(0, 3, size=n)
        threshold = float(rng.choice([0.3, 0.5, 0.7]))
        assert nms(boxes, scores, threshold).tolist() == _brute_force_nms(boxes, scores, threshold), trial
        expected = sorted(
            (i for c in range(3) for i in np.nonzero(labels == c)[0][_brute_force_nms(boxes[labels == c], scores[labels == c], threshold)]),
            key=lambda i: (-scores[i], i),
        )
        got = batched_nms(boxes, scores, labels, threshold)
        assert sorted(got.tolist()) == sorted(expected) and list(scores[got]) == list(scores[expected])


def test_pack_and_unpack() -> None:
    dets = [
        (np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32), np.array([0.9, 0.5], np.float32), np.array([3, 1])),
        (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)),
        (np.tile(np.array([[0, 0, 1, 1]], np.float32), (5, 1)), np.linspace(1, 0.5, 5, dtype=np.float32), np.arange(5)),
    ]
    boxes, scores, labels, count = pack_detections(dets, 3)
    assert boxes.shape == (3, 3, 4) and boxes.dtype == np.float32 and labels.dtype == np.int32 and count.dtype == np.int32
    np.testing.assert_array_equal(count, [2, 0, 3])
    assert labels[0, 2] == -1 and scores[0, 2] == 0 and not boxes[1].any() and (labels[1] == -1).all()
    back = unpack_detections(boxes, scores, labels, count)
    np.testing.assert_array_equal(back[0][0], dets[0][0])
    np.testing.assert_array_equal(back[0][2], dets[0][2])
    assert len(back[1][1]) == 0 and len(back[2][1]) == 3


def test_encode_then_decode_recovers_the_boxes() -> None:
    rng = np.random.default_rng(0)
    boxes_list = [random_scene(rng, int(rng.integers(1, 5))) for _ in range(16)]
    labels_list = [rng.integers(0, 10, size=len(b)) for b in boxes_list]
    targets = encode_targets(boxes_list, labels_list, 10, (8, 8), STRIDE)
    assert targets["heatmap"].shape == (16, 10, 8, 8) and targets["mask"].sum() == sum(len(b) for b in boxes_list)
    probability = targets["heatmap"].numpy().clip(1e-6, 1 - 1e-6)
    logits = np.log(probability / (1 - probability))
    regression = torch.cat([targets["size"], targets["offset"]], 1).numpy()
    detections = decode(logits, regression, stride=STRIDE, score_threshold=0.5, max_detections=10)
    for (boxes, _, labels), true_boxes, true_labels in zip(detections, boxes_list, labels_list):
        assert len(boxes) == len(true_boxes)
        iou = box_iou(true_boxes, boxes)
        for t in range(len(true_boxes)):
            best = int(iou[t].argmax())
            assert iou[t, best] > 0.9 and labels[best] == true_labels[t]
    # The reference formula's third case by hand: (-2·0.7·4 + sqrt((2·0.7·4)² + 4·4·0.7·0.3·4)) / 2.
    assert gaussian_radius(2.0, 2.0) == pytest.approx((-5.6 + np.sqrt(5.6**2 + 13.44)) / 2)


def test_object_weights_and_feature_imitation() -> None:
    weights = object_weights([np.array([[8, 8, 24, 16]])], (4, 4), STRIDE, background_weight=0.0)
    expected = np.zeros((1, 1, 4, 4), np.float32)
    expected[0, 0, 1, 1:3] = 1
    np.testing.assert_array_equal(weights.numpy(), expected)
    teacher = torch.randn(2, 6, 4, 4)
    partitions = [[0, 2, 4], [5, 1]]
    loss = FeatureImitationLoss()
    assert float(loss([teacher[:, p] for p in partitions], teacher, partitions)) == 0.0
    student = [torch.zeros(2, 3, 4, 4), teacher[:, [5, 1]]]
    assert float(loss(student, teacher, partitions)) == pytest.approx(float(teacher[:, [0, 2, 4]].pow(2).mean()), rel=1e-5)
    weighted = float(loss(student, teacher, partitions, weights.expand(2, 1, 4, 4)))
    assert weighted == pytest.approx(float(teacher[:, [0, 2, 4], 1, 1:3].pow(2).mean()), rel=1e-5)


def test_boxes_imports_without_torch() -> None:
    code = "import sys, rocoin.models.boxes; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# Training and export


def _scenes(count: int, seed: int):
    """Images with class-coded rectangles (intensity and stripes by class) on a noisy background."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.0, 0.1, size=(count, 1, 64, 64)).astype(np.float32)
    boxes_list, labels_list = [], []
    for n in range(count):
        boxes = random_scene(rng, int(rng.integers(1, 4)))
        labels = rng.integers(0, 3, size=len(boxes))
        for (x1, y1, x2, y2), label in zip(boxes.astype(int), labels):
            patch = np.full((y2 - y1, x2 - x1), 1.0 + label, np.float32)
            patch[:: 2 + int(label)] *= 0.3
            images[n, 0, y1:y2, x1:x2] = patch
        boxes_list.append(boxes)
        labels_list.append(labels)
    return torch.from_numpy(images), boxes_list, labels_list


def test_detection_loss_overfits_eight_images() -> None:
    torch.manual_seed(0)
    images, boxes_list, labels_list = _scenes(8, seed=3)
    model = build_detector("det-wrn-10-1", in_channels=1, num_classes=3)
    targets = encode_targets(boxes_list, labels_list, 3, model.feature_size((64, 64)), model.stride)
    criterion = DetectionLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(100):
        loss, terms = criterion(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(terms["total"])
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    model.eval()
    with torch.no_grad():
        out = model(images)
    detections = decode(
        out["heatmap"].numpy(), torch.cat([out["size"], out["offset"]], 1).numpy(), stride=model.stride, score_threshold=0.3, nms_iou=0.6
    )
    matched = total = 0
    for (boxes, _, labels), true_boxes, true_labels in zip(detections, boxes_list, labels_list):
        iou = box_iou(true_boxes, boxes) * (true_labels[:, None] == labels[None, :])
        matched += int((iou.max(axis=1, initial=0) > 0.5).sum()) if len(boxes) else 0
        total += len(true_boxes)
    assert matched >= 0.8 * total, (matched, total)


def _onnx_parity(module: torch.nn.Module, example: torch.Tensor, output_names: list[str], tmp_path) -> float:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (example[:2],),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in ["input", *output_names]},
            opset_version=17,
            do_constant_folding=True,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": example.numpy()})
    with torch.no_grad():
        expected = module(example)
    expected = expected if isinstance(expected, tuple) else (expected,)
    return max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected, strict=True))


def test_onnx_parity_of_a_student_and_the_rest(teacher, tmp_path) -> None:
    torch.manual_seed(1)
    student = build_detector_student("wrn-10-1", "neck", 43, in_channels=1, feature_size=(8, 8))
    student.train()
    with torch.no_grad():
        student(torch.randn(8, 1, 64, 64))  # non-trivial BN statistics
    assert _onnx_parity(student.eval(), torch.randn(3, 1, 64, 64), ["features"], tmp_path) < 1e-4
    features = teacher.features(torch.randn(3, 1, 64, 64), "backbone").detach()
    assert _onnx_parity(teacher.rest_module("backbone"), features, ["heatmap", "box"], tmp_path) < 1e-4
