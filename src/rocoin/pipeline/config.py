"""The settings of the offline pipeline, each defined once.

:class:`PipelineConfig` is what the steps read (data, teacher, students, fleet, plan, evaluation).
The front ends keep their own option names but build their fields from the same annotated types
below (constraints and descriptions in one place) and turn into a :class:`PipelineConfig`:
``rocoin.experiments.setup.ExperimentSetup`` extends it, :class:`DemoConfig` (``rocoin demo``)
maps onto it with :meth:`DemoConfig.pipeline`, and ``bench/accuracy.py`` extends it. Units are
in the field names where a setting has one; every model refuses unknown fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from rocoin.contracts.errors import RocoinError


def _known_arch(name: str) -> str:
    from rocoin.models.registry import parse_model_name

    try:
        parse_model_name(name)
    except RocoinError as exc:
        raise ValueError(str(exc).split(": ", 1)[-1]) from None
    return name


def _known_archs(names: tuple[str, ...]) -> tuple[str, ...]:
    if not names:
        raise ValueError("expected at least one student architecture")
    for name in names:
        _known_arch(name)
    if len(set(names)) != len(names):
        raise ValueError("expected distinct names")
    return names


# --- one definition per setting ------------------------------------------------------------------

Arch = Annotated[str, AfterValidator(_known_arch), Field(description="Teacher architecture.")]
Archs = Annotated[
    tuple[str, ...], AfterValidator(_known_archs), Field(description="Comma-separated student architectures (measured catalog).")
]
Epochs = Annotated[int, Field(ge=1)]
BatchSize = Annotated[int, Field(ge=1)]
Images = Annotated[int | None, Field(gt=0)]
Devices = Annotated[int, Field(ge=2, description="Devices in the generated fleet.")]
Heterogeneity = Annotated[int, Field(ge=0, le=5, description="Table IV level 0-5.")]
SuccessProb = Annotated[float, Field(gt=0.0, le=1.0, description="Mean device success probability.")]
Epsilon = Annotated[float, Field(gt=0.0, lt=1.0, description="Reliability target ε.")]
Trials = Annotated[int, Field(ge=1, description="Random failure draws per number of failed devices.")]
Seed = Annotated[int, Field(description="Random seed.")]
DataDir = Annotated[str | None, Field(description="Where the dataset files are.")]


class Settings(BaseModel):
    """Frozen, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PipelineConfig(Settings):
    """What the offline steps read; the defaults are the experiments' ``default`` size."""

    dataset: str = "fashion-mnist"
    data_dir: DataDir = None
    teacher_arch: Arch = "wrn-16-2"
    teacher_epochs: Epochs = 4
    teacher_batch_size: BatchSize = 128
    teacher_optimizer: Literal["sgd", "adam"] = "sgd"
    teacher_lr: float = Field(default=0.1, gt=0.0, allow_inf_nan=False)
    students: Archs = ("wrn-10-1", "wrn-16-1")
    student_epochs: Epochs = 2
    student_batch_size: BatchSize = 128
    max_train_images: Images = Field(default=None, description="training images of the teacher (None: all)")
    student_max_train_images: Images = Field(default=20000, description="training images of the students (None: the teacher's)")
    max_test_images: Images = None
    devices: Devices = 10
    heterogeneity: Heterogeneity = 4
    success_prob: SuccessProb = 0.8
    rate_unit: Literal["kbps", "bps"] = Field(
        default="kbps", description="how to read Table IV's rates: kbps (kbit/s, SPEC.md's reading) or bps (bit/s, as printed)"
    )
    epsilon: Epsilon = 0.05
    trials: Trials = 30
    seed: Seed = 0


class DemoConfig(Settings):
    """Everything ``rocoin demo`` can be told (its command-line options are built from these
    fields); the defaults take about 5 minutes on a 2-core CPU."""

    task: Literal["classification", "detection"] = Field(
        default="classification",
        description="classification (the paper's Figs. 5-6 setting) or detection (scenes of garments, boxes through the same runtime;"
        " output defaults to results/demo-detection).",
    )
    output: Path = Field(default=Path("results/demo"), description="Folder for every step's output and the report.")
    fresh: bool = Field(default=False, description="Redo every step instead of reusing the finished ones.")
    dataset: Literal["fashion-mnist", "digits"] = Field(
        default="fashion-mnist", description="fashion-mnist (installed, downloaded, or digits as a last resort) or digits."
    )
    data_dir: str | None = Field(default=None, description="Where to look for (and download) Fashion-MNIST.")
    install: bool = Field(default=True, description="Allow apt-get install dataset-fashion-mnist (as root on Debian).")
    download: bool = Field(default=True, description="Allow downloading Fashion-MNIST.")
    teacher_arch: Arch = "wrn-10-2"
    teacher_epochs: Epochs = Field(default=2, description="Teacher training epochs.")
    max_train_images: Images = Field(default=30_000, description="Training images for the teacher.")
    students: Archs = ("wrn-10-1", "wrn-16-1")
    distill_epochs: Epochs = Field(default=1, description="Distillation epochs.")
    distill_images: Images = Field(default=20_000, description="Training images for the students.")
    devices: Devices = 10
    heterogeneity: Heterogeneity = 4
    success_prob: SuccessProb = 0.8
    epsilon: Epsilon = 0.05
    queries: int | None = Field(default=None, ge=2, description="Test images sent through the source (default: the whole test split).")
    concurrency: int = Field(default=8, ge=1, le=64, description="Queries in flight at once.")
    kill: int = Field(default=3, ge=1, description="Devices killed (SIGKILL) part-way; a whole group among them when the plan allows.")
    kill_after: float = Field(default=0.4, gt=0.0, lt=1.0, description="Fraction of the queries answered before the kill.")
    speedup: float = Field(
        default=100.0, gt=0.0, allow_inf_nan=False, description="Emulated devices' FLOP/s and rates × this, so a query takes milliseconds."
    )
    deadline_s: float | None = Field(
        default=None,
        gt=0.0,
        allow_inf_nan=False,
        description="The source's per-query deadline (default: 2 × the plan's T / speedup + 50 ms).",
    )
    seed: Seed = 0
    download_url: str | None = Field(default=None, description="Where to download Fashion-MNIST from (default: its official site).")

    @field_validator("output")
    @classmethod
    def _folder(cls, value: Path) -> Path:
        if value.exists() and not value.is_dir():
            raise ValueError("exists and is not a folder")
        return value

    def pipeline(self, dataset: str, data_dir: str | None, *, trials: int) -> PipelineConfig:
        """The offline steps' settings once the data set is chosen (``dataset``, ``data_dir``)."""
        return PipelineConfig(
            dataset=dataset,
            data_dir=data_dir,
            teacher_arch=self.teacher_arch,
            teacher_epochs=self.teacher_epochs,
            teacher_optimizer="adam",
            teacher_lr=0.003,
            students=self.students,
            student_epochs=self.distill_epochs,
            max_train_images=self.max_train_images,
            student_max_train_images=self.distill_images,
            devices=self.devices,
            heterogeneity=self.heterogeneity,
            success_prob=self.success_prob,
            epsilon=self.epsilon,
            trials=trials,
            seed=self.seed,
        )


def parse_options(model: type[Settings], options: dict[str, Any]) -> Any:
    """Validate command-line ``options``; a bad one raises one :class:`RocoinError` line naming ``--option``."""
    try:
        return model(**options)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        message = first.get("msg", "invalid value").removeprefix("Value error, ")
        name = "--" + "-".join(str(part) for part in first.get("loc", ()) if isinstance(part, str)).replace("_", "-")
        raise RocoinError(f"{name} = {_short(first.get('input'))}: {message}") from None


def _short(value: Any) -> str:
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    text = repr(value) if not isinstance(value, (int, float)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
