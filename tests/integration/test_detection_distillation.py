"""Detection teacher and students (issue 15): a tiny detector learns generated shapes, its checkpoints
round-trip, resume and refuse other settings, distilled students detect with every group present and
degrade as groups go missing, and the planner gets activations and a catalog of feature-map students."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
import torch

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.plan import GroupPlan, Plan
from rocoin.contracts.progress import silent
from rocoin.data.detection import DetectionSplits, generate_scenes
from rocoin.data.detection_metrics import mean_average_precision
from rocoin.distillation import detection as det
from rocoin.distillation.detection import (
    DetectionDistillConfig,
    DetectionStudents,
    DetectionTeacher,
    DetectionTrainConfig,
    detection_catalog,
    distill_detection,
    drop_probabilities,
    evaluate_detection,
    load_detection_students,
    load_detection_teacher,
    predict,
    predict_from_features,
    split_activations,
    student_features,
    train_detection_teacher,
)
from rocoin.models.detector import build_detector, build_detector_student
from rocoin.planning import filter_graph, make_plan
from rocoin.profiles.generate import generate_fleet

ARCH = "det-wrn-10-1"  # 64 channels at the split point, 4 × 4 cells for 32 × 32 images
STUDENT = "wrn-10-1"
POINT = "backbone"
CLASSES = ["box", "ellipse", "triangle"]
TEACHER_CONFIG = DetectionTrainConfig(epochs=15, batch_size=16, lr=3e-3)
DISTILL_CONFIG = DetectionDistillConfig(epochs=10, batch_size=16, lr=3e-3)
FAILURE_PROBS = (0.04, 0.2)


def shapes(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28 × 28 bright shapes on black, class ``i % 3``: a filled rectangle, ellipse or triangle of random size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    images, labels = np.zeros((count, 28, 28), np.uint8), np.arange(count) % 3
    for i, label in enumerate(labels):
        value = int(rng.integers(170, 255))
        if label == 0:
            h, w = rng.integers(16, 27, 2)
            images[i, (28 - h) // 2 : (28 - h) // 2 + h, (28 - w) // 2 : (28 - w) // 2 + w] = value
        elif label == 1:
            a, b = rng.uniform(8, 13.5, 2)
            images[i][((xx - 13.5) / a) ** 2 + ((yy - 13.5) / b) ** 2 <= 1] = value
        else:
            images[i][(yy >= 2) & (np.abs(xx - 13.5) <= (yy - 1) / 2)] = value
    return images, labels


def make_splits(train: int = 96, val: int = 32, test: int = 32) -> DetectionSplits:
    objects, labels = shapes(60, seed=0)

    def scenes(n: int, seed: int):
        return generate_scenes(
            objects, labels, CLASSES, num_images=n, image_size=(32, 32), objects_per_image=(1, 2), object_size=(12, 22), seed=seed
        )

    return DetectionSplits(scenes(train, 1), scenes(val, 2), scenes(test, 3))


def hand_plan(catalog, failure_probs=FAILURE_PROBS, num_filters: int = 64) -> Plan:
    """Two groups: devices a1, a2 compute the even channels, b1 the odd ones."""
    return Plan(
        scheme="rocoin",
        epsilon=0.05,
        num_filters=num_filters,
        groups=[
            GroupPlan(
                devices=["a1", "a2"], filters=list(range(0, num_filters, 2)), student=STUDENT, failure_prob=failure_probs[0], latency_s=1.0
            ),
            GroupPlan(
                devices=["b1"], filters=list(range(1, num_filters, 2)), student=STUDENT, failure_prob=failure_probs[1], latency_s=1.0
            ),
        ],
        latency_s=1.0,
        p_complete=float(np.prod([1 - p for p in failure_probs])),
        catalog={STUDENT: catalog[STUDENT]},
    )


class Recorder:
    """A progress callback that remembers the tasks opened (and can stop training when one opens)."""

    def __init__(self, stop_at: str | None = None) -> None:
        self.labels: list[str] = []
        self.stop_at = stop_at

    @contextlib.contextmanager
    def __call__(self, label: str, total: int):
        self.labels.append(label)
        if self.stop_at is not None and self.stop_at in label:
            raise KeyboardInterrupt(label)
        yield lambda steps=1, **fields: None


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def same_predictions(a, b) -> bool:
    return len(a) == len(b) and all(all(np.array_equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


def close_predictions(a, b) -> bool:
    """Equal up to float rounding (a batch of another size may round differently)."""
    return len(a) == len(b) and all(all(np.allclose(x, y, atol=1e-4) for x, y in zip(p, q)) for p, q in zip(a, b))


def map50(dataset, predictions) -> float:
    return mean_average_precision(dataset, predictions)["map_50_pct"]


@pytest.fixture(scope="module")
def splits() -> DetectionSplits:
    return make_splits()


@pytest.fixture(scope="module")
def trained(splits, tmp_path_factory):
    path = tmp_path_factory.mktemp("detection") / "teacher.pt"
    started = time.perf_counter()
    teacher = train_detection_teacher(ARCH, splits, TEACHER_CONFIG, path=path, progress=silent)
    return teacher, path, time.perf_counter() - started


@pytest.fixture(scope="module")
def distilled(trained, splits, tmp_path_factory):
    teacher, _, _ = trained
    plan = hand_plan(detection_catalog([STUDENT], POINT, teacher))
    path = tmp_path_factory.mktemp("detection") / "students.pt"
    students = distill_detection(teacher, plan, POINT, splits, DISTILL_CONFIG, path=path, progress=silent)
    return students, path


def test_the_teacher_learns_to_detect(trained, splits):
    teacher, _, _ = trained
    torch.manual_seed(0)
    untrained = DetectionTeacher(
        build_detector(ARCH, 1, len(CLASSES)).eval(), ARCH, CLASSES, teacher.input_shape, teacher.mean, teacher.std, []
    )
    [row] = evaluate_detection(teacher, None, splits.test)
    [before] = evaluate_detection(untrained, None, splits.test)
    assert row["failed_devices"] == 0 and row["missing_groups_mean"] == 0
    assert row["map_50_pct"] > 20 and row["map_50_pct"] > before["map_50_pct"] + 15, (row, before)
    assert 0 < row["map_50_95_pct"] < row["map_50_pct"]
    assert [h["epoch"] for h in teacher.history] == list(range(1, TEACHER_CONFIG.epochs + 1))
    assert teacher.history[-1]["loss"] < teacher.history[0]["loss"]
    assert teacher.class_names == CLASSES and teacher.input_shape == (1, 32, 32)
    with pytest.raises(RocoinError, match="teacher alone"):
        evaluate_detection(teacher, None, splits.test, fail_devices=[1])


def test_the_teacher_checkpoint_round_trips_and_a_rerun_loads_it(trained, splits):
    teacher, path, seconds = trained
    loaded = load_detection_teacher(path)
    assert same_weights(loaded.model, teacher.model)
    assert (loaded.arch, loaded.class_names, loaded.input_shape, loaded.mean, loaded.std) == (
        teacher.arch,
        teacher.class_names,
        teacher.input_shape,
        teacher.mean,
        teacher.std,
    )
    assert same_predictions(predict(loaded, None, splits.test.images), predict(teacher, None, splits.test.images))
    recorder = Recorder()
    started = time.perf_counter()
    again = train_detection_teacher(ARCH, splits, TEACHER_CONFIG.model_copy(update={"device": "auto"}), path=path, progress=recorder)
    assert recorder.labels == []  # nothing trained
    assert time.perf_counter() - started < seconds / 2
    assert same_weights(again.model, teacher.model) and again.history == teacher.history


def test_an_interrupted_training_resumes_after_its_last_epoch(splits, tmp_path):
    config = DetectionTrainConfig(epochs=3, batch_size=16, max_train_images=32, seed=1)
    reference = train_detection_teacher(ARCH, splits, config, path=tmp_path / "whole.pt", progress=silent)
    path = tmp_path / "stopped.pt"
    with pytest.raises(KeyboardInterrupt):
        train_detection_teacher(ARCH, splits, config, path=path, progress=Recorder(stop_at="epoch 2/3"))
    with pytest.raises(RocoinError, match="stopped after epoch 1"):
        load_detection_teacher(path)
    recorder = Recorder()
    resumed = train_detection_teacher(ARCH, splits, config, path=path, progress=recorder)
    assert recorder.labels == ["detection teacher epoch 2/3", "detection teacher epoch 3/3"]
    assert same_weights(resumed.model, reference.model)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in reference.history]


def test_a_checkpoint_of_other_settings_is_refused(trained, distilled, splits):
    teacher, teacher_path, _ = trained
    students, students_path = distilled
    with pytest.raises(RocoinError, match="other settings.*lr"):
        train_detection_teacher(ARCH, splits, TEACHER_CONFIG.model_copy(update={"lr": 1e-3}), path=teacher_path, progress=silent)
    with pytest.raises(RocoinError, match="other settings.*arch"):
        train_detection_teacher("det-wrn-16-1", splits, TEACHER_CONFIG, path=teacher_path, progress=silent)
    with pytest.raises(RocoinError, match="other settings.*data"):
        train_detection_teacher(ARCH, make_splits(train=64), TEACHER_CONFIG, path=teacher_path, progress=silent)
    other_plan = hand_plan(students.plan.catalog, failure_probs=(0.1, 0.1))
    with pytest.raises(RocoinError, match="other settings.*plan"):
        distill_detection(teacher, other_plan, POINT, splits, DISTILL_CONFIG, path=students_path, progress=silent)
    with pytest.raises(RocoinError, match="other settings.*failure_aware"):
        aware = DISTILL_CONFIG.model_copy(update={"failure_aware": True})
        distill_detection(teacher, students.plan, POINT, splits, aware, path=students_path, progress=silent)
    with pytest.raises(RocoinError, match="rocoin-detection-students"):
        load_detection_students(teacher_path)
    with pytest.raises(RocoinError, match="num_filters = 32"):
        distill_detection(teacher, hand_plan(students.plan.catalog, num_filters=32), POINT, splits, DISTILL_CONFIG, progress=silent)
    with pytest.raises(ValueError, match="(?i)extra"):
        DetectionDistillConfig(epochs=1, dropout=0.5)
    with pytest.raises(ValueError):
        DetectionTrainConfig(epochs=0)


def test_distilled_students_detect_and_lose_accuracy_as_groups_go_missing(trained, distilled, splits):
    teacher, _, _ = trained
    students, _ = distilled
    test = splits.test
    present = map50(test, predict(teacher, students, test.images))
    none = map50(test, predict(teacher, students, test.images, missing=np.array([True, True])))
    torch.manual_seed(0)
    fresh = DetectionStudents([build_detector_student(STUDENT, POINT, 32, 1, (4, 4)).eval() for _ in range(2)], students.plan, POINT, [])
    untrained = map50(test, predict(teacher, fresh, test.images))
    assert present > 15 and present > none + 10 and present > untrained + 10, (present, none, untrained)
    rows = evaluate_detection(teacher, students, test, fail_devices=[0, 1, 2], trials=6, seed=0)
    assert [r["failed_devices"] for r in rows] == [0, 1, 2] and [r["trials"] for r in rows] == [1, 6, 6]
    assert rows[0]["map_50_pct"] == pytest.approx(present) and rows[0]["missing_groups_mean"] == 0
    assert rows[1]["missing_groups_mean"] > 0 and rows[2]["missing_groups_mean"] == 1  # any 2 of a1, a2, b1 empty a group
    for row in rows[1:]:
        assert row["map_50_pct"] <= rows[0]["map_50_pct"] + 2, rows
        assert row["map_50_std_pct"] >= 0
    # per-image missing groups: only the first image loses group 1
    mask = np.zeros((len(test), 2), dtype=bool)
    mask[0, 1] = True
    mixed = predict(teacher, students, test.images, missing=mask)
    alone = predict(teacher, students, test.images[:1], missing=np.array([False, True]))
    assert close_predictions(mixed[:1], alone) and close_predictions(mixed[1:], predict(teacher, students, test.images[1:]))
    with pytest.raises(RocoinError, match="missing: shape"):
        predict(teacher, students, test.images, missing=np.zeros(3, dtype=bool))
    with pytest.raises(RocoinError, match="need students"):
        predict(teacher, None, test.images, missing=np.zeros(2, dtype=bool))
    with pytest.raises(RocoinError, match="fail_devices"):
        evaluate_detection(teacher, students, test, fail_devices=[4])
    # float16 on the wire: the maps rounded as devices send them cost (almost) nothing
    half = evaluate_detection(teacher, students, test, wire_dtype="float16")[0]["map_50_pct"]
    assert abs(half - present) < 2, (half, present)
    with pytest.raises(RocoinError, match="wire_dtype = 'int8'"):
        evaluate_detection(teacher, students, test, wire_dtype="int8")
    # the students run once for several evaluations (Table V): the same numbers and detections
    features = student_features(teacher, students, test.images)
    assert evaluate_detection(teacher, students, test, fail_devices=[0, 1, 2], trials=6, seed=0, features=features) == rows
    assert evaluate_detection(teacher, students, test, wire_dtype="float16", features=features)[0]["map_50_pct"] == half
    assert close_predictions(predict_from_features(teacher, students, features), predict(teacher, students, test.images))
    with pytest.raises(RocoinError, match="features: shape"):
        evaluate_detection(teacher, students, test, features=features[1:])


def test_the_students_checkpoint_round_trips_and_the_teacher_stays_as_it_was(trained, distilled, splits):
    teacher, _, _ = trained
    students, path = distilled
    loaded = load_detection_students(path)
    assert loaded.plan == students.plan and loaded.point == POINT and loaded.history == students.history
    images = splits.test.images
    assert same_predictions(predict(teacher, loaded, images), predict(teacher, students, images))
    recorder = Recorder()
    again = distill_detection(teacher, students.plan, POINT, splits, DISTILL_CONFIG, path=path, progress=recorder)
    assert recorder.labels == [] and all(same_weights(a, b) for a, b in zip(again.modules, students.modules))
    assert all(p.requires_grad for p in teacher.model.parameters())  # frozen only while distilling
    assert students.history[-1]["loss_imitation"] < students.history[0]["loss_imitation"]


def test_failure_aware_training_drops_groups_with_the_plans_probabilities(trained, splits, monkeypatch, tmp_path):
    teacher, _, _ = trained
    plan = hand_plan(detection_catalog([STUDENT], POINT, teacher))
    aware = DetectionDistillConfig(epochs=1, batch_size=16, max_train_images=32, failure_aware=True)
    np.testing.assert_allclose(drop_probabilities(plan, aware), FAILURE_PROBS)
    np.testing.assert_array_equal(drop_probabilities(plan, aware.model_copy(update={"failure_aware": False})), [0, 0])
    seen = []
    original = det.sample_slot_mask

    def recording(batch, probabilities, generator=None):
        seen.append(probabilities.clone())
        return original(batch, probabilities, generator)

    monkeypatch.setattr(det, "sample_slot_mask", recording)
    students = distill_detection(teacher, plan, POINT, splits, aware, path=tmp_path / "aware.pt", progress=silent)
    assert len(seen) == 2 and all(torch.allclose(p, torch.tensor(FAILURE_PROBS)) for p in seen)
    assert len(students.modules) == 2 and students.history[0]["epoch"] == 1
    seen.clear()
    distill_detection(teacher, plan, POINT, splits, aware.model_copy(update={"failure_aware": False}), progress=silent)
    assert seen == []


def test_split_activations_and_the_catalog_feed_the_planner(trained, splits):
    teacher, _, _ = trained
    activations = split_activations(teacher, splits.val.images, POINT, batch_size=10)
    assert activations.shape == (len(splits.val), 64) and (activations >= 0).all() and activations.max() > 0
    catalog = detection_catalog([STUDENT, "wrn-16-1"], "neck", teacher)
    for name in (STUDENT, "wrn-16-1"):
        spec = catalog[name]
        assert spec.output_values_per_filter == 4 * 4 and spec.output_bits_per_value == 32 and spec.out_dim == 64
    assert catalog["wrn-16-1"].flops > catalog[STUDENT].flops
    real = build_detector_student(STUDENT, "neck", 32, 1, (4, 4))  # half the channels: fewer parameters than the bound
    assert sum(p.numel() for p in real.parameters()) < catalog[STUDENT].params
    fleet = generate_fleet(3, 2, 0.8, random_state=0)
    plan = make_plan(fleet, filter_graph(activations), detection_catalog([STUDENT], POINT, teacher), scheme="rocoin", seed=0)
    assert plan.num_filters == 64 and sorted(f for g in plan.groups for f in g.filters) == list(range(64))
