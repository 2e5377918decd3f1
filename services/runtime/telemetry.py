"""Metrics, traces and log correlation shared by every service (Prometheus, OpenTelemetry, JSON logs).

A call's job id and request id travel in its request message (`job_id`, `request_id`) and in gRPC metadata
(`a2v-job-id`, `a2v-request-id`; the W3C `traceparent` when tracing is on), so every process that handles a
job's call logs them and adds its spans to the job's trace. Metrics are served over HTTP on the service's
metrics port (`A2V_METRICS_PORT`); tracing is off unless an OTLP endpoint is configured (`A2V_OTLP_ENDPOINT`).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from opentelemetry import propagate, trace
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from services.runtime.config import TracingConfig

log = logging.getLogger(__name__)

JOB_ID_HEADER = "a2v-job-id"
REQUEST_ID_HEADER = "a2v-request-id"
JOB_ID_ATTRIBUTE = "a2v.job_id"
"""The span attribute that names the job (every span a job's calls make carries it)."""
UNOBSERVED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Probes and reflection: neither counted nor traced (a probe every 2 s per pod would drown the calls)."""

_JOB_ID: contextvars.ContextVar[str] = contextvars.ContextVar("a2v_job_id", default="")
_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("a2v_request_id", default="")

LATENCY_BUCKETS = (0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
"""Seconds: health-fast reads up to an hour of footage analysed in one call."""

GRPC_STARTED = Counter("grpc_server_started_total", "Calls started", ["grpc_service", "grpc_method"])
GRPC_HANDLED = Counter(
    "grpc_server_handled_total", "Calls ended, by status code", ["grpc_service", "grpc_method", "grpc_code"]
)
GRPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from a call's start to its end (a stream's last message), by status code",
    ["grpc_service", "grpc_method", "grpc_code"],
    buckets=LATENCY_BUCKETS,
)
GRPC_IN_FLIGHT = Gauge("grpc_server_in_flight", "Calls running now", ["grpc_service", "grpc_method"])
UNITS_PROCESSED = Counter(
    "a2v_stage_units_processed_total",
    "Work done by the stage's calls as their progress reports it (frames, seconds of audio, ...)",
    ["grpc_method", "unit"],
)
CACHE_RESULTS = Counter(
    "a2v_stage_cache_total",
    "Calls answered from outputs already in the store (hit) or computed (miss)",
    ["grpc_method", "result"],
)
STORE_BYTES = Counter("a2v_store_bytes_total", "Bytes read from and written to the object store", ["direction"])


def record_store_bytes(direction: str, count: int) -> None:
    """Count `count` bytes moved to ("written") or from ("read") the object store."""
    STORE_BYTES.labels(direction).inc(max(0, int(count)))


# -- correlation ---------------------------------------------------------------------------------


@contextmanager
def correlation(job_id: str = "", request_id: str = "", *, replace: bool = False) -> Iterator[None]:
    """Within the block, log lines and outgoing calls carry `job_id` and `request_id`.

    Empty values leave the ids as they were, unless `replace` (a server's call: its own ids or none, never those
    of an earlier call in the same thread). Threads started inside do not inherit them: run them in a copied
    context (`submit_in_context`, `contextvars.copy_context().run`).
    """
    tokens = []
    if job_id or replace:
        tokens.append((_JOB_ID, _JOB_ID.set(job_id)))
    if request_id or replace:
        tokens.append((_REQUEST_ID, _REQUEST_ID.set(request_id)))
    try:
        yield
    finally:
        for variable, token in reversed(tokens):
            # A stream abandoned by its caller may be closed from another thread's context; ours is unaffected.
            with contextlib.suppress(ValueError):
                variable.reset(token)


def current_job_id() -> str:
    """The id of the job whose call (or run) this code is part of; empty when none."""
    return _JOB_ID.get()


def submit_in_context(pool, fn, /, *args, **kwargs):
    """`pool.submit(fn, ...)` run in a copy of the caller's context: its job id, request id and trace span."""
    return pool.submit(contextvars.copy_context().run, fn, *args, **kwargs)


def current_ids() -> dict[str, str]:
    """The job id, request id and trace id of the code running now (only those that are set)."""
    ids = {"job_id": _JOB_ID.get(), "request_id": _REQUEST_ID.get()}
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        ids["trace_id"] = format(span.trace_id, "032x")
        ids["span_id"] = format(span.span_id, "016x")
    return {key: value for key, value in ids.items() if value}


class CorrelationFilter(logging.Filter):
    """Adds `job_id`, `request_id` and `trace_id` of the running call to every record (JSON fields)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate `record` (fields given in `extra=` are kept); never drops a record."""
        for key, value in current_ids().items():
            if not getattr(record, key, ""):
                setattr(record, key, value)
        return True


def ids_of_call(request: object, metadata: Mapping[str, str]) -> tuple[str, str]:
    """The (job id, request id) of an incoming call: its message's fields first, then its metadata.

    A request id of the form "<job id>/<stage>..." (what the orchestrator sends) names its job.
    """
    request_id = getattr(request, "request_id", "") or metadata.get(REQUEST_ID_HEADER, "")
    job_id = getattr(request, "job_id", "") or metadata.get(JOB_ID_HEADER, "")
    if not job_id and "/" in request_id:
        job_id = request_id.split("/", 1)[0]
    return job_id, request_id


# -- server side ---------------------------------------------------------------------------------


def _split_method(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _status(context, default: grpc.StatusCode) -> str:
    code = None
    with contextlib.suppress(AttributeError, NotImplementedError):  # a test's stand-in context has no code()
        code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return default.name


class ServerTelemetry(grpc.ServerInterceptor):
    """Per-call metrics (started, handled by code, latency, in flight) and log correlation of a service's calls.

    Placed outside the bound of calls (`server.CallSlots`), so refusals for being busy are counted too. Stage
    counters come from the calls' own messages: the progress a stream reports (frames, seconds) and the
    `cached` flag of a result.
    """

    def intercept_service(self, continuation, handler_call_details):
        """The handler, wrapped to measure it (health and reflection are left alone)."""
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNOBSERVED_PREFIXES):
            return handler
        service, method = _split_method(handler_call_details.method)
        metadata = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        if handler.unary_unary:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, service, method, metadata))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._stream(handler.unary_stream, service, method, metadata))
        return handler

    @staticmethod
    def _begin(request, service: str, method: str, metadata: Mapping[str, str]) -> tuple[str, str]:
        GRPC_STARTED.labels(service, method).inc()
        GRPC_IN_FLIGHT.labels(service, method).inc()
        job_id, request_id = ids_of_call(request, metadata)
        span = trace.get_current_span()
        if span.is_recording():
            if job_id:
                span.set_attribute(JOB_ID_ATTRIBUTE, job_id)
            if request_id:
                span.set_attribute("a2v.request_id", request_id)
        return job_id, request_id

    @staticmethod
    def _end(service: str, method: str, code: str, started: float) -> None:
        GRPC_IN_FLIGHT.labels(service, method).dec()
        GRPC_HANDLED.labels(service, method, code).inc()
        GRPC_SECONDS.labels(service, method, code).observe(time.perf_counter() - started)

    @staticmethod
    def _count_result(method: str, result: object) -> None:
        if result is not None and "cached" in result.DESCRIPTOR.fields_by_name:
            CACHE_RESULTS.labels(method, "hit" if result.cached else "miss").inc()

    def _unary(self, behaviour, service: str, method: str, metadata: Mapping[str, str]):
        def call(request, context):
            started = time.perf_counter()
            job_id, request_id = self._begin(request, service, method, metadata)
            code = grpc.StatusCode.OK.name
            try:
                with correlation(job_id, request_id, replace=True):
                    response = behaviour(request, context)
                self._count_result(method, response)
                code = _status(context, grpc.StatusCode.OK)
                return response
            except BaseException:
                code = _status(context, grpc.StatusCode.UNKNOWN)
                raise
            finally:
                self._end(service, method, code, started)

        return call

    def _stream(self, behaviour, service: str, method: str, metadata: Mapping[str, str]):
        def call(request, context):
            started = time.perf_counter()
            job_id, request_id = self._begin(request, service, method, metadata)
            code = grpc.StatusCode.OK.name
            done: dict[str, int] = collections.defaultdict(int)
            try:
                with correlation(job_id, request_id, replace=True):
                    for event in behaviour(request, context):
                        self._count_event(method, event, done)
                        yield event
                code = _status(context, grpc.StatusCode.OK)
            except GeneratorExit:  # the caller went away before the stream's end
                code = grpc.StatusCode.CANCELLED.name
                raise
            except BaseException:
                code = _status(context, grpc.StatusCode.UNKNOWN)
                raise
            finally:
                self._end(service, method, code, started)

        return call

    def _count_event(self, method: str, event, done: dict[str, int]) -> None:
        fields = event.DESCRIPTOR.fields_by_name
        if "progress" in fields and event.HasField("progress"):
            progress = event.progress
            if progress.unit and progress.done > done[progress.unit]:
                UNITS_PROCESSED.labels(method, progress.unit).inc(progress.done - done[progress.unit])
                done[progress.unit] = progress.done
        elif "result" in fields and event.HasField("result"):
            self._count_result(method, event.result)


def start_metrics_server(host: str, port: int) -> int | None:
    """Serve the process's Prometheus metrics on http://host:port/metrics; returns the port (None when off).

    Port 0 leaves metrics off. `host` is the gRPC listen address's host, so a pod (0.0.0.0) is scraped from
    outside and a local process (127.0.0.1) only from its machine.
    """
    if not port:
        return None
    server, _thread = start_http_server(port, addr=host or "0.0.0.0")
    return server.server_address[1]


# -- tracing -------------------------------------------------------------------------------------


def tracing_enabled() -> bool:
    """Whether this process records spans (an SDK tracer provider was installed by `configure_tracing`)."""
    from opentelemetry.sdk.trace import TracerProvider

    return isinstance(trace.get_tracer_provider(), TracerProvider)


def configure_tracing(service: str, config: TracingConfig, *, exporter=None) -> bool:
    """Install the process's tracer provider, exporting over OTLP (or to `exporter`, e.g. an in-memory one).

    Returns whether tracing is on. Without an endpoint and an exporter it stays off: spans are not recorded and
    the trace context is not sent on.
    """
    if not config.otlp_endpoint and exporter is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = config.otlp_endpoint
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"a2v-{service}", "service.namespace": "audio2video"}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing on: spans go to %s", config.otlp_endpoint or type(exporter).__name__)
    return True


def shutdown_tracing() -> None:
    """Send the spans still buffered (at a graceful stop)."""
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def server_interceptors() -> list[grpc.ServerInterceptor]:
    """The interceptors of every server, outermost first: the trace span (when tracing is on), then metrics."""
    interceptors: list[grpc.ServerInterceptor] = []
    if tracing_enabled():
        from opentelemetry.instrumentation.grpc import filters, server_interceptor

        skip = filters.any_of(filters.service_prefix("grpc.health"), filters.service_prefix("grpc.reflection"))
        interceptors.append(server_interceptor(filter_=filters.negate(skip)))
    interceptors.append(ServerTelemetry())
    return interceptors


# -- client side ---------------------------------------------------------------------------------


_CALL_FIELDS = ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")


class _CallDetails(collections.namedtuple("_CallDetails", _CALL_FIELDS), grpc.ClientCallDetails):
    pass


MAX_HEADER_CHARS = 256


def header_value(value: str) -> str:
    """`value` as a metadata value gRPC sends: printable ASCII (others escaped), at most MAX_HEADER_CHARS.

    A caller's request id of "é" made every call the stage made for it fail with INTERNAL "Invalid metadata".
    """
    text = value.encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(char if " " <= char <= "~" else f"\\x{ord(char):02x}" for char in text)
    return text[:MAX_HEADER_CHARS]


class ClientCorrelation(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Sends the running job's id, request id and trace context (W3C `traceparent`) with every call.

    Hand-rolled rather than the OpenTelemetry gRPC client interceptor: that one turns a server stream into a
    plain generator, which loses the call's `cancel()` the pipeline uses to stop a cancelled job's streams.
    The caller's own span (a stage call's) is the client side of the trace.
    """

    @staticmethod
    def _details(details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        if job_id := _JOB_ID.get():
            carrier[JOB_ID_HEADER] = header_value(job_id)
        if request_id := _REQUEST_ID.get():
            carrier[REQUEST_ID_HEADER] = header_value(request_id)
        if not carrier:
            return details
        metadata = [*(details.metadata or ()), *carrier.items()]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        """A unary call with the correlation metadata added."""
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        """A server-streaming call with the correlation metadata added."""
        return continuation(self._details(client_call_details), request)


# -- reading a service's metrics -----------------------------------------------------------------


@dataclass(frozen=True)
class CallCounts:
    """What a service's metrics endpoint says about its calls (health and reflection are never counted).

    Attributes:
        requests: Calls ended, every status code.
        errors: Calls ended with a status other than OK.
        in_flight: Calls running now.
        by_method: Calls ended per "Service/Method".
    """

    requests: int
    errors: int
    in_flight: int
    by_method: Mapping[str, int]


def read_call_counts(host: str, port: int, *, timeout_seconds: float = 2.0) -> CallCounts:
    """Scrape http://host:port/metrics and add up the gRPC call metrics; raises OSError when unreachable."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://{host}:{port}/metrics", timeout=timeout_seconds) as response:
        text = response.read().decode()
    requests = errors = in_flight = 0
    by_method: dict[str, int] = collections.defaultdict(int)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "grpc_server_handled_total":
                count = int(sample.value)
                requests += count
                errors += count if labels.get("grpc_code") != "OK" else 0
                by_method[f"{labels.get('grpc_service', '')}/{labels.get('grpc_method', '')}"] += count
            elif sample.name == "grpc_server_in_flight":
                in_flight += int(sample.value)
    return CallCounts(requests, errors, in_flight, dict(by_method))
