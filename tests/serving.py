"""A whole serving stack in this process, for the hardening and fuzz tests: the three devices of
``test_device``'s bundle and the source with its gRPC and REST APIs (the real ``serve_source``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import device as profile

from rocoin.contracts.fleet import Fleet
from rocoin.runtime.api.server import serve_source
from rocoin.runtime.device.server import DeviceServer, start_device
from rocoin.runtime.source.source import Source

DEVICE_TOKEN = "device-token-0123456789abcdef"
DEVICES = ("a", "b", "c")


@dataclass
class Stack:
    source: Source
    devices: dict[str, DeviceServer]
    grpc_address: str
    http_address: str
    extra: dict[str, Any] = field(default_factory=dict)

    def marked_down(self) -> float:
        """Times any device was marked down since the stack started."""
        registry = self.source.metrics.registry
        return sum(registry.get_sample_value("rocoin_device_marked_down_total", {"device": d}) or 0.0 for d in self.devices)

    def device_failures(self) -> float:
        registry = self.source.metrics.registry
        return sum(registry.get_sample_value("rocoin_device_failures_total", {"device": d}) or 0.0 for d in self.devices)


@contextlib.asynccontextmanager
async def serving_stack(bundle: Path, *, deadline_s: float = 2.0, api_token: str | None = None, **serve_options) -> AsyncIterator[Stack]:
    """Devices a, b, c (with the device token) and the source serving gRPC + REST on loopback."""
    devices = {name: await start_device(bundle, name, token=DEVICE_TOKEN) for name in DEVICES}
    stop = asyncio.Event()
    task = None
    try:
        fleet = Fleet(devices=[profile(name, 20, 4, 300, 0.1, address=d.address) for name, d in devices.items()])
        source = Source(bundle, fleet, deadline_s=deadline_s, token=DEVICE_TOKEN)
        with tempfile.TemporaryDirectory() as folder:
            ready = Path(folder) / "source.ready.json"
            task = asyncio.ensure_future(
                serve_source(
                    source, "127.0.0.1:0", http_listen="127.0.0.1:0", api_token=api_token, ready_file=ready, stop=stop, **serve_options
                )
            )
            while not ready.exists():
                if task.done():
                    task.result()  # raises what stopped it
                await asyncio.sleep(0.01)
            info = json.loads(ready.read_text())
        yield Stack(source, devices, info["address"], info["http_address"])
    finally:
        stop.set()
        if task is not None:
            await task
        for d in devices.values():
            await d.stop(0)


class BackgroundStack:
    """:func:`serving_stack` on an event loop of its own thread, for synchronous tests (hypothesis)."""

    def __init__(self, bundle: Path, **options) -> None:
        self._bundle, self._options = bundle, options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._context = None
        self.stack: Stack | None = None

    def __enter__(self) -> Stack:
        self._thread.start()
        self._context = serving_stack(self._bundle, **self._options)
        self.stack = self.call(self._context.__aenter__())
        return self.stack

    def __exit__(self, *exc) -> None:
        try:
            self.call(self._context.__aexit__(None, None, None))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def call(self, coro, timeout_s: float = 30.0):
        """Run ``coro`` on the stack's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)
