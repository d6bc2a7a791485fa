"""Distillation: each loss term pinned to golden values, the network of students, failure-aware
training, checkpoints, and evaluation with failed devices."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import write_fashion_mnist  # noqa: E402

from rocoin.contracts.errors import RocoinError  # noqa: E402
from rocoin.contracts.plan import GroupPlan, Plan  # noqa: E402
from rocoin.distillation.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from rocoin.distillation.evaluate import missing_slots, random_failures  # noqa: E402
from rocoin.distillation.losses import AttentionTransferTerm, CrossEntropyTerm, DistillationLoss, SoftTargetTerm, attention_map  # noqa: E402
from rocoin.distillation.students import StudentNetwork, sample_slot_mask  # noqa: E402
from rocoin.profiles.generate import default_catalog  # noqa: E402


def tiny_plan(groups: list[tuple[list[str], list[int], float]], student: str = "wrn-10-1", num_filters: int | None = None) -> Plan:
    catalog = default_catalog((1, 28, 28))
    spec = catalog["wrn-16-1"]
    return Plan(
        scheme="rocoin",
        epsilon=0.05,
        num_filters=num_filters or sum(len(f) for _, f, _ in groups),
        groups=[GroupPlan(devices=d, filters=f, student=student, failure_prob=q, latency_s=1.0) for d, f, q in groups],
        latency_s=1.0,
        p_complete=float(np.prod([1 - q for *_, q in groups])),
        catalog={student: spec},
    )


def test_cross_entropy_golden_value():
    value = CrossEntropyTerm()(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
    assert float(value) == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_target_golden_value(temperature):
    student, teacher = np.array([0.5, -0.5, 0.0]), np.array([2.0, 0.0, -1.0])
    p_s = np.exp(student / temperature) / np.exp(student / temperature).sum()
    p_t = np.exp(teacher / temperature) / np.exp(teacher / temperature).sum()
    expected = temperature**2 * float((p_t * np.log(p_t / p_s)).sum())
    value = SoftTargetTerm(temperature)(torch.tensor(student[None]), torch.tensor(teacher[None]))
    assert float(value) == pytest.approx(expected, rel=1e-5)
    assert float(SoftTargetTerm(temperature)(torch.tensor(teacher[None]), torch.tensor(teacher[None]))) == pytest.approx(0.0, abs=1e-7)


def test_attention_transfer_golden_value():
    student = torch.tensor([[[[1.0], [0.0]]]])  # B=1, C=1, H=2, W=1: attention (1, 0)
    teacher = torch.tensor([[[[0.0], [3.0]], [[0.0], [4.0]]]])  # C=2: mean of squares (0, 12.5) -> (0, 1)
    teacher_att = attention_map(teacher)
    np.testing.assert_allclose(teacher_att.numpy(), [[0.0, 1.0]])
    assert float(AttentionTransferTerm()(student, teacher_att, (2, 1))) == pytest.approx(1.0)  # ((1-0)² + (0-1)²) / 2
    # a student map of another size is resized to the teacher's before comparing
    big = torch.ones(1, 3, 4, 2)
    assert float(AttentionTransferTerm()(big, attention_map(torch.ones(1, 5, 2, 1)), (2, 1))) == pytest.approx(0.0, abs=1e-7)


def test_total_loss_is_the_weighted_sum_and_prints_its_formula():
    loss = DistillationLoss(alpha=0.9, temperature=4.0, beta=1000.0)
    logits, labels, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([1]), torch.tensor([[0.0, 2.0]])
    maps, att = [torch.tensor([[[[1.0], [0.0]]]])], [torch.tensor([[0.0, 1.0]])]
    total, terms = loss(logits, labels, teacher, maps, att, (2, 1))
    assert terms["total"] == pytest.approx(0.1 * terms["ce"] + 0.9 * terms["kd"] + 1000.0 * terms["at"], rel=1e-6)
    assert terms["at"] == pytest.approx(1.0)
    assert "0.9·T²·KL" in repr(loss) and "1000·Σ_k AT_k" in repr(loss)


def test_student_network_places_each_slot_on_its_filters():
    plan = tiny_plan([(["a"], [0, 3], 0.1), (["b", "c"], [1, 2, 4], 0.01)])
    network = StudentNetwork(plan, in_channels=1, num_classes=10).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        features = network.features(x)
        own = [s(x).mean(dim=(2, 3)) for s in network.students]
    assert features.shape == (2, 5)
    torch.testing.assert_close(features[:, [0, 3]], own[0])
    torch.testing.assert_close(features[:, [1, 2, 4]], own[1])
    missing = torch.tensor([[True, False], [False, False]])
    masked = network.features(x, missing).detach()
    assert (masked[0, [0, 3]] == 0).all() and torch.equal(masked[0, [1, 2, 4]], features[0, [1, 2, 4]])
    assert torch.equal(masked[1], features[1])
    assert network(x).shape == (2, 10)


def test_slot_dropout_drops_whole_slots_with_the_given_probabilities():
    probabilities = torch.tensor([0.0, 0.2, 0.5, 1.0])
    mask = sample_slot_mask(40_000, probabilities, torch.Generator().manual_seed(0))
    rates = mask.float().mean(dim=0).numpy()
    np.testing.assert_allclose(rates, [0.0, 0.2, 0.5, 1.0], atol=0.01)


def test_one_distillation_step_lowers_the_loss():
    torch.manual_seed(0)
    plan = tiny_plan([(["a"], [0, 1, 2, 3, 4, 5, 6, 7], 0.1), (["b"], list(range(8, 16)), 0.1)])
    network = StudentNetwork(plan, 1, 10)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    teacher_map = torch.rand(16, 16, 7, 7)
    teacher_logits = torch.randn(16, 10)
    atts = [attention_map(teacher_map[:, g.filters]) for g in plan.groups]
    loss_fn = DistillationLoss()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01)

    def loss_value():
        maps = network.maps(x)
        return loss_fn(network.fc(network.assemble(maps)), y, teacher_logits, maps, atts, (7, 7))[0]

    before = loss_value()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    assert loss_value().item() < before.item()


def test_checkpoints_hold_only_tensors_and_json(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, "students", {"plan": {"x": 1}}, {"w": torch.ones(2)})
    metadata, state, _ = load_checkpoint(path, "students")
    assert metadata == {"plan": {"x": 1}} and torch.equal(state["w"], torch.ones(2))
    with pytest.raises(RocoinError, match="format = 'rocoin-students': expected a rocoin-teacher"):
        load_checkpoint(path, "teacher")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "rocoin-students", "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(RocoinError, match="weights_only=True"):
        load_checkpoint(tmp_path / "evil.pt", "students")


def test_a_group_is_missing_only_when_all_its_replicas_fail():
    plan = tiny_plan([(["a", "b"], [0], 0.1), (["c"], [1], 0.1), (["d", "e", "f"], [2], 0.1)])
    failed = np.array(
        [
            [True, False, False, False, False, False],
            [True, True, False, False, False, False],
            [False, False, True, True, True, True],
            [True, True, True, True, True, True],
        ]
    )
    assert missing_slots(plan, failed).tolist() == [[False, False, False], [True, False, False], [False, True, True], [True, True, True]]
    draws = random_failures(6, 2, 1000, np.random.default_rng(0))
    assert (draws.sum(axis=1) == 2).all()
    np.testing.assert_allclose(draws.mean(axis=0), 2 / 6, atol=0.05)


def _class_seven_students(tmp_path):
    """A fixed network on 50 test images that answers class 7 when group 1 (devices b, c) answers
    and class 0 when it is missing, whatever group 0 does. Returns the test split and its info."""
    from rocoin.data import load_dataset
    from rocoin.distillation.teacher import info_to_json

    write_fashion_mnist(tmp_path, n_train=40, n_test=50)
    plan = tiny_plan([(["a"], [0, 1, 2, 3, 4], 0.1), (["b", "c"], [5, 6, 7, 8, 9], 0.1)], num_filters=10)
    network = StudentNetwork(plan, 1, 10)
    # The FC ignores the features and always answers class 7 (a filter of group 1) through the bias
    # only when group 1 is present: weight 0, bias favours 7, and feature 7 is forced positive.
    with torch.no_grad():
        for p in network.parameters():
            p.zero_()
        network.students[1].bridge.bias[2] = 1.0  # filter 7 = group 1, position 2
        network.fc.weight[7, 7] = 10.0
        network.fc.bias[0] = 1.0  # without group 1: class 0
    splits = load_dataset("fashion-mnist", tmp_path)
    metadata = {
        "plan": plan.model_dump(mode="json"),
        "dataset": info_to_json(splits.info),
        "data": {"dataset": "fashion-mnist", "data_dir": str(tmp_path)},
    }
    save_checkpoint(tmp_path / "students.pt", "students", metadata, network.state_dict())
    return splits


def test_evaluation_with_failures_is_hand_checkable(tmp_path):
    """A fixed network whose FC reads one filter per class: accuracy follows the missing groups exactly."""
    from rocoin.distillation.evaluate import evaluate_students

    labels = _class_seven_students(tmp_path).test.labels
    result = evaluate_students(tmp_path / "students.pt", fail_devices=[0, 1, 3], trials=200, seed=0)
    assert result["accuracy"] == pytest.approx(float(np.mean(labels == 7)))
    rows = {r["fail_devices"]: r for r in result["failures"]}
    assert rows[0]["accuracy_mean"] == pytest.approx(float(np.mean(labels == 7)))
    # J = 3 of 3 devices: every group missing -> always class 0
    assert rows[3]["accuracy_mean"] == pytest.approx(float(np.mean(labels == 0)))
    # J = 1: group 1 (two replicas) is never missing
    assert rows[1]["accuracy_mean"] == pytest.approx(float(np.mean(labels == 7)))
    with pytest.raises(RocoinError, match="fail-devices = 4: expected 0..3"):
        evaluate_students(tmp_path / "students.pt", fail_devices=[4])


def test_expected_accuracy_weighs_every_pattern_of_missing_groups(tmp_path):
    """The demo's prediction after healing: per image and pattern of missing groups, right or
    wrong; weighted by the outage model's probability of each pattern."""
    from rocoin.distillation.evaluate import correct_by_missing, expected_accuracy, pattern_probabilities

    splits = _class_seven_students(tmp_path)
    labels = splits.test.labels
    correct = correct_by_missing(tmp_path / "students.pt", splits.test, splits.info)
    assert correct.shape == (4, len(labels))  # patterns: none, group 0, group 1, both missing
    np.testing.assert_array_equal(correct[0], labels == 7)
    np.testing.assert_array_equal(correct[1], labels == 7)  # group 0 missing changes nothing
    np.testing.assert_array_equal(correct[2], labels == 0)
    np.testing.assert_array_equal(correct[3], labels == 0)
    probabilities = pattern_probabilities(np.array([0.3, 0.25]))
    np.testing.assert_allclose(probabilities, [0.7 * 0.75, 0.3 * 0.75, 0.7 * 0.25, 0.3 * 0.25])
    images = np.arange(len(labels))
    expected = expected_accuracy(correct, np.tile([0.3, 0.25], (len(labels), 1)), images)
    np.testing.assert_allclose(expected, 0.75 * (labels == 7) + 0.25 * (labels == 0))
    # a group certain to be missing (a lost group): only the patterns with it count
    lost = expected_accuracy(correct, np.tile([0.0, 1.0], (len(labels), 1)), images)
    np.testing.assert_allclose(lost, (labels == 0).astype(float))


def test_torch_threads_follow_the_environment(monkeypatch):
    import torch

    from rocoin.distillation.training import THREADS_ENV, use_all_cores

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(THREADS_ENV, "1")
        use_all_cores()
        assert torch.get_num_threads() == 1
        monkeypatch.setenv(THREADS_ENV, "zero")
        with pytest.raises(RocoinError, match=THREADS_ENV):
            use_all_cores()
    finally:
        torch.set_num_threads(before)
