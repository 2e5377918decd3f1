"""Configuration from the environment: frozen, defaulted, and failing fast on bad or missing values."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

REQUIRED = object()
"""Marker default: the variable must be set."""

MIB = 1 << 20

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(RuntimeError):
    """The environment lacks a required value or holds a malformed one (raised at start, not per request)."""


class Env:
    """Typed reader over an environment mapping that collects every problem before failing.

    Reading all values first and raising once means a misconfigured deployment learns about every
    missing variable in one start attempt, not one per restart.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ
        self._problems: list[str] = []

    def _raw(self, name: str, default: object) -> str | None:
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            if default is REQUIRED:
                self._problems.append(f"{name} is required but not set")
            return None
        return value.strip()

    def get_str(self, name: str, default: object = REQUIRED) -> str:
        """A string variable (stripped); blank counts as unset."""
        raw = self._raw(name, default)
        return raw if raw is not None else ("" if default is REQUIRED else default)  # type: ignore[return-value]

    def get_int(
        self, name: str, default: object = REQUIRED, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        """An integer variable within [minimum, maximum]."""
        raw = self._raw(name, default)
        if raw is None:
            return 0 if default is REQUIRED else default  # type: ignore[return-value]
        try:
            value = int(raw)
        except ValueError:
            self._problems.append(f"{name}={raw!r} is not an integer")
            return 0
        return self._check_range(name, value, minimum, maximum)

    def get_float(
        self, name: str, default: object = REQUIRED, *, minimum: float | None = None, maximum: float | None = None
    ) -> float:
        """A number variable within [minimum, maximum]."""
        raw = self._raw(name, default)
        if raw is None:
            return 0.0 if default is REQUIRED else default  # type: ignore[return-value]
        try:
            value = float(raw)
        except ValueError:
            self._problems.append(f"{name}={raw!r} is not a number")
            return 0.0
        return self._check_range(name, value, minimum, maximum)

    def get_bool(self, name: str, default: object = REQUIRED) -> bool:
        """A boolean variable: 1/true/yes/on or 0/false/no/off."""
        raw = self._environ.get(name)
        if raw is None:
            if default is REQUIRED:
                self._problems.append(f"{name} is required but not set")
                return False
            return bool(default)
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        self._problems.append(f"{name}={raw!r} is not a boolean (use true/false)")
        return False

    def _check_range(self, name, value, minimum, maximum):
        if minimum is not None and value < minimum:
            self._problems.append(f"{name}={value} is below the minimum {minimum}")
        if maximum is not None and value > maximum:
            self._problems.append(f"{name}={value} is above the maximum {maximum}")
        return value

    def check(self) -> None:
        """Raise one ConfigError naming every problem seen so far."""
        if self._problems:
            raise ConfigError("invalid configuration: " + "; ".join(self._problems))


def parse_address(address: str) -> tuple[str, int]:
    """Split "host:port" (or "[v6]:port") into its parts; raises ConfigError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class TlsConfig:
    """TLS of a gRPC server or client, from PEM files (off by default: plaintext, as the local stack runs).

    Attributes:
        enabled: A2V_TLS.
        cert_file: A2V_TLS_CERT, this process's certificate chain (a server's; a client's for mTLS).
        key_file: A2V_TLS_KEY, its private key.
        ca_file: A2V_TLS_CA, the CA bundle peers are checked against (a client: the servers'; empty = the system's
            roots; a server with client_auth: the clients').
        client_auth: A2V_TLS_CLIENT_AUTH, a server requires a client certificate signed by `ca_file` (mTLS).
        server_name: A2V_TLS_SERVER_NAME, the name a client checks in the server's certificate, when it dials an
            address that is not that name (an IP address).
    """

    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    client_auth: bool = False
    server_name: str = ""

    @classmethod
    def read(cls, env: Env, *, server: bool) -> TlsConfig:
        """Read the A2V_TLS_ variables; a server with TLS needs a certificate and key, mTLS a CA too."""
        enabled = env.get_bool("A2V_TLS", False)
        needed = REQUIRED if enabled and server else ""
        config = cls(
            enabled=enabled,
            cert_file=env.get_str("A2V_TLS_CERT", needed),
            key_file=env.get_str("A2V_TLS_KEY", needed),
            ca_file=env.get_str("A2V_TLS_CA", ""),
            client_auth=env.get_bool("A2V_TLS_CLIENT_AUTH", False),
            server_name=env.get_str("A2V_TLS_SERVER_NAME", ""),
        )
        if enabled and server and config.client_auth and not config.ca_file:
            env.get_str("A2V_TLS_CA")  # mTLS: the CA that signs the clients' certificates is required
        return config


@dataclass(frozen=True)
class AuthConfig:
    """Caller authentication of a gRPC server (services.runtime.security.TokenAuth).

    Attributes:
        tokens_file: A2V_AUTH_TOKENS_FILE, JSON naming each caller's token and scopes (empty: no check, the default
            locally); read again when it changes.
        reflection: A2V_REFLECTION, serve gRPC reflection (default on; off in the production overlay).
    """

    tokens_file: str = ""
    reflection: bool = True

    @classmethod
    def read(cls, env: Env) -> AuthConfig:
        """Read A2V_AUTH_TOKENS_FILE and A2V_REFLECTION."""
        return cls(
            tokens_file=env.get_str("A2V_AUTH_TOKENS_FILE", ""),
            reflection=env.get_bool("A2V_REFLECTION", cls.reflection),
        )


@dataclass(frozen=True)
class ServerConfig:
    """How a service listens and how much it takes on at once."""

    service: str
    listen: str = "127.0.0.1:0"
    max_workers: int = 8
    max_concurrent_rpcs: int = 16
    # Calls that mostly wait (a job's progress stream, `waiting_methods` of a servicer) are bounded apart: they
    # hold a thread each but no running slot, so watchers never keep real work from running.
    max_waiting_calls: int = 64
    max_message_bytes: int = 4 * 1024 * 1024
    grace_seconds: float = 10.0
    log_level: str = "INFO"
    # Clients re-resolve DNS only when a connection closes: ageing connections out lets replicas that
    # an autoscaler added receive calls. In-flight calls get `max_connection_age_grace_seconds` to end;
    # None (the default) lets them run to their end, since a progress stream lasts as long as its work
    # (a 10-minute training video, a job being watched) and new calls already go to a new connection.
    max_connection_age_seconds: float = 60.0
    max_connection_age_grace_seconds: float | None = None
    # Clients ping silent calls every 30 s (services.runtime.clients.KEEPALIVE_SECONDS); pings closer
    # together than this count as abuse and a few of them close the connection ("too many pings").
    min_ping_interval_seconds: float = 10.0
    # Prometheus metrics over HTTP on this port, on the listen address's host (0 = none; services.runtime.telemetry).
    metrics_port: int = 0
    # TLS (and mTLS) of the server, and who may call what (off by default; services.runtime.security).
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)

    @classmethod
    def read(cls, env: Env, service: str) -> ServerConfig:
        """Read the server's A2V_ variables (listen address, workers, limits, keepalive)."""
        return cls(
            service=service,
            listen=env.get_str("A2V_LISTEN", cls.listen),
            max_workers=env.get_int("A2V_MAX_WORKERS", cls.max_workers, minimum=1, maximum=256),
            max_concurrent_rpcs=env.get_int(
                "A2V_MAX_CONCURRENT_RPCS", cls.max_concurrent_rpcs, minimum=1, maximum=4096
            ),
            max_waiting_calls=env.get_int("A2V_MAX_WAITING_CALLS", cls.max_waiting_calls, minimum=0, maximum=4096),
            max_message_bytes=env.get_int(
                "A2V_MAX_MESSAGE_BYTES", cls.max_message_bytes, minimum=1024, maximum=256 * 1024 * 1024
            ),
            grace_seconds=env.get_float("A2V_GRACE_SECONDS", cls.grace_seconds, minimum=0.0, maximum=3600.0),
            log_level=env.get_str("A2V_LOG_LEVEL", cls.log_level).upper(),
            max_connection_age_seconds=env.get_float(
                "A2V_MAX_CONNECTION_AGE_SECONDS", cls.max_connection_age_seconds, minimum=1.0, maximum=86400.0
            ),
            max_connection_age_grace_seconds=env.get_float(
                "A2V_MAX_CONNECTION_AGE_GRACE_SECONDS",
                cls.max_connection_age_grace_seconds,
                minimum=0.0,
                maximum=86400.0,
            ),
            min_ping_interval_seconds=env.get_float(
                "A2V_MIN_PING_INTERVAL_SECONDS", cls.min_ping_interval_seconds, minimum=0.1, maximum=3600.0
            ),
            metrics_port=env.get_int("A2V_METRICS_PORT", cls.metrics_port, minimum=0, maximum=65535),
            tls=TlsConfig.read(env, server=True),
            auth=AuthConfig.read(env),
        )


@dataclass(frozen=True)
class TracingConfig:
    """Where spans go: an OTLP/gRPC collector endpoint (empty: tracing off, the default locally).

    Attributes:
        otlp_endpoint: "host:port" or "http://host:port" of an OpenTelemetry Collector's OTLP gRPC receiver.
        sample_ratio: Share of traces recorded, 0-1 (parent-based: a job's calls follow its decision).
    """

    otlp_endpoint: str = ""
    sample_ratio: float = 1.0

    @classmethod
    def read(cls, env: Env) -> TracingConfig:
        """A2V_OTLP_ENDPOINT (else OTEL_EXPORTER_OTLP_ENDPOINT) and A2V_TRACE_SAMPLE_RATIO (default 1)."""
        return cls(
            otlp_endpoint=env.get_str("A2V_OTLP_ENDPOINT", "") or env.get_str("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            sample_ratio=env.get_float("A2V_TRACE_SAMPLE_RATIO", cls.sample_ratio, minimum=0.0, maximum=1.0),
        )


@dataclass(frozen=True)
class StoreConfig:
    """Where the S3-compatible object store is and how blobs are written to it."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str = "audio2video"
    secure: bool = False
    region: str = "us-east-1"
    part_size_bytes: int = 16 * 1024 * 1024
    max_object_bytes: int = 8 * 1024 * 1024 * 1024
    # Buckets besides `bucket` that requests may name (A2V_S3_ALLOWED_BUCKETS, comma-separated); any other is refused.
    allowed_buckets: tuple[str, ...] = ()

    @classmethod
    def read(cls, env: Env) -> StoreConfig:
        """Read the object store's A2V_S3_ variables."""
        return cls(
            endpoint=env.get_str("A2V_S3_ENDPOINT", "127.0.0.1:8333"),
            access_key=env.get_str("A2V_S3_ACCESS_KEY"),
            secret_key=env.get_str("A2V_S3_SECRET_KEY"),
            bucket=env.get_str("A2V_S3_BUCKET", cls.bucket),
            secure=env.get_bool("A2V_S3_SECURE", cls.secure),
            region=env.get_str("A2V_S3_REGION", cls.region),
            # S3 multipart parts must be at least 5 MiB.
            part_size_bytes=env.get_int(
                "A2V_S3_PART_SIZE_BYTES", cls.part_size_bytes, minimum=5 * 1024 * 1024, maximum=5 * 1024 * 1024 * 1024
            ),
            max_object_bytes=env.get_int("A2V_S3_MAX_OBJECT_BYTES", cls.max_object_bytes, minimum=1),
            allowed_buckets=tuple(b.strip() for b in env.get_str("A2V_S3_ALLOWED_BUCKETS", "").split(",") if b.strip()),
        )

    def __repr__(self) -> str:  # never print the secret in logs
        return (
            f"StoreConfig(endpoint={self.endpoint!r}, bucket={self.bucket!r}, secure={self.secure}, "
            f"access_key={self.access_key!r}, secret_key='***')"
        )


@dataclass(frozen=True)
class Resources:
    """What one replica may use: its pod's memory limit and the size of its scratch folder (/tmp).

    Kubernetes passes the memory limit in (`resourceFieldRef: limits.memory`) and the scratch size is the
    `emptyDir` sizeLimit; the defaults are those of the base manifests (2 GiB each).
    """

    memory_bytes: int = 2 << 30
    scratch_bytes: int = 2 << 30

    @classmethod
    def read(cls, env: Env) -> Resources:
        """Read A2V_MEMORY_BYTES and A2V_SCRATCH_BYTES (defaults 2 GiB)."""
        return cls(
            memory_bytes=env.get_int("A2V_MEMORY_BYTES", cls.memory_bytes, minimum=64 * MIB),
            scratch_bytes=env.get_int("A2V_SCRATCH_BYTES", cls.scratch_bytes, minimum=16 * MIB),
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Resources:
        """Read A2V_MEMORY_BYTES and A2V_SCRATCH_BYTES from the environment; raises ConfigError when malformed."""
        env = Env(environ)
        resources = cls.read(env)
        env.check()
        return resources


@dataclass(frozen=True)
class InputLimits:
    """How much one call of a stage that reads a whole media file may bring, and what its replica has.

    Attributes:
        max_seconds: Longest input accepted, in seconds.
        max_input_bytes: Largest input accepted, in bytes; None = as much as the replica's resources allow
            (each stage caps it by what its calls hold per input byte).
        resources: The replica's memory and scratch space.
    """

    max_seconds: float = 1800.0
    max_input_bytes: int | None = None
    resources: Resources = field(default_factory=Resources)

    @classmethod
    def read(cls, env: Env, stage: str) -> InputLimits:
        """Read a stage's limits and the replica's `Resources`.

        A2V_<STAGE>_MAX_SECONDS (default 1800 s), A2V_<STAGE>_MAX_INPUT_BYTES (0 or unset = no own limit).
        """
        prefix = f"A2V_{stage.upper()}"
        return cls(
            max_seconds=env.get_float(f"{prefix}_MAX_SECONDS", cls.max_seconds, minimum=1.0, maximum=24 * 3600.0),
            max_input_bytes=env.get_int(f"{prefix}_MAX_INPUT_BYTES", 0, minimum=0) or None,
            resources=Resources.read(env),
        )


S = TypeVar("S")
"""The type of a stage's own settings (`Config.settings`)."""


@dataclass(frozen=True)
class Config(Generic[S]):
    """Everything a service needs at start: its server settings, the object store and its own settings.

    Attributes:
        server: How the service listens.
        store: The object store.
        rpc_timeout_seconds: Deadline of the calls it makes to other services.
        settings: The stage's own settings (a frozen dataclass its servicer takes), read by the reader given to
            `from_env`; None when none was given.
        tracing: Where its spans go (off unless an OTLP endpoint is set).
    """

    server: ServerConfig
    store: StoreConfig
    rpc_timeout_seconds: float = 60.0
    settings: S = None  # type: ignore[assignment]
    tracing: TracingConfig = field(default_factory=TracingConfig)

    @classmethod
    def from_env(
        cls,
        service: str,
        environ: Mapping[str, str] | None = None,
        settings: Callable[[Env], S] | None = None,
    ) -> Config[S]:
        """Read the config of `service` from the environment.

        Args:
            service: The service's name (logs, health).
            environ: The environment; default `os.environ`.
            settings: Reads the stage's own settings from the same environment, so that one ConfigError names
                every problem of the start.

        Returns:
            The frozen config.

        Raises:
            ConfigError: a required value is missing or a value is malformed (all of them listed).
        """
        env = Env(environ)
        config = cls(
            server=ServerConfig.read(env, service),
            store=StoreConfig.read(env),
            rpc_timeout_seconds=env.get_float(
                "A2V_RPC_TIMEOUT_SECONDS", cls.rpc_timeout_seconds, minimum=0.1, maximum=86400.0
            ),
            settings=settings(env) if settings is not None else None,  # type: ignore[arg-type]
            tracing=TracingConfig.read(env),
        )
        env.check()
        parse_address(config.server.listen)
        parse_address(config.store.endpoint)
        return config


def read_settings(reader: Callable[[Env], Any], environ: Mapping[str, str] | None = None) -> Any:
    """One stage's settings read on their own (tools, tests); raises ConfigError naming every problem."""
    env = Env(environ)
    settings = reader(env)
    env.check()
    return settings


def service_address(name: str, environ: Mapping[str, str] | None = None, default: str | None = None) -> str:
    """Address of another service from `A2V_<NAME>_ADDR` (one `.env` shared by compose and the local stack)."""
    env = Env(environ)
    variable = f"A2V_{name.upper()}_ADDR"
    value = env.get_str(variable, REQUIRED if default is None else default)
    env.check()
    return value
