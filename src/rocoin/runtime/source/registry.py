"""The source's membership registry (issue 14): every device the source knows, its profile, its
state, its group and the hash of the model it serves, kept in ``membership.sqlite3`` in the
source's state directory (stdlib :mod:`sqlite3`, WAL) so that a restarted source knows its fleet.

States (:data:`STATES`) and the operations that change them::

    operation       from                                  to
    join            (unknown), gone, joining/serving/...  joining (a rejoin keeps group and model)
    mark_serving    joining, suspect, serving             serving (it answered a health check)
    assign          serving                               joining (a move; joining/suspect keep theirs)
    standby         serving                               joining, no group (a spare; joining/suspect keep theirs)
    mark_suspect    joining, serving                      suspect (its grace period starts)
    seen            suspect, within grace_s               the state it had: serving or joining
    seen, expire    suspect, longer than grace_s          gone
    leave           joining, serving, suspect             gone
    prune / forget  gone for a while / any                removed, with the binding of its id

- ``joining``: registered, not (yet) counted for a group: it has just joined or reconnected, or it
  was moved to another group and has not answered a health check with the new model's hash.
- ``serving``: counted as a replica of its group.
- ``suspect``: its link broke or it stopped answering; it keeps its group. Seen again within the
  grace period it returns to the state it had: that is *not* a membership change. Suspect for
  longer than the grace period it is ``gone`` (by :meth:`~MembershipRegistry.expire`, or by
  :meth:`~MembershipRegistry.seen` when it comes back too late; it then has to join again).
- ``gone``: out of the fleet (expired, or it left). Its row, and the binding of its id to its
  credential, stay until :meth:`~MembershipRegistry.prune` removes gone devices after a retention
  period, or an operator removes it with :meth:`~MembershipRegistry.forget`.

**Identity.** The first join binds a device id to the credential the device presents (a
per-device random key the device keeps; under mTLS, the name its CA-signed certificate gives, so
a renewed certificate keeps the binding); only a salted SHA-256 of it is stored, and a later join
under the same id must present the same credential (:class:`IdentityError` otherwise; the
refusal is logged and recorded). A key must be a high-entropy secret: a fast salted hash protects
it only as well as it is random (a slow KDF would cost 10,000 joins minutes). The certificate
form is not secret, but only the TLS handshake yields it: the join service refuses keys in that form. A device the source dials (an ``address`` from the
fleet file) joins with ``credential=None``: its id is bound to "dialed by the source", and neither
a device joining over its own stream can take it nor the other way round.

**Events.** Every state change writes an event row (:class:`Event`: sequence number, time, kind,
device, reason, whether it is a *membership change*, details) in the same transaction as the
change, and logs one line on ``rocoin.runtime.source.registry`` with the details as ``extra``
fields, after the commit. Membership changes — what a re-plan must consider — are ``joined``,
``rejoined`` (a gone device joined again), ``assigned`` (a new group or model), ``standby`` (a
spare now, from a group), ``gone``,
``left``, ``forgotten``, and a ``reconnected`` or ``serving`` that changed the profile, the
address, the group or the model; they log at INFO (``gone`` and ``refused`` at WARNING). The rest
(``suspect``, ``recovered``, a plain ``reconnected`` or ``serving``, ``pruned``) logs at DEBUG.

**Bounds.** At most ``max_devices`` rows (gone devices count until pruned: a join beyond it is
refused with :class:`DeviceLimitError`); at most ``max_events`` event rows (the oldest are
dropped); reasons are cut to :data:`MAX_REASON_CHARS`.

**Storage.** WAL journal, ``synchronous=NORMAL`` (a committed change survives a crash of the
source; a power cut may lose the last few, never leaves the file inconsistent), every change in
one ``BEGIN IMMEDIATE`` transaction. The file is opened in exclusive locking mode: a second
process (a second source on the same state directory) is refused at :meth:`open` instead of
writing the same fleet. A file that is not a registry, is corrupt, or has a newer schema is
refused with a :class:`RocoinError` that says what to do. The clock is injected (wall time by
default: the times must mean something after a restart).

**Speed** (measured on the 2-core development machine while other benchmarks loaded both cores,
Python 3.11, SQLite 3.40, ``tests/unit/test_registry.py``): 10,000 first joins (one transaction
each) in 1.1 to 1.3 s, 10,000 :meth:`seen` calls in 0.3 to 0.4 s, :meth:`mark_all_suspect` then
:meth:`expire` of 10,000 devices in 0.8 s together. Checkpoints are the only fsyncs under
``synchronous=NORMAL``; with SQLite's default interval (1,000 pages) and indexes on the events
the joins took 2.8 s.

The registry is synchronous and thread-safe (one lock); each call is a few tens of microseconds,
so the source may call it from its event loop.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import operator
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import ValidationError

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import format_validation_error
from rocoin.contracts.fleet import DeviceProfile, check_device_id
from rocoin.contracts.text import one_line, short_repr

__all__ = [
    "DEFAULT_FORGET_AFTER_S", "DEFAULT_GRACE_S", "DEFAULT_MAX_DEVICES", "DEFAULT_MAX_EVENTS", "LIVE_STATES", "MAX_CREDENTIAL_CHARS", "MAX_REASON_CHARS",
    "MIN_CREDENTIAL_CHARS", "REGISTRY_FILE", "SCHEMA_VERSION", "STATES", "DeviceLimitError", "Event", "IdentityError", "Member",
    "MembershipRegistry", "State", "StateError", "UnknownDeviceError",
]  # fmt: skip

logger = logging.getLogger(__name__)

State = Literal["joining", "serving", "suspect", "gone"]
STATES: tuple[str, ...] = get_args(State)
#: States of a device that is still in the fleet.
LIVE_STATES: tuple[str, ...] = ("joining", "serving", "suspect")

#: The registry's file in the source's state directory.
REGISTRY_FILE = "membership.sqlite3"
#: Version of the tables below; a file with a higher one was written by a newer rocoin.
SCHEMA_VERSION = 1
#: ``format`` row of the meta table, and the SQLite header's application id ("RoMR").
FORMAT_NAME = "rocoin-membership"
APPLICATION_ID = 0x526F4D52

#: Defaults [decision]: a phone or camera loses its link for seconds to minutes; 30 s of grace
#: keeps short outages from moving devices between groups, and re-plans within a minute.
DEFAULT_GRACE_S = 30.0
#: How long a gone device stays (its id bound to its credential) before the source prunes it.
DEFAULT_FORGET_AFTER_S = 7 * 24 * 3600.0
DEFAULT_MAX_DEVICES = 10_000
#: Largest max_devices accepted: the registry is an index of a fleet, not a device database.
MAX_MAX_DEVICES = 1_000_000
#: Event rows kept (the oldest are dropped first): days of history for a churning fleet, a few
#: tens of MB at most.
DEFAULT_MAX_EVENTS = 100_000
#: The events table is trimmed after this many new rows (and at open), not after every one.
_TRIM_EVERY = 1_000
#: Most events one :meth:`MembershipRegistry.events` call returns.
MAX_EVENTS_PAGE = 10_000
#: Credential length: a random key (``secrets.token_urlsafe(32)`` has 43 characters) or a
#: certificate's name (72 characters); shorter keys are too easy to guess.
MIN_CREDENTIAL_CHARS = 16
MAX_CREDENTIAL_CHARS = 1024
#: Reasons (often an exception's text) are cut to this many characters.
MAX_REASON_CHARS = 500
#: Largest group index (a plan has at most as many groups as devices).
MAX_GROUP = 2**31 - 1
#: How long :meth:`MembershipRegistry.open` waits for the file's lock before it says another
#: process holds it.
OPEN_TIMEOUT_S = 1.0

#: WAL checkpoint interval (pages of 4 KiB) and the size a checkpointed WAL is cut back to.
WAL_AUTOCHECKPOINT_PAGES = 4_000
WAL_SIZE_LIMIT_BYTES = 16 * 2**20

_SHA256 = re.compile(r"[0-9a-f]{64}")
_PRINTABLE = re.compile(r"[^\s\x00-\x1f\x7f-\x9f]+")
_HASH_DOMAIN = b"rocoin-membership-credential-v1\x00"

_SCHEMA = (
    """CREATE TABLE registry_meta (
        key TEXT PRIMARY KEY NOT NULL,
        value TEXT NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE members (
        device_id TEXT PRIMARY KEY NOT NULL,
        profile_json TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('joining', 'serving', 'suspect', 'gone')),
        resume_state TEXT CHECK (resume_state IS NULL OR resume_state IN ('joining', 'serving')),
        group_index INTEGER CHECK (group_index IS NULL OR group_index >= 0),
        model_sha256 TEXT CHECK (model_sha256 IS NULL OR length(model_sha256) = 64),
        address TEXT,
        credential_salt BLOB,
        credential_hash BLOB,
        joined_at REAL NOT NULL,
        last_seen REAL NOT NULL,
        state_since REAL NOT NULL,
        CHECK ((credential_salt IS NULL) = (credential_hash IS NULL))
    ) WITHOUT ROWID""",
    "CREATE INDEX members_by_state ON members (state, state_since)",
    """CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        device_id TEXT NOT NULL,
        membership INTEGER NOT NULL CHECK (membership IN (0, 1)),
        reason TEXT NOT NULL,
        details_json TEXT NOT NULL
    )""",
)
# The events table has no index besides ``seq`` on purpose: each index costs every change a page
# write, and a query by device or time scans at most ``max_events`` rows (milliseconds).

_MEMBER_COLUMNS = "device_id, profile_json, state, group_index, model_sha256, address, joined_at, last_seen, state_since"


class IdentityError(RocoinError):
    """A join under a device id bound to another credential: a device cannot take over another's id."""


class DeviceLimitError(RocoinError):
    """A first join when the registry already holds ``max_devices`` devices."""


class UnknownDeviceError(RocoinError):
    """A device id the registry does not hold (it never joined, or was pruned or forgotten)."""


class StateError(RocoinError):
    """An operation the device's state does not allow (a gone device must join again)."""


@dataclass(frozen=True)
class Member:
    """One device of the registry, as stored. Times are seconds from the registry's clock."""

    device_id: str
    profile: DeviceProfile
    state: State
    #: Index of the plan group it serves (or is moving to); ``None`` before its first assignment.
    group: int | None
    #: SHA-256 of the group's model it serves (or is being sent).
    model_sha256: str | None
    #: host:port of a device the source dials; ``None`` for one that joined over its own stream.
    address: str | None
    joined_at: float
    last_seen: float
    state_since: float

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def dialed(self) -> bool:
        return self.address is not None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for the REST API and ``rocoin fleet status``); no credential."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"profile": _profile_dict(self.profile)}


@dataclass(frozen=True)
class Event:
    """One recorded state change (or refused join). ``seq`` increases with every event."""

    seq: int
    ts: float
    kind: str
    device_id: str
    #: Whether it changes the fleet or the assignment (a re-plan trigger), or is transient.
    membership: bool
    reason: str
    details: dict[str, Any] = field(hash=False)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"details": dict(self.details)}


@dataclass(frozen=True)
class _Change:
    kind: str
    device_id: str
    membership: bool
    reason: str
    details: dict[str, Any]


#: Log level of each event kind that is a membership change (the others log at DEBUG).
_MEMBERSHIP_LEVEL = {"gone": logging.WARNING, "refused": logging.WARNING}


# --- input checks -------------------------------------------------------------------------------


def _check_id(value: object, name: str = "device_id") -> str:
    if not isinstance(value, str):
        raise RocoinError(f"{name} {short_repr(value)}: expected a string")
    try:
        return check_device_id(value)
    except ValueError as error:
        raise RocoinError(f"{name} {short_repr(value)}: {error}") from None


def _check_group(value: object) -> int:
    if isinstance(value, bool):
        raise RocoinError(f"group {value!r}: expected an integer group index >= 0")
    try:
        index = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise RocoinError(f"group {short_repr(value)}: expected an integer group index >= 0") from None
    if not 0 <= index <= MAX_GROUP:
        raise RocoinError(f"group {index}: expected an integer group index from 0 to {MAX_GROUP}")
    return index


def _check_sha256(value: object) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise RocoinError(f"model_sha256 {short_repr(value)}: expected 64 lowercase hex digits (the SHA-256 of the model file)")
    return value


def _check_state(value: object) -> str:
    if value not in STATES:
        raise RocoinError(f"state {short_repr(value)}: expected one of {', '.join(STATES)}")
    return value  # type: ignore[return-value]


def _check_states(states: str | Iterable[str] | None) -> tuple[str, ...]:
    if states is None:
        return STATES
    if isinstance(states, str):  # members(states="serving"), not the letters of "serving"
        states = (states,)
    checked = tuple(dict.fromkeys(_check_state(s) for s in states))
    if not checked:
        raise RocoinError("states: expected at least one state (or None for all)")
    return checked


def _check_reason(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RocoinError(f"reason {short_repr(value)}: expected a non-empty string saying why")
    value = value.strip()
    return value if len(value) <= MAX_REASON_CHARS else value[: MAX_REASON_CHARS - 3] + "..."


def _check_seconds(value: object, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RocoinError(f"{name} {short_repr(value)}: expected a finite number of seconds")
    if value < 0 or (positive and value == 0):
        raise RocoinError(f"{name} {value!r}: expected a number of seconds {'> 0' if positive else '>= 0'}")
    return float(value)


def _check_count(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RocoinError(f"{name} {short_repr(value)}: expected an integer from {low} to {high}")
    return value


def _check_address(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if sep and host and port.isdigit() and 0 < int(port) < 65536 and len(value) <= 1024 and _PRINTABLE.fullmatch(value):
            return value
    raise RocoinError(f"address {short_repr(value)}: expected host:port with a port in 1..65535")


def _check_credential(value: object) -> str:
    # Never echo the value: it is a secret.
    if not isinstance(value, str):
        raise RocoinError(f"credential: a {type(value).__name__}: expected a string (a per-device random key or certificate fingerprint)")
    if not MIN_CREDENTIAL_CHARS <= len(value) <= MAX_CREDENTIAL_CHARS:
        raise RocoinError(
            f"credential: {len(value)} characters: expected {MIN_CREDENTIAL_CHARS} to {MAX_CREDENTIAL_CHARS}"
            " (a per-device random key such as secrets.token_urlsafe(32), or a certificate fingerprint)"
        )
    return value


def _check_profile(value: object) -> DeviceProfile:
    if isinstance(value, DeviceProfile):
        return value
    if isinstance(value, Mapping):
        try:
            return DeviceProfile.model_validate(dict(value))
        except ValidationError as error:
            raise RocoinError(format_validation_error(error, "profile")) from None
    raise RocoinError(f"profile {short_repr(value)}: expected a DeviceProfile (a fleet entry)")


def _profile_dict(profile: DeviceProfile) -> dict[str, Any]:
    """The profile as JSON that validates again (a channel-given profile keeps its derived outage)."""
    return profile.model_dump(mode="json", exclude_none=True)


def _profile_json(profile: DeviceProfile) -> str:
    return json.dumps(_profile_dict(profile), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _hash_credential(credential: str, salt: bytes) -> bytes:
    return hashlib.sha256(_HASH_DOMAIN + salt + credential.encode("utf-8", "surrogatepass")).digest()


def _seconds(value: float) -> float:
    return round(max(0.0, value), 3)


# --- the registry -------------------------------------------------------------------------------


class MembershipRegistry:
    """The membership of the source's fleet, persisted in ``state_dir/membership.sqlite3``.

    Use as a context manager, or call :meth:`close`. ``grace_s`` is how long a suspect device
    stays in the fleet; ``clock`` returns seconds (wall time by default).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        grace_s: float = DEFAULT_GRACE_S,
        max_devices: int = DEFAULT_MAX_DEVICES,
        max_events: int = DEFAULT_MAX_EVENTS,
    ) -> None:
        self.grace_s = _check_seconds(grace_s, "grace_s", positive=True)
        self.max_devices = _check_count(max_devices, "max_devices", 1, MAX_MAX_DEVICES)
        self.max_events = _check_count(max_events, "max_events", 1, 100 * DEFAULT_MAX_EVENTS)
        self._clock = clock
        self._lock = threading.RLock()
        self._profiles: dict[str, DeviceProfile] = {}  # profile JSON -> validated profile
        self._new_events = 0
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / REGISTRY_FILE
        self._conn: sqlite3.Connection | None = self._open()
        self._count = self._conn.execute("SELECT count(*) FROM members").fetchone()[0]

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str], **options: Any) -> MembershipRegistry:
        """Open (or create) the registry of ``state_dir``; ``options`` as for the constructor."""
        return cls(state_dir, **options)

    # --- opening ----------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        path = self.path
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RocoinError(f"{self.state_dir}: cannot create the state directory ({error.strerror or error})") from None
        if path.exists() and not path.is_file():
            raise RocoinError(f"{path}: not a file: expected the membership registry (move it away)")
        try:  # created private: it binds device ids to (hashed) credentials
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            pass
        except OSError as error:
            raise RocoinError(f"{path}: cannot create the membership registry ({error.strerror or error})") from None
        try:
            conn = sqlite3.connect(path, timeout=OPEN_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            raise RocoinError(f"{path}: cannot open the membership registry ({error})") from None
        try:
            # Exclusive before WAL: the lock is held from the first write to close(), so a second
            # source on the same state directory is refused, and WAL needs no shared memory file.
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RocoinError(
                    f"{path}: SQLite refused the WAL journal here (journal mode {mode!r}): give a state directory on a local disk"
                )
            conn.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints (the only fsyncs under synchronous=NORMAL) every 4,000 pages, not 1,000:
            # a burst of reconnecting devices then costs a third as much; the WAL stays under 16 MiB.
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._check_schema(conn)
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise RocoinError(
                    f"{path}: the membership registry is corrupt ({one_line(str(check), 200)}):"
                    " move it away to start with an empty fleet (devices then join again)"
                )
            self._trim_events(conn)
        except sqlite3.Error as error:
            conn.close()
            raise self._open_error(error) from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_error(self, error: sqlite3.Error) -> RocoinError:
        path, text = self.path, str(error)
        if "not a database" in text:
            return RocoinError(
                f"{path}: not a SQLite database, so not a rocoin membership registry: move it away or give another state directory"
            )
        if "locked" in text or "busy" in text:
            return RocoinError(f"{path}: in use by another process (is another source running with the state directory {self.state_dir}?)")
        if "malformed" in text or "corrupt" in text:
            return RocoinError(
                f"{path}: the membership registry is corrupt ({text}): move it away to start with an empty fleet (devices then join again)"
            )
        return RocoinError(f"{path}: cannot open the membership registry ({text})")

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        path = self.path
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        foreign = f"{path}: not a rocoin membership registry"
        if not tables:
            if application_id not in (0, APPLICATION_ID):
                raise RocoinError(f"{foreign} (SQLite application id {application_id:#x}): move it away or give another state directory")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")  # a constant: PRAGMAs take no parameters
            conn.executemany(
                "INSERT INTO registry_meta (key, value) VALUES (?, ?)",
                [("format", FORMAT_NAME), ("schema_version", str(SCHEMA_VERSION)), ("created_at", repr(float(self._clock())))],
            )
            return
        if "registry_meta" not in tables or application_id != APPLICATION_ID:
            shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
            raise RocoinError(f"{foreign} (a SQLite database with the tables {shown}): move it away or give another state directory")
        meta = dict(conn.execute("SELECT key, value FROM registry_meta"))
        if meta.get("format") != FORMAT_NAME:
            raise RocoinError(f"{foreign} (format {short_repr(meta.get('format'))}): move it away or give another state directory")
        try:
            version = int(meta.get("schema_version", ""))
        except ValueError:
            version = 0
        if version > SCHEMA_VERSION:
            raise RocoinError(
                f"{path}: schema version {version} is newer than this rocoin's ({SCHEMA_VERSION}): a newer rocoin wrote it;"
                " upgrade rocoin, or move the file away to start with an empty fleet"
            )
        if version < 1 or not {"members", "events"} <= tables:
            raise RocoinError(
                f"{path}: the membership registry is corrupt (schema version {short_repr(meta.get('schema_version'))},"
                f" tables {', '.join(sorted(tables))}): move it away to start with an empty fleet"
            )

    # --- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file (and release its lock); further calls raise :class:`RocoinError`."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> MembershipRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._conn is None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RocoinError(f"{self.path}: the membership registry is closed")
        return self._conn

    def _now(self) -> float:
        now = self._clock()
        if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
            raise RocoinError(f"clock: {short_repr(now)}: expected a finite number of seconds")
        return float(now)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed when the block ends, rolled back on any error."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _record(self, conn: sqlite3.Connection, changes: list[_Change], now: float) -> None:
        """Write the event rows of ``changes`` (in the caller's transaction)."""
        if not changes:
            return
        conn.executemany(
            "INSERT INTO events (ts, kind, device_id, membership, reason, details_json) VALUES (?, ?, ?, ?, ?, ?)",
            [(now, c.kind, c.device_id, int(c.membership), c.reason, json.dumps(c.details, sort_keys=True)) for c in changes],
        )
        self._new_events += len(changes)
        if self._new_events >= _TRIM_EVERY:
            self._trim_events(conn)

    def _trim_events(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM events WHERE seq <= (SELECT max(seq) FROM events) - ?", (self.max_events,))
        self._new_events = 0

    def _log(self, changes: list[_Change]) -> None:
        """One line per change, after the commit (a rolled-back change is never logged)."""
        for change in changes:
            level = _MEMBERSHIP_LEVEL.get(change.kind, logging.INFO) if change.membership or change.kind == "refused" else logging.DEBUG
            if logger.isEnabledFor(level):
                logger.log(
                    level,
                    "device %s %s: %s",
                    change.device_id,
                    change.kind,
                    change.reason,
                    extra={"event": change.kind, "device": change.device_id, "membership": change.membership, **change.details},
                )

    def _profile(self, text: str, device_id: str) -> DeviceProfile:
        profile = self._profiles.get(text)
        if profile is None:
            try:
                profile = DeviceProfile.model_validate_json(text)
            except ValidationError as error:
                raise RocoinError(
                    f"{format_validation_error(error, f'{self.path}: device {device_id!r}: stored profile')};"
                    " the file was edited or damaged: forget the device or move the file away"
                ) from None
            if len(self._profiles) >= 2 * self.max_devices:
                self._profiles.clear()
            self._profiles[text] = profile
        return profile

    def _member(self, row: tuple) -> Member:
        device_id, profile_json, state, group, model_sha256, address, joined_at, last_seen, state_since = row
        profile = self._profile(profile_json, device_id)
        if profile.id != device_id or state not in STATES or (model_sha256 is not None and not _SHA256.fullmatch(model_sha256)):
            raise RocoinError(f"{self.path}: device {device_id!r}: the stored row is not valid; the file was edited or damaged")
        return Member(device_id, profile, state, group, model_sha256, address, joined_at, last_seen, state_since)

    def _read(self, conn: sqlite3.Connection, device_id: str) -> Member | None:
        row = conn.execute(f"SELECT {_MEMBER_COLUMNS} FROM members WHERE device_id = ?", (device_id,)).fetchone()
        return None if row is None else self._member(row)

    def _require(self, conn: sqlite3.Connection, device_id: str) -> Member:
        member = self._read(conn, device_id)
        if member is None:
            raise UnknownDeviceError(f"device_id {device_id!r}: not a member (it never joined, or was pruned or forgotten)")
        return member

    def _resume_state(self, conn: sqlite3.Connection, device_id: str) -> str | None:
        return conn.execute("SELECT resume_state FROM members WHERE device_id = ?", (device_id,)).fetchone()[0]

    # --- joining ----------------------------------------------------------------------------

    def join(self, profile: DeviceProfile | Mapping[str, Any], *, credential: str | None, address: str | None = None) -> Member:
        """Register ``profile.id`` (state ``joining``), or take a known device back.

        The first join binds the id to ``credential``; a later one must present the same
        (:class:`IdentityError` otherwise, and the member is left as it was). A rejoin updates the
        profile and the address, sets ``joining`` and keeps the group and the model. A device the
        source dials joins with ``credential=None`` and its ``address`` (by default the
        profile's). A first join beyond ``max_devices`` raises :class:`DeviceLimitError`.
        """
        profile = _check_profile(profile)
        if address is None:
            address = profile.address
        address = _check_address(address)
        if profile.address is not None and address != profile.address:
            raise RocoinError(f"address {address!r}: differs from the profile's address {profile.address!r}")
        if credential is None:
            if address is None:
                raise RocoinError(
                    "credential: none given: a device that joins over its own stream must present one (only a device the source dials,"
                    " with an address, has none)"
                )
        else:
            credential = _check_credential(credential)
        device_id = profile.id
        profile_json = _profile_json(profile)
        refused: str | None = None
        with self._lock:
            now = self._now()
            with self._write() as conn:
                row = conn.execute(
                    "SELECT credential_salt, credential_hash, state, profile_json, address, group_index, model_sha256, joined_at,"
                    " state_since FROM members WHERE device_id = ?",
                    (device_id,),
                ).fetchone()
                if row is None:
                    if self._count >= self.max_devices:
                        gone = conn.execute("SELECT count(*) FROM members WHERE state = 'gone'").fetchone()[0]
                        raise DeviceLimitError(
                            f"device_id {device_id!r}: refused: the registry holds {self._count} devices, its maximum"
                            f" ({gone} of them gone): prune gone devices or raise max_devices"
                        )
                    salt = None if credential is None else secrets.token_bytes(16)
                    digest = None if credential is None else _hash_credential(credential, salt)  # type: ignore[arg-type]
                    conn.execute(
                        "INSERT INTO members (device_id, profile_json, state, resume_state, group_index, model_sha256, address,"
                        " credential_salt, credential_hash, joined_at, last_seen, state_since)"
                        " VALUES (?, ?, 'joining', NULL, NULL, NULL, ?, ?, ?, ?, ?, ?)",
                        (device_id, profile_json, address, salt, digest, now, now, now),
                    )
                    how = "dialed by the source" if credential is None else "over its own stream"
                    change = _Change("joined", device_id, True, f"first join ({how})", {"address": address})
                    self._record(conn, [change], now)
                    self._count += 1
                    member = Member(device_id, profile, "joining", None, None, address, now, now, now)
                else:
                    salt, digest, previous, old_profile, old_address, group, model_sha256, joined_at, state_since = row
                    refused = self._identity_refusal(device_id, credential, salt, digest, old_address)
                    if refused is not None:
                        change = _Change("refused", device_id, False, refused, {"state": previous})
                    else:
                        conn.execute(
                            "UPDATE members SET profile_json = ?, address = ?, state = 'joining', resume_state = NULL,"
                            " last_seen = ?, state_since = ? WHERE device_id = ?",
                            (profile_json, address, now, now, device_id),
                        )
                        details = {
                            "previous_state": previous,
                            "group": group,
                            "profile_changed": profile_json != old_profile,
                            "address_changed": address != old_address,
                        }
                        if previous == "gone":
                            details["gone_for_s"] = _seconds(now - state_since)
                            change = _Change("rejoined", device_id, True, "joined again after it was gone", details)
                        else:
                            changed = bool(details["profile_changed"] or details["address_changed"])
                            why = "with a new profile or address" if changed else "with the same profile"
                            change = _Change("reconnected", device_id, changed, f"joined again while {previous} ({why})", details)
                        member = Member(device_id, profile, "joining", group, model_sha256, address, joined_at, now, now)
                    self._record(conn, [change], now)
            self._log([change])
            if refused is not None:
                raise IdentityError(f"device_id {device_id!r}: join refused: {refused}")
            return member

    @staticmethod
    def _identity_refusal(
        device_id: str, credential: str | None, salt: bytes | None, digest: bytes | None, address: str | None
    ) -> str | None:
        """Why a join under a bound id is refused, or ``None`` when it may proceed."""
        if digest is None:
            if credential is not None:
                return f"the id belongs to a device the source dials (at {address}); a device joining over its own stream cannot take it"
            return None
        if credential is None:
            return "the id is bound to the credential of a device that joined over its own stream; a dialed device cannot take it"
        if not hmac.compare_digest(_hash_credential(credential, salt), digest):  # type: ignore[arg-type]
            return "the credential differs from the one this id first joined with (a device cannot take over another device's id)"
        return None

    # --- serving, moving ---------------------------------------------------------------------

    def mark_serving(self, device_id: str, group: int, model_sha256: str) -> Member:
        """The device answered a health check with ``model_sha256``: it counts for ``group``.

        A membership change when the group or the model differs from the registry's; a gone
        device must join again first (:class:`StateError`).
        """
        device_id, group, model_sha256 = _check_id(device_id), _check_group(group), _check_sha256(model_sha256)
        with self._lock:
            now = self._now()
            with self._write() as conn:
                member = self._require(conn, device_id)
                if member.state == "gone":
                    raise StateError(f"device_id {device_id!r}: gone since {member.state_since:.3f}: it must join again before it serves")
                moved = (member.group, member.model_sha256) != (group, model_sha256)
                if member.state == "serving" and not moved:
                    conn.execute("UPDATE members SET last_seen = ? WHERE device_id = ?", (now, device_id))
                    changes = []
                else:
                    since = member.state_since if member.state == "serving" else now
                    conn.execute(
                        "UPDATE members SET state = 'serving', resume_state = NULL, group_index = ?, model_sha256 = ?,"
                        " last_seen = ?, state_since = ? WHERE device_id = ?",
                        (group, model_sha256, now, since, device_id),
                    )
                    details = {
                        "previous_state": member.state,
                        "group": group,
                        "model_sha256": model_sha256,
                        "previous_group": member.group,
                        "previous_model_sha256": member.model_sha256,
                    }
                    why = f"serves group {group}" + (" (a new group or model)" if moved else "")
                    changes = [_Change("serving", device_id, moved, why, details)]
                    self._record(conn, changes, now)
            self._log(changes)
            return self._require(self._connection(), device_id)

    def assign(self, device_id: str, group: int, model_sha256: str) -> Member:
        """Move the device to ``group`` with its model (a re-plan's decision; a membership change).

        A serving device becomes ``joining``: it counts for the new group only once
        :meth:`mark_serving` confirms it answered a health check with the new model's hash. A
        suspect one stays suspect and, seen again, returns as ``joining``. Assigning the group and
        model it already has changes nothing.
        """
        device_id, group, model_sha256 = _check_id(device_id), _check_group(group), _check_sha256(model_sha256)
        with self._lock:
            now = self._now()
            with self._write() as conn:
                member = self._require(conn, device_id)
                if member.state == "gone":
                    raise StateError(
                        f"device_id {device_id!r}: gone since {member.state_since:.3f}: it must join again before it is assigned"
                    )
                changes = []
                if (member.group, member.model_sha256) != (group, model_sha256):
                    state = "joining" if member.state == "serving" else member.state
                    resume = "joining" if member.state == "suspect" else None
                    since = now if state != member.state else member.state_since
                    conn.execute(
                        "UPDATE members SET state = ?, resume_state = ?, group_index = ?, model_sha256 = ?, state_since = ? WHERE device_id = ?",
                        (state, resume, group, model_sha256, since, device_id),
                    )
                    details = {
                        "previous_state": member.state,
                        "state": state,
                        "group": group,
                        "model_sha256": model_sha256,
                        "previous_group": member.group,
                        "previous_model_sha256": member.model_sha256,
                    }
                    where = "none" if member.group is None else f"group {member.group}"
                    changes = [_Change("assigned", device_id, True, f"assigned to group {group} (was {where})", details)]
                    self._record(conn, changes, now)
            self._log(changes)
            return self._require(self._connection(), device_id)

    def standby(self, device_id: str, reason: str) -> Member:
        """A re-plan made the device a spare: it serves no group (``group`` is ``None``) and is
        ``joining`` until it is assigned one (a membership change when it had a group). A suspect
        one stays suspect and, seen again, returns as ``joining``."""
        device_id, reason = _check_id(device_id), _check_reason(reason)
        with self._lock:
            now = self._now()
            with self._write() as conn:
                member = self._require(conn, device_id)
                if member.state == "gone":
                    raise StateError(f"device_id {device_id!r}: gone since {member.state_since:.3f}: it must join again first")
                changes = []
                if member.group is not None or member.state == "serving":
                    state = "joining" if member.state == "serving" else member.state
                    resume = "joining" if member.state == "suspect" else None
                    since = now if state != member.state else member.state_since
                    conn.execute(
                        "UPDATE members SET state = ?, resume_state = ?, group_index = NULL, state_since = ? WHERE device_id = ?",
                        (state, resume, since, device_id),
                    )
                    details = {"previous_state": member.state, "state": state, "previous_group": member.group}
                    changes = [_Change("standby", device_id, member.group is not None, reason, details)]
                    self._record(conn, changes, now)
            self._log(changes)
            return self._require(self._connection(), device_id)

    # --- liveness ---------------------------------------------------------------------------

    def mark_suspect(self, device_id: str, reason: str) -> Member:
        """The device's link broke or it stopped answering: ``suspect`` (not a membership change).

        The grace period runs from the first suspicion: a suspect device stays as it is, and so
        does a gone one.
        """
        device_id, reason = _check_id(device_id), _check_reason(reason)
        with self._lock:
            now = self._now()
            with self._write() as conn:
                member = self._require(conn, device_id)
                changes = []
                if member.state in ("joining", "serving"):
                    conn.execute(
                        "UPDATE members SET state = 'suspect', resume_state = ?, state_since = ? WHERE device_id = ?",
                        (member.state, now, device_id),
                    )
                    changes = [_Change("suspect", device_id, False, reason, {"previous_state": member.state, "group": member.group})]
                    self._record(conn, changes, now)
            self._log(changes)
            return self._require(self._connection(), device_id)

    def seen(self, device_id: str) -> Member:
        """The device answered (a query, a health check, a keepalive): update ``last_seen``.

        A suspect device seen within the grace period returns to the state it had (``serving``,
        or ``joining``): a ``recovered`` event, not a membership change. Seen later than that
        (before :meth:`expire` ran) it is ``gone`` now, as :meth:`expire` would have made it, and
        must join again. A gone device stays gone.
        """
        device_id = _check_id(device_id)
        with self._lock:
            now = self._now()
            conn = self._connection()
            # The common case in one statement (atomic on its own): a joining or serving device.
            updated = conn.execute(
                "UPDATE members SET last_seen = ? WHERE device_id = ? AND state IN ('joining', 'serving')", (now, device_id)
            ).rowcount
            if updated:
                return self._require(conn, device_id)
            changes = []
            with self._write() as conn:
                member = self._require(conn, device_id)
                if member.state == "suspect":
                    suspect_for = now - member.state_since
                    details = {"suspect_for_s": _seconds(suspect_for), "grace_s": self.grace_s, "group": member.group}
                    if suspect_for <= self.grace_s:
                        state = self._resume_state(conn, device_id) or "serving"
                        reason = f"seen again after {_seconds(suspect_for)} s, within the grace period"
                        changes = [_Change("recovered", device_id, False, reason, {**details, "state": state})]
                    else:
                        state = "gone"
                        reason = (
                            f"seen again after {_seconds(suspect_for)} s as suspect, longer than the grace period of {self.grace_s:g} s"
                        )
                        changes = [_Change("gone", device_id, True, reason, details)]
                    conn.execute(
                        "UPDATE members SET state = ?, resume_state = NULL, last_seen = ?, state_since = ? WHERE device_id = ?",
                        (state, now, now, device_id),
                    )
                    self._record(conn, changes, now)
                else:
                    conn.execute("UPDATE members SET last_seen = ? WHERE device_id = ?", (now, device_id))
            self._log(changes)
            return self._require(self._connection(), device_id)

    def expire(self, grace_s: float | None = None) -> list[Member]:
        """Suspect devices whose suspicion is older than ``grace_s`` (the registry's by default)
        become ``gone``, each a membership change; returns them."""
        grace = self.grace_s if grace_s is None else _check_seconds(grace_s, "grace_s")
        with self._lock:
            now = self._now()
            with self._write() as conn:
                rows = conn.execute(
                    "SELECT device_id, state_since, group_index FROM members WHERE state = 'suspect' AND state_since < ? ORDER BY device_id",
                    (now - grace,),
                ).fetchall()
                conn.executemany(
                    "UPDATE members SET state = 'gone', resume_state = NULL, state_since = ? WHERE device_id = ?",
                    [(now, device_id) for device_id, _, _ in rows],
                )
                changes = [
                    _Change(
                        "gone",
                        device_id,
                        True,
                        f"suspect for {_seconds(now - since)} s, longer than the grace period of {grace:g} s",
                        {"suspect_for_s": _seconds(now - since), "grace_s": grace, "group": group},
                    )
                    for device_id, since, group in rows
                ]
                self._record(conn, changes, now)
                members = [self._require(conn, device_id) for device_id, _, _ in rows]
            self._log(changes)
            return members

    def mark_all_suspect(self, reason: str) -> list[str]:
        """Every live device becomes ``suspect`` now, its grace period starting now (also those
        already suspect); returns their ids.

        For a source that starts on an existing registry: its streams are gone, so every device
        has to reconnect (or be dialed and seen) within the grace period, and the time the source
        was down does not count against them.
        """
        reason = _check_reason(reason)
        with self._lock:
            now = self._now()
            with self._write() as conn:
                rows = conn.execute(
                    "SELECT device_id, state, resume_state, group_index FROM members WHERE state IN ('joining', 'serving', 'suspect')"
                    " ORDER BY device_id"
                ).fetchall()
                conn.executemany(
                    "UPDATE members SET state = 'suspect', resume_state = ?, state_since = ? WHERE device_id = ?",
                    [(resume if state == "suspect" else state, now, device_id) for device_id, state, resume, _ in rows],
                )
                changes = [_Change("suspect", d, False, reason, {"previous_state": s, "group": g}) for d, s, _, g in rows]
                self._record(conn, changes, now)
            self._log(changes)
            return [device_id for device_id, _, _, _ in rows]

    # --- leaving ----------------------------------------------------------------------------

    def leave(self, device_id: str, reason: str) -> Member:
        """The device left (it said so, or an operator drained it): ``gone`` at once, a
        membership change. A gone device stays as it is."""
        device_id, reason = _check_id(device_id), _check_reason(reason)
        with self._lock:
            now = self._now()
            with self._write() as conn:
                member = self._require(conn, device_id)
                changes = []
                if member.live:
                    conn.execute(
                        "UPDATE members SET state = 'gone', resume_state = NULL, state_since = ? WHERE device_id = ?", (now, device_id)
                    )
                    changes = [_Change("left", device_id, True, reason, {"previous_state": member.state, "group": member.group})]
                    self._record(conn, changes, now)
            self._log(changes)
            return self._require(self._connection(), device_id)

    def forget(self, device_id: str, reason: str) -> Member:
        """Remove the device whatever its state, and the binding of its id to its credential (an
        operator's act: a device replaced, its key lost). Returns it as it was."""
        device_id, reason = _check_id(device_id), _check_reason(reason)
        with self._lock:
            now = self._now()
            with self._write() as conn:
                member = self._require(conn, device_id)
                conn.execute("DELETE FROM members WHERE device_id = ?", (device_id,))
                changes = [_Change("forgotten", device_id, member.live, reason, {"previous_state": member.state, "group": member.group})]
                self._record(conn, changes, now)
            self._count -= 1
            self._log(changes)
            return member

    def prune(self, older_than_s: float) -> list[str]:
        """Remove the devices gone for longer than ``older_than_s``, with the binding of their ids
        (a ``pruned`` event each; the events stay); returns their ids."""
        older_than_s = _check_seconds(older_than_s, "older_than_s")
        with self._lock:
            now = self._now()
            with self._write() as conn:
                rows = conn.execute(
                    "SELECT device_id, state_since FROM members WHERE state = 'gone' AND state_since < ? ORDER BY device_id",
                    (now - older_than_s,),
                ).fetchall()
                conn.executemany("DELETE FROM members WHERE device_id = ?", [(device_id,) for device_id, _ in rows])
                changes = [
                    _Change("pruned", d, False, f"gone for {_seconds(now - since)} s", {"gone_for_s": _seconds(now - since)})
                    for d, since in rows
                ]
                self._record(conn, changes, now)
                self._trim_events(conn)
            self._count -= len(rows)
            self._log(changes)
            return [device_id for device_id, _ in rows]

    # --- reading ----------------------------------------------------------------------------

    def get(self, device_id: str) -> Member | None:
        """The member with this id, or ``None``."""
        device_id = _check_id(device_id)
        with self._lock:
            return self._read(self._connection(), device_id)

    def members(self, states: str | Iterable[str] | None = None) -> list[Member]:
        """The members in ``states`` (all by default), by id."""
        states = _check_states(states)
        marks = ", ".join("?" * len(states))
        with self._lock:
            rows = self._connection().execute(f"SELECT {_MEMBER_COLUMNS} FROM members WHERE state IN ({marks}) ORDER BY device_id", states)
            return [self._member(row) for row in rows]

    def live(self) -> list[Member]:
        """The members still in the fleet: joining, serving or suspect."""
        return self.members(LIVE_STATES)

    def count(self, states: str | Iterable[str] | None = None) -> int:
        states = _check_states(states)
        marks = ", ".join("?" * len(states))
        with self._lock:
            return self._connection().execute(f"SELECT count(*) FROM members WHERE state IN ({marks})", states).fetchone()[0]

    def serving_groups(self) -> dict[int, list[str]]:
        """The serving devices of each group that has any (a group with none is absent)."""
        with self._lock:
            rows = self._connection().execute(
                "SELECT group_index, device_id FROM members WHERE state = 'serving' AND group_index IS NOT NULL ORDER BY group_index, device_id"
            )
            groups: dict[int, list[str]] = {}
            for group, device_id in rows:
                groups.setdefault(group, []).append(device_id)
            return groups

    def events(
        self,
        *,
        since: float | None = None,
        after: int | None = None,
        device_id: str | None = None,
        kinds: str | Iterable[str] | None = None,
        membership_only: bool = False,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[Event]:
        """Recorded events in order of ``seq`` (the newest first when asked): those at or after
        time ``since``, after sequence number ``after`` (a cursor: the last ``seq`` read), of one
        device, of some kinds, only membership changes; at most ``limit``."""
        clauses, params = [], []
        if since is not None:
            clauses.append("ts >= ?")
            params.append(_check_seconds(since, "since"))
        if after is not None:
            clauses.append("seq > ?")
            params.append(_check_count(after, "after", 0, 2**63 - 1))
        if device_id is not None:
            clauses.append("device_id = ?")
            params.append(_check_id(device_id))
        if kinds is not None:
            kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
            if not kinds or not all(isinstance(k, str) for k in kinds):
                raise RocoinError(f"kinds {short_repr(kinds)}: expected one or more event kinds")
            clauses.append(f"kind IN ({', '.join('?' * len(kinds))})")
            params.extend(kinds)
        if membership_only:
            clauses.append("membership = 1")
        limit = _check_count(limit, "limit", 1, MAX_EVENTS_PAGE)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "DESC" if newest_first else "ASC"
        with self._lock:
            rows = self._connection().execute(
                f"SELECT seq, ts, kind, device_id, membership, reason, details_json FROM events {where} ORDER BY seq {order} LIMIT ?",
                (*params, limit),
            )
            return [Event(seq, ts, kind, dev, bool(m), reason, json.loads(details)) for seq, ts, kind, dev, m, reason, details in rows]
