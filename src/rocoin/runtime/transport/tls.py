"""TLS and mutual TLS for the device RPCs, from PEM certificate files.

A device serves with its certificate and key; given a client CA it also requires the source to
present a certificate signed by that CA (mTLS). The source verifies devices against a CA and,
for mTLS, presents its own certificate. ``scripts/make_certs.sh`` makes a test CA and
certificates with openssl.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from rocoin.contracts.errors import RocoinError


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RocoinError(f"{what} = {str(path)!r}: cannot read it ({exc.strerror})") from None
    if b"-----BEGIN" not in data:
        raise RocoinError(f"{what} = {str(path)!r}: not a PEM file")
    return data


@dataclass(frozen=True)
class ServerTLS:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: require client certificates signed by it (mTLS)

    def credentials(self) -> grpc.ServerCredentials:
        pair = [(_read(self.key, "tls-key"), _read(self.cert, "tls-cert"))]
        if self.client_ca is None:
            return grpc.ssl_server_credentials(pair)
        return grpc.ssl_server_credentials(pair, root_certificates=_read(self.client_ca, "tls-client-ca"), require_client_auth=True)

    def ssl_context(self):
        """The same certificate for an HTTPS server (the source's REST API). It asks for no client
        certificate, ``client_ca`` or not: REST clients authenticate with the API token."""
        import ssl

        _read(self.cert, "tls-cert"), _read(self.key, "tls-key")  # one-line errors for bad files
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


@dataclass(frozen=True)
class ClientTLS:
    ca: Path  # verifies the devices' certificates
    cert: Path | None = None  # presented for mTLS
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise RocoinError("tls-cert and tls-key: give both (the source's certificate for mTLS) or neither")
        key = _read(self.key, "tls-key") if self.key else None
        cert = _read(self.cert, "tls-cert") if self.cert else None
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca, "tls-ca"), private_key=key, certificate_chain=cert)


def server_tls(
    cert: str | os.PathLike[str] | None, key: str | os.PathLike[str] | None, client_ca: str | os.PathLike[str] | None = None
) -> ServerTLS | None:
    """The :class:`ServerTLS` of a server's ``tls-cert``/``tls-key``/``tls-client-ca`` settings (``None``: plain)."""
    if cert is None and key is None:
        if client_ca is not None:
            raise RocoinError("tls-client-ca needs --tls-cert and --tls-key (mTLS runs over TLS)")
        return None
    if cert is None or key is None:
        raise RocoinError("tls-cert and tls-key: give both")
    return ServerTLS(Path(cert), Path(key), Path(client_ca) if client_ca is not None else None)
