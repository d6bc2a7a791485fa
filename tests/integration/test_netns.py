"""The namespace fabric the fault tests run on: each device on its own host and shaped link, a cut
link black-holes packets (a connection times out, it is not refused), nothing is left behind."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from rocoin.runtime.cluster.netns import NetnsFabric, unavailable

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"network namespaces unavailable: {REASON}")

CONNECT = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))"
SERVE = (
    "import socket,sys; s=socket.socket(); s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); c,_=s.accept(); n=0\n"
    "while (d := c.recv(65536)): n += len(d)\nprint(n)"
)


def namespaces() -> set[str]:
    return {line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines() if line}


def test_a_shaped_link_carries_its_rate_and_a_cut_link_black_holes_packets():
    before = namespaces()
    with NetnsFabric() as fabric:
        fabric.create(["slow", "free"], {"slow": 1e6})
        slow = fabric.links["slow"]
        assert {fabric.hub, slow.namespace, fabric.links["free"].namespace} <= namespaces()
        server = subprocess.Popen(
            fabric.command(fabric.hub, [sys.executable, "-c", SERVE, fabric.hub_address, "5000"]), stdout=subprocess.PIPE, text=True
        )
        time.sleep(0.5)
        started = time.perf_counter()
        send = f"import socket; s = socket.create_connection(('{fabric.hub_address}', 5000)); s.sendall(b'x' * 250_000); s.close()"
        subprocess.run(fabric.command(slow.namespace, [sys.executable, "-c", send]), check=True)
        received = int(server.communicate(timeout=30)[0])
        elapsed = time.perf_counter() - started
        assert received == 250_000
        assert 1.5 < elapsed < 6.0  # 2 Mbit at 1 Mbit/s: ~2 s (unshaped loopback: milliseconds)
        fabric.cut("slow")
        started = time.perf_counter()
        cut = subprocess.run(
            fabric.command(slow.namespace, [sys.executable, "-c", CONNECT, fabric.hub_address, "5001", "1.0"]),
            capture_output=True,
            text=True,
        )
        assert cut.returncode != 0 and "timed out" in cut.stderr and time.perf_counter() - started >= 1.0  # silence, not a refusal
        fabric.restore("slow")
        time.sleep(0.3)
        back = subprocess.run(
            fabric.command(slow.namespace, [sys.executable, "-c", CONNECT, fabric.hub_address, "5001", "2.0"]),
            capture_output=True,
            text=True,
        )
        assert "ConnectionRefusedError" in back.stderr  # reachable again: nothing listens there
    assert namespaces() == before
