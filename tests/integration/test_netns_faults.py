"""Real network faults (bench/netns_faults.py): devices on their own network namespaces join the
source over shaped links; a black-holed replica is noticed within the keepalive bound, a group
whose only replica is black-holed is healed from a spare, and every query comes back by its
deadline meanwhile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rocoin.runtime.cluster.netns import unavailable

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"network namespaces unavailable: {REASON}")
ROOT = Path(__file__).resolve().parents[2]
#: Scheduling slack on a loaded 2-core machine.
SLACK_S = 1.0


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line}


def test_black_holed_devices_are_noticed_and_a_lost_group_heals_with_no_query_lost(tmp_path):
    before = namespaces()
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "netns_faults.py"), "--out", str(tmp_path / "report.txt"), "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(out.read_text())
    keepalive_s = sum(r["keepalive_ms"]) / 1e3
    assert r["baseline"]["complete_share"] >= 0.95
    replica, group = r["replica_fault"], r["group_fault"]
    assert replica["detected_s"] <= keepalive_s + SLACK_S
    assert replica["complete_share"] >= 0.95  # the other replica answers for the group
    assert group["healed_s"] is not None and group["healed_s"] <= keepalive_s + SLACK_S
    for fault in (replica, group):
        assert fault["max_ms"] <= 1e3 * (r["deadline_s"] + SLACK_S)  # by its deadline: none lost
    assert group["device"] not in r["groups_after"][group["group"]] and r["groups_after"][group["group"]]
    assert "black-holed" in (tmp_path / "report.txt").read_text()
    assert namespaces() <= before  # every namespace the run made is removed
