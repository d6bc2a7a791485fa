"""The PyTorch model zoo: layer structure, shapes, and the measured student catalog."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from rocoin.contracts.errors import RocoinError  # noqa: E402
from rocoin.models.analytic import DEFAULT_STUDENTS, arch_stats  # noqa: E402
from rocoin.models.measure import count_flops, measure_catalog, measure_model, measure_module, peak_activation_bytes  # noqa: E402
from rocoin.models.registry import create_model, model_names, parse_model_name  # noqa: E402

torch.set_num_threads(2)

CIFAR, FMNIST, TINY = (3, 32, 32), (1, 28, 28), (1, 8, 8)
STUDENTS_AND_TEACHER = (*DEFAULT_STUDENTS, "wrn-16-4")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", [CIFAR, FMNIST], ids=["3x32x32", "1x28x28"])
@pytest.mark.parametrize("name", STUDENTS_AND_TEACHER)
def test_parameter_counts_equal_the_shape_arithmetic(name, shape):
    model = create_model(name, in_channels=shape[0], num_classes=10)
    stats = arch_stats(name, shape, 10)
    assert n_params(model) == stats.params
    assert model.num_features == stats.out_dim
    assert model.fc.in_features == stats.out_dim and model.fc.out_features == 10


@pytest.mark.parametrize(
    "name, classes, params_m",
    [("wrn-16-4", 10, 2.75), ("wrn-22-1", 10, 0.27), ("wrn-16-1", 10, 0.18), ("wrn-16-3", 100, 1.56), ("wrn-16-2", 10, 0.69)],
)
def test_parameter_counts_match_the_paper(name, classes, params_m):
    # The paper rounds to two decimals (WRN-22-1 is 0.272 M, WRN-16-2 0.692 M, WRN-16-3 1.567 M).
    assert n_params(create_model(name, num_classes=classes)) / 1e6 == pytest.approx(params_m, abs=0.011)


@pytest.mark.parametrize(
    "shape, wrn_map, mobilenet_map", [(CIFAR, 8, 4), (FMNIST, 7, 4), (TINY, 2, 1)], ids=["3x32x32", "1x28x28", "1x8x8"]
)
@pytest.mark.parametrize("name", [*DEFAULT_STUDENTS, "wrn-10-1"])
def test_feature_map_and_logit_shapes(name, shape, wrn_map, mobilenet_map):
    model = create_model(name, in_channels=shape[0], num_classes=7).eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features = model.forward_features(x)
        logits = model(x)
        side = wrn_map if name.startswith("wrn") else mobilenet_map
        assert tuple(features.shape) == (2, model.num_features, side, side)
        assert tuple(logits.shape) == (2, 7)
        torch.testing.assert_close(logits, model.forward_head(features), rtol=0, atol=0)
    # The map is taken after the final activation: ReLU (WRN) or ReLU6 (MobileNetV2).
    assert features.min() >= 0
    if name.startswith("mobilenetv2"):
        assert features.max() <= 6


@pytest.mark.parametrize("name", ["wrn-10-1", "mobilenetv2-0.25"])
def test_models_train(name):
    model = create_model(name, in_channels=1, num_classes=3).train()
    loss = nn.functional.cross_entropy(model(torch.randn(2, *TINY)), torch.tensor([0, 2]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_standard_initialisation():
    model = create_model("wrn-10-1")
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.all(model.fc.bias == 0)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    stem = model.stem.weight  # Kaiming normal, fan-out = 16 · 3 · 3
    assert stem.std().item() == pytest.approx((2 / (16 * 9)) ** 0.5, rel=0.3)


def conv_macs(in_c: int, out_c: int, kernel: int, out_side: int, groups: int = 1) -> int:
    return out_c * out_side * out_side * (in_c // groups) * kernel * kernel


def test_flops_of_a_tiny_wrn_counted_by_hand():
    # WRN-10-1 (one block per stage) on a 1×8×8 input: maps 8×8, 8×8, 4×4, 2×2.
    macs = (
        conv_macs(1, 16, 3, 8)  # stem
        + conv_macs(16, 16, 3, 8)
        + conv_macs(16, 16, 3, 8)  # stage 1: identity shortcut
        + conv_macs(16, 32, 1, 4)
        + conv_macs(16, 32, 3, 4)
        + conv_macs(32, 32, 3, 4)  # stage 2 (+1×1 shortcut)
        + conv_macs(32, 64, 1, 2)
        + conv_macs(32, 64, 3, 2)
        + conv_macs(64, 64, 3, 2)  # stage 3 (+1×1 shortcut)
        + 64 * 10  # FC
    )
    assert measure_model("wrn-10-1", TINY, 10).flops == 2 * macs == 2 * 763_520


def test_memory_measurement_sees_every_live_tensor():
    class Chain(nn.Module):
        def forward(self, x):
            y = x * 2
            z = y + 1
            return z.sum()

    # x, y and z are live together at the end: three maps of 4-byte floats (plus the
    # wrapped scalar of `y + 1` and the 4-byte sum).
    for shape in [(1, 8, 8), (3, 32, 32)]:
        n = shape[0] * shape[1] * shape[2]
        assert 12 * n <= peak_activation_bytes(Chain(), shape) <= 12 * n + 64


@pytest.mark.parametrize("shape", [CIFAR, FMNIST], ids=["3x32x32", "1x28x28"])
def test_measured_catalog_agrees_with_the_shape_arithmetic(shape):
    seen = []
    catalog = measure_catalog(shape, 10, progress=lambda name, spec: seen.append(name))
    assert seen == catalog.names == list(DEFAULT_STUDENTS)
    for name, spec in catalog.items():
        stats = arch_stats(name, shape, 10)
        assert spec.params == stats.params and spec.out_dim == stats.out_dim
        assert spec.flops == stats.flops  # FlopCounterMode = 2 × MACs of conv and FC, as analytic.py
        # A layer's input and output are live together, and kernels add workspace on top.
        assert spec.memory_bytes >= 4 * spec.params + stats.peak_activation_bytes
    # Bigger students cost more.
    assert catalog["wrn-16-1"].flops < catalog["wrn-22-1"].flops < catalog["wrn-16-2"].flops < catalog["wrn-16-3"].flops
    assert catalog["wrn-16-1"].memory_bytes < catalog["wrn-16-2"].memory_bytes < catalog["wrn-16-3"].memory_bytes
    assert catalog["mobilenetv2-0.25"].memory_bytes < catalog["mobilenetv2-0.5"].memory_bytes < catalog["mobilenetv2-1.0"].memory_bytes


@pytest.mark.parametrize("name", ["wrn-16-1", "mobilenetv2-0.5"])
def test_measured_memory_grows_with_the_input(name):
    model = create_model(name, in_channels=1)
    small, medium, large = (measure_module(model, (1, side, side)) for side in (8, 28, 56))
    assert small.weight_bytes == medium.weight_bytes == large.weight_bytes >= 4 * small.params
    assert small.peak_activation_bytes < medium.peak_activation_bytes < large.peak_activation_bytes
    assert small.memory_bytes < medium.memory_bytes < large.memory_bytes


@settings(max_examples=8, deadline=None)
@given(
    name=st.sampled_from(["wrn-10-1", "wrn-10-2", "wrn-16-1", "mobilenetv2-0.25", "mobilenetv2-0.35"]),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 20), st.integers(1, 20)),
    classes=st.integers(1, 20),
)
def test_any_input_shape_agrees_with_the_shape_arithmetic(name, shape, classes):
    model = create_model(name, in_channels=shape[0], num_classes=classes)
    stats = arch_stats(name, shape, classes)
    assert n_params(model) == stats.params
    assert count_flops(model.eval(), shape) == stats.flops


def test_model_names():
    names = model_names()
    assert names[: len(DEFAULT_STUDENTS)] == DEFAULT_STUDENTS
    assert {"wrn-16-4", "wrn-28-10"} <= set(names)
    for name in names:
        parse_model_name(name)
    assert parse_model_name("wrn-28-10") == ("wrn", (28, 10))
    assert parse_model_name("mobilenetv2-0.5") == ("mobilenetv2", (0.5,))


@pytest.mark.parametrize(
    "name, message",
    [
        ("resnet-18", "expected wrn-D-K .* or mobilenetv2-W"),
        ("wrn", "expected wrn-D-K"),
        ("wrn-16", "expected wrn-D-K"),
        ("wrn-16-1-2", "expected wrn-D-K"),
        ("WRN-16-1", "expected wrn-D-K"),
        ("", "expected wrn-D-K"),
        ("wrn-15-1", r"'wrn-15-1': expected wrn-D-K \(D = 6n\+4"),
        ("wrn-4-1", "'wrn-4-1': expected wrn-D-K"),
        ("wrn-16-0", "'wrn-16-0': expected wrn-D-K"),
        ("mobilenetv2-0", r"'mobilenetv2-0': expected mobilenetv2-W \(0 < W <= 4"),
        ("mobilenetv2-5", "'mobilenetv2-5': expected mobilenetv2-W"),
        ("mobilenetv2-half", "'mobilenetv2-half': expected wrn-D-K .* or mobilenetv2-W"),
    ],
)
def test_bad_names_are_rejected(name, message):
    with pytest.raises(RocoinError, match=message):
        create_model(name)
    with pytest.raises(RocoinError, match=message):
        measure_model(name, CIFAR, 10)


def test_bad_arguments_are_rejected():
    with pytest.raises(RocoinError, match="in_channels = 0: expected a positive integer"):
        create_model("wrn-16-1", in_channels=0)
    with pytest.raises(RocoinError, match="num_classes = -1: expected a positive integer"):
        create_model("wrn-16-1", num_classes=-1)
    with pytest.raises(RocoinError, match=r"input_shape = \(3, 32\): expected \(channels, height, width\)"):
        measure_model("wrn-16-1", (3, 32), 10)
    with pytest.raises(RocoinError, match=r"input_shape = \(0, 32, 32\)"):
        measure_model("wrn-16-1", (0, 32, 32), 10)
