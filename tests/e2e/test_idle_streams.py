"""Idle streams under the keepalive settings, in real time scaled 10x (8 s per test): a soak."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("grpc_health")

from conftest import device as profile  # noqa: E402
from serving import DEVICE_TOKEN  # noqa: E402
from test_device import make_bundle  # noqa: E402

from rocoin.contracts.fleet import Fleet  # noqa: E402
from rocoin.runtime.device.server import start_device  # noqa: E402
from rocoin.runtime.source.source import Source  # noqa: E402
from rocoin.runtime.transport.keepalive import KEEPALIVE, Keepalive  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def _idle_streams(bundle, client: Keepalive, server: Keepalive, idle_s: float):
    """Devices whose servers permit ``server``'s pings, a source pinging at ``client``'s; idle for
    ``idle_s``, then one query. Returns (times marked down, missing groups of the query)."""

    async def main():
        devices = [await start_device(bundle, n, token=DEVICE_TOKEN, keepalive=server) for n in ("a", "b", "c")]
        try:
            fleet = Fleet(devices=[profile(d.worker.device_id, 20, 4, 300, 0.1, address=d.address) for d in devices])
            async with Source(bundle, fleet, deadline_s=2.0, token=DEVICE_TOKEN, keepalive=client) as source:
                await asyncio.sleep(idle_s)
                registry = source.metrics.registry
                downs = sum(registry.get_sample_value("rocoin_device_marked_down_total", {"device": n}) or 0 for n in ("a", "b", "c"))
                result = await source.infer(np.zeros((1, 1, 8, 8), dtype=np.uint8))
                return downs, result.missing_groups
        finally:
            for d in devices:
                await d.stop(0)

    return asyncio.run(main())


#: The default configuration 10x faster: a ping per second (gRPC core sends keepalive pings at
#: most once a second, so it cannot go faster), 8 per stream while idle; a server with gRPC's
#: default policy lets 2 early pings pass, then strikes twice, then GOAWAY (~6 s).
SCALED = Keepalive(time_ms=KEEPALIVE.time_ms // 10, timeout_ms=KEEPALIVE.timeout_ms // 10)
IDLE_S = 8.0


def test_an_idle_cluster_keeps_its_streams_with_the_real_configuration_scaled_in_time(bundle):
    downs, missing = _idle_streams(bundle, SCALED, SCALED, idle_s=IDLE_S)
    assert downs == 0 and missing == []


def test_a_server_that_does_not_permit_the_pings_drops_the_idle_streams(bundle):
    """The control: what the idle cluster did before (device servers kept gRPC's ping policy)."""
    strict = Keepalive(time_ms=600_000)  # permits one ping per 5 minutes, like gRPC's default
    downs, _ = _idle_streams(bundle, SCALED, strict, idle_s=IDLE_S)
    assert downs >= 1
