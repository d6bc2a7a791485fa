"""Dynamic batching on loopback with real device workers: devices the source dials and devices that
dial the source (``rocoin device join``) both get one message for many queued queries, run it in one
onnxruntime call, and every query gets exactly the answer it gets alone; the source learns each
device's ``--max-batch`` from its answers and never sends it more."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("grpc_health")

from test_device_join import clients  # noqa: E402
from test_joins import joined_source, wait_for  # noqa: E402
from test_runtime import expected_logits, images_batch, in_process_devices, make_bundle  # noqa: E402

from rocoin.runtime.source.source import Source  # noqa: E402

QUERIES = 40


def messages(source: Source) -> tuple[float, float]:
    """(messages, queries) the source has sent to the devices so far."""
    registry = source.metrics.registry
    return registry.get_sample_value("rocoin_batch_queries_count"), registry.get_sample_value("rocoin_batch_queries_sum")


async def alone_then_together(source: Source, xs: list[np.ndarray]):
    """Each query alone (one after the other), then all at once; and the messages the second part took."""
    alone = [await source.infer(x) for x in xs]
    before = messages(source)
    together = await asyncio.gather(*(source.infer(x) for x in xs))
    after = messages(source)
    return alone, together, (after[0] - before[0], after[1] - before[1])


def check(bundle, xs, alone, together, sent) -> None:
    for x, a, t in zip(xs, alone, together):
        assert a.missing_groups == [] and t.missing_groups == []
        np.testing.assert_array_equal(t.logits, a.logits)  # exactly the unbatched answer
        np.testing.assert_allclose(t.logits, expected_logits(bundle, x), rtol=1e-5, atol=1e-5)
    count, queries = sent
    assert queries == len(xs) and count < len(xs) / 2  # many queries per message


def test_dialed_devices_get_batches_no_larger_than_their_max_batch_and_answer_as_alone(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    xs = [images_batch(i, batch=1 + i % 2) for i in range(QUERIES)]  # queries of 1 and 2 images

    async def scenario():
        async with in_process_devices(bundle, set(), 0.0, max_batch=6) as (_, fleet):
            async with Source(bundle, fleet, deadline_s=2.0, insecure=True, max_queue_delay_ms=20) as source:
                alone, together, sent = await alone_then_together(source, xs)
                refusals = sum(
                    source.metrics.registry.get_sample_value("rocoin_device_refusals_total", {"device": d.device_id}) or 0
                    for d in source.devices
                )
                return alone, together, sent, refusals, {r.state.device_id: r.max_batch for r in source._replicas}

    alone, together, sent, refusals, limits = asyncio.run(scenario())
    check(bundle, xs, alone, together, sent)
    assert set(limits.values()) == {6}  # said in their answers
    assert refusals == 0  # no message beyond 6 images (a device refuses those as INVALID_ARGUMENT)


def test_devices_that_dial_the_source_get_batches_and_answer_as_alone(tmp_path):
    xs = [images_batch(100 + i) for i in range(QUERIES)]

    async def main():
        async with joined_source(tmp_path) as (source, join, bundle):  # the source's default queue delay: batching on
            devices = clients(join.ready["address"], tmp_path / "devices")
            tasks = [asyncio.ensure_future(c.run()) for c in devices.values()]
            await wait_for(lambda: sum(d.up for d in source.devices) == len(devices))
            result = await alone_then_together(source, xs)
            for c in devices.values():
                c.stop()
            await asyncio.gather(*tasks)
            return bundle, result

    bundle, (alone, together, sent) = asyncio.run(main())
    check(bundle, xs, alone, together, sent)
