"""gRPC transport security and caller checks: TLS / mTLS from PEM files, bearer tokens with per-caller scopes.

Scopes: `jobs` (the orchestrator's job API), `stage:<name>` (one stage's service, e.g. `stage:audio`; `stage:*` every
stage, as the orchestrator needs), `admin` (everything). Health is open to all; reflection is open when it is served
(A2V_REFLECTION, off in the production overlay). The tokens file (A2V_AUTH_TOKENS_FILE, a mounted Secret) is JSON:

    {"callers": [{"name": "orchestrator", "token": "...", "scopes": ["stage:*"]},
                 {"name": "a2v", "token": "...", "scopes": ["jobs"]}]}

Only the tokens' SHA-256 is kept in memory; the file is read again when it changes, and so are the server's
certificate and key (a renewed certificate needs no restart).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.runtime.config import ConfigError, Env, TlsConfig

log = logging.getLogger(__name__)

SCOPE_JOBS = "jobs"
SCOPE_ADMIN = "admin"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Methods any caller may use: health (probes, load balancers) and reflection where it is served."""
AUTHORIZATION = "authorization"
RELOAD_CHECK_SECONDS = 1.0
"""How often a call may look at the tokens file's modification time."""


def stage_scope(stage: str) -> str:
    """The scope that lets a caller call one stage's service."""
    return f"stage:{stage}"


def required_scope(method: str) -> str:
    """The scope a "/package.Service/Method" needs.

    `jobs` for the orchestrator, `stage:<name>` for a stage's service (`stage:trainer` for the trainer service),
    `admin` for anything else.
    """
    service = method.lstrip("/").split("/", 1)[0]
    parts = service.split(".")
    if len(parts) == 4 and parts[0] == "audio2video":
        if parts[1] == "orchestrator":
            return SCOPE_JOBS
        if parts[3] == "TrainerService":
            return stage_scope("trainer")
        return stage_scope(parts[1])
    return SCOPE_ADMIN


@dataclass(frozen=True)
class Caller:
    """Who a token belongs to and what it may call."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """Whether the caller holds `scope` (`admin` holds every scope, `stage:*` every stage's)."""
        return (
            SCOPE_ADMIN in self.scopes
            or scope in self.scopes
            or (scope.startswith("stage:") and stage_scope("*") in self.scopes)
        )


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, source: str = "tokens file") -> dict[bytes, Caller]:
    """{sha256(token): Caller} from the JSON of a tokens file; raises ConfigError naming what is wrong."""
    try:
        document = json.loads(text)
        entries = document["callers"]
        callers: dict[bytes, Caller] = {}
        for entry in entries:
            name, token, scopes = entry["name"], entry["token"], entry["scopes"]
            if not (isinstance(name, str) and name and isinstance(token, str) and len(token) >= 16):
                raise ConfigError(f"{source}: caller {name!r} needs a name and a token of at least 16 characters")
            if not isinstance(scopes, list) or not all(isinstance(s, str) and s for s in scopes):
                raise ConfigError(f"{source}: caller {name!r} needs a list of scopes")
            digest = _digest(token)
            if digest in callers:
                raise ConfigError(f"{source}: callers {callers[digest].name!r} and {name!r} share a token")
            callers[digest] = Caller(name, frozenset(scopes))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{source} is not {{'callers': [{{'name', 'token', 'scopes'}}...]}}: {exc}") from exc
    return callers


class TokenRegistry:
    """The callers of a tokens file, read again when the file changes (a bad new file keeps the old callers)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._checked = 0.0
        self._stamp = self._stat()
        self._callers = parse_tokens(self.path.read_text(), str(self.path))

    def _stat(self) -> tuple[int, int]:
        info = os.stat(self.path)
        return info.st_mtime_ns, info.st_size

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_SECONDS:
            return
        with self._lock:
            self._checked = now
            try:
                stamp = self._stat()
                if stamp == self._stamp:
                    return
                self._callers = parse_tokens(self.path.read_text(), str(self.path))
                self._stamp = stamp
                log.info("reloaded %d callers from %s", len(self._callers), self.path)
            except (OSError, ConfigError) as exc:
                log.error("keeping the previous callers: %s", exc)

    def caller(self, token: str) -> Caller | None:
        """The caller a token belongs to, or None (compared by digest, in constant time per entry)."""
        self._maybe_reload()
        digest = _digest(token)
        found = None
        for known, caller in self._callers.items():
            if hmac.compare_digest(known, digest):
                found = caller
        return found


class TokenAuth(grpc.ServerInterceptor):
    """The token check of a server.

    Refuses calls without a known bearer token (UNAUTHENTICATED) or without the method's scope
    (PERMISSION_DENIED); health and reflection stay open.
    """

    def __init__(self, registry: TokenRegistry) -> None:
        self.registry = registry

    def intercept_service(self, continuation, handler_call_details):
        """The method's handler, or one that refuses the call."""
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        metadata = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        header = metadata.get(AUTHORIZATION, "")
        scheme, _, token = header.partition(" ")
        if not header:
            detail = "no credentials: send 'authorization: Bearer <token>'"
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, detail)
        if scheme.lower() != "bearer" or not token.strip():
            detail = "the authorization header is not 'Bearer <token>'"
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, detail)
        caller = self.registry.caller(token.strip())
        if caller is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token")
        scope = required_scope(method)
        if not caller.allows(scope):
            detail = f"caller {caller.name!r} lacks the scope {scope!r} that {method} needs"
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, detail)
        return handler


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, detail: str) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour replaced by an abort (same kind of call, same (de)serializers)."""

    def refuse(_request, context):
        context.abort(code, detail)

    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        if getattr(handler, kind):
            return handler._replace(**{kind: refuse})
    return handler


def server_interceptor(tokens_file: str) -> TokenAuth | None:
    """The token check for a server whose config names a tokens file (None: no check)."""
    if not tokens_file:
        return None
    try:
        return TokenAuth(TokenRegistry(tokens_file))
    except OSError as exc:
        raise ConfigError(f"A2V_AUTH_TOKENS_FILE {tokens_file}: {exc.strerror}") from exc


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from exc


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """TLS credentials of a server from its files, read again whenever they change (a renewed certificate).

    With `client_auth` a client must present a certificate signed by the CA file (mTLS).
    """

    def load():
        key, chain = _read(tls.key_file, "A2V_TLS_KEY"), _read(tls.cert_file, "A2V_TLS_CERT")
        roots = _read(tls.ca_file, "A2V_TLS_CA") if tls.ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    files = [f for f in (tls.cert_file, tls.key_file, tls.ca_file) if f]

    def stamp():
        try:
            return tuple(os.stat(f).st_mtime_ns for f in files)
        except OSError:
            return None

    state = {"stamp": stamp()}

    def fetch():
        current = stamp()
        if current is None or current == state["stamp"]:
            return None
        try:
            configuration = load()
        except ConfigError as exc:
            log.error("keeping the previous certificate: %s", exc)
            return None
        state["stamp"] = current
        log.info("reloaded the TLS certificate from %s", tls.cert_file)
        return configuration

    return grpc.dynamic_ssl_server_credentials(load(), fetch, require_client_authentication=tls.client_auth)


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches our services: TLS (its CA, a client certificate for mTLS) and its bearer token.

    Attributes:
        tls: TLS of the channel (A2V_TLS, A2V_TLS_CA, A2V_TLS_CERT / A2V_TLS_KEY for mTLS, A2V_TLS_SERVER_NAME).
        token: A2V_AUTH_TOKEN, else the contents of A2V_AUTH_TOKEN_FILE; sent as `authorization: Bearer`.
    """

    tls: TlsConfig = TlsConfig()
    token: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSecurity:
        """Read the client's A2V_TLS_ and A2V_AUTH_TOKEN(_FILE) variables; raises ConfigError when malformed."""
        env = Env(environ)
        tls = TlsConfig.read(env, server=False)
        token = env.get_str("A2V_AUTH_TOKEN", "")
        token_file = env.get_str("A2V_AUTH_TOKEN_FILE", "")
        env.check()
        if not token and token_file:
            token = _read(token_file, "A2V_AUTH_TOKEN_FILE").decode().strip()
        return cls(tls, token)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials of a channel: the CA to check servers against, and the client certificate for mTLS."""
        tls = self.tls
        roots = _read(tls.ca_file, "A2V_TLS_CA") if tls.ca_file else None
        key = _read(tls.key_file, "A2V_TLS_KEY") if tls.cert_file and tls.key_file else None
        chain = _read(tls.cert_file, "A2V_TLS_CERT") if key is not None else None
        return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)

    def channel(self, address: str, options: list[tuple[str, object]]) -> grpc.Channel:
        """A channel to `address`: TLS when configured, else plaintext; the token added to every call."""
        if self.tls.enabled:
            if self.tls.server_name:
                options = [*options, ("grpc.ssl_target_name_override", self.tls.server_name)]
            channel = grpc.secure_channel(address, self.channel_credentials(), options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        return grpc.intercept_channel(channel, BearerToken(self.token)) if self.token else channel


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Sends `authorization: Bearer <token>` with every call."""

    def __init__(self, token: str) -> None:
        self.header = (AUTHORIZATION, f"Bearer {token}")

    def _details(self, details):
        return _CallDetails(details, [*(details.metadata or ()), self.header])

    def intercept_unary_unary(self, continuation, client_call_details, request):
        """The call with the token added."""
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        """The call with the token added."""
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        """The call with the token added."""
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        """The call with the token added."""
        return continuation(self._details(client_call_details), request_iterator)
