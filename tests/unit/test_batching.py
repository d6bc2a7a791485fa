"""The source's dynamic batcher over in-memory links (no sockets): queued queries share one message
per device and each gets exactly the answer it would get alone, a lone query is never held, every
query keeps its own deadline, no message is larger than the source or a device allows, a queue
delay of 0 turns batching off, and a failed message counts once against its device."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from test_gather import INPUT_CHW, MemorySource  # noqa: E402
from test_gather import bundle as gather_bundle  # noqa: E402

from rocoin.contracts.errors import RocoinError  # noqa: E402
from rocoin.contracts.fileio import validate  # noqa: E402
from rocoin.runtime.api.options import SourceOptions  # noqa: E402
from rocoin.runtime.source.gather import FAILURES_TO_MARK_DOWN, STATUS_NAMES  # noqa: E402
from rocoin.runtime.source.link import MemoryLink  # noqa: E402
from rocoin.runtime.source.messages import Answer, Request  # noqa: E402
from rocoin.runtime.source.settings import MAX_QUEUE_DELAY_MS  # noqa: E402

UNAVAILABLE = STATUS_NAMES.index("UNAVAILABLE")
DEADLINE_S = 1.0
DELAY_MS = 20.0


class Replica:
    """A device whose features depend on every image of the request (so rows mixed up between the
    queries of a message would show): row i is ``sum(image i) * (j + 1) + value`` for feature j.
    ``max_batch`` is what it says in its answers; ``mode`` "error" fails every request."""

    def __init__(self, width: int, value: float, delay_s: float = 0.0, *, max_batch: int = 0, mode: str = "answer"):
        self.width, self.value, self.delay_s, self.max_batch, self.mode = width, value, delay_s, max_batch, mode
        self.link = MemoryLink(self.serve)

    async def serve(self, request: Request) -> Answer:
        await asyncio.sleep(self.delay_s)
        if self.mode == "error":
            return Answer(request.wire_id, code=UNAVAILABLE, error="emulated outage", max_batch=self.max_batch)
        sums = request.inputs.reshape(len(request.inputs), -1).sum(axis=1, dtype=np.float32)
        features = sums[:, None] * np.arange(1, self.width + 1, dtype=np.float32) + np.float32(self.value)
        return Answer(request.wire_id, features.astype(np.float32), max_batch=self.max_batch)

    def rows(self) -> list[int]:
        """Images per request the device got, in order."""
        return [len(r.inputs) for r in self.link.requests]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """test_gather's bundle: groups a1/a2 (filters 0, 2) and b (filter 1), a MatMul head."""
    return gather_bundle.__wrapped__(tmp_path_factory)


def replicas(**changed: Replica) -> dict[str, Replica]:
    return {"a1": Replica(2, 1.0), "a2": Replica(2, 2.0, delay_s=0.05), "b": Replica(1, 3.0), **changed}


def images(seed: int, count: int, batch: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(batch, *INPUT_CHW), dtype=np.uint8) for _ in range(count)]


def run(bundle, devices: dict[str, Replica], scenario, **options):
    async def main():
        async with MemorySource(bundle, devices, deadline_s=DEADLINE_S, **options) as source:
            return await scenario(source)

    return asyncio.run(main())


async def alone_then_together(source, batch: list[np.ndarray]):
    """Each image alone (one after the other: never batched), then all of them at once."""
    alone = [await source.infer(x) for x in batch]
    together = await asyncio.gather(*(source.infer(x) for x in batch))
    return alone, together


def test_a_lone_query_goes_out_at_once_even_with_the_longest_queue_delay(bundle):
    async def scenario(source):
        return [await source.infer(x) for x in images(0, 5)]

    devices = replicas()
    results = run(bundle, devices, scenario, max_queue_delay_ms=MAX_QUEUE_DELAY_MS)
    assert all(r.missing_groups == [] for r in results)
    assert max(r.latency_s for r in results) < MAX_QUEUE_DELAY_MS / 1e3 / 2  # never waited for the 100 ms queue delay
    assert devices["a1"].rows() == [1] * 5  # each went out alone, under its own id
    assert [r.wire_id.partition("#")[0] for r in devices["a1"].link.requests] == [r.query_id for r in results]


def test_queued_queries_share_one_message_and_get_exactly_the_answers_they_would_get_alone(bundle):
    devices = replicas()
    batch = images(1, 12) + images(2, 4, batch=3)  # a query may carry several images
    alone, together = run(bundle, devices, lambda source: alone_then_together(source, batch), max_queue_delay_ms=DELAY_MS)
    for a, t in zip(alone, together):
        assert t.missing_groups == [] and t.answered_by == ["a1", "b"]
        np.testing.assert_array_equal(t.logits, a.logits)  # bit for bit
    assert len({tuple(t.logits.ravel()) for t in together}) == len(batch)  # distinct images, distinct answers
    sent_together = devices["b"].rows()[len(batch) :]
    assert len(sent_together) < len(batch) / 2 and max(sent_together) > 1  # few messages, several queries each
    assert sum(sent_together) == sum(len(x) for x in batch)  # every image once


def test_a_query_s_deadline_holds_inside_a_batch(bundle):
    """Queries A (deadline 0.1 s) and B (the source's 1 s) share a message; group 1 answers after
    0.3 s: A is answered at its deadline with group 1 zero-filled, B waits for it and is complete."""
    devices = replicas(b=Replica(1, 3.0, delay_s=0.3))
    x = images(3, 3)

    async def scenario(source):
        first = asyncio.ensure_future(source.infer(x[0]))  # goes out alone; A and B queue behind it
        await asyncio.sleep(0)
        started = time.perf_counter()
        a = asyncio.ensure_future(source.infer(x[1], deadline_s=0.1))
        b = asyncio.ensure_future(source.infer(x[2]))
        a_done = await a
        a_at = time.perf_counter() - started
        return a_done, a_at, await b, await first

    a, a_at, b, _ = run(bundle, devices, scenario, max_queue_delay_ms=DELAY_MS)
    assert devices["b"].rows() == [1, 2]  # A and B were one message
    assert a.missing_groups == [1] and 0.1 <= a.latency_s and a_at < 0.25
    assert np.all(a.logits[:, 1] == 0.0)  # group 1's filter zero-filled
    assert b.missing_groups == [] and b.answered_by == ["a1", "b"] and b.latency_s >= 0.3
    assert b.logits[0, 1] != 0.0


def test_no_message_carries_more_images_than_the_source_or_a_device_allows(bundle):
    async def scenario(source):
        await source.infer(images(4, 1)[0])  # the devices' first answers say their limit
        return await asyncio.gather(*(source.infer(x) for x in images(5, 20)))

    devices = replicas()
    results = run(bundle, devices, scenario, max_queue_delay_ms=DELAY_MS, max_batch_images=3)
    assert all(r.missing_groups == [] for r in results)
    assert max(devices["a1"].rows()) == 3  # batched, never beyond --max-batch-images

    devices = replicas(b=Replica(1, 3.0, max_batch=2))  # a device that accepts at most 2 images
    results = run(bundle, devices, scenario, max_queue_delay_ms=DELAY_MS)
    assert all(r.missing_groups == [] for r in results)
    assert max(devices["a1"].rows()) == 2 and max(devices["b"].rows()) == 2  # every device gets the smallest limit


def test_a_zero_queue_delay_sends_every_query_alone(bundle):
    devices = replicas()
    batch = images(6, 10)
    alone, together = run(bundle, devices, lambda source: alone_then_together(source, batch), max_queue_delay_ms=0)
    assert devices["a1"].rows() == [1] * 20 and devices["b"].rows() == [1] * 20
    for a, t in zip(alone, together):
        np.testing.assert_array_equal(t.logits, a.logits)


def test_many_queries_in_flight_are_all_answered_correctly(bundle):
    devices = replicas(a1=Replica(2, 1.0, delay_s=0.002), b=Replica(1, 3.0, delay_s=0.002))
    batch = images(7, 300)
    alone, together = run(bundle, devices, lambda source: alone_then_together(source, batch), max_queue_delay_ms=DELAY_MS)
    assert [t.missing_groups for t in together] == [[]] * len(batch)
    for a, t in zip(alone, together):
        np.testing.assert_array_equal(t.logits, a.logits)
    assert len(devices["b"].rows()) - len(batch) < len(batch) / 4  # 300 queries in far fewer messages


def test_a_failed_message_counts_once_against_its_device(bundle):
    """A device failing one message of ten queries has failed once, not ten times (it is not
    marked down for it); its group is answered by the other replica."""

    async def scenario(source):
        results = await asyncio.gather(*(source.infer(x) for x in images(8, 10)))
        return results, next(d for d in source.devices if d.device_id == "a1")

    devices = replicas(a1=Replica(2, 1.0, mode="error"))
    results, a1 = run(bundle, devices, scenario, max_queue_delay_ms=DELAY_MS)
    assert all(r.missing_groups == [] and r.answered_by[0] == "a2" for r in results)
    messages = len(devices["a1"].rows())
    assert messages < FAILURES_TO_MARK_DOWN and a1.failures == messages and a1.up


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"max_queue_delay_ms": -1}, "max-queue-delay-ms = -1: expected milliseconds in 0..100 (0: no batching)"),
        ({"max_queue_delay_ms": 500.0}, "max-queue-delay-ms = 500.0: expected milliseconds in 0..100"),
        ({"max_batch_images": 0}, "max-batch-images = 0: expected an integer in 1..64"),
        ({"max_batch_images": 65}, "max-batch-images = 65: expected an integer in 1..64"),
    ],
)
def test_bad_batching_settings_are_one_clear_error(bundle, options, needle):
    with pytest.raises(RocoinError) as error:
        MemorySource(bundle, replicas(), **options)
    assert needle in str(error.value)
    with pytest.raises(RocoinError) as error:  # the process options (source serve, the cluster's option files)
        validate(SourceOptions, {"bundle": bundle, "fleet": bundle / "fleet.yaml", **options}, "options")
    assert next(iter(options)) in str(error.value)


def test_source_serve_refuses_a_bad_queue_delay_in_one_line_with_exit_2(bundle):
    from typer.testing import CliRunner

    from rocoin.cli.main import app

    result = CliRunner().invoke(
        app, ["source", "serve", "--bundle", str(bundle), "--fleet", str(bundle / "fleet.yaml"), "--max-queue-delay-ms", "500"]
    )
    assert result.exit_code == 2
    assert "max_queue_delay_ms = 500" in result.output and "less than or equal to 100" in result.output
    assert "Traceback" not in result.output


def test_a_local_cluster_passes_batching_on_and_an_emulated_one_does_not_batch_unless_asked(bundle, tmp_path):
    pytest.importorskip("grpc_health")
    from rocoin.contracts.fleet import DeviceProfile, Fleet
    from rocoin.runtime.cluster.local import LocalCluster

    fleet = Fleet(devices=[DeviceProfile(id=d, flops=1e9, memory_bytes=1 << 24, rate_bps=1e6, outage=0.01) for d in ("a1", "a2", "b")])
    assert LocalCluster(bundle, fleet, tmp_path).batching == {}  # the source's defaults
    assert LocalCluster(bundle, fleet, tmp_path, max_queue_delay_ms=5, max_batch_images=8).batching == {
        "max_queue_delay_ms": 5,
        "max_batch_images": 8,
    }
    assert LocalCluster(bundle, fleet, tmp_path, emulate=True).batching == {"max_queue_delay_ms": 0.0}
    assert LocalCluster(bundle, fleet, tmp_path, emulate=True, max_queue_delay_ms=5).batching == {"max_queue_delay_ms": 5}
    with pytest.raises(RocoinError, match=r"max-queue-delay-ms = 500: expected milliseconds in 0\.\.100"):
        LocalCluster(bundle, fleet, tmp_path, max_queue_delay_ms=500)
