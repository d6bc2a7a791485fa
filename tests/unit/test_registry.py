"""The source's membership registry (issue 14): joins and identities, suspicion and grace,
persistence across a restart, refused files and inputs, bounds, events, pruning and speed."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import stat
import threading
import time

import pytest

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fleet import DeviceProfile
from rocoin.logs import TextFormatter
from rocoin.runtime.source.registry import (
    MAX_EVENTS_PAGE,
    REGISTRY_FILE,
    DeviceLimitError,
    IdentityError,
    MembershipRegistry,
    StateError,
    UnknownDeviceError,
)

SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4
GRACE_S = 30.0
LOGGER = "rocoin.runtime.source.registry"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def profile(device_id: str, *, flops: float = 1e9, **extra) -> DeviceProfile:
    fields = {"outage": 0.05, **extra}
    return DeviceProfile(id=device_id, flops=flops, memory_bytes=64 * 2**20, rate_bps=1e6, **fields)


def key(device_id: str) -> str:
    return f"key-of-{device_id}-0123456789abcdef"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(tmp_path, clock):
    with MembershipRegistry.open(tmp_path / "state", clock=clock, grace_s=GRACE_S) as reg:
        yield reg


def kinds(reg: MembershipRegistry, **filters) -> list[tuple[str, str]]:
    return [(e.kind, e.device_id) for e in reg.events(**filters)]


# --- joining and leaving ------------------------------------------------------------------------


def test_join_serve_and_leave(registry, clock):
    member = registry.join(profile("cam-1"), credential=key("cam-1"))
    assert (member.state, member.group, member.model_sha256, member.address) == ("joining", None, None, None)
    assert member.joined_at == member.last_seen == member.state_since == clock.t
    assert member.profile == profile("cam-1") and member.live and not member.dialed

    clock.advance(2)
    member = registry.mark_serving("cam-1", 3, SHA_A)
    assert (member.state, member.group, member.model_sha256, member.state_since) == ("serving", 3, SHA_A, clock.t)
    assert registry.serving_groups() == {3: ["cam-1"]}

    clock.advance(5)
    member = registry.leave("cam-1", "the operator drained it")
    assert member.state == "gone" and not member.live and member.state_since == clock.t
    assert registry.leave("cam-1", "again") == member  # a gone device stays as it is: no event
    assert registry.live() == [] and registry.members("gone") == [member] and registry.count() == 1
    assert registry.get("cam-9") is None
    with pytest.raises(UnknownDeviceError, match="cam-9"):
        registry.mark_serving("cam-9", 0, SHA_A)

    events = registry.events()
    assert [(e.kind, e.membership) for e in events] == [("joined", True), ("serving", True), ("left", True)]
    assert events[2].reason == "the operator drained it" and events[2].details == {"previous_state": "serving", "group": 3}


def test_a_dialed_device_joins_with_its_address_and_no_credential(registry):
    member = registry.join(profile("cam-1", address="10.0.0.7:50061"), credential=None)
    assert member.dialed and member.address == "10.0.0.7:50061"
    assert registry.join(profile("cam-1", address="10.0.0.8:50061"), credential=None).address == "10.0.0.8:50061"
    with pytest.raises(IdentityError, match="the source dials"):
        registry.join(profile("cam-1"), credential=key("cam-1"))
    registry.join(profile("cam-2"), credential=key("cam-2"))
    with pytest.raises(IdentityError, match="own stream"):
        registry.join(profile("cam-2", address="10.0.0.9:50061"), credential=None)
    with pytest.raises(RocoinError, match="credential: none given"):
        registry.join(profile("cam-3"), credential=None)


# --- identity -----------------------------------------------------------------------------------


def test_another_credential_cannot_take_over_an_id(registry, clock, caplog):
    registry.join(profile("cam-1"), credential=key("cam-1"))
    before = registry.mark_serving("cam-1", 1, SHA_A)
    clock.advance(1)
    intruder = "the-intruders-own-secret-key"
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(IdentityError, match="take over") as refused:
        registry.join(profile("cam-1", flops=5e12), credential=intruder)
    assert intruder not in str(refused.value)  # a credential is never echoed
    assert registry.get("cam-1") == before  # profile, state, group, model and times untouched
    event = registry.events(kinds="refused")[0]
    assert (event.device_id, event.membership) == ("cam-1", False)
    assert any(r.levelno == logging.WARNING and getattr(r, "event", None) == "refused" for r in caplog.records)
    assert all(intruder not in r.getMessage() for r in caplog.records)
    # the rightful device still joins
    assert registry.join(profile("cam-1"), credential=key("cam-1")).state == "joining"


def test_a_rejoin_keeps_group_and_model_and_updates_the_profile(registry, clock):
    registry.join(profile("cam-1"), credential=key("cam-1"))
    registry.mark_serving("cam-1", 2, SHA_A)
    clock.advance(3)
    member = registry.join(profile("cam-1", flops=2e9), credential=key("cam-1"))
    assert (member.state, member.group, member.model_sha256) == ("joining", 2, SHA_A)
    assert member.profile.flops == 2e9 and member.state_since == clock.t and member.joined_at == clock.t - 3
    reconnected = registry.events(kinds="reconnected")[-1]
    assert reconnected.membership and reconnected.details["profile_changed"]  # a new profile is a membership change

    registry.mark_serving("cam-1", 2, SHA_A)
    registry.join(profile("cam-1", flops=2e9), credential=key("cam-1"))
    plain = registry.events(kinds="reconnected")[-1]
    assert not plain.membership and not plain.details["profile_changed"]  # a plain reconnect is not
    confirm = registry.mark_serving("cam-1", 2, SHA_A)
    assert confirm.state == "serving" and not registry.events(kinds="serving")[-1].membership


# --- suspicion and grace ------------------------------------------------------------------------


def test_a_suspect_seen_within_grace_serves_again_without_a_membership_event(registry, clock, caplog):
    registry.join(profile("cam-1"), credential=key("cam-1"))
    registry.mark_serving("cam-1", 0, SHA_A)
    cursor = registry.events()[-1].seq
    caplog.clear()  # only what follows (an earlier test may have let INFO through)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        suspect = registry.mark_suspect("cam-1", "stream lost: UNAVAILABLE")
        assert suspect.state == "suspect" and suspect.group == 0
        clock.advance(10)
        assert registry.mark_suspect("cam-1", "again").state_since == suspect.state_since  # the grace runs from the first
        clock.advance(GRACE_S - 10)  # exactly the grace period: still within it
        assert registry.expire() == []
        member = registry.seen("cam-1")
    assert (member.state, member.group, member.last_seen, member.state_since) == ("serving", 0, clock.t, clock.t)
    assert registry.events(after=cursor, membership_only=True) == []
    assert kinds(registry, after=cursor) == [("suspect", "cam-1"), ("recovered", "cam-1")]
    ours = [r for r in caplog.records if r.name == LOGGER]
    assert [(r.levelno, r.event) for r in ours] == [(logging.DEBUG, "suspect"), (logging.DEBUG, "recovered")]


def test_a_suspect_past_grace_is_gone_with_its_reason(registry, clock, caplog):
    for name in ("cam-1", "cam-2", "cam-3"):
        registry.join(profile(name), credential=key(name))
        registry.mark_serving(name, 1, SHA_A)
    registry.mark_suspect("cam-1", "stream lost")
    clock.advance(20)
    registry.mark_suspect("cam-2", "3 failed calls")
    clock.advance(GRACE_S - 20 + 0.5)
    caplog.clear()  # only what expire logs (an earlier test may have let INFO through)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        gone = registry.expire()
    assert [(m.device_id, m.state, m.state_since) for m in gone] == [("cam-1", "gone", clock.t)]
    event = registry.events(kinds="gone")[0]
    assert event.membership and "grace period of 30 s" in event.reason and event.details["suspect_for_s"] == 30.5
    assert [(r.levelno, r.device) for r in caplog.records] == [(logging.WARNING, "cam-1")]
    assert {m.device_id for m in registry.live()} == {"cam-2", "cam-3"}

    # seen again too late, before expire ran: gone now, as expire would have made it
    clock.advance(GRACE_S)
    assert registry.seen("cam-2").state == "gone"
    assert registry.events(kinds="gone", device_id="cam-2")[0].membership
    # a gone device stays gone until it joins again
    assert registry.seen("cam-1").state == "gone"
    with pytest.raises(StateError, match="join again"):
        registry.mark_serving("cam-1", 1, SHA_A)
    with pytest.raises(StateError, match="join again"):
        registry.assign("cam-1", 1, SHA_A)
    rejoined = registry.join(profile("cam-1"), credential=key("cam-1"))
    assert (rejoined.state, rejoined.group) == ("joining", 1)
    assert registry.events(kinds="rejoined")[0].membership
    assert registry.expire(grace_s=0) == []  # nobody suspect


def test_assign_moves_a_device_that_counts_again_once_confirmed(registry, clock):
    registry.join(profile("cam-1"), credential=key("cam-1"))
    registry.mark_serving("cam-1", 0, SHA_A)
    moved = registry.assign("cam-1", 4, SHA_B)
    assert (moved.state, moved.group, moved.model_sha256) == ("joining", 4, SHA_B)
    assert registry.serving_groups() == {}
    event = registry.events(kinds="assigned")[0]
    assert event.membership and event.details["previous_group"] == 0 and event.details["group"] == 4
    n = len(registry.events())
    assert registry.assign("cam-1", 4, SHA_B) == moved and len(registry.events()) == n  # no change, no event
    assert registry.mark_serving("cam-1", 4, SHA_B).state == "serving"
    assert not registry.events()[-1].membership  # the confirmation of the move is not another change

    # a suspect device moved while away comes back as joining: it has not shown the new model
    registry.mark_suspect("cam-1", "stream lost")
    assert registry.assign("cam-1", 1, SHA_A).state == "suspect"
    clock.advance(1)
    assert (registry.seen("cam-1").state, registry.get("cam-1").group) == ("joining", 1)
    # a joining device that breaks before it is confirmed comes back joining, too
    registry.mark_suspect("cam-1", "stream lost")
    assert registry.seen("cam-1").state == "joining"


def test_a_spare_has_no_group_and_is_not_counted(registry, clock):
    registry.join(profile("cam-1"), credential=key("cam-1"))
    registry.mark_serving("cam-1", 2, SHA_A)
    spare = registry.standby("cam-1", "a re-plan made it a spare")
    assert (spare.state, spare.group, spare.model_sha256) == ("joining", None, SHA_A)
    assert registry.serving_groups() == {}
    event = registry.events(kinds="standby")[0]
    assert event.membership and event.details["previous_group"] == 2
    n = len(registry.events())
    assert registry.standby("cam-1", "again") == spare and len(registry.events()) == n  # no change, no event
    assert registry.mark_serving("cam-1", 0, SHA_B).group == 0  # assigned a group again
    registry.mark_suspect("cam-1", "stream lost")
    assert registry.standby("cam-1", "spare while away").state == "suspect"
    clock.advance(1)
    assert (registry.seen("cam-1").state, registry.get("cam-1").group) == ("joining", None)


# --- persistence --------------------------------------------------------------------------------


def test_a_reopened_registry_has_every_member_and_event(tmp_path, clock):
    state = tmp_path / "state"
    channel = profile("cam-3", outage=None, snr_db=12.0, bandwidth_hz=2e6)  # outage computed from the channel
    with MembershipRegistry.open(state, clock=clock) as reg:
        reg.join(profile("cam-1"), credential=key("cam-1"))
        reg.mark_serving("cam-1", 0, SHA_A)
        reg.join(profile("cam-2", address="10.0.0.2:50061"), credential=None)
        reg.mark_serving("cam-2", 1, SHA_B)
        reg.mark_suspect("cam-2", "link down")
        reg.join(channel, credential=key("cam-3"))
        reg.join(profile("cam-4"), credential=key("cam-4"))
        reg.leave("cam-4", "powered off")
        members, events = reg.members(), reg.events()
    assert not (state / REGISTRY_FILE).with_name(REGISTRY_FILE + "-shm").exists()  # exclusive WAL: no shared memory file

    clock.advance(3600)  # the source was down for an hour
    with MembershipRegistry.open(state, clock=clock, grace_s=GRACE_S) as reg:
        assert reg.members() == members and reg.events() == events
        assert reg.get("cam-3").profile == channel
        with pytest.raises(IdentityError):
            reg.join(profile("cam-1"), credential=key("someone-else"))
        # the streams are gone: every live device gets a fresh grace period to come back
        assert reg.mark_all_suspect("source restarted") == ["cam-1", "cam-2", "cam-3"]
        assert reg.expire() == []
        clock.advance(5)
        assert (reg.seen("cam-1").state, reg.seen("cam-2").state, reg.seen("cam-3").state) == ("serving", "serving", "joining")
        assert reg.get("cam-2").group == 1 and reg.get("cam-4").state == "gone"


def test_wal_journal_and_a_single_owner(tmp_path, clock, registry):
    conn = registry._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    path = registry.path
    assert path == tmp_path / "state" / REGISTRY_FILE and stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(RocoinError, match="in use by another process"):
        MembershipRegistry.open(tmp_path / "state", clock=clock)
    registry.close()
    assert registry.closed
    with pytest.raises(RocoinError, match="closed"):
        registry.get("cam-1")
    MembershipRegistry.open(tmp_path / "state", clock=clock).close()  # the lock went with close()


def test_a_crash_inside_a_change_leaves_the_file_as_before(tmp_path, clock, monkeypatch):
    state, snapshot = tmp_path / "state", tmp_path / "snapshot"
    reg = MembershipRegistry.open(state, clock=clock)
    reg.join(profile("cam-1"), credential=key("cam-1"))
    reg.mark_serving("cam-1", 0, SHA_A)
    before, events = reg.members(), reg.events()

    def crash(*args):  # the member row is written, its event not yet: copy the files as a crash leaves them
        snapshot.mkdir(exist_ok=True)
        for name in (REGISTRY_FILE, REGISTRY_FILE + "-wal"):
            if (state / name).exists():
                shutil.copy(state / name, snapshot / name)
        raise OSError("the process died here")

    monkeypatch.setattr(MembershipRegistry, "_record", crash)
    with pytest.raises(OSError, match="died"):
        reg.assign("cam-1", 2, SHA_B)
    with pytest.raises(OSError, match="died"):
        reg.join(profile("cam-2"), credential=key("cam-2"))
    monkeypatch.undo()
    assert reg.members() == before and reg.events() == events  # rolled back in this process
    reg.close()
    with MembershipRegistry.open(snapshot, clock=clock) as crashed:  # and on disk at the moment of the crash
        assert crashed.members() == before and crashed.events() == events
    with MembershipRegistry.open(state, clock=clock) as reopened:
        assert reopened.members() == before and reopened.count() == 1


def test_files_that_are_not_a_registry_are_refused(tmp_path, clock):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / REGISTRY_FILE).write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(RocoinError, match="not a SQLite database.*move it away"):
        MembershipRegistry.open(garbage, clock=clock)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with sqlite3.connect(foreign / REGISTRY_FILE) as other:
        other.execute("CREATE TABLE users (name TEXT)")
    other.close()
    with pytest.raises(RocoinError, match="not a rocoin membership registry.*users"):
        MembershipRegistry.open(foreign, clock=clock)

    newer = tmp_path / "newer"
    MembershipRegistry.open(newer, clock=clock).close()
    with sqlite3.connect(newer / REGISTRY_FILE) as edit:
        edit.execute("UPDATE registry_meta SET value = '2' WHERE key = 'schema_version'")
    edit.close()
    with pytest.raises(RocoinError, match="schema version 2 is newer than this rocoin's \\(1\\).*upgrade rocoin"):
        MembershipRegistry.open(newer, clock=clock)

    damaged = tmp_path / "damaged"
    with MembershipRegistry.open(damaged, clock=clock) as reg:
        for i in range(200):
            reg.join(profile(f"cam-{i}"), credential=key(f"cam-{i}"))
    data = (damaged / REGISTRY_FILE).read_bytes()
    (damaged / REGISTRY_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(RocoinError, match="corrupt"):
        MembershipRegistry.open(damaged, clock=clock)

    (tmp_path / "plain-file").write_text("x")
    with pytest.raises(RocoinError, match="cannot create the state directory"):
        MembershipRegistry.open(tmp_path / "plain-file", clock=clock)
    (tmp_path / "dir" / REGISTRY_FILE).mkdir(parents=True)
    with pytest.raises(RocoinError, match="not a file"):
        MembershipRegistry.open(tmp_path / "dir", clock=clock)


# --- inputs and bounds --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: r.join({"id": "cam-1", "flops": 1e9, "outage": 0.1}, credential=key("cam-1")), "profile: memory_bytes: required"),
        (
            lambda r: r.join({**profile("cam-1").model_dump(), "flops": -1.0}, credential=key("cam-1")),
            "profile: flops = -1.0: .*greater than or equal to 1",
        ),
        (lambda r: r.join("cam-1", credential=key("cam-1")), "profile 'cam-1'"),
        (lambda r: r.join(profile("cam-1"), credential="short-secret"), "credential: 12 characters: expected 16 to 1024"),
        (lambda r: r.join(profile("cam-1"), credential=key("cam-1"), address="no-port"), "address 'no-port'"),
        (lambda r: r.mark_serving("cam\n1", 0, SHA_A), "device_id 'cam\\\\n1': control character"),
        (lambda r: r.mark_serving("", 0, SHA_A), "device_id '': expected a non-empty device id"),
        (lambda r: r.mark_serving(7, 0, SHA_A), "device_id 7: expected a string"),
        (lambda r: r.mark_serving("cam-1", -1, SHA_A), "group -1: expected an integer group index from 0"),
        (lambda r: r.mark_serving("cam-1", "0", SHA_A), "group '0'"),
        (lambda r: r.mark_serving("cam-1", True, SHA_A), "group True"),
        (lambda r: r.assign("cam-1", 0, SHA_A.upper()), "model_sha256 'AAAA.*64 lowercase hex"),
        (lambda r: r.assign("cam-1", 0, "abc"), "model_sha256 'abc'"),
        (lambda r: r.members(states=["serving", "down"]), "state 'down': expected one of joining, serving, suspect, gone"),
        (lambda r: r.mark_suspect("cam-1", "  "), "reason '  ': expected a non-empty string"),
        (lambda r: r.expire(grace_s=-1), "grace_s -1"),
        (lambda r: r.prune(float("nan")), "older_than_s nan"),
        (lambda r: r.events(limit=0), "limit 0"),
    ],
)
def test_bad_inputs_are_refused_naming_the_field(registry, call, message):
    with pytest.raises(RocoinError, match=message):
        call(registry)
    assert registry.count() == 0 and registry.events() == []


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(RocoinError, match="grace_s 0: expected a number of seconds > 0"):
        MembershipRegistry.open(tmp_path, grace_s=0)
    with pytest.raises(RocoinError, match="max_devices 0"):
        MembershipRegistry.open(tmp_path, max_devices=0)


def test_the_number_of_devices_is_bounded(tmp_path, clock):
    with MembershipRegistry.open(tmp_path, clock=clock, max_devices=3) as reg:
        for name in ("cam-1", "cam-2", "cam-3"):
            reg.join(profile(name), credential=key(name))
        with pytest.raises(DeviceLimitError, match="holds 3 devices, its maximum \\(0 of them gone\\): prune gone devices"):
            reg.join(profile("cam-4"), credential=key("cam-4"))
        assert reg.get("cam-4") is None and reg.count() == 3
        reg.join(profile("cam-1"), credential=key("cam-1"))  # a known device still rejoins
        reg.leave("cam-2", "decommissioned")
        with pytest.raises(DeviceLimitError, match="1 of them gone"):
            reg.join(profile("cam-4"), credential=key("cam-4"))
        clock.advance(10)
        assert reg.prune(5) == ["cam-2"]
        assert reg.join(profile("cam-4"), credential=key("cam-4")).state == "joining"


def test_prune_removes_only_devices_gone_longer_than_the_retention(registry, clock):
    for name in ("old", "recent", "live"):
        registry.join(profile(name), credential=key(name))
    registry.leave("old", "gone")
    clock.advance(100)
    registry.leave("recent", "gone")
    clock.advance(10)
    assert registry.prune(50) == ["old"]
    assert [m.device_id for m in registry.members()] == ["live", "recent"]
    pruned = registry.events(kinds="pruned")[0]
    assert (pruned.device_id, pruned.membership, pruned.details) == ("old", False, {"gone_for_s": 110.0})
    assert registry.events(device_id="old")[0].kind == "joined"  # its history stays
    # the id is free again: another device may take it
    assert registry.join(profile("old"), credential=key("another-device")).state == "joining"
    forgotten = registry.forget("live", "replaced by the operator")
    assert forgotten.state == "joining" and registry.get("live") is None
    assert registry.events()[-1].kind == "forgotten" and registry.events()[-1].membership


# --- events and logs ----------------------------------------------------------------------------


def test_events_are_ordered_and_filterable(registry, clock):
    registry.join(profile("cam-1"), credential=key("cam-1"))
    clock.advance(1)
    registry.join(profile("cam-2"), credential=key("cam-2"))
    t2 = clock.t
    registry.mark_serving("cam-1", 0, SHA_A)
    clock.advance(1)
    registry.mark_suspect("cam-1", "link down")
    registry.seen("cam-1")
    events = registry.events()
    assert [e.seq for e in events] == sorted(e.seq for e in events) and len({e.seq for e in events}) == 5
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    assert kinds(registry, device_id="cam-1") == [("joined", "cam-1"), ("serving", "cam-1"), ("suspect", "cam-1"), ("recovered", "cam-1")]
    assert kinds(registry, kinds=["joined"]) == [("joined", "cam-1"), ("joined", "cam-2")]
    assert kinds(registry, membership_only=True) == [("joined", "cam-1"), ("joined", "cam-2"), ("serving", "cam-1")]
    assert kinds(registry, since=t2) == [("joined", "cam-2"), ("serving", "cam-1"), ("suspect", "cam-1"), ("recovered", "cam-1")]
    assert kinds(registry, after=events[2].seq) == [("suspect", "cam-1"), ("recovered", "cam-1")]
    assert kinds(registry, limit=2) == [("joined", "cam-1"), ("joined", "cam-2")]
    assert kinds(registry, limit=1, newest_first=True) == [("recovered", "cam-1")]
    assert events[2].details["group"] == 0 and events[2].to_json()["kind"] == "serving"


def test_old_events_are_dropped_beyond_the_bound(tmp_path, clock):
    with MembershipRegistry.open(tmp_path, clock=clock, max_events=10) as reg:
        for i in range(30):
            reg.join(profile(f"cam-{i}"), credential=key(f"cam-{i}"))
        assert reg.prune(0) == []  # prune also trims the events
        events = reg.events()
        assert [e.device_id for e in events] == [f"cam-{i}" for i in range(20, 30)]
        reg.join(profile("cam-x"), credential=key("cam-x"))
        assert reg.events()[-1].seq == 31  # sequence numbers are never reused


def test_each_change_logs_one_structured_line(registry, caplog):
    formatter = TextFormatter()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        registry.join(profile("cam-1"), credential=key("cam-1"))
        registry.mark_serving("cam-1", 2, SHA_A)
        registry.mark_suspect("cam-1", "stream lost:\nrocoin: ERROR: forged line")
    joined, serving, suspect = caplog.records
    assert (joined.levelno, joined.event, joined.device, joined.membership) == (logging.INFO, "joined", "cam-1", True)
    assert (serving.group, serving.model_sha256, serving.previous_group) == (2, SHA_A, None)
    assert (suspect.levelno, suspect.previous_state) == (logging.DEBUG, "serving")
    line = formatter.format(suspect)
    assert "\n" not in line and "event=suspect" in line and "device=cam-1" in line
    member = registry.get("cam-1").to_json()
    assert member["state"] == "suspect" and member["profile"]["id"] == "cam-1" and "credential" not in str(member)


def test_threads_may_share_a_registry(registry):
    names = [f"cam-{i}" for i in range(4)]
    for name in names:
        registry.join(profile(name), credential=key(name))
        registry.mark_serving(name, 0, SHA_A)
    errors = []

    def churn(name: str) -> None:
        try:
            for _ in range(100):
                registry.mark_suspect(name, "flaky link")
                registry.seen(name)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=churn, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and {m.state for m in registry.members()} == {"serving"}
    assert len(registry.events(kinds=["suspect", "recovered"], limit=MAX_EVENTS_PAGE)) == 800


# --- speed --------------------------------------------------------------------------------------


def test_ten_thousand_devices_join_and_are_seen_in_seconds(tmp_path, clock):
    profiles = [profile(f"phone-{i:05d}") for i in range(10_000)]
    with MembershipRegistry.open(tmp_path, clock=clock) as reg:
        start = time.perf_counter()
        for p in profiles:
            reg.join(p, credential=key(p.id))
        joined = time.perf_counter() - start
        start = time.perf_counter()
        for p in profiles:
            reg.seen(p.id)
        seen = time.perf_counter() - start
        start = time.perf_counter()
        reg.mark_all_suspect("source restarted")
        clock.advance(GRACE_S + 1)
        assert len(reg.expire()) == 10_000
        bulk = time.perf_counter() - start
    print(f"10,000 joins {joined:.2f} s, 10,000 seen {seen:.2f} s, suspect + expire all {bulk:.2f} s")
    assert joined + seen + bulk < 10.0  # about 1.5 s on a loaded 2-core machine
