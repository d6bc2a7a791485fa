"""The command line's one progress renderer: rich bars on stderr when it is a terminal.

Library code reports progress through a :data:`rocoin.contracts.progress.Progress` callback;
the commands pass :func:`rich_progress`. Where stderr is not a terminal (CI, a log file) it falls
back to the library's log lines.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rocoin.contracts.progress import Advance, format_fields, log_progress


@contextmanager
def rich_progress(label: str, total: int) -> Iterator[Advance]:
    """A rich bar with elapsed and remaining time and the fields of the last step."""
    if not sys.stderr.isatty():
        with log_progress(label, total) as advance:
            yield advance
        return
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
            bar.update(task, advance=steps, info=format_fields(fields))

        yield advance


@contextmanager
def rich_counter(label: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """:func:`rich_progress` for callbacks that report ``(done, total)`` (the simulator's)."""
    with rich_progress(label, total) as advance:
        shown = [0]

        def report(done: int, _total: int) -> None:
            advance(done - shown[0])
            shown[0] = done

        yield report
