"""The device worker's former single module, kept for the importers that still name it
(``rocoin.runtime.device.options``). New code imports from where each part lives:

- :mod:`.runner`: the onnxruntime session of the group model, checked against the manifest;
- :mod:`.emulation`: :class:`Emulation`, a fleet profile to behave like;
- :mod:`.servicer`: :class:`DeviceWorker`, the ``rocoin.v1.Device`` gRPC servicer;
- :mod:`.server`: :class:`DeviceServer`, :func:`start_device`, :func:`serve_device`, :func:`parse_listen`.
"""

from rocoin.runtime.device.emulation import Emulation
from rocoin.runtime.device.server import SHUTDOWN_GRACE_S, DeviceServer, parse_listen, serve_device, start_device, wait_ready_file
from rocoin.runtime.device.servicer import (
    DEFAULT_INTRA_OP_THREADS,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONCURRENCY,
    DEVICE_SERVICE,
    MAX_QUERY_ID_CHARS,
    MAX_QUEUED_CALLS,
    MESSAGE_SLACK_BYTES,
    DeviceWorker,
)

__all__ = [
    "DEFAULT_INTRA_OP_THREADS", "DEFAULT_MAX_BATCH", "DEFAULT_MAX_CONCURRENCY", "DEVICE_SERVICE", "MAX_QUERY_ID_CHARS", "MAX_QUEUED_CALLS",
    "MESSAGE_SLACK_BYTES", "SHUTDOWN_GRACE_S", "DeviceServer", "DeviceWorker", "Emulation", "parse_listen", "serve_device", "start_device",
    "wait_ready_file",
]  # fmt: skip
