"""The source's deadline, batching and join settings, in a module without grpc or onnxruntime so that
the command line and the process options (:mod:`rocoin.runtime.api.options`) can show and check them."""

from __future__ import annotations

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.text import short_repr

#: Default time the source waits for the groups of one query.
DEFAULT_DEADLINE_S = 1.0
#: Deadlines accepted, per query or as the default: shorter than a millisecond no device can
#: answer (every group would be missing); longer than 5 minutes a lost device holds a caller
#: (and the query's memory) for longer than any edge application waits.
MIN_DEADLINE_S = 0.001
MAX_DEADLINE_S = 300.0

#: Dynamic batching: the longest a query waits in the source's queue (0: no batching, every query
#: goes out alone). A query that finds the devices idle (nothing queued, nothing in flight) is never
#: held; one that finds a message in flight waits until that message's queries have ended (about
#: one message's time, the batch growing meanwhile), and at most this long if the message stalls.
#: Also bounded by a quarter of the query's own budget.
DEFAULT_MAX_QUEUE_DELAY_MS = 50.0
#: Queue delays accepted: beyond this the queue would eat most of a typical deadline.
MAX_QUEUE_DELAY_MS = 100.0
#: Largest image batch (all queries of one batched message together) by default: the devices'
#: default ``--max-batch``; a device that accepts less says so in its answers and gets less.
DEFAULT_MAX_BATCH_IMAGES = 64
#: The most images one query or one message may carry (the source's ``MAX_BATCH``).
MAX_BATCH_IMAGES = 64


def check_queue_delay(value: float, name: str) -> float:
    """``value`` if it is a queue delay the source accepts (0: no batching), else :class:`RocoinError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_QUEUE_DELAY_MS:
        raise RocoinError(f"{name} = {short_repr(value)}: expected milliseconds in 0..{MAX_QUEUE_DELAY_MS:g} (0: no batching)")
    return float(value)


def check_max_batch_images(value: int, name: str) -> int:
    """``value`` if it is a batch limit the source accepts, else :class:`RocoinError`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCH_IMAGES:
        raise RocoinError(f"{name} = {short_repr(value)}: expected an integer in 1..{MAX_BATCH_IMAGES} (images per message to a device)")
    return value


#: Joins (:mod:`rocoin.runtime.source.join_service`): joins admitted per second, sustained and in
#: a burst, and join streams open at once (joined devices and those still saying hello).
DEFAULT_JOINS_PER_S = 20.0
JOIN_BURST = 50
DEFAULT_MAX_JOIN_STREAMS = 256
