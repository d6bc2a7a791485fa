"""rocoin.pipeline's settings and a step without training: one line per bad option, the demo's
options mapped onto the pipeline's, named and content-addressed outputs of the fleet step."""

from __future__ import annotations

import pytest

from rocoin.contracts.errors import RocoinError
from rocoin.pipeline import steps
from rocoin.pipeline.cache import StepCache
from rocoin.pipeline.config import DemoConfig, PipelineConfig, parse_options


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="extra"):
        PipelineConfig(teacher_epochz=3)
    with pytest.raises(RocoinError, match="--nonsense"):
        parse_options(DemoConfig, {"nonsense": 1})


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"distill_images": 0}, "--distill-images = 0"),
        ({"teacher_arch": "resnet-50"}, "--teacher-arch = 'resnet-50'"),
        ({"students": ("wrn-16-1", "wrn-16-1")}, "--students = 'wrn-16-1,wrn-16-1': expected distinct names"),
        ({"heterogeneity": 9}, "--heterogeneity = 9"),
    ],
)
def test_a_bad_demo_option_is_one_line_naming_it(options, needle):
    with pytest.raises(RocoinError) as caught:
        parse_options(DemoConfig, options)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_the_demo_maps_onto_the_pipeline_settings():
    demo = DemoConfig(distill_epochs=3, distill_images=500, max_train_images=1000, devices=7, seed=4)
    settings = demo.pipeline("digits", None, trials=5)
    assert (settings.student_epochs, settings.student_max_train_images, settings.max_train_images) == (3, 500, 1000)
    assert (settings.devices, settings.seed, settings.trials, settings.dataset) == (7, 4, 5, "digits")
    assert (settings.teacher_optimizer, settings.teacher_lr) == ("adam", 0.003)


def test_the_fleet_step_is_reused_and_follows_its_settings(tmp_path):
    config = PipelineConfig(devices=4)
    first = steps.fleet(steps.Pipeline(config, StepCache(tmp_path)))
    assert not first.reused and (tmp_path / "fleet.yaml").is_file()
    again = steps.fleet(steps.Pipeline(config, StepCache(tmp_path)))
    assert again.reused and again.value == first.value and again.key == first.key
    other = steps.fleet(steps.Pipeline(config.model_copy(update={"devices": 5}), StepCache(tmp_path)))
    assert not other.reused and len(other.value.devices) == 5


def test_content_addressed_outputs_carry_the_key(tmp_path):
    p = steps.Pipeline(PipelineConfig(devices=4), StepCache(tmp_path), addressed=True)
    done = steps.fleet(p)
    assert (tmp_path / f"fleet-{done.key}.yaml").is_file()
    assert not (tmp_path / "steps.json").exists()
