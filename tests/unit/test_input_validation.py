"""Hostile inputs (from a security probe): every one gets one RocoinError line, never a traceback,
and nothing is written."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from conftest import device, small_catalog
from typer.testing import CliRunner

from rocoin.cli.main import app
from rocoin.contracts import fileio
from rocoin.contracts.catalog import StudentSpec, load_catalog
from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import load_document, validate, write_json_atomic
from rocoin.contracts.fleet import DeviceProfile, Fleet, load_fleet
from rocoin.contracts.manifest import MANIFEST_NAME, load_manifest
from rocoin.contracts.plan import GroupPlan, Plan, load_plan, save_plan
from rocoin.contracts.text import short_repr
from rocoin.planning import make_plan
from rocoin.planning.activations import load_activations

runner = CliRunner()
GOOD = {"id": "cam-1", "flops": 2.5e7, "memory_bytes": 1048576, "rate_bps": 300000, "outage": 0.15}
DEEP = 100_000


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(RocoinError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    return message


def cli_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


def fleet_error(devices, **top) -> str:
    return one_line_error(validate, Fleet, {"devices": devices, **top}, "fleet.yaml")


@pytest.fixture
def act(tmp_path):
    path = tmp_path / "act.npy"
    np.save(path, np.random.default_rng(0).gamma(1.0, 1.0, size=(20, 8)))
    return path


# --- 1. nesting depth and document size ------------------------------------------------------


@pytest.mark.parametrize("name", ["fleet.yaml", "plan.json", "catalog.json", "fleet.json"])
def test_a_document_nested_100000_deep_is_one_error(tmp_path, name):
    path = tmp_path / name
    path.write_text("[" * DEEP + "]" * DEEP)
    message = one_line_error(load_document, path)
    assert message.startswith(f"{path}: ") and f"at most {fileio.MAX_DOCUMENT_DEPTH}" in message


def test_a_manifest_nested_100000_deep_is_one_error(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text('{"plan": ' + "[" * DEEP + "]" * DEEP + "}")
    assert "nested" in one_line_error(load_manifest, tmp_path)


def test_a_fleet_nested_deep_inside_a_mapping_is_one_error(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("devices:\n  - id: a\n    flops: " + "[" * DEEP + "]" * DEEP + "\n")
    assert "nested" in one_line_error(load_fleet, path)


def nested(depth: int) -> str:
    """A JSON document of exactly ``depth`` levels of lists/mappings."""
    return '{"a": ' * (depth - 1) + "[1]" + "}" * (depth - 1)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_the_depth_limit_is_exact(tmp_path, suffix):
    limit = fileio.MAX_DOCUMENT_DEPTH
    ok = tmp_path / f"ok{suffix}"
    ok.write_text(nested(limit))
    assert isinstance(load_document(ok), dict)
    deep = tmp_path / f"deep{suffix}"
    deep.write_text(nested(limit + 1))  # far below Python's recursion limit: only the walk sees it
    message = one_line_error(load_document, deep)
    assert f"{limit + 1} levels" in message and f"at most {limit}" in message
    assert "a.a.a" in message  # where it got too deep


def test_a_recursive_yaml_alias_is_refused(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("devices: &loop\n  - *loop\n")
    assert "nested" in one_line_error(load_fleet, path)


def test_an_alias_bomb_is_refused_before_validation(tmp_path):
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]  # 10**10 values once expanded
    lines += ["devices: *a9"]
    path = tmp_path / "fleet.yaml"
    path.write_text("\n".join(lines) + "\n")
    message = one_line_error(load_document, path)
    assert f"at most {fileio.MAX_DOCUMENT_VALUES}" in message


def test_a_document_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "MAX_DOCUMENT_BYTES", 100)
    path = tmp_path / "fleet.yaml"
    path.write_text("devices: []\n" + "#" * 200 + "\n")
    message = one_line_error(load_document, path)
    assert "bytes" in message and "at most 100" in message


def test_the_cli_reports_a_deep_fleet_in_one_line(tmp_path, act):
    path = tmp_path / "fleet.yaml"
    path.write_text("devices: " + "[" * DEEP + "]" * DEEP + "\n")
    cli_error(run("plan", path, "--activations", act, "-o", tmp_path / "plan.json"), "nested")
    assert not (tmp_path / "plan.json").exists()


# --- 2. duplicate keys -------------------------------------------------------------------------


def test_a_duplicate_yaml_key_names_the_key_and_its_line(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "devices:\n  - id: cam-1\n    flops: 2.5e7\n    memory_bytes: 1048576\n    flops: 9.9e9\n    rate_bps: 300000\n    outage: 0.15\n"
    )
    message = one_line_error(load_fleet, path)
    assert "duplicate key 'flops'" in message and "line 5" in message and "line 3" in message


def test_a_duplicate_top_level_yaml_key_is_refused(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("devices:\n  - {id: a, flops: 1e7, memory_bytes: 1000, rate_bps: 1000, outage: 0.1}\ndevices: []\n")
    assert "duplicate key 'devices'" in one_line_error(load_fleet, path)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "base: &base {flops: 1.0e+7, memory_bytes: 1000000, rate_bps: 1000, outage: 0.1}\n"
        "devices:\n  - {<<: *base, id: a}\n  - {<<: *base, id: b, flops: 2.0e+7}\n"
    )
    data = load_document(path)
    assert [d["flops"] for d in data["devices"]] == [1.0e7, 2.0e7]


@pytest.mark.parametrize("name", ["plan.json", "catalog.json"])
def test_a_duplicate_json_key_names_the_key_and_its_line(tmp_path, name):
    path = tmp_path / name
    path.write_text(
        '{\n  "s": {\n    "flops": 1e6,\n    "memory_bytes": 1000,\n    "params": 10,\n    "out_dim": 4,\n    "flops": 1e9\n  }\n}\n'
    )
    message = one_line_error(load_document, path)
    assert "duplicate key 'flops'" in message and "line 7" in message and "line 3" in message
    assert "duplicate key 'flops'" in one_line_error(load_catalog, path)


# --- 3. non-finite numbers -------------------------------------------------------------------


def plan_for(fleet: Fleet) -> Plan:
    return make_plan(fleet, np.ones((4, 4)) - np.eye(4), small_catalog(), epsilon=0.3)


def test_a_plan_with_an_infinite_latency_is_not_written(tmp_path, two_tier_fleet):
    plan = plan_for(two_tier_fleet)
    broken = plan.model_copy(update={"groups": [plan.groups[0].model_copy(update={"latency_s": math.inf}), *plan.groups[1:]]})
    out = tmp_path / "plan.json"
    message = one_line_error(save_plan, broken, out)
    assert message == f"{out}: groups[0].latency_s = inf: expected a finite number"
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "groups[0].latency_s = inf" in one_line_error(broken.to_json)


def test_write_json_atomic_refuses_nan_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("{}\n")
    message = one_line_error(write_json_atomic, out, {"rows": [{"x": 1.0}, {"x": float("nan")}]})
    assert message == f"{out}: rows[1].x = nan: expected a finite number"
    assert out.read_text() == "{}\n" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_plan_file_with_infinity_is_refused(tmp_path, two_tier_fleet):
    data = plan_for(two_tier_fleet).model_dump(mode="json")
    data["latency_s"] = math.inf
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))  # "Infinity": what the old planner wrote
    assert "latency_s = inf" in one_line_error(load_plan, path)


@pytest.mark.parametrize(
    "field, value",
    [
        ("downlink_bps", 1e-308),
        ("downlink_bps", 1e13),
        ("rate_bps", 1e-300),
        ("rate_bps", 5e12),
        ("flops", 1e-3),
        ("flops", 1e300),
        ("memory_bytes", 2**60),
        ("memory_bytes", 10**400),
    ],
)
def test_absurd_profile_values_are_refused(field, value):
    assert fleet_error([{**GOOD, field: value}]).startswith(f"fleet.yaml: devices[0].{field} = {short_repr(value)}")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"snr_db": 1000.0, "bandwidth_hz": 1e6}, "snr_db = 1000.0"),
        ({"snr_db": -1000.0, "bandwidth_hz": 1e6}, "snr_db = -1000.0"),
        ({"snr_db": 10.0, "bandwidth_hz": 1e-300}, "bandwidth_hz = 1e-300"),
        ({"snr_db": 10.0, "bandwidth_hz": 1e15}, "bandwidth_hz = 1000000000000000.0"),
    ],
)
def test_absurd_channel_values_are_refused(change, field):
    no_outage = {k: v for k, v in GOOD.items() if k != "outage"}
    assert fleet_error([{**no_outage, **change}]).startswith(f"fleet.yaml: devices[0].{field}")


@pytest.mark.parametrize("field, value", [("memory_bytes", 10**400), ("params", 2**60), ("flops", 1e300), ("out_dim", 10**12)])
def test_absurd_catalog_values_are_refused(tmp_path, field, value):
    spec = {"flops": 1e6, "memory_bytes": 1000, "params": 10, "out_dim": 4, field: value}
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"s": spec}))
    assert one_line_error(load_catalog, path).startswith(f"{path}: s.{field} = ")


def test_a_plan_claiming_a_trillion_filters_is_refused_quickly(tmp_path, two_tier_fleet):
    data = plan_for(two_tier_fleet).model_dump(mode="json")
    data["num_filters"] = 10**12
    assert "filters must cover" in one_line_error(validate, Plan, data, "plan.json")


@pytest.mark.parametrize("bits", [2**41, 10**400])
def test_absurd_input_sizes_are_refused(bits):
    assert fleet_error([GOOD], input_bits=bits).startswith("fleet.yaml: input_bits = ")


def test_profile_bounds_keep_realistic_values():
    validate(
        Fleet,
        {"devices": [{**GOOD, "flops": 1e15, "rate_bps": 1e12, "downlink_bps": 1.0, "memory_bytes": 2**40}], "input_bits": 2**33},
        "f",
    )
    validate(Fleet, {"devices": [{**{k: v for k, v in GOOD.items() if k != "outage"}, "snr_db": -5.0, "bandwidth_hz": 1e6}]}, "f")


def test_plan_cli_with_a_tiny_downlink_writes_nothing(tmp_path, act):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "devices:\n"
        "  - {id: a, flops: 2.0e7, memory_bytes: 9000000, rate_bps: 3.0e5, outage: 0.1, downlink_bps: 1.0e-308}\n"
        "  - {id: b, flops: 2.0e7, memory_bytes: 9000000, rate_bps: 3.0e5, outage: 0.1, downlink_bps: 1.0e-308}\n"
        "input_bits: 6272\n"
    )
    cli_error(run("plan", fleet, "--activations", act, "-o", tmp_path / "plan.json"), "downlink_bps = 1e-308")
    assert not (tmp_path / "plan.json").exists()


def test_the_planner_refuses_an_infinite_latency(two_tier_fleet):
    # model_copy skips validation: the planner's own check is the second line of defence.
    fleet = two_tier_fleet.model_copy(
        update={"input_bits": 6272, "devices": [d.model_copy(update={"downlink_bps": 1e-308}) for d in two_tier_fleet.devices]}
    )
    for scheme in ("rocoin", "nonn", "optimal"):
        message = one_line_error(make_plan, fleet, np.ones((4, 4)) - np.eye(4), small_catalog(), scheme=scheme, epsilon=0.3)
        assert "not finite" in message and "device '" in message and "group " in message


def test_the_planner_refuses_a_non_finite_probability(two_tier_fleet):
    fleet = two_tier_fleet.model_copy(update={"devices": [d.model_copy(update={"outage": math.nan}) for d in two_tier_fleet.devices]})
    message = one_line_error(make_plan, fleet, np.ones((4, 4)) - np.eye(4), small_catalog(), scheme="nonn", epsilon=0.3)
    assert "not finite" in message and "device '" in message


# --- 4. device ids -----------------------------------------------------------------------------

BAD_IDS = [
    "",
    "x" * 129,
    "a\nb",
    "a\rb",
    "a\x1b[31mred",
    "a\x7f",
    "a\x85b",  # C1 NEL
    "a\x9b31m",  # C1 CSI
    "a\ud800b",  # lone surrogate
    " a",
    "a ",
    "a\t",
    "\u2028a",
    "a\u2029b",  # paragraph separator: a line break for many viewers
]


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_bad_device_ids_are_refused_in_a_fleet(bad_id):
    message = fleet_error([{**GOOD, "id": bad_id}])
    assert message.startswith("fleet.yaml: devices[0].id = ")


@pytest.mark.parametrize("good_id", ["dev-01", "cam-1", "a1", "x" * 128, "caméra_1.lab", "a b", "d0"])
def test_valid_device_ids_still_work(good_id):
    assert validate(Fleet, {"devices": [{**GOOD, "id": good_id}]}, "f").ids == [good_id]


def test_a_fleet_file_with_an_escape_sequence_in_an_id_is_one_line(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text('devices:\n  - {id: "cam\\e[2J\\r\\nerror: fake", flops: 1e7, memory_bytes: 1000, rate_bps: 1000, outage: 0.1}\n')
    message = one_line_error(load_fleet, path)
    assert message.startswith(f"{path}: devices[0].id = ") and "\x1b" not in message


@pytest.mark.parametrize("bad_id", ["a\nb", "", "x" * 129, "a\x1b", " a"])
def test_bad_device_ids_are_refused_in_a_plan(tmp_path, two_tier_fleet, bad_id):
    data = plan_for(two_tier_fleet).model_dump(mode="json")
    planned = copy.deepcopy(data)
    planned["groups"][0]["devices"][0] = bad_id
    assert "groups[0].devices[0] = " in one_line_error(validate, Plan, planned, "plan.json")
    unassigned = copy.deepcopy(data)
    unassigned["unassigned"] = [{"id": bad_id, "reason": "too small"}]
    assert "unassigned[0].id = " in one_line_error(validate, Plan, unassigned, "plan.json")


# --- 5. .npy headers ---------------------------------------------------------------------------


def npy_with_header(path, shape, descr="<f8", data: bytes = b"", version=(1, 0)) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape}) if version == (1, 0) else (
            np.lib.format.write_array_header_2_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
        )
        f.write(data)


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_an_npy_header_claiming_a_huge_array_is_refused_unread(tmp_path, version):
    path = tmp_path / "act.npy"
    npy_with_header(path, (10**6, 10**6), version=version)
    message = one_line_error(load_activations, path)
    assert "(1000000, 1000000)" in message and "bytes" in message


def test_an_npy_with_an_object_dtype_is_refused(tmp_path):
    path = tmp_path / "act.npy"
    npy_with_header(path, (2, 2), descr="|O", data=b"\0" * 32)
    assert "dtype object" in one_line_error(load_activations, path)


@pytest.mark.parametrize("extra", [-8, 8])
def test_an_npy_whose_size_differs_from_its_header_is_refused(tmp_path, extra):
    path = tmp_path / "act.npy"
    data = np.ones((10, 4)).tobytes()
    npy_with_header(path, (10, 4), data=data[:extra] if extra < 0 else data + b"\0" * extra)
    assert "the file has" in one_line_error(load_activations, path)


def test_an_npy_with_a_negative_dimension_is_refused(tmp_path):
    path = tmp_path / "act.npy"
    npy_with_header(path, (-2, -4), data=np.ones(8).tobytes())
    assert "(-2, -4)" in one_line_error(load_activations, path)


def test_an_npy_over_the_size_limit_is_refused(tmp_path, monkeypatch, act):
    monkeypatch.setattr(fileio, "MAX_NPY_BYTES", 1000)
    assert "at most 1000 bytes" in one_line_error(load_activations, act)


def test_valid_npy_files_still_load(tmp_path, act):
    assert load_activations(act).shape == (20, 8)
    fortran = tmp_path / "f.npy"
    np.save(fortran, np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)))
    assert np.array_equal(fileio.load_npy(fortran), np.arange(12).reshape(3, 4))
    npz = tmp_path / "a.npz"
    np.savez(npz, a=np.ones((2, 2)))
    assert ".npz archive" in one_line_error(load_activations, npz)


def test_the_workspace_reads_its_cached_filter_graph_safely(tmp_path, monkeypatch):
    from rocoin.experiments.setup import ExperimentSetup
    from rocoin.experiments.workspace import Workspace, file_digest

    ws = Workspace(ExperimentSetup(), tmp_path / "cache")
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"teacher")
    monkeypatch.setattr(ws, "teacher", lambda: teacher)
    npy_with_header(ws.cache_dir / f"filter-graph-{file_digest(teacher)}.npy", (10**6, 10**6))
    assert "(1000000, 1000000)" in one_line_error(ws.filter_weights)


# --- 6. the bundle manifest --------------------------------------------------------------------


def manifest_data(channels: int = 1) -> dict:
    plan = Plan(
        scheme="rocoin",
        epsilon=0.05,
        num_filters=3,
        groups=[
            GroupPlan(devices=["a1"], filters=[0, 2], student="tiny", failure_prob=0.01, latency_s=0.01),
            GroupPlan(devices=["b1"], filters=[1], student="tiny", failure_prob=0.01, latency_s=0.01),
        ],
        latency_s=0.01,
        p_complete=0.98,
        catalog={"tiny": StudentSpec(flops=1e4, memory_bytes=10_000, params=10, out_dim=4)},
    )

    def model(name: str, inp: list[int], out: list[int]) -> dict:
        return {
            "file": name,
            "sha256": "0" * 64,
            "size_bytes": 10,
            "input": {"name": "image", "shape": inp, "dtype": "float32"},
            "output": {"name": "features", "shape": out, "dtype": "float32"},
        }

    groups = [
        {
            **model(f"group{k}.onnx", [channels, 8, 8], [len(g.filters)]),
            "group": k,
            "student": "tiny",
            "devices": g.devices,
            "filters": g.filters,
        }
        for k, g in enumerate(plan.groups)
    ]
    return {
        "format": "rocoin-bundle/1",
        "plan": plan.model_dump(mode="json"),
        "dataset": "digits",
        "class_names": ["zero", "one"],
        "normalization": {"mean": [0.5] * channels, "std": [0.25] * channels},
        "groups": groups,
        "head": model("head.onnx", [3], [2]),
        "rocoin_version": "0.1.0",
    }


def manifest_error(tmp_path, data) -> str:
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))  # NaN/Infinity written as the old code would
    return one_line_error(load_manifest, tmp_path)


def test_a_valid_manifest_still_loads(tmp_path):
    for channels in (1, 3):
        (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest_data(channels)))
        assert load_manifest(tmp_path).input.shape == [channels, 8, 8]


@pytest.mark.parametrize(
    "normalization, needle",
    [
        ({"mean": [0.5], "std": [0.0]}, "normalization.std[0] = 0.0"),
        ({"mean": [0.5], "std": [1e-9]}, "normalization.std[0] = 1e-09"),
        ({"mean": [0.5], "std": [-0.25]}, "normalization.std[0] = -0.25"),
        ({"mean": [0.5], "std": [math.nan]}, "normalization.std[0] = nan"),
        ({"mean": [math.nan], "std": [0.25]}, "normalization.mean[0] = nan"),
        ({"mean": [math.inf], "std": [0.25]}, "normalization.mean[0] = inf"),
        ({"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, "3 values for an input of 1 channel"),
        ({"mean": [0.5], "std": [0.25, 0.25]}, "len(mean) = 1 but len(std) = 2"),
        ({"mean": [], "std": []}, "normalization.mean"),
    ],
)
def test_bad_normalization_is_refused_at_load(tmp_path, normalization, needle):
    data = manifest_data()
    data["normalization"] = normalization
    assert needle in manifest_error(tmp_path, data)


@pytest.mark.parametrize("shape", [[0, 8, 8], [1, -8, 8], [1, 8, 2**40], [], [1] * 20, [1, 2**20, 2**20]])
def test_bad_tensor_shapes_are_refused_at_load(tmp_path, shape):
    data = manifest_data()
    for group in data["groups"]:
        group["input"]["shape"] = shape
    data["normalization"] = {"mean": [0.5] * max(1, shape[0] if shape else 1), "std": [0.25] * max(1, shape[0] if shape else 1)}
    assert "input.shape" in manifest_error(tmp_path, data)


def test_group_models_must_share_one_input_spec(tmp_path):
    data = manifest_data()
    data["groups"][1]["input"]["shape"] = [1, 16, 16]
    message = manifest_error(tmp_path, data)
    assert "groups[1].input" in message and "[1, 16, 16]" in message


def test_a_bad_device_id_in_the_manifest_is_refused(tmp_path):
    data = manifest_data()
    data["plan"]["groups"][0]["devices"] = ["a\x1b1"]
    data["groups"][0]["devices"] = ["a\x1b1"]
    assert "devices[0] = " in manifest_error(tmp_path, data)


def test_conftest_fixtures_stay_valid(two_tier_fleet):
    assert DeviceProfile.model_validate(device("x", 10, 1, 200, 0.2).model_dump()).id == "x"
    assert plan_for(two_tier_fleet).latency_s > 0
