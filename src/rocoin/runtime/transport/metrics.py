"""Prometheus metrics of the source and of each device, each in its own registry.

The source exposes its metrics at ``/metrics`` on its HTTP port; a device worker serves its own
with ``--metrics-listen host:port``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

#: Latency buckets (seconds): from sub-millisecond loopback calls to multi-second edge devices.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SourceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queries = Counter("rocoin_queries", "Queries answered by the source", registry=r)
        self.query_latency = Histogram(
            "rocoin_query_latency_seconds", "End-to-end query latency at the source", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.group_latency = Histogram(
            "rocoin_group_latency_seconds", "Time until a group's first answer", ["group"], buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.missing_groups = Counter("rocoin_missing_groups", "Groups zero-filled at the deadline", ["group"], registry=r)
        self.device_failures = Counter("rocoin_device_failures", "Failed or late device calls", ["device"], registry=r)
        self.device_up = Gauge("rocoin_device_up", "1 while the device is used, 0 while it is marked down", ["device"], registry=r)
        self.marked_down = Counter("rocoin_device_marked_down", "Times the device was marked down", ["device"], registry=r)
        self.batch_queries = Histogram(
            "rocoin_batch_queries",
            "Queries per message sent to the devices (dynamic batching; 1: a query alone)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.device_refusals = Counter(
            "rocoin_device_refusals",
            "Queries the device refused as invalid although the source had checked them (misconfigured device)",
            ["device"],
            registry=r,
        )
        # a fleet that changes (source serve --joins)
        self.replans = Counter("rocoin_replans", "Re-plans of the device-to-group assignment, by trigger", ["trigger"], registry=r)
        self.group_live_replicas = Gauge("rocoin_group_live_replicas", "Replicas of the group that are up", ["group"], registry=r)
        self.group_failure_prob = Gauge(
            "rocoin_group_failure_probability", "Product of the outage of the group's live replicas (1 with none)", ["group"], registry=r
        )
        self.joined_devices = Gauge("rocoin_joined_devices", "Devices connected over their own Join stream", registry=r)


class DeviceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rocoin_device_requests", "Infer calls by outcome", ["code"], registry=r)
        self.run_time = Histogram(
            "rocoin_device_run_seconds", "Time in the model (and emulation) per call", buckets=LATENCY_BUCKETS_S, registry=r
        )

    def serve(self, listen: str) -> int:
        """Serve ``/metrics`` on ``listen`` (host:port; port 0 for any) in a thread; returns the port."""
        host, _, port = listen.rpartition(":")
        server, _ = start_http_server(int(port), addr=host, registry=self.registry)
        return server.server_port
