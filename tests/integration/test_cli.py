"""The ``rocoin`` command as a user runs it: outputs, exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from rocoin.cli.main import app
from rocoin.contracts.fleet import load_fleet
from rocoin.contracts.plan import load_plan

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def workspace(tmp_path):
    assert run("fleet", "generate", "--devices", 8, "--heterogeneity", 4, "--seed", 2, "-o", tmp_path / "fleet.yaml").exit_code == 0
    assert run("activations", "--synthetic", "--images", 60, "--filters", 32, "-o", tmp_path / "act.npy").exit_code == 0
    return tmp_path


def test_generate_plan_simulate_round_trip(workspace):
    fleet = load_fleet(workspace / "fleet.yaml")
    assert len(fleet.devices) == 8
    result = run(
        "plan",
        workspace / "fleet.yaml",
        "--activations",
        workspace / "act.npy",
        "--epsilon",
        0.05,
        "--optimal-gap",
        "-o",
        workspace / "plan.json",
    )
    assert result.exit_code == 0, result.output
    assert "rocoin plan" in result.stdout and "exact optimum" in result.stdout
    plan = load_plan(workspace / "plan.json")
    assert plan.num_filters == 32 and sorted(plan.device_ids) == sorted(fleet.ids)
    result = run("simulate", workspace / "plan.json", workspace / "fleet.yaml", "--trials", 2000, "--timeout-s", 10, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["trials"] == 2000 and set(data["latency_s"]) == {"mean", "p50", "p99"}
    assert 0.0 <= data["p_complete"] <= 1.0
    assert data["exact"]["p_complete"] == pytest.approx(plan.p_complete, rel=1e-9)  # timeout above every latency


@pytest.mark.parametrize("scheme", ["rocoin", "rocoin-g", "nonn", "hetnonn", "optimal"])
def test_every_scheme_from_the_command_line(workspace, scheme):
    result = run(
        "plan",
        workspace / "fleet.yaml",
        "--activations",
        workspace / "act.npy",
        "--scheme",
        scheme,
        "--objective",
        "minmax",
        "-o",
        workspace / "p.json",
    )
    assert result.exit_code == 0, result.output
    assert load_plan(workspace / "p.json").scheme == scheme


def bad(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(workspace):
    fleet, act, out = workspace / "fleet.yaml", workspace / "act.npy", workspace / "out.json"
    bad(run("plan", fleet, "--activations", act, "--epsilon", 1.5, "-o", out), "epsilon = 1.5")
    bad(run("plan", fleet, "--activations", act, "--epsilon", 1e-12, "-o", out), "the best achievable")
    bad(run("plan", fleet, "--activations", act, "--theta", "wide", "-o", out), "theta = 'wide'")
    bad(run("plan", fleet, "--activations", act, "--scheme", "magic", "-o", out), "scheme = 'magic'")
    nan_act = workspace / "nan.npy"
    np.save(nan_act, np.array([[1.0, np.nan]]))
    bad(run("plan", fleet, "--activations", nan_act, "-o", out), "= nan: expected finite")
    junk = workspace / "junk.npy"
    junk.write_bytes(b"not an array")
    bad(run("plan", fleet, "--activations", junk, "-o", out), "not a readable .npy array")
    broken = workspace / "broken.yaml"
    broken.write_text("devices:\n  - id: a\n    flops: 1e7\n    memory_bytes: 1000000\n    rate_bps: -5\n    outage: 0.1\n")
    bad(run("plan", broken, "--activations", act, "-o", out), "devices[0].rate_bps = -5")
    catalog = workspace / "catalog.json"
    catalog.write_text('{"s": {"flops": 1e6}}')
    bad(run("plan", fleet, "--activations", act, "--catalog", catalog, "-o", out), "s.memory_bytes: required field is missing")
    bad(run("plan", fleet, "--activations", act, "-o", workspace / "no-such-dir" / "p.json"), "does not exist")
    bad(run("fleet", "generate", "--heterogeneity", 9, "-o", out), "heterogeneity = 9")
    assert not out.exists()
    assert [p.name for p in workspace.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_simulate_rejects_a_plan_for_another_fleet(workspace):
    assert run("plan", workspace / "fleet.yaml", "--activations", workspace / "act.npy", "-o", workspace / "plan.json").exit_code == 0
    run("fleet", "generate", "--devices", 3, "-o", workspace / "other.yaml")
    bad(run("simulate", workspace / "plan.json", workspace / "other.yaml", "--timeout-s", 5), "is not in the fleet")
    bad(run("simulate", workspace / "plan.json", workspace / "fleet.yaml", "--timeout-s", 5, "--trials", 0), "trials = 0")


def test_catalog_command_writes_the_builtin_catalog(tmp_path):
    result = run("catalog", "--input-shape", "1x28x28", "-o", tmp_path / "catalog.json")
    assert result.exit_code == 0
    data = json.loads((tmp_path / "catalog.json").read_text())
    assert data["wrn-16-1"]["params"] == 174778 and data["wrn-16-1"]["out_dim"] == 64
    bad(run("catalog", "--input-shape", "28"), "input-shape = '28'")


def test_plan_warns_about_devices_without_a_student(tmp_path):
    (tmp_path / "fleet.yaml").write_text(
        "devices:\n"
        + "".join(f"  - {{id: d{i}, flops: 2.0e7, memory_bytes: 9000000, rate_bps: 3.0e5, outage: 0.1}}\n" for i in range(3))
        + "  - {id: tiny, flops: 2.0e7, memory_bytes: 1000, rate_bps: 3.0e5, outage: 0.1}\n"
    )
    run("activations", "--synthetic", "--images", 20, "--filters", 8, "-o", tmp_path / "act.npy")
    result = run("plan", tmp_path / "fleet.yaml", "--activations", tmp_path / "act.npy", "-o", tmp_path / "plan.json")
    assert result.exit_code == 0
    assert "tiny" in result.stderr and "smallest student" in result.stderr
    assert [u.id for u in load_plan(tmp_path / "plan.json").unassigned] == ["tiny"]


def test_json_logs_carry_the_query_id(capsys):
    import logging

    from rocoin.logs import configure

    configure(logging.INFO, json_lines=True)
    try:
        logging.getLogger("rocoin.runtime.source.source").info("groups %s missing", [1], extra={"query_id": "q-42"})
    finally:
        configure(logging.WARNING)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    entry = json.loads(line)
    assert entry["query_id"] == "q-42" and entry["msg"] == "groups [1] missing" and entry["level"] == "info"
