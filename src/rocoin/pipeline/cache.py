"""One content-hash cache for the offline steps of every pipeline (demo, experiments, benches).

A step is run through :meth:`StepCache.run` with the *inputs* that decide its result (settings,
the keys of the steps it reads, the SHA-256 of files it reads). Their hash is the step's key; the
step is reused when

* its outputs are there and were made with the same key, and
* its ``load()`` returns without raising :class:`CannotReuse`;

else ``make()`` runs. ``fresh=True`` redoes each step once in this cache object (a step made in this
run is then reused by later callers). Two ways to say which key made an output:

* **named outputs** (``outputs`` is a list of paths, e.g. ``teacher.pt``): the key is recorded in
  the folder's ``steps.json`` (``{step: {"key", "inputs", "seconds"}}``) once the step finished;
* **content-addressed outputs** (``outputs`` is a function of the key, e.g.
  ``lambda key: [folder / f"students-{key}.pt"]``): the key is in the file name, so the file is
  its own record and processes sharing the folder need no common index (writes are atomic: two of
  them at worst make the same thing twice).

``CannotReuse`` is this package's signal for "the output is there but not what the step would make
now" (other settings, unreadable); it never reaches the user. ``RocoinError`` keeps its meaning:
bad input, reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.fileio import write_json_atomic

logger = logging.getLogger(__name__)

T = TypeVar("T")
Say = Callable[[str], None]
#: A step's outputs: fixed paths, or the paths for a key (content-addressed).
Outputs = Sequence[Path] | Callable[[str], Sequence[Path]]

INDEX_FILE = "steps.json"
KEY_CHARS = 16


class CannotReuse(Exception):
    """Raised by a step's ``load()``: the output on disk cannot stand for this step now (made
    with other settings, or unreadable); the cache then makes it again."""


def digest(value: Any) -> str:
    """A short content hash of a JSON-able value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:KEY_CHARS]


def file_key(path: Path) -> str:
    """A short SHA-256 of a file's bytes: the key of a step input that is a file."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:KEY_CHARS]


def step_key(inputs: Mapping[str, Any] | str) -> str:
    """The key of a step: the hash of its inputs, or, for a step whose only input is one upstream
    output, that output's key as it is."""
    return inputs if isinstance(inputs, str) else digest(dict(inputs))


@contextmanager
def unreadable_as_stale(what: str = "it") -> Iterator[None]:
    """In a ``load()``: a file the safe readers refuse (:class:`RocoinError`) is made again."""
    try:
        yield
    except RocoinError as exc:
        raise CannotReuse(f"{what} cannot be read: {exc}") from None


@dataclass(frozen=True)
class Done(Generic[T]):
    """What a step gave: its key (downstream steps put it in theirs), its value, and how."""

    key: str
    value: T
    reused: bool
    seconds: float


@dataclass
class StepCache:
    """Runs steps, reusing the finished ones (see the module docstring)."""

    folder: Path
    fresh: bool = False
    say: Say = logger.info
    index_name: str = INDEX_FILE
    #: per step name: {"seconds", "reused"[, "made_in_s"]} of this run, for reports
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)
    _index: dict[str, dict[str, Any]] | None = field(default=None, repr=False)
    _made: set[tuple[str, str]] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)

    @property
    def index_path(self) -> Path:
        return self.folder / self.index_name

    def run(self, name: str, inputs: Mapping[str, Any] | str, outputs: Outputs, make: Callable[[], T], load: Callable[[], T]) -> Done[T]:
        """Reuse step ``name`` when its key and outputs match and ``load()`` works; else ``make()``."""
        key = step_key(inputs)
        addressed = callable(outputs)
        paths = list(outputs(key) if callable(outputs) else outputs)
        reused = self._try_reuse(name, key, paths, addressed, load)
        if reused is not None:
            return reused
        return self._make(name, key, inputs, addressed, make)

    def mark_made(self, name: str, key: str) -> None:
        """Step ``name`` with ``key`` was made for this run by another process sharing the folder
        (content-addressed outputs): reuse it, also with ``fresh``."""
        self._made.add((name, key))

    def _try_reuse(self, name: str, key: str, paths: list[Path], addressed: bool, load: Callable[[], T]) -> Done[T] | None:
        shown = ", ".join(p.name for p in paths)
        if self.fresh and (name, key) not in self._made:
            return None
        entry = None if addressed else self._entries().get(name)
        if not addressed and entry is None:
            return None
        if entry is not None and entry.get("key") != key:
            self.say(f"{name}: its inputs changed since the last run; redoing it")
            return None
        if not all(p.exists() for p in paths):
            return None
        try:
            value = load()
        except CannotReuse as exc:
            self.say(f"{name}: {shown} cannot be reused ({exc}); redoing it")
            return None
        self.say(f"reusing {name} ({shown})")
        made_in = entry.get("seconds") if entry else None
        self.timings[name] = {"seconds": 0.0, "reused": True, "made_in_s": made_in}
        return Done(key, value, True, 0.0)

    def _make(self, name: str, key: str, inputs: Mapping[str, Any] | str, addressed: bool, make: Callable[[], T]) -> Done[T]:
        if not addressed:
            self._entries().pop(name, None)
            self._save()
        started = time.perf_counter()
        value = make()
        seconds = time.perf_counter() - started
        if not addressed:
            self._entries()[name] = {"key": key, "inputs": inputs, "seconds": round(seconds, 3)}
            self._save()
        self._made.add((name, key))
        self.timings[name] = {"seconds": seconds, "reused": False}
        return Done(key, value, False, seconds)

    def _entries(self) -> dict[str, dict[str, Any]]:
        if self._index is None:
            self._index = {}
            if not self.fresh and self.index_path.is_file():
                try:
                    data = json.loads(self.index_path.read_text(encoding="utf-8"))
                    self._index = data if isinstance(data, dict) else {}
                except (OSError, ValueError):
                    self._index = {}
        return self._index

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.index_path, self._entries())
