"""What a benchmark prints, also written to a file: the README's figures come from these files."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path

from rocoin.contracts.fileio import write_text_atomic


class Tee(io.TextIOBase):
    """A stream that writes to ``stream`` and keeps a copy in ``lines``."""

    def __init__(self, stream, lines: list[str]) -> None:
        self.stream, self.lines = stream, lines

    def write(self, text: str) -> int:
        self.lines.append(text)
        return self.stream.write(text)


@contextlib.contextmanager
def report_to(path: Path | None) -> Iterator[None]:
    """Print as usual inside the block; at its end write everything printed to ``path`` (atomically)."""
    lines: list[str] = []
    with contextlib.redirect_stdout(Tee(sys.stdout, lines)):
        yield
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "".join(lines))
