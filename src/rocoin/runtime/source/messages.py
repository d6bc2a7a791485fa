"""What the source and a device link say to each other: a :class:`Request` (one query's input
batch, under an id unique on the wire) and an :class:`Answer` (the group's features for that id,
or an error). Plain data, so that the gather (:mod:`.gather`) can judge answers without knowing
the transport and tests can make answers by hand.

Everything is keyed by the wire id, never by the order of messages: a link may carry answers out
of order or arrive from a device that dialed the source, and the source reads the same answers.
With dynamic batching one request carries the images of several queued queries under a message
id of its own (``#n``), and the source splits its answer back into the queries' rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

#: The status code of an answer that carries features (gRPC numbering, as on the wire).
OK = 0


@dataclass(eq=False, slots=True)
class Request:
    """One query as every device gets it.

    ``timeout_s`` is the time left until the query's deadline when it was sent, so a device can
    drop a request that waited too long for a free slot.
    """

    wire_id: str
    inputs: np.ndarray
    timeout_s: float
    #: The request as its transport encodes it, made by the first link that needs it and reused
    #: by the others: a query broadcast to every device is serialised once.
    encoded: bytes | None = field(default=None, repr=False)


class Answer:
    """A device's answer to the request ``wire_id``: features, or a status ``code`` and ``error``.

    ``features`` may be a function that decodes them (raising :class:`ValueError` when the message
    does not hold a readable tensor): an answer that comes after its query ended is never decoded.
    ``max_batch`` is the largest image batch the device says it accepts (0: it did not say); the
    source's dynamic batcher never coalesces more images for it.
    """

    __slots__ = ("wire_id", "code", "error", "max_batch", "_features")

    def __init__(
        self,
        wire_id: str,
        features: np.ndarray | Callable[[], np.ndarray] | None = None,
        *,
        code: int = OK,
        error: str = "",
        max_batch: int = 0,
    ) -> None:
        self.wire_id = wire_id
        self.code = code
        self.error = error
        self.max_batch = max_batch
        self._features = features

    def features(self) -> np.ndarray:
        """The features the answer carries; :class:`ValueError` when it carries none that can be read."""
        features = self._features
        if callable(features):
            return features()
        if features is None:
            raise ValueError("features: missing")
        return features

    def __repr__(self) -> str:
        return f"Answer({self.wire_id!r}, code={self.code}, error={self.error[:40]!r})"
