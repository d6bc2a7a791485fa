"""gRPC keepalive of the runtime's long-lived connections: one configuration that both sides read.

The source keeps one channel and one ``InferStream`` per device open for as long as it runs, and
most of that time the stream is idle. Its channel pings the device every
:attr:`Keepalive.time_ms`, so a dead link or a device that vanished without a FIN is noticed
within ``time_ms + timeout_ms`` rather than after the kernel's TCP timeout.

A gRPC server polices those pings: by default it expects at most one ping per 5 minutes while
it sends no data, counts each earlier one as a *strike*, and after two strikes answers GOAWAY
``too_many_pings`` and drops the connection — with it every stream. An idle cluster used to
tear itself down that way (every device at once, ~130 s after the last query). So the client
options and the server options come from the same :class:`Keepalive`: the server permits pings
at half the client's interval (timers on a loaded machine fire early or late), with and without
calls in flight, and the client keeps pinging an idle stream (``max_pings_without_data`` 0: no
cap on pings between data frames).

A device that dials the source (``rocoin device join``) reverses the roles: it is the client and
pings the source, and the source's server pings it back on the same schedule
(:meth:`Keepalive.server_options`), so each side notices a black-holed link within
``time_ms + timeout_ms``.
"""

from __future__ import annotations

from dataclasses import dataclass

from rocoin.contracts.errors import RocoinError

#: The source pings each device every 10 s: a lost device is noticed within ~15 s even when idle.
DEFAULT_TIME_MS = 10_000
#: A ping not acknowledged within 5 s closes the connection (the device is marked down).
DEFAULT_TIMEOUT_MS = 5_000
#: Early pings a server tolerates before GOAWAY (gRPC's default); with the permitted interval at
#: half the client's, a well-behaved client never earns one.
DEFAULT_MAX_PING_STRIKES = 2


@dataclass(frozen=True)
class Keepalive:
    """Keepalive pings from the client side and what the server side permits."""

    time_ms: int = DEFAULT_TIME_MS
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    max_ping_strikes: int = DEFAULT_MAX_PING_STRIKES

    def __post_init__(self) -> None:
        for name in ("time_ms", "timeout_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RocoinError(f"keepalive {name} = {value!r}: expected a positive number of milliseconds")
        if isinstance(self.max_ping_strikes, bool) or not isinstance(self.max_ping_strikes, int) or self.max_ping_strikes < 0:
            raise RocoinError(f"keepalive max_ping_strikes = {self.max_ping_strikes!r}: expected an integer >= 0")

    @property
    def permitted_interval_ms(self) -> int:
        """The shortest time between two pings that a server accepts without a strike."""
        return max(1, self.time_ms // 2)

    def client_options(self) -> list[tuple[str, int]]:
        """Channel options of the side that pings (the source's channels to its devices)."""
        return [
            ("grpc.keepalive_time_ms", self.time_ms),
            ("grpc.keepalive_timeout_ms", self.timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def server_options(self) -> list[tuple[str, int]]:
        """Server options that accept :meth:`client_options`' pings, with and without calls, and
        ping the clients on the same schedule: a device that dialed the source (a Join stream)
        and vanished without a FIN is noticed by the source within ``time_ms + timeout_ms`` too."""
        return [
            ("grpc.keepalive_time_ms", self.time_ms),
            ("grpc.keepalive_timeout_ms", self.timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS: the key does not say "recv"; a
            # misspelt key is silently ignored (the tests run the real policy scaled in time)
            ("grpc.http2.min_ping_interval_without_data_ms", self.permitted_interval_ms),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
        ]


#: What the source and the device workers use unless told otherwise.
KEEPALIVE = Keepalive()
