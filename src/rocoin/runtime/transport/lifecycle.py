"""What every server process of the runtime shares: stopping on SIGTERM/SIGINT, and the ready
file through which a parent learns the address a child bound (``--listen HOST:0``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rocoin.contracts.errors import UnavailableError

#: How often :func:`wait_ready_file` looks for the ready file, and how long it waits by default.
READY_POLL_S = 0.05
READY_TIMEOUT_S = 60.0


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Set ``stop`` on SIGTERM/SIGINT while the block runs (where this thread may handle signals)."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def wait_ready_file(path: str | os.PathLike[str], *, timeout_s: float = READY_TIMEOUT_S, process: Any = None) -> dict[str, Any]:
    """For a parent that spawned a server with ``--ready-file PATH``: the server's ready record.

    Polls until the file appears (it is written atomically), raising :class:`UnavailableError` after
    ``timeout_s`` or as soon as ``process`` (a ``subprocess.Popen``) has exited.
    """
    path = Path(path)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            pass
        if process is not None and process.poll() is not None:
            raise UnavailableError(f"the server exited with code {process.returncode} before it was ready ({path} never appeared)")
        if time.monotonic() > deadline:
            raise UnavailableError(f"{path}: the server was not ready after {timeout_s:g} s")
        time.sleep(READY_POLL_S)
