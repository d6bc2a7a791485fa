"""Table V's verdict on the paper's target: judged on the paired folds' mean and its 2 standard errors."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from rocoin.experiments.detection import PAPER_POINTS_LOST, _findings, _target_verdict  # noqa: E402


@pytest.mark.parametrize(
    ("lost", "margin", "verdict"),
    [(5.0, 1.5, "met"), (5.57, 1.55, "not separated"), (8.0, 0.5, "not met"), (7.0, 0.0, "met"), (6.0, 1.5, "not separated")],
)
def test_the_target_is_met_only_beyond_two_standard_errors(lost, margin, verdict):
    assert PAPER_POINTS_LOST == 7.0
    assert _target_verdict(lost, margin).startswith(verdict)


def _rows(teacher: float, bc: float) -> list[dict]:
    return [
        {"scheme": "Teacher", "devices": 1, "split": "", "map_50_pct": teacher},
        {"scheme": "RoCoIn BC", "devices": 2, "split": "backbone", "map_50_pct": bc, "map_50_fp16_wire_pct": bc},
    ]


def test_the_finding_reports_the_folds_mean_and_its_error():
    teacher = [60.0, 62.0, 64.0, 66.0]
    close = _findings(_rows(63.0, 58.0), {"teacher": teacher, "bc-2": [t - 5 for t in teacher]})  # 5 points, no spread
    assert "within 7 points: met, 5.00 ± 0.00 points lost on average over 4 paired folds" in close[1]
    noisy = _findings(_rows(63.0, 57.0), {"teacher": teacher, "bc-2": [55.0, 53.0, 58.0, 58.0]})  # 5, 9, 6, 8 points: 7.00 ± 1.83
    assert "within 7 points: not separated from it" in noisy[1]
    whole = _findings(_rows(63.0, 52.0))  # no folds: the whole test set, 11 points
    assert "within 7 points: not met, on the whole test set" in whole[1]
