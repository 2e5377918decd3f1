"""gRPC server start-up shared by every service: health, reflection, bounded concurrency, graceful stop."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.runtime import security
from services.runtime.blobstore import BlobStore, wait_for_store
from services.runtime.config import Config, ConfigError, Env, ServerConfig, parse_address
from services.runtime.logs import configure_logging
from services.runtime.telemetry import configure_tracing, server_interceptors, shutdown_tracing, start_metrics_server

log = logging.getLogger(__name__)
BUSY_DETAIL = "server busy: every call slot is taken; try again"
"""Detail of the RESOURCE_EXHAUSTED that refuses a call over the bound (`services.runtime.clients.is_busy`)."""
UNBOUNDED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Methods outside the bound: probes and reflection answer while every call slot is taken."""
RESERVED_WORKERS = 2
"""Threads beyond the bound of calls, so health checks never wait behind long calls."""


class CallSlots(grpc.ServerInterceptor):
    """The bound of concurrent calls, applied to the service's own methods only.

    gRPC's `maximum_concurrent_rpcs` counts every call, health checks included, and its thread pool is shared:
    eight long progress streams left the 2 s probes queued behind them (or refused), and Kubernetes then
    restarted a pod for being busy. Here a call beyond `admitted` is refused with RESOURCE_EXHAUSTED
    (BUSY_DETAIL) and at most `running` of the admitted ones run at once (the others wait in their thread);
    the pool has `admitted` + RESERVED_WORKERS threads, so health and reflection always find one.
    """

    def __init__(self, running: int, admitted: int, *, waiting_methods=frozenset(), waiting: int = 0) -> None:
        self.limit = admitted + (waiting if waiting_methods else 0)
        self.admitted = threading.BoundedSemaphore(admitted)
        self.running = threading.Semaphore(min(running, admitted))
        # Methods that mostly wait (progress streams): bounded by `waiting`, apart from the others, and taking no
        # running slot, so twenty people watching their jobs neither starve nor are starved by the work itself.
        self.waiting_methods = frozenset(waiting_methods)
        self.waiting = threading.BoundedSemaphore(waiting)  # 0: every such call is refused

    def intercept_service(self, continuation, handler_call_details):
        """The handler, wrapped to refuse calls beyond the bound (health and reflection are never bounded)."""
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNBOUNDED_PREFIXES):
            return handler
        if handler_call_details.method in self.waiting_methods:
            admitted, running = self.waiting, contextlib.nullcontext()
        else:
            admitted, running = self.admitted, self.running
        if handler.unary_unary:
            return handler._replace(unary_unary=self._bounded(handler.unary_unary, admitted, running))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._bounded(handler.stream_unary, admitted, running))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._bounded_stream(handler.unary_stream, admitted, running))
        return handler._replace(stream_stream=self._bounded_stream(handler.stream_stream, admitted, running))

    @staticmethod
    def _bounded(behaviour, admitted, running):
        def call(request, context):
            if not admitted.acquire(blocking=False):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, BUSY_DETAIL)
            try:
                with running:
                    return behaviour(request, context)
            finally:
                admitted.release()

        return call

    @staticmethod
    def _bounded_stream(behaviour, admitted, running):
        def call(request, context):
            if not admitted.acquire(blocking=False):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, BUSY_DETAIL)
            try:
                with running:
                    yield from behaviour(request, context)
            finally:
                admitted.release()

        return call


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service to host: its full name, the generated `add_..._to_server`, and the servicer.

    `load` runs after the server has started and before the service reports SERVING, so a stage
    whose models take a while to load is reachable (health says NOT_SERVING) but gets no traffic
    from health-aware clients until it is ready.
    """

    name: str
    add_to_server: Callable[[object, grpc.Server], None]
    servicer: object
    load: Callable[[], None] | None = field(default=None)


def binding_for(
    pb2_module, pb2_grpc_module, service: str, servicer: object, load: Callable[[], None] | None = None
) -> ServiceBinding:
    """Binding of `servicer` for `service` (e.g. "AudioService") of a generated module pair."""
    descriptor = pb2_module.DESCRIPTOR.services_by_name[service]
    add_to_server = getattr(pb2_grpc_module, f"add_{service}Servicer_to_server")
    return ServiceBinding(descriptor.full_name, add_to_server, servicer, load)


class Server:
    """A started-or-startable gRPC server together with its health servicer."""

    def __init__(
        self,
        grpc_server: grpc.Server,
        port: int,
        health_servicer: health.HealthServicer,
        bindings: Sequence[ServiceBinding],
        grace_seconds: float,
        options: Sequence[tuple[str, object]] = (),
    ) -> None:
        self.grpc_server = grpc_server
        self.options = dict(options)  # the channel arguments it was built with (tests compare them with clients')
        self.port = port
        self.health = health_servicer
        self.bindings = tuple(bindings)
        self.grace_seconds = grace_seconds
        self._stopped = threading.Event()

    def start(self) -> None:
        """Start listening."""
        self.grpc_server.start()

    def set_serving(self, name: str, serving: bool = True) -> None:
        """Set a service's health status (SERVING or NOT_SERVING)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(name, status)

    def load_and_mark_serving(self) -> None:
        """Run each binding's `load`, then report it SERVING."""
        for binding in self.bindings:
            if binding.load is not None:
                log.info("loading %s", binding.name)
                binding.load()
            self.set_serving(binding.name)
            log.info("%s is SERVING on port %d", binding.name, self.port)

    def stop(self, grace: float | None = None) -> threading.Event:
        """Refuse new calls, let in-flight calls finish within `grace` seconds, then cancel the rest."""
        self.health.enter_graceful_shutdown()
        done = self.grpc_server.stop(self.grace_seconds if grace is None else grace)
        self._stopped.set()
        return done

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops or `timeout` passes; True when it timed out."""
        return self.grpc_server.wait_for_termination(timeout)


def create_server(config: ServerConfig, bindings: Sequence[ServiceBinding]) -> tuple[Server, int]:
    """Build a server for `bindings` bound to `config.listen` (port 0 picks a free port).

    Health: the overall "" entry is SERVING from the start (the process is alive); each named
    service is NOT_SERVING until `Server.load_and_mark_serving`. Reflection lists every service (unless
    `config.auth.reflection` is off). With `config.tls` the port takes TLS only (mTLS with `client_auth`); with a
    tokens file every call but health and reflection needs a bearer token of the right scope.
    Calls to the services beyond `max_concurrent_rpcs` are refused with RESOURCE_EXHAUSTED rather than
    queued without bound, and `max_workers` of them run at once (`CallSlots`); a servicer's `waiting_methods`
    (progress streams) are bounded apart by `max_waiting_calls` and take no running slot; health checks are outside
    every bound and have threads of their own. Messages over `max_message_bytes` are refused by gRPC itself.
    Every call is measured (`telemetry.ServerTelemetry`) and, when the process traces, gets a span.
    """
    host, port = parse_address(config.listen)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)),
        # Accept the clients' keepalive pings on calls that send nothing for minutes (see ServerConfig).
        ("grpc.http2.min_ping_interval_without_data_ms", int(config.min_ping_interval_seconds * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if config.max_connection_age_grace_seconds is not None:
        options.append(("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_seconds * 1000)))
    waiting_methods = {
        f"/{binding.name}/{method}"
        for binding in bindings
        for method in getattr(binding.servicer, "waiting_methods", ())
    }
    slots = CallSlots(
        config.max_workers,
        config.max_concurrent_rpcs,
        waiting_methods=waiting_methods,
        waiting=config.max_waiting_calls,
    )
    auth = security.server_interceptor(config.auth.tokens_file)
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=slots.limit + RESERVED_WORKERS, thread_name_prefix=config.service),
        # Outermost first: the trace span and the metrics see every call, refusals for being busy included; a
        # caller refused by the token check (services.runtime.security) takes no call slot.
        interceptors=[*server_interceptors(), *([auth] if auth else []), slots],
        options=options,
    )
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=1),
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    for binding in bindings:
        binding.add_to_server(binding.servicer, grpc_server)
        health_servicer.set(binding.name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if config.auth.reflection:
        reflection.enable_server_reflection(
            [b.name for b in bindings] + [health.SERVICE_NAME, reflection.SERVICE_NAME], grpc_server
        )
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if config.tls.enabled:
        bound_port = grpc_server.add_secure_port(target, security.server_credentials(config.tls))
    else:
        bound_port = grpc_server.add_insecure_port(target)
    if bound_port == 0:
        raise ConfigError(f"cannot listen on {config.listen} (address in use or not available)")
    server = Server(grpc_server, bound_port, health_servicer, bindings, config.grace_seconds, options)
    return server, bound_port


def serve(config: Config, bindings: Sequence[ServiceBinding]) -> int:
    """Run a service until SIGTERM/SIGINT, then drain gracefully; returns the process exit code."""
    configure_logging(config.server.service, config.server.log_level)
    configure_tracing(config.server.service, config.tracing)
    server, port = create_server(config.server, bindings)
    server.start()
    metrics_port = start_metrics_server(parse_address(config.server.listen)[0], config.server.metrics_port)
    log.info("listening", extra={"port": port, "listen": config.server.listen, "metrics_port": metrics_port})

    stopping = threading.Event()

    def on_signal(signum, _frame):
        if not stopping.is_set():
            stopping.set()
            log.info("received %s: draining for up to %.1fs", signal.Signals(signum).name, server.grace_seconds)
            server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.load_and_mark_serving()
    except Exception:
        log.exception("loading failed; stopping")
        server.stop(0).wait()
        return 1
    server.wait_for_termination()
    shutdown_tracing()
    log.info("stopped")
    return 0


def run_service(
    service: str,
    make_bindings: Callable[[Config], Sequence[ServiceBinding]],
    settings: Callable[[Env], object] | None = None,
) -> None:
    """Entry point body of `python -m services.<stage>`: read config, build bindings, serve, exit.

    Args:
        service: The service's name.
        make_bindings: Builds what the service serves from its config.
        settings: Reads the stage's own settings (`Config.settings`) with the rest of the config.
    """
    try:
        config = Config.from_env(service, settings=settings)
    except ConfigError as exc:
        configure_logging(service)
        log.error("%s", exc)
        raise SystemExit(2) from exc
    raise SystemExit(serve(config, make_bindings(config)))


def store_backed_bindings(
    config: Config, pb2_module, pb2_grpc_module, service: str, make_servicer: Callable[[BlobStore], object]
) -> list[ServiceBinding]:
    """Bindings of a service whose servicer works over the object store; SERVING once the store answers.

    Stages whose servicers also load models build their own binding with a `load` that does both.
    """
    store = BlobStore.from_config(config.store)
    servicer = make_servicer(store)
    return [binding_for(pb2_module, pb2_grpc_module, service, servicer, load=lambda: wait_for_store(store))]
