"""Fleet and catalog files: validation, generation, the Rayleigh outage, the built-in catalog."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rocoin.contracts.catalog import Catalog, load_catalog, parse_input_shape
from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import validate
from rocoin.contracts.fleet import Fleet, load_fleet, rayleigh_outage
from rocoin.models.analytic import arch_stats
from rocoin.profiles.generate import default_catalog, generate_fleet

GOOD = {"id": "cam-1", "flops": 2.5e7, "memory_bytes": 1048576, "rate_bps": 300000, "outage": 0.15}


def fleet_error(devices, **top) -> str:
    with pytest.raises(RocoinError) as info:
        validate(Fleet, {"devices": devices, **top}, "fleet.yaml")
    return str(info.value)


def test_issue_example_fleet_loads(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "devices:\n"
        "  - id: cam-1\n    flops: 2.5e7\n    memory_bytes: 1048576\n    rate_bps: 300000\n    outage: 0.15\n"
        "    downlink_bps: 1.0e6\n    address: 127.0.0.1:50061\n"
        "input_bits: 6272\n"
    )
    fleet = load_fleet(path)
    assert fleet.ids == ["cam-1"]
    assert fleet.input_bits == 6272
    assert fleet.arrays().input_s[0] == pytest.approx(6272 / 1e6)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"rate_bps": -3}, "devices[0].rate_bps = -3"),
        ({"rate_bps": 0}, "devices[0].rate_bps = 0"),
        ({"flops": 0}, "devices[0].flops = 0"),
        ({"outage": 1.0}, "devices[0].outage = 1.0"),
        ({"outage": -0.1}, "devices[0].outage = -0.1"),
        ({"memory_bytes": "lots"}, "devices[0].memory_bytes = 'lots'"),
        ({"colour": "red"}, "devices[0].colour: unknown field"),
        ({"address": "nowhere"}, "devices[0].address = 'nowhere'"),
        ({"flops": float("nan")}, "devices[0].flops = nan"),
    ],
)
def test_bad_device_fields_are_named(change, expected):
    message = fleet_error([{**GOOD, **change}])
    assert message.startswith(f"fleet.yaml: {expected}")
    assert "\n" not in message


def test_duplicate_ids_and_missing_outage_are_reported():
    assert "duplicate device id 'cam-1'" in fleet_error([GOOD, GOOD])
    no_outage = {k: v for k, v in GOOD.items() if k != "outage"}
    assert "outage is required" in fleet_error([no_outage])
    assert "not both" in fleet_error([{**GOOD, "snr_db": 10, "bandwidth_hz": 1e6}])
    assert "devices: " in fleet_error([])
    assert "input_bits = 0" in fleet_error([GOOD], input_bits=0)
    assert "unknown field" in fleet_error([GOOD], extra=1)


def test_rayleigh_outage_matches_the_formula():
    rate, bandwidth, snr_db = 300e3, 200e3, 10.0
    gamma = 10 ** (snr_db / 10)
    expected = 1 - math.exp(-(2 ** (rate / bandwidth) - 1) / gamma)
    device = validate(
        Fleet,
        {"devices": [{**{k: v for k, v in GOOD.items() if k != "outage"}, "rate_bps": rate, "snr_db": snr_db, "bandwidth_hz": bandwidth}]},
        "f",
    ).devices[0]
    assert device.outage == pytest.approx(expected, rel=1e-12)
    assert rayleigh_outage(rate, bandwidth, 30.0) < device.outage  # more SNR, fewer outages


def test_unreadable_files_get_one_line(tmp_path):
    with pytest.raises(RocoinError, match="file not found"):
        load_fleet(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RocoinError, match="not valid JSON"):
        load_fleet(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(RocoinError, match="expected a mapping"):
        load_fleet(listy)


def test_generated_fleet_follows_table_iv():
    flat = generate_fleet(50, heterogeneity=0, success_prob=0.8, success_spread=0.0, random_state=1)
    assert {d.flops for d in flat.devices} == {20e6}
    assert {d.rate_bps for d in flat.devices} == {300e3}
    assert all(d.outage == pytest.approx(0.2) for d in flat.devices)
    wide = generate_fleet(400, heterogeneity=5, success_prob=0.7, random_state=2)
    flops = np.array([d.flops for d in wide.devices])
    rates = np.array([d.rate_bps for d in wide.devices])
    success = 1 - np.array([d.outage for d in wide.devices])
    assert 5e6 <= flops.min() and flops.max() <= 35e6 and np.ptp(flops) > 25e6
    assert 50e3 <= rates.min() and rates.max() <= 550e3 and np.ptp(rates) > 400e3
    assert abs(success.mean() - 0.7) < 0.02
    assert generate_fleet(5, random_state=3) == generate_fleet(5, random_state=3)
    assert generate_fleet(5, random_state=3) != generate_fleet(5, random_state=4)


@pytest.mark.parametrize("kwargs, message", [({"heterogeneity": 6}, "heterogeneity = 6"), ({"success_prob": 0.0}, "success-prob = 0.0")])
def test_generate_rejects_bad_levels(kwargs, message):
    with pytest.raises(RocoinError, match=message):
        generate_fleet(3, **kwargs)


@pytest.mark.parametrize(
    "name, classes, params_m",
    [
        ("wrn-16-4", 10, 2.75),
        ("wrn-16-1", 10, 0.18),
        ("wrn-22-1", 10, 0.27),
        ("wrn-16-2", 10, 0.69),
        ("wrn-16-3", 100, 1.56),
        ("wrn-28-10", 100, 36.54),
    ],
)
def test_parameter_counts_match_the_paper(name, classes, params_m):
    stats = arch_stats(name, (3, 32, 32), classes)
    assert stats.params / 1e6 == pytest.approx(params_m, abs=0.011)


def test_default_catalog_is_ordered_by_size_and_shape_aware():
    cifar, fmnist = default_catalog((3, 32, 32)), default_catalog((1, 28, 28))
    assert cifar["wrn-16-1"].out_dim == 64 and cifar["wrn-16-2"].out_dim == 128
    assert cifar["wrn-16-1"].flops < cifar["wrn-22-1"].flops < cifar["wrn-16-2"].flops < cifar["wrn-16-3"].flops
    assert fmnist["wrn-16-1"].flops < cifar["wrn-16-1"].flops  # smaller input, fewer FLOPs
    assert cifar["wrn-16-1"].memory_bytes > 4 * cifar["wrn-16-1"].params  # weights plus activations


def test_catalog_file_validation(tmp_path):
    path = tmp_path / "catalog.json"
    path.write_text('{"tiny": {"flops": 1e6, "memory_bytes": 1000, "params": 10, "out_dim": 4, "speed": 1}}')
    with pytest.raises(RocoinError, match=r"catalog.json: tiny.speed: unknown field"):
        load_catalog(path)
    path.write_text("{}")
    with pytest.raises(RocoinError, match="lists no student"):
        load_catalog(path)
    path.write_text('{"tiny": {"flops": -1, "memory_bytes": 1000, "params": 10, "out_dim": 4}}')
    with pytest.raises(RocoinError, match=r"tiny.flops = -1"):
        load_catalog(path)
    path.write_text(default_catalog().to_json())
    assert load_catalog(path) == default_catalog()
    assert isinstance(load_catalog(path), Catalog)


def test_input_shape_parsing():
    assert parse_input_shape("1x28x28") == (1, 28, 28)
    with pytest.raises(RocoinError, match="input-shape = '28x28'"):
        parse_input_shape("28x28")


def test_int8_catalog_shrinks_the_weights_only():
    from rocoin.contracts.catalog import int8_catalog

    fp32 = default_catalog((1, 28, 28))
    int8 = int8_catalog(fp32)
    for name, spec in fp32.items():
        assert int8[name].memory_bytes == spec.memory_bytes - 3 * spec.params
        assert int8[name].flops == spec.flops and int8[name].params == spec.params


def test_the_rate_unit_reads_table_iv_as_kbit_or_bit_per_second():
    from rocoin.profiles.generate import generate_fleet

    kbps = generate_fleet(200, 5, random_state=3)
    bps = generate_fleet(200, 5, rate_unit="bps", random_state=3)
    assert 50e3 <= min(d.rate_bps for d in kbps.devices) and max(d.rate_bps for d in kbps.devices) <= 550e3
    assert 50 <= min(d.rate_bps for d in bps.devices) and max(d.rate_bps for d in bps.devices) <= 550
    assert [d.flops for d in bps.devices] == [d.flops for d in kbps.devices]  # only the rates change
    with pytest.raises(RocoinError, match="rate-unit = 'mbps': expected one of kbps, bps"):
        generate_fleet(3, rate_unit="mbps")


def test_a_fleet_given_by_its_channel_saves_and_loads_again(tmp_path):
    from rocoin.contracts.fleet import save_fleet

    channel = {k: v for k, v in GOOD.items() if k != "outage"} | {"snr_db": 20.0, "bandwidth_hz": 1e6}
    fleet = Fleet(devices=[channel])
    save_fleet(fleet, tmp_path / "fleet.yaml")  # the dump holds the derived outage beside the channel
    again = load_fleet(tmp_path / "fleet.yaml")
    assert again.devices[0].outage == fleet.devices[0].outage and again.devices[0].snr_db == 20.0
    # an outage that disagrees with the channel is still refused
    assert "not both" in fleet_error([{**channel, "outage": 0.5}])
