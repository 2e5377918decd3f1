"""A throwaway certificate authority for the local stack with TLS on (`A2V_TLS=1 a2v up`) and for tests.

One CA and one certificate every local service uses, as server and as client (mTLS), for localhost, 127.0.0.1 and
::1; on request a client certificate per caller, its identity a URI (`spiffe://a2v.local/<caller>`) that a callers
file can name instead of a token (services.runtime.security). EC P-256 keys, valid for a week. Never for production:
Kubernetes gets its certificates from cert-manager.
Only the local tooling imports this (the `cryptography` package is in requirements-dev.txt, in no image).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from client.environment import CLIENT_TOKEN_FILE, SERVICE_TOKEN_FILE, TOKENS_FILE

VALID_DAYS = 7
HOSTS = ("localhost", "127.0.0.1", "::1")
IDENTITY = "spiffe://a2v.local/{caller}"
"""A caller's identity: the URI subject alternative name of its client certificate."""
LOCAL_CALLERS = {"services": ["stage:*"], "a2v": ["admin"]}
"""The local stack's callers and their scopes: the orchestrator calling the stages, and the command line."""


@dataclass(frozen=True)
class ClientCertificate:
    """One caller's own client certificate and key (mTLS): `identity` is what a callers file names."""

    identity: str
    cert_file: Path
    key_file: Path


def client_certificate(folder: str | Path, caller: str) -> ClientCertificate:
    """Where `make_local_pki` puts the client certificate of `caller`, and its identity."""
    folder = Path(folder)
    return ClientCertificate(
        IDENTITY.format(caller=caller), folder / f"{caller}.client.pem", folder / f"{caller}.client-key.pem"
    )


@dataclass(frozen=True)
class LocalPki:
    """The files of a throwaway CA: its certificate, one certificate and key for every service, and callers' own."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    clients: Mapping[str, ClientCertificate] = field(default_factory=dict)

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


def _sign(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    names: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
) -> x509.Certificate:
    """A leaf certificate for `key`, signed by the CA, valid as long as the CA."""
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca_cert.not_valid_before_utc)
        .not_valid_after(ca_cert.not_valid_after_utc)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _write_pair(cert_file: Path, key_file: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        key_file,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def make_local_pki(
    folder: str | Path, *, common_name: str = "a2v-local", hosts=HOSTS, callers: Iterable[str] = ()
) -> LocalPki:
    """Write a new CA, a certificate signed by it (server and client use) and a client certificate per caller."""
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
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    clients = {caller: client_certificate(folder, caller) for caller in callers}
    pki = LocalPki(folder / "ca.pem", folder / "service.pem", folder / "service-key.pem", clients)
    pki.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    key = ec.generate_private_key(ec.SECP256R1())
    _write_pair(pki.cert_file, pki.key_file, _sign(common_name, key, names, both, ca_key, ca_cert), key)
    for caller, client in clients.items():
        key = ec.generate_private_key(ec.SECP256R1())
        identity = [x509.UniformResourceIdentifier(client.identity)]
        cert = _sign(caller, key, identity, [ExtendedKeyUsageOID.CLIENT_AUTH], ca_key, ca_cert)
        _write_pair(client.cert_file, client.key_file, cert, key)
    return pki


def make_local_security(folder: str | Path) -> dict[str, str]:
    """The local stack's TLS (`A2V_TLS=1 a2v up`): a new CA and certificate, and two callers (`LOCAL_CALLERS`).

    `services` (the orchestrator calling the stages: `stage:*`) and `a2v` (the command line: `admin`), each with a
    token in its own file (client.environment names them) and a client certificate of its own, both in the callers
    file. The stack's processes present the shared service certificate, which names no caller, and send their
    tokens. Returns the variables of a service of the stack.
    """
    folder = Path(folder)
    pki = make_local_pki(folder, callers=LOCAL_CALLERS)
    certificates = {caller: [client.identity] for caller, client in pki.clients.items()}
    tokens = write_tokens_file(folder / TOKENS_FILE, LOCAL_CALLERS, certificates=certificates)
    _write_private(folder / SERVICE_TOKEN_FILE, tokens["services"].encode())
    _write_private(folder / CLIENT_TOKEN_FILE, tokens["a2v"].encode())
    return {
        **pki.environment(),
        "A2V_AUTH_TOKENS_FILE": str(folder / TOKENS_FILE),
        "A2V_AUTH_TOKEN_FILE": str(folder / SERVICE_TOKEN_FILE),
    }


def write_tokens_file(
    path: str | Path,
    scopes_by_caller: Mapping[str, list[str]],
    *,
    certificates: Mapping[str, list[str]] | None = None,
) -> dict[str, str]:
    """A callers file (services.runtime.security) with a new random token per caller; {caller: token}.

    `certificates` adds the client certificate identities a caller may also be known by.
    """
    tokens = {caller: secrets.token_urlsafe(32) for caller in scopes_by_caller}
    entries = []
    for caller, scopes in scopes_by_caller.items():
        entry = {"name": caller, "token": tokens[caller], "scopes": scopes}
        if certificates and caller in certificates:
            entry["certificates"] = certificates[caller]
        entries.append(entry)
    _write_private(Path(path), json.dumps({"callers": entries}, indent=2).encode())
    return tokens
