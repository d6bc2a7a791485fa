"""Devices on their own hosts and links, on one Linux machine: a network namespace per device.

:class:`NetnsFabric` builds a *hub* namespace with a bridge (the source's address) and, for each
device, a namespace with its own address and a veth link into the hub. Each link is shaped with
``tc … tbf`` in both directions from the device's profile (its ``rate_bps`` × ``speedup``, the
factor the emulation scales FLOP/s and rates by, so a test does not wait minutes for an image;
``netem`` is not needed). :meth:`NetnsFabric.cut` takes a link down on the hub's side, so the
device's packets are black-holed, not refused: the hard case that killing a process (which resets
its connections) never exercises; :meth:`NetnsFabric.restore` brings it back.

Everything is named after this process (``rcn<pid>…``) and removed by :meth:`NetnsFabric.delete`
(also on ``with`` exit), so concurrent runs do not meet and nothing is left behind. Needs root
(``CAP_NET_ADMIN``) and ``ip``/``tc`` from iproute2: :func:`unavailable` says why not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from rocoin.contracts.errors import RocoinError

#: The fabric's private subnet: the hub is .0.1, device i is 10.SUBNET.(i // 250).(i % 250 + 2).
DEFAULT_SUBNET = 77
#: Lowest shaped rate (tbf needs a burst of a few packets to pass anything at all).
MIN_RATE_BPS = 64_000
#: tbf's bucket and queue: a few full-size packets, at most this long a wait in the queue.
TBF_BURST_BYTES = 32 * 1024
TBF_LATENCY_MS = 400


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"rcn{os.getpid()}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()[:200]}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


@dataclass
class Link:
    device_id: str
    namespace: str
    address: str  # the device's address inside its namespace
    hub_side: str  # the veth end in the hub namespace (cut it to black-hole the device)
    device_side: str
    rate_bps: float | None


@dataclass
class NetnsFabric:
    """A hub namespace (bridge, the source's address) and one namespace per device."""

    subnet: int = DEFAULT_SUBNET
    tag: str = field(default_factory=lambda: f"rcn{os.getpid() % 100000}")
    links: dict[str, Link] = field(default_factory=dict)
    _made: list[str] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"{self.tag}hub"

    @property
    def hub_address(self) -> str:
        return f"10.{self.subnet}.0.1"

    def create(self, device_ids: Sequence[str], rates_bps: dict[str, float] | None = None, *, speedup: float = 1.0) -> None:
        """The hub and a shaped link per device (``rates_bps[id] × speedup``; unshaped when absent)."""
        if len(device_ids) > 250 * 250:
            raise RocoinError(f"{len(device_ids)} devices: the fabric has room for {250 * 250}")
        self._ip("netns", "add", self.hub)
        self._made.append(self.hub)
        self._in(self.hub, "ip", "link", "set", "lo", "up")
        self._in(self.hub, "ip", "link", "add", "br0", "type", "bridge")
        self._in(self.hub, "ip", "addr", "add", f"{self.hub_address}/16", "dev", "br0")
        self._in(self.hub, "ip", "link", "set", "br0", "up")
        for i, device_id in enumerate(device_ids):
            rate = None if rates_bps is None or device_id not in rates_bps else max(MIN_RATE_BPS, rates_bps[device_id] * speedup)
            self._add_device(i, device_id, rate)

    def _add_device(self, i: int, device_id: str, rate_bps: float | None) -> None:
        namespace = f"{self.tag}d{i}"
        hub_side, device_side = f"{self.tag}h{i}", f"{self.tag}v{i}"
        address = f"10.{self.subnet}.{i // 250}.{i % 250 + 2}"
        self._ip("netns", "add", namespace)
        self._made.append(namespace)
        self._in(namespace, "ip", "link", "set", "lo", "up")
        self._ip("link", "add", hub_side, "type", "veth", "peer", "name", device_side)
        self._ip("link", "set", hub_side, "netns", self.hub)
        self._ip("link", "set", device_side, "netns", namespace)
        self._in(self.hub, "ip", "link", "set", hub_side, "master", "br0")
        self._in(self.hub, "ip", "link", "set", hub_side, "up")
        self._in(namespace, "ip", "addr", "add", f"{address}/16", "dev", device_side)
        self._in(namespace, "ip", "link", "set", device_side, "up")
        if rate_bps is not None:  # the uplink (device -> hub) and the downlink (hub -> device)
            for ns, dev in ((namespace, device_side), (self.hub, hub_side)):
                self._in(ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(rate_bps)}bit",
                         "burst", f"{TBF_BURST_BYTES}", "latency", f"{TBF_LATENCY_MS}ms")  # fmt: skip
        self.links[device_id] = Link(device_id, namespace, address, hub_side, device_side, rate_bps)

    def command(self, namespace: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``namespace``."""
        return ["ip", "netns", "exec", namespace, *argv]

    def cut(self, device_id: str) -> None:
        """Take the device's link down on the hub's side: its packets vanish (no reset, no FIN)."""
        self._in(self.hub, "ip", "link", "set", self.links[device_id].hub_side, "down")

    def restore(self, device_id: str) -> None:
        self._in(self.hub, "ip", "link", "set", self.links[device_id].hub_side, "up")

    def delete(self) -> None:
        """Remove every namespace made (their veth ends go with them)."""
        for namespace in reversed(self._made):
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        self._made.clear()
        self.links.clear()

    def __enter__(self) -> NetnsFabric:
        return self

    def __exit__(self, *exc) -> None:
        self.delete()

    def _in(self, namespace: str, *argv: str) -> None:
        self._run(self.command(namespace, argv))

    def _ip(self, *argv: str) -> None:
        self._run(["ip", *argv])

    @staticmethod
    def _run(argv: list[str]) -> None:
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise RocoinError(f"{' '.join(argv)}: {done.stderr.strip()[:300]}")
