"""The demo's outage-model prediction: each query is weighed against the assignment in force when
it was sent, with the killed devices dead."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")

from rocoin.experiments.demo.load import QueryLog  # noqa: E402
from rocoin.experiments.demo.prediction import outage_prediction  # noqa: E402


def _setup():
    plan = SimpleNamespace(groups=[SimpleNamespace(devices=["a", "b"]), SimpleNamespace(devices=["c", "d"])])
    fleet = SimpleNamespace(devices=[SimpleNamespace(id=d, outage=o) for d, o in zip("abcd", (0.5, 0.5, 0.2, 0.1), strict=True)])
    n, kill = 8, 2
    log = QueryLog.empty(n, kill)
    log.sent_s = np.arange(n, dtype=float)  # one query a second
    log.origin_wall_s = 1000.0
    log.kill_s = 1.5
    # the kill takes a and b (group 0 lost); at 1004.5 s a re-plan moves d into group 0
    history = [{"at": 1004.5, "groups_after": [["d"], ["c"]], "trigger": "group 0 has no live replica"}]
    # pattern 0: nothing missing -> right; any missing group -> wrong
    correct = np.zeros((4, n), dtype=bool)
    correct[0] = True
    labels = np.zeros(n, dtype=np.int64)
    return plan, fleet, log, history, correct, labels


def test_queries_follow_the_assignment_in_force_when_sent():
    plan, fleet, log, history, correct, labels = _setup()
    log.missing = [[], [], [0], [0], [0], [], [1], []]  # healed from query 5 (sent 5.0 s, answered at once)
    log.prediction[[2, 3, 4, 6]] = 1  # a missing group: wrong
    result = outage_prediction(log, plan, fleet, ["a", "b"], history, correct, labels)
    before, after, healed = result["before"], result["after"], result["after_recovery"]
    # before the kill: P(group 0 missing) = 0.25, P(group 1 missing) = 0.02
    assert before["queries"] == 2
    assert before["predicted_complete_share"] == pytest.approx(0.75 * 0.98)
    assert before["predicted_accuracy"] == pytest.approx(0.75 * 0.98)
    # after the kill, queries 2-4 (sent before 4.5 s) have group 0 lost; 5-7 have d in group 0, c in group 1
    assert after["queries"] == 6
    healed_p = 0.9 * 0.8
    assert after["predicted_complete_share"] == pytest.approx((0 * 3 + healed_p * 3) / 6)
    np.testing.assert_allclose(after["missing_prob_mean"], [(3 * 1.0 + 3 * 0.1) / 6, (3 * 0.02 + 3 * 0.2) / 6])
    assert healed["queries"] == 3 and healed["predicted_accuracy"] == pytest.approx(healed_p)
    assert healed["accuracy"] == pytest.approx(2 / 3) and healed["complete_share"] == pytest.approx(2 / 3)
    assert healed["unhealed_accuracy"] == 0.0  # without the re-plan group 0 never answers
    # replayed: the students with each query's missing groups = what the runtime answered
    assert healed["replayed_accuracy"] == pytest.approx(healed["accuracy"])
    assert healed["accuracy_se"] == pytest.approx(np.sqrt(2 / 3 * 1 / 3 / 3))


def test_without_a_complete_answer_after_the_kill_nothing_counts_as_healed():
    plan, fleet, log, _, correct, labels = _setup()
    log.missing = [[], [], [0], [0], [0], [0], [0], [0]]
    result = outage_prediction(log, plan, fleet, ["a", "b"], [], correct, labels)
    assert result["after_recovery"] == {"queries": 0}
    assert result["after"]["predicted_complete_share"] == 0.0
