"""gRPC transport security and caller checks: TLS / mTLS from PEM files, callers with per-caller scopes.

Callers are known by a bearer token or by their client certificate. Scopes: `jobs` (the orchestrator's job API),
`stage:<name>` (one stage's service, e.g. `stage:audio`; `stage:*` every stage, as the orchestrator needs), `admin`
(everything). Health is open to all; reflection is open when it is served (A2V_REFLECTION, off in the production
overlay). The callers file (A2V_AUTH_TOKENS_FILE, a mounted Secret) is JSON; a caller has a token, certificate
identities, or both:

    {"callers": [{"name": "orchestrator", "token": "...", "scopes": ["stage:*"]},
                 {"name": "a2v", "certificates": ["spiffe://a2v.local/a2v"], "scopes": ["jobs"]}]}

Who calls: a call that sends `authorization: Bearer <token>` is that token's caller, whatever certificate it
presents (a token is the narrower, revocable credential). A call without one, on a server that takes mTLS
(A2V_TLS_CLIENT_AUTH: the certificate was verified against A2V_TLS_CA), is the caller that names one of its
certificate's identities: a subject alternative name (URI such as a SPIFFE ID, DNS name, IP address) or the subject
CN. Only the tokens' SHA-256 is kept in memory; the file is read again when it changes, and so are the server's
certificate and key (a renewed certificate needs no restart).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
HANDLER_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
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
    """Who a token or a certificate identity belongs to and what it may call."""

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


@dataclass(frozen=True)
class Callers:
    """The callers of a callers file, by the SHA-256 of their tokens and by their certificate identities."""

    by_token: Mapping[bytes, Caller]
    by_identity: Mapping[str, Caller]


def parse_callers(text: str, source: str = "callers file") -> Callers:
    """The callers in the JSON of a callers file; raises ConfigError naming what is wrong."""
    by_token: dict[bytes, Caller] = {}
    by_identity: dict[str, Caller] = {}
    try:
        for entry in json.loads(text)["callers"]:
            name, scopes = entry["name"], entry["scopes"]
            token, identities = entry.get("token"), entry.get("certificates", [])
            if not (isinstance(name, str) and name):
                raise ConfigError(f"{source}: a caller needs a name")
            if token is not None and not (isinstance(token, str) and len(token) >= 16):
                raise ConfigError(f"{source}: caller {name!r}: a token has at least 16 characters")
            if not isinstance(identities, list) or not all(isinstance(i, str) and i for i in identities):
                raise ConfigError(f"{source}: caller {name!r}: certificates is a list of identities")
            if token is None and not identities:
                raise ConfigError(f"{source}: caller {name!r} needs a token or certificates")
            if not isinstance(scopes, list) or not all(isinstance(s, str) and s for s in scopes):
                raise ConfigError(f"{source}: caller {name!r} needs a list of scopes")
            caller = Caller(name, frozenset(scopes))
            if token is not None:
                digest = _digest(token)
                if digest in by_token:
                    raise ConfigError(f"{source}: callers {by_token[digest].name!r} and {name!r} share a token")
                by_token[digest] = caller
            for identity in identities:
                if identity in by_identity:
                    other = by_identity[identity].name
                    raise ConfigError(f"{source}: callers {other!r} and {name!r} share the identity {identity!r}")
                by_identity[identity] = caller
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        expected = "{'callers': [{'name', 'scopes', 'token' and/or 'certificates'}...]}"
        raise ConfigError(f"{source} is not {expected}: {exc}") from exc
    return Callers(by_token, by_identity)


class Unauthenticated(Exception):
    """A call whose caller is not known: no credentials, an unknown token or a certificate no caller names."""


def certificate_identities(context: grpc.ServicerContext) -> frozenset[str]:
    """The identities of the call's client certificate: its subject alternative names and subject CN.

    Empty without one. A server asks for a client certificate only with mTLS, and then gRPC has verified it
    against the CA (`server_credentials`), so the names are the CA's word.
    """
    auth = context.auth_context() or {}
    if auth.get("transport_security_type") != [b"ssl"]:
        return frozenset()
    names = [*auth.get("x509_subject_alternative_name", ()), *auth.get("x509_common_name", ())]
    return frozenset(name.decode(errors="replace") for name in names)


class TokenRegistry:
    """The callers of a callers file, read again when the file changes (a bad new file keeps the old callers)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._checked = 0.0
        self._stamp = self._stat()
        self._callers = parse_callers(self.path.read_text(), str(self.path))

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
                self._callers = parse_callers(self.path.read_text(), str(self.path))
                self._stamp = stamp
                log.info("reloaded the callers from %s", self.path)
            except (OSError, ConfigError) as exc:
                log.error("keeping the previous callers: %s", exc)

    def caller(self, token: str) -> Caller | None:
        """The caller a token belongs to, or None (compared by digest, in constant time per entry)."""
        self._maybe_reload()
        digest = _digest(token)
        found = None
        for known, caller in self._callers.by_token.items():
            if hmac.compare_digest(known, digest):
                found = caller
        return found

    def identify(self, header: str, context: grpc.ServicerContext | None) -> Caller:
        """The caller of a call: its bearer token's when it sends an authorization header, else its certificate's.

        Raises Unauthenticated saying why there is none.
        """
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the authorization header is not 'Bearer <token>'")
            caller = self.caller(token.strip())
            if caller is None:
                raise Unauthenticated("unknown or revoked token")
            return caller
        identities = certificate_identities(context) if context is not None else frozenset()
        if not identities:
            raise Unauthenticated(
                "no credentials: send 'authorization: Bearer <token>' or, with mTLS, a known certificate"
            )
        self._maybe_reload()
        by_identity = self._callers.by_identity
        callers = {by_identity[i] for i in identities if i in by_identity}
        if len(callers) != 1:
            names = ", ".join(sorted(identities))
            why = "names no caller" if not callers else "names more than one caller"
            raise Unauthenticated(f"the client certificate ({names}) {why}")
        return callers.pop()


class TokenAuth(grpc.ServerInterceptor):
    """The caller check of a server.

    Refuses calls from no known caller (UNAUTHENTICATED) or from one without the method's scope (PERMISSION_DENIED);
    health and reflection stay open. A call without a token is checked when it runs, since only its context shows
    the client certificate; either way a refused call never reaches the call slots or the servicer.
    """

    def __init__(self, registry: TokenRegistry) -> None:
        self.registry = registry

    def intercept_service(self, continuation, handler_call_details):
        """The method's handler, or one that checks or refuses the call first."""
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        metadata = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        header = metadata.get(AUTHORIZATION, "")
        if not header:
            return _checked(handler, lambda context: self._refusal(method, "", context))
        refusal = self._refusal(method, header, None)
        return _checked(handler, lambda _context: refusal) if refusal else handler

    def _refusal(self, method: str, header: str, context) -> tuple[grpc.StatusCode, str] | None:
        """Why the call is refused (status code, detail), or None."""
        try:
            caller = self.registry.identify(header, context)
        except Unauthenticated as exc:
            return grpc.StatusCode.UNAUTHENTICATED, str(exc)
        scope = required_scope(method)
        if not caller.allows(scope):
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"caller {caller.name!r} lacks the scope {scope!r} that {method} needs",
            )
        return None


def _checked(handler: grpc.RpcMethodHandler, check) -> grpc.RpcMethodHandler:
    """`handler` that first asks `check(context)`: a (code, detail) it returns aborts the call.

    Same kind of call, same (de)serializers; the refused call never reaches `handler`'s behaviour.
    """
    for kind in HANDLER_KINDS:
        behaviour = getattr(handler, kind)
        if behaviour:

            def checked(request, context, behaviour=behaviour):
                refusal = check(context)
                if refusal:
                    context.abort(*refusal)
                return behaviour(request, context)

            return handler._replace(**{kind: checked})
    return handler


def server_interceptor(tokens_file: str) -> TokenAuth | None:
    """The caller check for a server whose config names a callers file (None: no check)."""
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


def modification_stamp(files: Sequence[str]) -> tuple[int, ...] | None:
    """The files' modification times (ns), to tell a rewritten certificate; None while one is missing."""
    try:
        return tuple(os.stat(f).st_mtime_ns for f in files)
    except OSError:
        return None


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """TLS credentials of a server from its files, read again whenever they change (a renewed certificate).

    With `client_auth` a client must present a certificate signed by the CA file (mTLS).
    """

    def load():
        key, chain = _read(tls.key_file, "A2V_TLS_KEY"), _read(tls.cert_file, "A2V_TLS_CERT")
        roots = _read(tls.ca_file, "A2V_TLS_CA") if tls.ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    files = [f for f in (tls.cert_file, tls.key_file, tls.ca_file) if f]
    state = {"stamp": modification_stamp(files)}

    def fetch():
        current = modification_stamp(files)
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
        """A channel to `address`: TLS when configured, else plaintext; the token added to every call.

        A TLS channel whose files are named (CA, client certificate) starts over with them when they change
        (`RenewingChannel`): a renewed client certificate is used before the old one expires.
        """
        if self.tls.enabled:
            if self.tls.server_name:
                options = [*options, ("grpc.ssl_target_name_override", self.tls.server_name)]
            files = [f for f in (self.tls.ca_file, self.tls.cert_file, self.tls.key_file) if f]

            def open_channel() -> grpc.Channel:
                return grpc.secure_channel(address, self.channel_credentials(), options=options)

            channel = RenewingChannel(open_channel, files) if files else open_channel()
        else:
            channel = grpc.insecure_channel(address, options=options)
        return grpc.intercept_channel(channel, BearerToken(self.token)) if self.token else channel


RENEWAL_CHECK_SECONDS = 10.0
"""How often a `RenewingChannel` looks at its files (a stat each; cert-manager renews weeks before expiry)."""


class RenewingChannel(grpc.Channel):
    """A TLS channel that opens a new channel when its certificate files change, for calls from then on.

    gRPC reads a client's certificate once, when the channel is made; a long-running client (the orchestrator
    calls the stages for months) would present its first certificate until it expired and every new connection
    failed, although cert-manager had renewed the files weeks before. Servers reload theirs
    (`server_credentials`); this is the client's half. Every `RENEWAL_CHECK_SECONDS` a call compares the files'
    modification times; when they changed, the next calls go through a new channel with the new files. The old
    channel is kept open (never closed before `close`), so calls already on it finish: a channel closed under a
    running stream cancels it. Files that cannot be read (half written) keep the current channel, and the change
    is tried again at the next check.

    The stubs built on it must ask for a multicallable per call, as `grpc.intercept_channel` does (every
    `create_channel` channel is intercepted); a stub built directly on it keeps the channel of its creation.
    """

    def __init__(self, open_channel: Callable[[], grpc.Channel], files: Sequence[str]) -> None:
        self._open = open_channel
        self._files = list(files)
        self._lock = threading.Lock()
        self._stamp = modification_stamp(self._files)
        self._channel = open_channel()
        self._retired: list[grpc.Channel] = []
        self._checked = time.monotonic()

    def _current(self) -> grpc.Channel:
        now = time.monotonic()
        if now - self._checked < RENEWAL_CHECK_SECONDS:
            return self._channel
        with self._lock:
            if now - self._checked < RENEWAL_CHECK_SECONDS:
                return self._channel
            self._checked = now
            stamp = modification_stamp(self._files)
            if stamp is None or stamp == self._stamp:
                return self._channel
            try:
                renewed = self._open()
            except ConfigError as exc:
                log.error("keeping the previous client certificate: %s", exc)
                return self._channel
            self._retired.append(self._channel)
            self._channel, self._stamp = renewed, stamp
            log.info("a TLS file changed (%s): new calls use a new channel", ", ".join(self._files))
            return renewed

    def unary_unary(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        """The current channel's multicallable."""
        return self._current().unary_unary(method, request_serializer, response_deserializer, _registered_method)

    def unary_stream(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        """The current channel's multicallable."""
        return self._current().unary_stream(method, request_serializer, response_deserializer, _registered_method)

    def stream_unary(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        """The current channel's multicallable."""
        return self._current().stream_unary(method, request_serializer, response_deserializer, _registered_method)

    def stream_stream(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        """The current channel's multicallable."""
        return self._current().stream_stream(method, request_serializer, response_deserializer, _registered_method)

    def subscribe(self, callback, try_to_connect=False):
        """Connectivity of the current channel."""
        self._current().subscribe(callback, try_to_connect)

    def unsubscribe(self, callback):
        """Stop the callback on the current and earlier channels."""
        with self._lock:
            channels = [self._channel, *self._retired]
        for channel in channels:
            with contextlib.suppress(KeyError, ValueError):  # not subscribed there
                channel.unsubscribe(callback)

    def close(self):
        """Close the current channel and every earlier one."""
        with self._lock:
            channels, self._retired = [self._channel, *self._retired], []
        for channel in channels:
            channel.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.close()
        return False


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
