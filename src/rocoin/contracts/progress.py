"""Progress reporting: library code reports through a callback, the command line renders it.

A long step asks its ``progress`` argument for a task and advances it::

    with progress("distill epoch 1/3", steps) as advance:
        for batch in batches:
            ...
            advance(loss=loss)          # one step, with fields shown beside the bar

``progress`` is any :data:`Progress`: :func:`log_progress` (the library's default: a log line at
most every :data:`LOG_INTERVAL_S`), :func:`silent`, or the command line's rich bars
(``rocoin.cli.progress``). Library code never draws on the terminal itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

logger = logging.getLogger("rocoin.progress")

#: Seconds between log lines of :func:`log_progress`.
LOG_INTERVAL_S = 30.0

#: ``advance(steps=1, **fields)``: move the task on and show ``fields`` (e.g. loss) beside it.
Advance = Callable[..., None]
#: ``progress(label, total)``: a context manager that yields the :data:`Advance` of a new task.
Progress = Callable[[str, int], AbstractContextManager[Advance]]


@contextmanager
def log_progress(label: str, total: int) -> Iterator[Advance]:
    """Report a task as log lines: at most one every :data:`LOG_INTERVAL_S`, and one at the end."""
    state = {"done": 0, "last": time.monotonic()}

    def advance(steps: int = 1, **fields: float) -> None:
        state["done"] += steps
        now = time.monotonic()
        if now - state["last"] >= LOG_INTERVAL_S or state["done"] >= total:
            state["last"] = now
            logger.info("%s: %d/%d %s", label, state["done"], total, format_fields(fields))

    yield advance


@contextmanager
def silent(label: str, total: int) -> Iterator[Advance]:
    """Report nothing."""
    yield lambda steps=1, **fields: None


def format_fields(fields: dict[str, float]) -> str:
    """``{"loss": 0.123456}`` -> ``"loss 0.1235"``."""
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
