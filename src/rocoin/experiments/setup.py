"""The settings every paper experiment shares, and the sizes they run at.

``quick`` is what the test suite runs (seconds, tiny data); ``default`` is sized for a 2-core CPU
(`rocoin experiment all` within an hour, Table III and Fig. 5's failure-aware series aside: a
3-epoch teacher, students distilled from the first 16,000 training images); ``paper`` is a GPU budget (a WRN-16-4 teacher like the paper's CIFAR-10 one,
students from three architectures on every training image; see ``bench/paper.py``). Any field
can be overridden on the command line.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import validate
from rocoin.pipeline.config import PipelineConfig

Size = Literal["quick", "default", "paper"]
SIZES: tuple[str, ...] = ("quick", "default", "paper")


class ExperimentSetup(PipelineConfig):
    """What an experiment trains, plans and simulates: the pipeline's settings (teacher, students,
    fleet, ε, evaluation draws) and the experiments' own sweeps. Units are in the field names."""

    size: Size = "default"
    epsilons: tuple[float, ...] = (0.01, 0.05, 0.2)
    success_probs: tuple[float, ...] = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    fleets: int = Field(default=20, ge=1, description="generated fleets averaged per point of the planner-only figures")
    scale_devices: tuple[int, ...] = (10, 100, 1000, 10000)
    sim_queries: int = Field(default=20000, ge=1)
    latency_trials: int = Field(
        default=100, ge=1, description="simulated queries per fleet for the mean latency of Figs. 3(a) and 7 (the paper's 100 trials)"
    )
    #: [decision, measured: docs/experiments/rate-unit] The paper's simulations read Table IV's rates
    #: as printed (bit/s): only then does Fig. 3(a)'s latency fall with the success probability;
    #: with kbit/s sending results costs milliseconds and planned T does not move at all.
    rate_unit: Literal["kbps", "bps"] = Field(default="bps", description="how to read Table IV's rates (see RATE_UNITS)")
    detection_data: Literal["fashion-scenes", "visdrone", "coco"] = Field(
        default="fashion-scenes",
        description="Table V's data: scenes generated from the (grayscale) dataset, or VisDrone-DET / COCO files under data_dir",
    )

    @field_validator("epsilons")
    @classmethod
    def _epsilons(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(not 0.0 < e < 1.0 for e in value):
            raise ValueError("expected probabilities in (0, 1)")
        return tuple(sorted(value))

    @property
    def fail_counts(self) -> list[int]:
        """Numbers of failed devices evaluated: 0 .. half of the fleet."""
        return list(range(0, self.devices // 2 + 1))


PRESETS: dict[str, dict] = {
    "quick": {
        "teacher_arch": "wrn-10-1",
        "teacher_epochs": 1,
        "student_epochs": 1,
        "students": ("wrn-10-1",),
        "max_train_images": 256,
        "student_max_train_images": None,
        "max_test_images": 200,
        "devices": 6,
        "epsilons": (0.05, 0.2),
        "success_probs": (0.7, 0.9),
        "trials": 3,
        "fleets": 2,
        "scale_devices": (10, 100),
        "sim_queries": 500,
        "latency_trials": 20,
    },
    # Sized so that `rocoin experiment all` fits its 60-minute budget on 2 cores (the README's timings).
    "default": {"teacher_epochs": 3, "student_max_train_images": 16_000},
    "paper": {
        "teacher_arch": "wrn-16-4",
        "teacher_epochs": 10,
        "student_epochs": 6,
        "student_batch_size": 256,
        "students": ("wrn-10-1", "wrn-16-1", "wrn-16-2"),
        "student_max_train_images": None,
    },
}


def make_setup(size: str = "default", **overrides) -> ExperimentSetup:
    """The preset ``size`` with ``overrides`` (``None`` values are ignored) applied."""
    if size not in PRESETS:
        raise RocoinError(f"size = {size!r}: expected one of {', '.join(SIZES)}")
    values = {"size": size, **PRESETS[size], **{k: v for k, v in overrides.items() if v is not None}}
    return validate(ExperimentSetup, values, "experiment settings")
