"""Throw-away test PKI built with ``trustme`` and written as PEM files.

rsyslog's TLS drivers read certificates and keys from files, and need the
certificate (chain) and the private key in *separate* files, so every
certificate here is written as ``NAME.pem`` + ``NAME.key``.

Contents:

* ``ca`` - the trusted CA; the forwarder and rsyslog both trust it.
* ``server_cert``/``server_key`` - rsyslog's identity: SAN ``DNS:localhost``
  and ``IP:127.0.0.1``, so clients can verify either name.
* ``wrong_cert``/``wrong_key`` - signed by the same CA but only for
  ``wrong.example``: a hostname-checking client must refuse it.
* ``client_cert``/``client_key`` - the forwarder's identity for mutual TLS
  (``forwarder.test``).
* ``untrusted_ca`` and ``untrusted_client_cert``/``untrusted_client_key`` - a
  second CA that nobody trusts, and a client certificate it issued: a
  certificate-verifying server must reject it.

trustme issues ECDSA keys whose certificates carry both the serverAuth and
clientAuth extended key usages, so any leaf works on either side of a
connection.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trustme

SERVER_NAME = "localhost"
SERVER_IP = "127.0.0.1"
WRONG_SERVER_NAME = "wrong.example"
CLIENT_NAME = "forwarder.test"
UNTRUSTED_CLIENT_NAME = "intruder.test"


@dataclasses.dataclass(frozen=True)
class Pki:
    """Paths of the PEM files written by :func:`make_pki`."""

    ca: Path
    server_cert: Path
    server_key: Path
    wrong_cert: Path
    wrong_key: Path
    client_cert: Path
    client_key: Path
    untrusted_ca: Path
    untrusted_client_cert: Path
    untrusted_client_key: Path


def _write_leaf(leaf: trustme.LeafCert, directory: Path, name: str) -> tuple[Path, Path]:
    """Write a leaf's certificate chain and its key; return (cert path, key path)."""
    cert_path = directory / f"{name}.pem"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def make_pki(directory: Path) -> Pki:
    """Create the CAs and certificates under ``directory`` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    ca = trustme.CA(organization_name="sync_waf_to_syslog test CA")
    untrusted_ca = trustme.CA(organization_name="untrusted test CA")
    ca_path = directory / "ca.pem"
    untrusted_ca_path = directory / "untrusted-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    untrusted_ca.cert_pem.write_to_path(str(untrusted_ca_path))

    server = ca.issue_cert(SERVER_NAME, SERVER_IP, common_name=SERVER_NAME)
    wrong = ca.issue_cert(WRONG_SERVER_NAME, common_name=WRONG_SERVER_NAME)
    client = ca.issue_cert(CLIENT_NAME, common_name=CLIENT_NAME)
    intruder = untrusted_ca.issue_cert(UNTRUSTED_CLIENT_NAME, common_name=UNTRUSTED_CLIENT_NAME)

    server_cert, server_key = _write_leaf(server, directory, "server")
    wrong_cert, wrong_key = _write_leaf(wrong, directory, "wrong-server")
    client_cert, client_key = _write_leaf(client, directory, "client")
    untrusted_client_cert, untrusted_client_key = _write_leaf(intruder, directory, "untrusted-client")

    return Pki(
        ca=ca_path,
        server_cert=server_cert,
        server_key=server_key,
        wrong_cert=wrong_cert,
        wrong_key=wrong_key,
        client_cert=client_cert,
        client_key=client_key,
        untrusted_ca=untrusted_ca_path,
        untrusted_client_cert=untrusted_client_cert,
        untrusted_client_key=untrusted_client_key,
    )
