"""A throwaway certificate authority for the local stack with TLS on (`A2V_TLS=1 a2v up`) and for tests.

One CA and one certificate every local service uses, as server and as client (mTLS), for localhost, 127.0.0.1 and
::1; EC P-256 keys, valid for a week. Never for production: Kubernetes gets its certificates from cert-manager.
Only the local tooling imports this (the `cryptography` package is in requirements-dev.txt, in no image).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from client.environment import CLIENT_TOKEN_FILE, SERVICE_TOKEN_FILE, TOKENS_FILE

VALID_DAYS = 7
HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class LocalPki:
    """The files of a throwaway CA: its certificate, and one certificate and key for every service."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def environment(self) -> dict[str, str]:
        """The A2V_TLS_ variables of a service (server and client, mTLS) using these files."""
        return {
            "A2V_TLS": "1",
            "A2V_TLS_CA": str(self.ca_file),
            "A2V_TLS_CERT": str(self.cert_file),
            "A2V_TLS_KEY": str(self.key_file),
            "A2V_TLS_CLIENT_AUTH": "1",
            "A2V_TLS_SERVER_NAME": "localhost",
        }


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "audio2video local"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def make_local_pki(folder: str | Path, *, common_name: str = "a2v-local", hosts=HOSTS) -> LocalPki:
    """Write a new CA and a certificate signed by it (server and client use) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{common_name} CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = LocalPki(folder / "ca.pem", folder / "service.pem", folder / "service-key.pem")
    pki.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        pki.key_file,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return pki


def make_local_security(folder: str | Path) -> dict[str, str]:
    """The local stack's TLS (`A2V_TLS=1 a2v up`): a new CA and certificate, and tokens for two callers.

    `services` (the orchestrator calling the stages: `stage:*`) and `a2v` (the command line: `admin`), each token in
    its own file (client.environment names them). Returns the variables of a service of the stack.
    """
    folder = Path(folder)
    pki = make_local_pki(folder)
    tokens = write_tokens_file(folder / TOKENS_FILE, {"services": ["stage:*"], "a2v": ["admin"]})
    _write_private(folder / SERVICE_TOKEN_FILE, tokens["services"].encode())
    _write_private(folder / CLIENT_TOKEN_FILE, tokens["a2v"].encode())
    return {
        **pki.environment(),
        "A2V_AUTH_TOKENS_FILE": str(folder / TOKENS_FILE),
        "A2V_AUTH_TOKEN_FILE": str(folder / SERVICE_TOKEN_FILE),
    }


def write_tokens_file(path: str | Path, scopes_by_caller: dict[str, list[str]]) -> dict[str, str]:
    """A tokens file (services.runtime.security) with a new random token per caller; {caller: token}."""
    tokens = {caller: secrets.token_urlsafe(32) for caller in scopes_by_caller}
    document = {"callers": [{"name": c, "token": tokens[c], "scopes": s} for c, s in scopes_by_caller.items()]}
    _write_private(Path(path), json.dumps(document, indent=2).encode())
    return tokens
