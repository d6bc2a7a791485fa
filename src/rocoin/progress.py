"""Progress bars for long steps: a rich bar on stderr when it is a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

logger = logging.getLogger("rocoin.progress")

#: Seconds between log lines when stderr is not a terminal.
LOG_INTERVAL_S = 30.0

#: ``advance(steps=1, **fields)``: move the bar and show ``fields`` (e.g. loss) beside it.
Advance = Callable[..., None]


@contextmanager
def progress_bar(label: str, total: int) -> Iterator[Advance]:
    """Yield an ``advance`` callback for a task of ``total`` steps."""
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(label, total=total, info="")

            def advance(steps: int = 1, **fields: float) -> None:
                bar.update(task, advance=steps, info=_fields(fields))

            yield advance
        return
    state = {"done": 0, "last": time.monotonic()}

    def advance_log(steps: int = 1, **fields: float) -> None:
        state["done"] += steps
        now = time.monotonic()
        if now - state["last"] >= LOG_INTERVAL_S or state["done"] >= total:
            state["last"] = now
            logger.info("%s: %d/%d %s", label, state["done"], total, _fields(fields))

    yield advance_log


def _fields(fields: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
