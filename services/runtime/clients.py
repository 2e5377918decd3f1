"""gRPC client helpers: one channel factory with deadlines, UNAVAILABLE retries and round-robin balancing."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.errors import Unavailable
from services.runtime.security import ClientSecurity
from services.runtime.telemetry import ClientCorrelation

DEFAULT_TIMEOUT_SECONDS = 60.0
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
KEEPALIVE_SECONDS = 30.0
"""A client pings a connection whose calls are silent this often, to notice a dead server within a minute.

Servers must accept pings at least this often (`ServerConfig.min_ping_interval_seconds`, default 10 s): gRPC's
own server default is one ping per 5 minutes, and a server sends GOAWAY "too many pings" after a few strikes,
which killed progress streams that stayed silent for minutes."""
KEEPALIVE_TIMEOUT_SECONDS = 20.0


def service_config(
    service_names: Sequence[str],
    *,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    max_attempts: int = 4,
    open_ended_methods: Sequence[str] = (),
) -> str:
    """A gRPC service config: round_robin over every resolved address; per-method deadline; retries.

    Only UNAVAILABLE is retried (the request never reached a healthy replica, so a retry cannot
    repeat side effects). The timeout here is the default deadline of every call to these services,
    so no call can hang even when the caller forgets to pass `timeout=`, except `open_ended_methods`
    ("package.Service/Method"): streams that last as long as what they watch (a job), which gRPC
    would otherwise cut at this deadline whatever `timeout=` the call passes.
    """
    retry_policy = {
        "maxAttempts": max(2, min(max_attempts, 5)),
        "initialBackoff": "0.2s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    method_configs = [
        {
            "name": [{"service": name} for name in service_names] or [{}],
            "timeout": f"{timeout_seconds:.3f}s",
            "retryPolicy": retry_policy,
        }
    ]
    if open_ended_methods:
        names = [dict(zip(("service", "method"), name.split("/", 1), strict=True)) for name in open_ended_methods]
        method_configs.append({"name": names, "retryPolicy": retry_policy})  # no "timeout": no default deadline
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": method_configs})


def channel_options(
    service_names: Sequence[str] = (),
    *,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    max_attempts: int = 4,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    keepalive_seconds: float = KEEPALIVE_SECONDS,
    open_ended_methods: Sequence[str] = (),
) -> list[tuple[str, object]]:
    """The options of every channel `create_channel` makes (see there)."""
    config = service_config(
        service_names, timeout_seconds=timeout_seconds, max_attempts=max_attempts, open_ended_methods=open_ended_methods
    )
    return [
        ("grpc.service_config", config),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Re-resolve DNS promptly when replicas come and go behind a headless Service.
        ("grpc.dns_min_time_between_resolutions_ms", 5000),
        # Keep pinging a silent stream (gRPC stops after two pings without data by default), so a server that
        # died or a connection that broke fails the call instead of leaving it waiting for ever.
        ("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_SECONDS * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def create_channel(
    address: str,
    service_names: Sequence[str] = (),
    *,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    max_attempts: int = 4,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    keepalive_seconds: float = KEEPALIVE_SECONDS,
    open_ended_methods: Sequence[str] = (),
    security: ClientSecurity | None = None,
) -> grpc.Channel:
    """A channel to `address` for calls to `service_names`, plaintext or as `security` says.

    `security` (`ClientSecurity.from_env`): TLS, mTLS, a bearer token. Clients of our own services pass it; those
    of TF Serving stay plaintext.

    `address` is any gRPC target: "127.0.0.1:50051", "dns:///texture-headless:50051" (a Kubernetes
    headless Service: every pod's address, balanced round-robin) or "ipv4:127.0.0.1:1,127.0.0.1:2"
    (several local replicas). Every call has `timeout_seconds` as its deadline except those of
    `open_ended_methods` ("package.Service/Method"), which have none unless the call passes one. Calls carry
    the running job's id, request id and trace context (`telemetry.ClientCorrelation`).
    """
    options = channel_options(
        service_names,
        timeout_seconds=timeout_seconds,
        max_attempts=max_attempts,
        max_message_bytes=max_message_bytes,
        keepalive_seconds=keepalive_seconds,
        open_ended_methods=open_ended_methods,
    )
    channel = (security or ClientSecurity()).channel(address, options)
    return grpc.intercept_channel(channel, ClientCorrelation())


def rpc_failure(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The status code and detail of a failed call (UNKNOWN and the error's text when it is no call)."""
    if isinstance(exc, grpc.Call):
        return exc.code(), exc.details()
    return grpc.StatusCode.UNKNOWN, str(exc)


BUSY_DETAILS = ("server busy:", "Concurrent RPC limit exceeded")
"""Details of a refusal for being busy: our servers' (services.runtime.server.BUSY_DETAIL) and gRPC's own."""


def is_busy(code: grpc.StatusCode, detail: str) -> bool:
    """Whether a failure is a server at its bound of concurrent calls (worth trying again later).

    The alternative is a request over a limit (RESOURCE_EXHAUSTED too, but final).
    """
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and (detail or "").startswith(BUSY_DETAILS)


def health_status(channel: grpc.Channel, service: str = "", *, timeout_seconds: float = 2.0) -> str:
    """The health status name ("SERVING", "NOT_SERVING", "SERVICE_UNKNOWN") or "UNREACHABLE"."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_seconds)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return "SERVICE_UNKNOWN"
        return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def wait_for_serving(
    address: str,
    service: str = "",
    *,
    timeout_seconds: float = 30.0,
    poll_seconds: float = 0.1,
    security: ClientSecurity | None = None,
) -> None:
    """Block until `service` at `address` reports SERVING; raises Unavailable after the timeout.

    Over TLS (and with a token, though health needs none) when `security` says so.
    """
    deadline = time.monotonic() + timeout_seconds
    status = "UNREACHABLE"
    with (security or ClientSecurity()).channel(address, []) as channel:
        while time.monotonic() < deadline:
            status = health_status(channel, service, timeout_seconds=min(2.0, max(0.1, deadline - time.monotonic())))
            if status == "SERVING":
                return
            time.sleep(poll_seconds)
    raise Unavailable(f"{service or 'server'} at {address} not SERVING after {timeout_seconds:.0f}s (last: {status})")


def retry_delay(attempt: int, *, base: float = 0.5, cap: float = 8.0) -> float:
    """Seconds to wait before attempt `attempt + 1`: exponential backoff with up to 25 % jitter."""
    return min(cap, base * 2 ** (attempt - 1)) * (1.0 + 0.25 * random.random())
