"""``rocoin replan`` as a user runs it: a summary, a new plan written atomically, one-line errors."""

from __future__ import annotations

import pytest
from test_cli import bad, run

from rocoin.contracts.fleet import Fleet, load_fleet, save_fleet
from rocoin.contracts.plan import load_plan


@pytest.fixture
def planned(tmp_path):
    assert run("fleet", "generate", "--devices", 9, "--heterogeneity", 4, "--seed", 2, "-o", tmp_path / "fleet.yaml").exit_code == 0
    assert run("activations", "--synthetic", "--images", 60, "--filters", 32, "-o", tmp_path / "act.npy").exit_code == 0
    result = run("plan", tmp_path / "fleet.yaml", "--activations", tmp_path / "act.npy", "-o", tmp_path / "plan.json")
    assert result.exit_code == 0, result.output
    return tmp_path


def test_replan_after_a_device_leaves_and_again_with_nothing_changed(planned):
    fleet = load_fleet(planned / "fleet.yaml")
    plan = load_plan(planned / "plan.json")
    gone = plan.groups[0].devices[0]
    save_fleet(Fleet(devices=[d for d in fleet.devices if d.id != gone]), planned / "live.yaml")
    result = run("replan", planned / "plan.json", "--fleet", planned / "live.yaml", "-o", planned / "new.json")
    assert result.exit_code == 0, result.output
    assert "T: " in result.stdout and "P(all groups answer)" in result.stdout and "moves: " in result.stdout
    assert "epsilon = 0.05" in result.stdout and "removed 1" in result.stdout
    assert "wrote" in result.stderr
    new = load_plan(planned / "new.json")
    new.check_fleet(load_fleet(planned / "live.yaml"))  # the new plan is for the live fleet
    assert [(g.student, g.filters) for g in new.groups] == [(g.student, g.filters) for g in plan.groups]
    # the re-planned plan on the same fleet: nothing to do
    again = run("replan", planned / "new.json", "--fleet", planned / "live.yaml", "--margin", 0.1, "-o", planned / "again.json")
    assert again.exit_code == 0, again.output
    assert "kept the current assignment" in again.stdout and "moves: 0;" in again.stdout
    assert load_plan(planned / "again.json").groups == new.groups


def test_replan_bad_inputs_exit_2_with_one_line_and_write_nothing(planned):
    plan, fleet, out = planned / "plan.json", planned / "fleet.yaml", planned / "out.json"
    bad(run("replan", plan, "--fleet", fleet, "--epsilon", 1.5, "-o", out), "epsilon = 1.5")
    bad(run("replan", plan, "--fleet", fleet, "--margin", -0.1, "-o", out), "margin = -0.1")
    (planned / "tiny.yaml").write_text("devices:\n  - {id: t, flops: 2.0e7, memory_bytes: 1000, rate_bps: 3.0e5, outage: 0.1}\n")
    bad(run("replan", plan, "--fleet", planned / "tiny.yaml", "-o", out), "no device has memory for any group's student")
    bad(run("replan", planned / "missing.json", "--fleet", fleet, "-o", out), "missing.json")
    bad(run("replan", plan, "--fleet", fleet, "-o", planned / "no-such-dir" / "p.json"), "does not exist")
    assert not out.exists()
    assert [p.name for p in planned.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers
