"""Detection data: the synthetic scenes, the VisDrone and COCO formats written small by hand, and mAP."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rocoin.contracts.errors import RocoinError
from rocoin.data import detection as det
from rocoin.data.detection import (
    OBJECT_THRESHOLD,
    VISDRONE_CLASSES,
    DetectionDataset,
    box_iou,
    generate_scenes,
    load_detection_dataset,
    read_coco,
    read_visdrone_annotations,
    write_coco,
    write_visdrone_annotations,
)
from rocoin.data.detection_metrics import mean_average_precision

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
NAMES = tuple(f"class{c}" for c in range(5))


def garments(count: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` 28x28 "garments": bright filled rectangles with random margins (each one different)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    for k in range(count):
        top, left = rng.integers(0, 8, size=2)
        bottom, right = rng.integers(20, 28, size=2)
        images[k, top:bottom, left:right] = rng.integers(120, 256, size=(bottom - top, right - left))
        images[k, top, left] = 255 - k  # tells the objects apart
    return images, np.arange(count, dtype=np.int64) % len(NAMES)


def scenes(seed: int = 0, **kwargs) -> DetectionDataset:
    images, labels = garments()
    kwargs.setdefault("num_images", 40)
    return generate_scenes(images, labels, NAMES, seed=seed, **kwargs)


def dataset(boxes: list[list[list[float]]], labels: list[list[int]], size: int = 100, ignored=None) -> DetectionDataset:
    n = len(boxes)
    return DetectionDataset(
        np.zeros((n, 3, size, size), dtype=np.uint8),
        tuple(np.array(b, dtype=np.float32).reshape(-1, 4) for b in boxes),
        tuple(np.array(lab, dtype=np.int64) for lab in labels),
        NAMES,
        "hand",
        None if ignored is None else tuple(np.array(r, dtype=np.float32).reshape(-1, 4) for r in ignored),
    )


# --------------------------------------------------------------------------------------------
# The container


def test_dataset_accessors_and_subset():
    data = dataset([[[1, 2, 30, 40]], [], [[5, 5, 10, 10], [50, 50, 90, 99]]], [[0], [], [4, 2]])
    assert len(data) == 3 and data.num_classes == 5 and data.num_boxes == 3 and data.image_shape == (3, 100, 100)
    sub = data.subset([2, 0])
    assert len(sub) == 2 and sub.labels[0].tolist() == [4, 2] and sub.boxes[1].tolist() == [[1, 2, 30, 40]]
    assert len(data.subset(np.array([False, True, True]))) == 2 and len(data.subset(slice(1, None))) == 2
    assert data.ignored_regions(0).shape == (0, 4)
    with pytest.raises(RocoinError, match="out of range"):
        data.subset([3])


@pytest.mark.parametrize(
    "boxes, labels, message",
    [
        ([[1, 2, 101, 40]], [0], r"DetectionDataset.boxes\[0\]: box 0 = \[1.0, 2.0, 101.0, 40.0\] leaves the 100x100 image"),
        ([[10, 2, 5, 40]], [0], r"boxes\[0\]: box 0 .* is empty; expected x1 < x2"),
        ([[1, 2, np.nan, 40]], [0], r"boxes\[0\]: box 0 .* is not finite"),
        ([[1, 2, 3, 4]], [5], r"DetectionDataset.labels\[0\]: label 5 is out of range \[0, 5\)"),
    ],
)
def test_dataset_rejects_bad_boxes_and_labels(boxes, labels, message):
    with pytest.raises(RocoinError, match=message):
        dataset([boxes], [labels])


def test_dataset_rejects_bad_types_and_lengths():
    images = np.zeros((2, 1, 8, 8), dtype=np.uint8)
    box = np.array([[0, 0, 4, 4]], dtype=np.float32)
    lab = np.array([0], dtype=np.int64)
    with pytest.raises(RocoinError, match=r"images must be a uint8 array \(N, C, H, W\), got float32"):
        DetectionDataset(images.astype(np.float32), (box, box), (lab, lab), NAMES)
    with pytest.raises(RocoinError, match=r"boxes must be a tuple with one array per image \(2\), got 1 entries"):
        DetectionDataset(images, (box,), (lab, lab), NAMES)
    with pytest.raises(RocoinError, match=r"boxes\[1\] must be a float32 array \(n, 4\).*got float64"):
        DetectionDataset(images, (box, box.astype(np.float64)), (lab, lab), NAMES)
    with pytest.raises(RocoinError, match=r"labels\[0\] must be an int64 array of shape \(1,\)"):
        DetectionDataset(images, (box, box), (lab.astype(np.int32), lab), NAMES)
    with pytest.raises(RocoinError, match="class_names"):
        DetectionDataset(images, (box, box), (lab, lab), ())
    with pytest.raises(RocoinError, match=r"ignored\[0\]"):
        DetectionDataset(images, [box, box], [lab, lab], NAMES, "x", (box + 10, box))
    assert isinstance(DetectionDataset(images, [box, box], [lab, lab], NAMES).boxes, tuple)


# --------------------------------------------------------------------------------------------
# Synthetic scenes


def test_scenes_are_deterministic_by_seed():
    a, b, c = scenes(seed=3), scenes(seed=3), scenes(seed=4)
    assert a.images.shape == (40, 1, 64, 64) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images)
    assert all(np.array_equal(x, y) for x, y in zip(a.boxes, b.boxes))
    assert all(np.array_equal(x, y) for x, y in zip(a.labels, b.labels))
    assert not np.array_equal(a.images, c.images)


def test_scenes_hold_several_objects_inside_the_image_without_much_overlap():
    data = scenes(num_images=60, image_size=(48, 80), objects_per_image=(2, 4), object_size=(10, 24), max_iou=0.1)
    counts = np.array([b.shape[0] for b in data.boxes])
    assert counts.min() >= 1 and counts.max() <= 4 and counts.mean() > 2.0
    assert data.images.shape[2:] == (48, 80)
    for boxes in data.boxes:
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 48).all()
        iou = box_iou(boxes, boxes)
        np.fill_diagonal(iou, 0.0)
        assert iou.max() <= 0.1 + 1e-9
    assert {int(c) for labels in data.labels for c in labels} <= set(range(len(NAMES)))


def test_scene_boxes_hug_the_object_pixels():
    single = scenes(num_images=30, objects_per_image=(1, 1), object_size=(14, 40))
    for image, boxes in zip(single.images[:, 0], single.boxes):
        (x1, y1, x2, y2) = boxes[0].astype(int)
        bright = image > OBJECT_THRESHOLD
        assert bright[y1:y2, x1:x2].sum() == bright.sum()  # every object pixel is inside the box
        inside = bright[y1:y2, x1:x2]
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()  # and it touches each side
    several = scenes(num_images=30)
    for image, boxes in zip(several.images[:, 0], several.boxes):
        for x1, y1, x2, y2 in boxes.astype(int):
            inside = image[y1:y2, x1:x2] > OBJECT_THRESHOLD
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_resize_bilinear_keeps_constants_and_corners():
    assert np.allclose(det.resize_bilinear(np.full((28, 28), 7.0), 13, 41), 7.0)
    ramp = np.arange(4.0)[None, :].repeat(2, axis=0)
    assert np.allclose(det.resize_bilinear(ramp, 2, 8)[0], [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])


def test_generate_scenes_rejects_bad_settings():
    images, labels = garments()
    with pytest.raises(RocoinError, match=r"object_size must be .* <= 64, got \(14, 65\)"):
        generate_scenes(images, labels, NAMES, num_images=1, object_size=(14, 65), seed=0)
    with pytest.raises(RocoinError, match="objects_per_image"):
        generate_scenes(images, labels, NAMES, num_images=1, objects_per_image=(0, 2), seed=0)
    with pytest.raises(RocoinError, match=r"objects_labels hold 0..9, expected \[0, 5\)"):
        generate_scenes(images, np.arange(30) % 10, NAMES, num_images=1, seed=0)
    with pytest.raises(RocoinError, match="uint8"):
        generate_scenes(images.astype(np.float32), labels, NAMES, num_images=1, seed=0)


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">i", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes())


def test_fashion_scenes_from_idx_files_keep_the_splits_apart(tmp_path):
    train_images, _ = garments(40, seed=1)
    test_images, _ = garments(12, seed=2)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(40) % 10)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(12) % 10)
    splits = load_detection_dataset("Fashion_Scenes", data_dir=tmp_path, num_train=6, num_val=3, num_test=4, seed=5)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 4)
    assert splits.num_classes == 10 and splits.train.class_names[0] == "T-shirt/top" and splits.test.name == "fashion-scenes"
    again = load_detection_dataset("fashion-scenes", data_dir=tmp_path, num_train=6, num_val=3, num_test=4, seed=5)
    assert np.array_equal(splits.test.images, again.test.images)
    pools = det._fashion_object_pools(tmp_path, 5)
    train_rows = {im.tobytes() for im in pools["train"][0]}
    assert len(pools["train"][0]) + len(pools["val"][0]) == 40
    assert not train_rows & {im.tobytes() for im in pools["val"][0]}
    assert not train_rows & {im.tobytes() for im in pools["test"][0]}


@pytest.mark.skipif(not (REAL_FASHION / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST is not installed")
def test_fashion_scenes_from_the_real_fashion_mnist():
    splits = load_detection_dataset("fashion-scenes", data_dir=REAL_FASHION, num_train=8, num_val=4, num_test=8, seed=0)
    assert splits.train.images.shape == (8, 1, 64, 64) and splits.test.num_boxes >= 8


def test_unknown_and_missing_data_sets(tmp_path):
    with pytest.raises(RocoinError, match="unknown detection data set 'pascal'; expected one of fashion-scenes, visdrone, coco"):
        load_detection_dataset("pascal")
    with pytest.raises(RocoinError, match="visdrone: data not found; looked in"):
        load_detection_dataset("visdrone", data_dir=tmp_path)
    with pytest.raises(RocoinError, match="coco: data not found"):
        load_detection_dataset("coco", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# VisDrone-DET

VISDRONE_TEXT = (
    "684,8,273,116,0,0,0,0\n"  # ignored region
    "1,24,33,48,1,1,0,0\n"  # pedestrian
    "100,50,20,40,1,4,1,0,\n"  # car, trailing comma
    "\n"
    "120,60,10,10,0,4,0,2\n"  # a car with score 0: ignored
    " 50, 50, 30, 30, 1, 11, 0, 0\n"  # others: ignored
    "7,8,9,10,1,10,0,1\n"  # motor
)


def test_read_visdrone_annotations_maps_categories_and_ignores(tmp_path):
    path = tmp_path / "0000001_00000_d_0000001.txt"
    path.write_text(VISDRONE_TEXT)
    boxes, labels, ignore = read_visdrone_annotations(path)
    assert boxes.dtype == np.float32 and labels.dtype == np.int64 and ignore.dtype == bool
    assert boxes.tolist() == [[684, 8, 957, 124], [1, 24, 34, 72], [100, 50, 120, 90], [120, 60, 130, 70], [50, 50, 80, 80], [7, 8, 16, 18]]
    assert labels.tolist() == [-1, 0, 3, 3, -1, 9]
    assert ignore.tolist() == [True, False, False, True, True, False]
    assert VISDRONE_CLASSES[3] == "car" and VISDRONE_CLASSES[9] == "motor"
    (tmp_path / "empty.txt").write_text("")
    empty = read_visdrone_annotations(tmp_path / "empty.txt")
    assert empty[0].shape == (0, 4) and empty[1].shape == (0,) and empty[2].shape == (0,)


def test_visdrone_write_read_round_trip(tmp_path):
    boxes = np.array([[10, 20, 40, 60], [0, 0, 5, 7]], dtype=np.float32)
    path = write_visdrone_annotations(tmp_path / "a" / "x.txt", boxes, np.array([4, 0]), ignored_regions=np.array([[1, 1, 3, 3]]))
    assert path.read_text().splitlines() == ["10,20,30,40,1,5,0,0", "0,0,5,7,1,1,0,0", "1,1,2,2,0,0,0,0"]
    read_boxes, labels, ignore = read_visdrone_annotations(path)
    assert (
        np.array_equal(read_boxes[~ignore], boxes) and labels[~ignore].tolist() == [4, 0] and read_boxes[ignore].tolist() == [[1, 1, 3, 3]]
    )
    with pytest.raises(RocoinError, match="2 boxes but 1 labels"):
        write_visdrone_annotations(tmp_path / "y.txt", boxes, np.array([1]))
    with pytest.raises(RocoinError, match=r"labels hold 0..10, expected \[0, 10\)"):
        write_visdrone_annotations(tmp_path / "y.txt", boxes, np.array([10, 0]))


@pytest.mark.parametrize(
    "line, problem",
    [
        ("1,2,3", r"line 2 has 3 fields \('1,2,3'\); expected left,top,width,height"),
        ("1,2,x,4,1,1,0,0", "line 2: '1,2,x,4,1,1,0,0' has a field that is not an integer"),
        ("1,2,3.5,4,1,1,0,0", "line 2: .* has a field that is not an integer"),
        ("1,2,-3,4,1,1,0,0", r"line 2: negative box size -3x4"),
        ("1,2,3,4,1,12,0,0", r"line 2: category 12 is not a VisDrone-DET category \(0..11\)"),
        ("1,2,3,4,-1,1,0,0", "line 2: score -1 is negative"),
    ],
)
def test_read_visdrone_rejects_malformed_lines(tmp_path, line, problem):
    path = tmp_path / "bad.txt"
    path.write_text("1,2,3,4,1,1,0,0\n" + line + "\n")
    with pytest.raises(RocoinError, match=f"{path}: {problem}"):
        read_visdrone_annotations(path)


def _save_image(path: Path, width: int, height: int, seed: int) -> np.ndarray:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def test_load_visdrone_letterboxes_images_and_boxes(tmp_path):
    for split, folder in det.VISDRONE_SPLIT_DIRS.items():
        for k in range(3):
            stem = f"{split}_{k:07d}"
            _save_image(tmp_path / "VisDrone" / folder / "images" / f"{stem}.png", 200, 100, k)
            (tmp_path / "VisDrone" / folder / "annotations").mkdir(parents=True, exist_ok=True)
            (tmp_path / "VisDrone" / folder / "annotations" / f"{stem}.txt").write_text(
                "10,20,50,25,1,4,0,0,\n190,90,30,30,1,1,0,0\n0,0,100,50,0,0,0,0\n40,40,0,5,1,2,0,0\n"
            )
    splits = load_detection_dataset("VisDrone2019", data_dir=tmp_path, image_size=(64, 64), num_test=2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3, 3, 2)
    data = splits.train
    assert data.images.shape == (3, 3, 64, 64) and data.class_names == VISDRONE_CLASSES
    # 200x100 → 64x32, 16 rows of padding above and below; the second box is clipped, the zero-width one dropped.
    assert np.allclose(data.boxes[0], [[3.2, 16 + 6.4, 19.2, 16 + 14.4], [60.8, 16 + 28.8, 64, 48]])
    assert data.labels[0].tolist() == [3, 0]
    assert np.allclose(data.ignored_regions(0), [[0, 16, 32, 32]])
    assert (data.images[0][:, :16] == det.LETTERBOX_FILL).all() and (data.images[0][:, 48:] == det.LETTERBOX_FILL).all()


def test_load_visdrone_flat_folder_is_split_at_random(tmp_path):
    for k in range(6):
        _save_image(tmp_path / "images" / f"{k}.jpg", 32, 32, k)
        write_visdrone_annotations(tmp_path / "annotations" / f"{k}.txt", np.array([[1, 1, 9, 9]]), np.array([k % 10]))
    splits = load_detection_dataset("visdrone", data_dir=tmp_path, image_size=(32, 32), num_train=3, num_val=1, num_test=2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3, 1, 2)
    labels = sorted(int(lab[0]) for part in (splits.train, splits.val, splits.test) for lab in part.labels)
    assert labels == list(range(6))  # each image in exactly one split
    (tmp_path / "annotations" / "5.txt").unlink()
    with pytest.raises(RocoinError, match=r"5.jpg: no annotation file .*5.txt"):
        load_detection_dataset("visdrone", data_dir=tmp_path, image_size=(32, 32))


# --------------------------------------------------------------------------------------------
# COCO JSON


def test_coco_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    data = DetectionDataset(
        rng.integers(0, 256, size=(3, 3, 40, 50), dtype=np.uint8),
        (
            np.array([[1.5, 2.25, 30, 39.75]], dtype=np.float32),
            np.zeros((0, 4), dtype=np.float32),
            np.array([[0, 0, 50, 40], [3, 4, 5, 6]], dtype=np.float32),
        ),
        (np.array([2], dtype=np.int64), np.zeros(0, dtype=np.int64), np.array([0, 4], dtype=np.int64)),
        NAMES,
        "round",
        (np.zeros((0, 4), dtype=np.float32), np.array([[10, 10, 20, 20]], dtype=np.float32), np.zeros((0, 4), dtype=np.float32)),
    )
    json_path = write_coco(data, tmp_path / "annotations" / "instances_val.json", tmp_path / "val")
    raw = json.loads(json_path.read_text())
    assert [c["id"] for c in raw["categories"]] == [1, 2, 3, 4, 5] and raw["annotations"][0]["bbox"] == [1.5, 2.25, 28.5, 37.5]
    assert sum(a["iscrowd"] for a in raw["annotations"]) == 5  # the ignored region, once per category
    back = read_coco(json_path, tmp_path / "val", (40, 50))
    assert np.array_equal(back.images, data.images) and back.class_names == NAMES
    for i in range(3):
        assert np.array_equal(back.boxes[i], data.boxes[i]) and np.array_equal(back.labels[i], data.labels[i])
        assert np.array_equal(back.ignored_regions(i), data.ignored_regions(i))


def test_read_coco_maps_sorted_category_ids_and_checks_entries(tmp_path):
    _save_image(tmp_path / "imgs" / "a.png", 20, 10, 0)
    _save_image(tmp_path / "imgs" / "b.png", 20, 10, 1)
    spec = {
        "images": [{"id": 7, "file_name": "b.png", "width": 20, "height": 10}, {"id": 3, "file_name": "a.png", "width": 20, "height": 10}],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 90, "bbox": [1, 1, 4, 4], "iscrowd": 0},
            {"id": 2, "image_id": 3, "category_id": 1, "bbox": [0, 0, 20, 10], "iscrowd": 1},
            {"id": 3, "image_id": 7, "category_id": 18, "bbox": [2, 2, 2, 2]},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(spec))
    data = read_coco(path, tmp_path / "imgs", (10, 20))
    assert data.class_names == ("person", "dog", "toothbrush")
    assert [lab.tolist() for lab in data.labels] == [[2], [1]]  # image id 3 first
    assert data.boxes[0].tolist() == [[1, 1, 5, 5]] and data.ignored_regions(0).tolist() == [[0, 0, 20, 10]]
    spec["annotations"].append({"id": 4, "image_id": 3, "category_id": 5, "bbox": [1, 1, 2, 2]})
    path.write_text(json.dumps(spec))
    with pytest.raises(RocoinError, match="annotation 3 has category id 5, which is not in 'categories'"):
        read_coco(path, tmp_path / "imgs", (10, 20))
    spec["annotations"][-1] = {"id": 4, "image_id": 3, "category_id": 1, "bbox": [1, 1, -2, 2]}
    path.write_text(json.dumps(spec))
    with pytest.raises(RocoinError, match=r"annotation 3 has bbox \[1, 1, -2, 2\]"):
        read_coco(path, tmp_path / "imgs", (10, 20))
    spec["annotations"].pop()
    spec["images"][0]["width"] = 21
    path.write_text(json.dumps(spec))
    with pytest.raises(RocoinError, match="b.png: the image is 20x10, the JSON says 21x10"):
        read_coco(path, tmp_path / "imgs", (10, 20))
    path.write_text("{not json")
    with pytest.raises(RocoinError, match="cannot read the COCO annotations"):
        read_coco(path, tmp_path / "imgs", (10, 20))


def test_load_coco_layout(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 5), ("val", 2)):
        boxes = tuple(np.array([[1, 1, 8, 8]], dtype=np.float32) for _ in range(n))
        labels = tuple(np.array([k % 5], dtype=np.int64) for k in range(n))
        part = DetectionDataset(rng.integers(0, 256, size=(n, 3, 16, 16), dtype=np.uint8), boxes, labels, NAMES)
        write_coco(part, tmp_path / "annotations" / f"instances_{split}2017.json", tmp_path / f"{split}2017")
    splits = load_detection_dataset("coco", data_dir=tmp_path, image_size=(32, 32), num_train=3, num_val=1, seed=2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3, 1, 2)
    assert splits.test.boxes[0].tolist() == [[2, 2, 16, 16]] and splits.class_names == NAMES


# --------------------------------------------------------------------------------------------
# mAP


def perfect(data: DetectionDataset) -> list:
    return [(b, np.ones(len(b)), lab) for b, lab in zip(data.boxes, data.labels)]


def test_map_of_perfect_predictions_is_100_percent():
    data = scenes(num_images=20)
    result = mean_average_precision(data, perfect(data))
    assert result["map_50_pct"] == pytest.approx(100.0) and result["map_50_95_pct"] == pytest.approx(100.0)
    assert result["images"] == 20 and result["detections"] == result["ground_truth_boxes"] == data.num_boxes
    assert all(v == pytest.approx(100.0) for v in result["ap_50_per_class_pct"].values())


def test_map_of_shifted_and_mislabelled_predictions():
    data = scenes(num_images=20)
    half = [
        (b + np.stack([(b[:, 2] - b[:, 0]) / 2, 0 * b[:, 0], (b[:, 2] - b[:, 0]) / 2, 0 * b[:, 0]], 1), s, lab)
        for b, s, lab in perfect(data)
    ]
    slight = [(b + 0.5, s, lab) for b, s, lab in perfect(data)]
    wrong = [(b, s, (lab + 1) % len(NAMES)) for b, s, lab in perfect(data)]
    assert mean_average_precision(data, half)["map_50_pct"] < 1.0  # IoU 1/3 everywhere
    assert 0 < mean_average_precision(data, slight)["map_50_95_pct"] < 100.0
    assert mean_average_precision(data, slight)["map_50_pct"] == pytest.approx(100.0)
    assert mean_average_precision(data, wrong)["map_50_95_pct"] == 0.0


def test_map_hand_computed():
    # Two ground-truth boxes of class 0; a perfect hit (score 0.9) and a false positive (0.8).
    # Precision is 1 up to recall 0.5 and 0 beyond: 51 of COCO's 101 recall points → 51/101.
    data = dataset([[[10, 10, 30, 30], [50, 50, 80, 80]]], [[0, 0]])
    preds = [(np.array([[10, 10, 30, 30], [0, 60, 5, 65]]), np.array([0.9, 0.8]), np.array([0, 0]))]
    result = mean_average_precision(data, preds)
    assert result["map_50_pct"] == pytest.approx(100 * 51 / 101) and result["map_50_95_pct"] == pytest.approx(100 * 51 / 101)
    assert result["mar_pct"] == pytest.approx(50.0)
    # A false positive ranked above the only true positive: precision 1/2 at every recall → 50 %.
    data = dataset([[[10, 10, 30, 30]], []], [[1], []])
    preds = [(np.array([[10, 10, 30, 30]]), np.array([0.5]), np.array([1])), (np.array([[0, 0, 9, 9]]), np.array([0.7]), np.array([1]))]
    assert mean_average_precision(data, preds)["map_50_pct"] == pytest.approx(50.0)
    # Two classes, one found perfectly, one missed entirely: the mean over classes with ground truth.
    data = dataset([[[10, 10, 30, 30], [40, 40, 60, 60]]], [[0, 3]])
    result = mean_average_precision(data, [(np.array([[10, 10, 30, 30]]), np.array([1.0]), np.array([0]))])
    assert result["map_50_pct"] == pytest.approx(50.0) and result["ap_50_per_class_pct"] == pytest.approx({"class0": 100.0, "class3": 0.0})


def test_map_with_empty_images_ignored_regions_and_no_predictions():
    data = dataset([[[10, 10, 30, 30]], [], [[1, 1, 9, 9]]], [[0], [], [2]], ignored=[[[60, 60, 99, 99]], [], []])
    empty = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))
    nothing = mean_average_precision(data, [empty] * 3)
    assert nothing["map_50_pct"] == 0.0 and nothing["map_50_95_pct"] == 0.0 and nothing["detections"] == 0
    hit = (np.array([[10, 10, 30, 30]]), np.array([0.9]), np.array([0]))
    assert mean_average_precision(data, [hit, empty, empty])["map_50_pct"] == pytest.approx(50.0)
    # A detection inside the ignored region is neither a hit nor a false positive.
    in_ignored = (np.array([[10, 10, 30, 30], [65, 65, 90, 90]]), np.array([0.5, 0.9]), np.array([0, 0]))
    two_hits = [in_ignored, ([], [], []), (np.array([[1, 1, 9, 9]]), np.array([0.3]), np.array([2]))]
    assert mean_average_precision(data, two_hits)["map_50_pct"] == pytest.approx(100.0)


def test_map_rejects_bad_predictions():
    data = dataset([[[10, 10, 30, 30]], []], [[0], []])
    ok = (np.array([[10, 10, 30, 30]]), np.array([0.9]), np.array([0]))
    with pytest.raises(RocoinError, match=r"predictions: 1 entries for 2 images"):
        mean_average_precision(data, [ok])
    with pytest.raises(RocoinError, match=r"predictions\[1\] must be a \(boxes, scores, labels\) triple"):
        mean_average_precision(data, [ok, (np.zeros((0, 4)), np.zeros(0))])
    with pytest.raises(RocoinError, match=r"predictions\[0\] boxes must be a numeric array \(m, 4\)"):
        mean_average_precision(data, [(np.zeros((1, 5)), np.ones(1), np.zeros(1, dtype=int)), ok])
    with pytest.raises(RocoinError, match=r"predictions\[0\] scores must be a numeric array of shape \(1,\)"):
        mean_average_precision(data, [(ok[0], np.ones(2), ok[2]), ok])
    with pytest.raises(RocoinError, match=r"predictions\[0\] labels must be an integer array"):
        mean_average_precision(data, [(ok[0], ok[1], np.array([0.0])), ok])
    with pytest.raises(RocoinError, match=r"predictions\[1\]: label 5 is out of range \[0, 5\)"):
        mean_average_precision(data, [ok, (ok[0], ok[1], np.array([5]))])
    with pytest.raises(
        RocoinError, match=r"predictions\[0\] box 0 = \[10.0, 10.0, 5.0, 5.0\]: expected x1 <= x2 and y1 <= y2 \(xyxy, not xywh\)"
    ):
        mean_average_precision(data, [(np.array([[10, 10, 5, 5]]), ok[1], ok[2]), ok])
    with pytest.raises(RocoinError, match="must be finite"):
        mean_average_precision(data, [(ok[0], np.array([np.nan]), ok[2]), ok])
    with pytest.raises(RocoinError, match="holds no boxes"):
        mean_average_precision(dataset([[]], [[]]), [ok])


# --------------------------------------------------------------------------------------------
# Imports


def test_detection_modules_import_without_torch_pillow_or_pycocotools():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import rocoin.data, rocoin.data.detection, rocoin.data.detection_metrics\n"
        "loaded = [m for m in ('torch', 'PIL', 'pycocotools') if sys.modules.get(m) is not None]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
