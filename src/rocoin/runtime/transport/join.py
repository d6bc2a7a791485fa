"""What both ends of the ``rocoin.v1.Fleet/Join`` stream agree on (the messages are in
``rocoin.proto``): the protocol version, the size of a model chunk, the largest model a device
accepts, and the reconnection backoff of a device whose stream broke.

The stream, in order: the device sends ``JoinHello`` (its id, its fleet entry as JSON, the
SHA-256 of the models it has cached); the source answers with an ``Assignment`` (group, or -1 for
a spare; the manifest's entry of the group's model), followed by the model's bytes in
``ModelChunk`` messages when the device lacks it; the device verifies size and SHA-256, loads the
model and says ``ModelReady`` (or why it refused it). From then on the source sends
``DeviceInferRequest`` and ``HealthCheck`` messages and the device answers each; a later
``Assignment`` moves the device to another group (the same exchange again). A refused join ends
with a gRPC status: ``UNAUTHENTICATED`` (no or a wrong token), ``PERMISSION_DENIED`` (the id
belongs to another credential), ``RESOURCE_EXHAUSTED`` (too many joins), ``INVALID_ARGUMENT``
(a bad hello) or ``FAILED_PRECONDITION`` (another protocol version).
"""

from __future__ import annotations

import grpc

#: Version of the Join exchange described above; the source refuses another.
JOIN_PROTOCOL = 1
#: Bytes of model per ``ModelChunk`` (well below every message limit of the source and device).
MODEL_CHUNK_BYTES = 64 * 1024
#: The largest model a device accepts (and a source sends).
MAX_MODEL_BYTES = 512 * 1024 * 1024
#: A broken stream is dialed again after a random wait in [0, b] (full jitter), b starting at the
#: initial backoff and doubling up to the maximum; it resets once a stream has been assigned.
INITIAL_JOIN_BACKOFF_S = 0.2
MAX_JOIN_BACKOFF_S = 15.0
#: Statuses after which dialing again cannot help: the device stops and says why.
PERMANENT_REFUSALS = (
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
)
#: The method's full name (a source serves it on its own port).
JOIN_METHOD = "/rocoin.v1.Fleet/Join"
#: A device times its uplink to the source with it before joining (``rocoin device join --measure``).
PROBE_METHOD = "/rocoin.v1.Fleet/Probe"
#: Group number of a device that has joined but serves no group (a spare).
SPARE = -1
