"""An operator restarts a cluster's worker by hand with the cluster's token file (real processes)."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("grpc_health")

import grpc  # noqa: E402
from conftest import device as profile  # noqa: E402
from test_device import make_bundle  # noqa: E402

from rocoin.contracts.fleet import Fleet  # noqa: E402
from rocoin.runtime.cluster.local import TOKEN_FILE, LocalCluster, wait_serving  # noqa: E402
from rocoin.runtime.transport.auth import token_metadata  # noqa: E402
from rocoin.runtime.transport.protocol import rocoin_pb2, rocoin_pb2_grpc  # noqa: E402
from rocoin.runtime.transport.serde import tensor_to_proto  # noqa: E402


def rocoin_command() -> list[str]:
    """The ``rocoin`` command line of this installation, as an operator runs it."""
    return [sys.executable, "-m", "rocoin.cli.main"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def test_a_worker_restarted_by_hand_with_the_clusters_token_file_is_used_again_and_refuses_strangers(bundle, tmp_path):
    state = tmp_path / "state"
    fleet = Fleet(devices=[profile(n, 20, 4, 300, 0.1) for n in ("a", "b", "c")])
    with LocalCluster(bundle, fleet, state, with_source=False) as cluster:
        token_file = state / TOKEN_FILE
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert token_file.read_text().strip() == cluster.token
        address = cluster.member("c").address
        cluster.kill_device("c")
        by_hand = subprocess.Popen(
            [
                *rocoin_command(),
                "device",
                "serve",
                "--bundle",
                str(bundle),
                "--device-id",
                "c",
                "--listen",
                address,
                "--token-file",
                str(token_file),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if k != "ROCOIN_DEVICE_TOKEN"},
        )
        try:
            wait_serving(address, 30)

            async def calls():
                request = rocoin_pb2.DeviceInferRequest(query_id="q", input=tensor_to_proto(np.zeros((1, 1, 8, 8), dtype=np.float32)))
                async with grpc.aio.insecure_channel(address) as channel:
                    stub = rocoin_pb2_grpc.DeviceStub(channel)
                    with pytest.raises(grpc.aio.AioRpcError) as stranger:
                        await stub.Infer(request, timeout=5)
                    reply = await stub.Infer(request, timeout=5, metadata=token_metadata(cluster.token))
                return stranger.value.code(), reply.device_id

            stranger, answered = asyncio.run(calls())
        finally:
            by_hand.terminate()
            by_hand.wait(10)
    assert stranger == grpc.StatusCode.UNAUTHENTICATED and answered == "c"
    assert not token_file.exists()  # the secret goes with the cluster
