"""Devices that join a source served with mTLS: the client certificate's common name is the
device's id (``scripts/make_certs.sh --join-id ID``). The real source and the real device client,
on loopback: a certificate admits only the id it names, and a renewed certificate for the same id
keeps the device's place (the CA vouches for the id, not one certificate's bytes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from conftest import device  # noqa: E402
from test_joins import wait_for  # noqa: E402
from test_runtime import GROUPS, expected_logits, images_batch, make_bundle  # noqa: E402

from rocoin.contracts.errors import RocoinError  # noqa: E402
from rocoin.contracts.fleet import Fleet  # noqa: E402
from rocoin.runtime.api.server import serve_source  # noqa: E402
from rocoin.runtime.device.join import JoinClient  # noqa: E402
from rocoin.runtime.source.source import Source  # noqa: E402
from rocoin.runtime.transport.tls import ClientTLS, ServerTLS  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_certs.sh"
JOIN_IDS = ("a1", "a2", "b1", "b2", "c1")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    root = tmp_path_factory.mktemp("certs")
    ids = [arg for i in JOIN_IDS for arg in ("--join-id", i)]
    subprocess.run(["bash", str(SCRIPT), str(root), "127.0.0.1", *ids], check=True, capture_output=True)
    return root


def renew(root: Path, device_id: str) -> tuple[Path, Path]:
    """A second certificate for ``device_id`` from the same CA, with a new key (a renewal)."""
    key, csr, cert = root / f"renewed-{device_id}.key", root / f"renewed-{device_id}.csr", root / f"renewed-{device_id}.pem"
    ext = root / "client.ext"
    ext.write_text("extendedKeyUsage=clientAuth\n")
    run = dict(check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={device_id}", "-keyout", key, "-out", csr], **run)
    subprocess.run(
        ["openssl", "x509", "-req", "-in", csr, "-CA", root / "ca.pem", "-CAkey", root / "ca.key", "-CAcreateserial", "-days", "1",
         "-extfile", ext, "-out", cert],
        **run,
    )  # fmt: skip
    return cert, key


def client(address: str, root: Path, device_id: str, certs: Path, cert: Path | None = None, key: Path | None = None) -> JoinClient:
    tls = ClientTLS(certs / "ca.pem", cert or certs / f"join-{device_id}.pem", key or certs / f"join-{device_id}.key")
    return JoinClient(address, device(device_id, 20, 4, 300, 0.1), root / device_id, tls=tls, seed=1)


@contextlib.asynccontextmanager
async def mtls_source(tmp_path: Path, certs: Path):
    """The source on 127.0.0.1 requiring client certificates of the test CA (no device token)."""
    bundle = make_bundle(tmp_path / "bundle")
    fleet = Fleet(devices=[device(d, 20, 4, 300, 0.1) for members, _ in GROUPS for d in members])
    dial = ClientTLS(certs / "ca.pem", certs / "source.pem", certs / "source.key")  # for devices it dials (none here)
    source = Source(bundle, fleet, deadline_s=0.5, joins=True, tls=dial)
    stop, ready = asyncio.Event(), tmp_path / "ready.json"
    tls = ServerTLS(certs / "device.pem", certs / "device.key", certs / "ca.pem")
    server = asyncio.ensure_future(serve_source(source, "127.0.0.1:0", tls=tls, ready_file=ready, stop=stop, state_dir=tmp_path / "state"))
    await wait_for(lambda: ready.exists() or server.done())
    if server.done():
        server.result()
    try:
        yield source, json.loads(ready.read_text())["address"], bundle
    finally:
        stop.set()
        await server


def test_a_certificate_admits_the_id_it_names_and_a_renewed_one_keeps_the_devices_place(tmp_path, certs):
    async def main():
        async with mtls_source(tmp_path, certs) as (source, address, bundle):
            devices = {d: client(address, tmp_path / "devices", d, certs) for d in JOIN_IDS}
            tasks = {d: asyncio.ensure_future(c.run()) for d, c in devices.items()}
            await wait_for(lambda: sum(r.up for r in source.devices) == len(JOIN_IDS), timeout_s=30)
            images = images_batch(3, batch=2)
            result = await source.infer(images)
            assert result.missing_groups == []
            np.testing.assert_allclose(result.logits, expected_logits(bundle, images), rtol=1e-5, atol=1e-5)

            # a2's certificate does not make its holder c1: refused for good, c1 keeps serving
            thief = client(address, tmp_path / "thief", "c1", certs, certs / "join-a2.pem", certs / "join-a2.key")
            with pytest.raises(RocoinError, match="PERMISSION_DENIED.*certificate names 'a2'"):
                await asyncio.wait_for(thief.run(), 20)
            assert source.replica("c1").state.up and source.replica("c1").state.group == 2

            # c1 renews its certificate (new key, same CA and id): admitted again under its id
            devices["c1"].stop()
            await tasks["c1"]
            await wait_for(lambda: source.replica("c1") is None or not source.replica("c1").state.up)
            cert, key = renew(certs, "c1")
            renewed = client(address, tmp_path / "devices", "c1", certs, cert, key)
            task = asyncio.ensure_future(renewed.run())
            await wait_for(lambda: source.replica("c1") is not None and source.replica("c1").state.up or task.done(), timeout_s=20)
            assert not task.done(), task.exception()
            assert {m["device_id"]: m["state"] for m in source.fleet_status()["members"]}["c1"] == "serving"
            result = await source.infer(images)
            assert result.missing_groups == []
            np.testing.assert_allclose(result.logits, expected_logits(bundle, images), rtol=1e-5, atol=1e-5)
            for c in [*devices.values(), renewed]:
                c.stop()
            await asyncio.gather(task, *tasks.values())

    asyncio.run(main())


def test_a_device_key_in_the_certificate_form_is_refused_so_a_token_cannot_pose_as_a_certificate(tmp_path):
    import hashlib

    import grpc
    from test_joins import joined_source

    async def main():
        async with joined_source(tmp_path) as (source, join, _):
            forged = join("c1", key="x509-cn:" + hashlib.sha256(b"c1").hexdigest())
            await wait_for(lambda: forged.ended is not None)
            assert forged.ended.code() == grpc.StatusCode.INVALID_ARGUMENT and "expected a random key" in forged.ended.details()
            assert source.replica("c1") is None or not source.replica("c1").state.up

    asyncio.run(main())


def test_source_serve_with_a_join_ca_admits_devices_by_certificate_over_the_command_line(tmp_path, certs):
    """``rocoin source serve --joins --api-tls-cert … --join-tls-client-ca CA``: devices presenting
    a certificate that names their id join (no device token needed); the gRPC port requires a
    certificate of the CA from every client, the REST API from none."""
    import ssl
    import sys
    import urllib.request

    import grpc

    from rocoin.contracts.fleet import save_fleet
    from rocoin.runtime.cluster.local import stop_processes
    from rocoin.runtime.transport.lifecycle import wait_ready_file
    from rocoin.runtime.transport.protocol import rocoin_pb2, rocoin_pb2_grpc
    from rocoin.runtime.transport.serde import tensor_to_proto

    bundle = make_bundle(tmp_path / "bundle")
    fleet = tmp_path / "fleet.yaml"
    save_fleet(Fleet(devices=[device(d, 20, 4, 300, 0.1) for d in JOIN_IDS]), fleet)
    ready = tmp_path / "ready.json"
    args = [
        sys.executable, "-m", "rocoin.cli.main", "source", "serve", "--bundle", str(bundle), "--fleet", str(fleet),
        "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--joins", "--state-dir", str(tmp_path / "state"),
        "--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / "source.pem"), "--tls-key", str(certs / "source.key"),
        "--api-tls-cert", str(certs / "device.pem"), "--api-tls-key", str(certs / "device.key"),
        "--join-tls-client-ca", str(certs / "ca.pem"), "--ready-file", str(ready),
    ]  # fmt: skip
    with open(tmp_path / "source.log", "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        info = wait_ready_file(ready, timeout_s=30, process=process)

        async def main():
            devices = {d: client(info["address"], tmp_path / "devices", d, certs) for d in JOIN_IDS}
            tasks = [asyncio.ensure_future(c.run()) for c in devices.values()]
            await wait_for(lambda: all(c.model_sha256 for c in devices.values()) or any(t.done() for t in tasks), 30)
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
            api = ClientTLS(certs / "ca.pem", certs / "source.pem", certs / "source.key")  # a client with a certificate of the CA
            async with grpc.aio.secure_channel(info["address"], api.credentials()) as channel:
                images, stub = images_batch(5, batch=2), rocoin_pb2_grpc.SourceStub(channel)
                for _ in range(50):  # the last devices may still be passing their health check
                    reply = await stub.Infer(rocoin_pb2.SourceInferRequest(input=tensor_to_proto(images)), timeout=10)
                    if not reply.missing_groups:
                        break
                    await asyncio.sleep(0.1)
                assert list(reply.missing_groups) == []
            for c in devices.values():
                c.stop()
            await asyncio.gather(*tasks)

        asyncio.run(main())
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))  # REST: no client certificate
        with urllib.request.urlopen(f"https://{info['http_address']}/v2/health/live", context=context, timeout=10) as reply:
            assert reply.status == 200
    finally:
        stop_processes([process.pid])


def test_a_join_ca_without_the_apis_certificate_is_one_error_line_and_opens_nothing(tmp_path, certs):
    from test_cli import bad, run

    from rocoin.contracts.fleet import save_fleet

    bundle = make_bundle(tmp_path / "bundle")
    save_fleet(Fleet(devices=[device(d, 20, 4, 300, 0.1) for d in JOIN_IDS]), tmp_path / "fleet.yaml")
    state = tmp_path / "state"
    result = run(
        "source", "serve", "--bundle", bundle, "--fleet", tmp_path / "fleet.yaml", "--insecure", "--joins", "--state-dir", state,
        "--join-tls-client-ca", certs / "ca.pem",
    )  # fmt: skip
    bad(result, "join-tls-client-ca: needs --joins and --api-tls-cert/--api-tls-key")
    assert not state.exists()
