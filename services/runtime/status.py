"""One mapping from failures to gRPC status codes, shared by every servicer."""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import Callable

import grpc

from services.runtime.errors import A2VError

log = logging.getLogger(__name__)

_PASS_THROUGH_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.PERMISSION_DENIED,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message a caller should see for `exc`.

    Unexpected exceptions become INTERNAL with an opaque reference; their traceback is logged
    under that reference and never sent, so internals do not leak to callers.
    """
    if isinstance(exc, A2VError):
        return grpc.StatusCode[exc.status], str(exc) or type(exc).__name__
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        # A downstream stage failed: keep its verdict on the input, call everything else unavailable.
        code = exc.code()
        detail = exc.details() or code.name
        if code in _PASS_THROUGH_CODES:
            return code, f"downstream: {detail}"
        return grpc.StatusCode.UNAVAILABLE, f"downstream call failed ({code.name}): {detail}"
    if _is_connection_error(exc):
        return grpc.StatusCode.UNAVAILABLE, f"dependency unavailable: {type(exc).__name__}"
    reference = uuid.uuid4().hex[:12]
    log.error("unhandled error (ref %s)", reference, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (ref {reference}); see the service log"


def _is_connection_error(exc: BaseException) -> bool:
    try:
        import urllib3.exceptions as u3
    except ImportError:  # pragma: no cover - urllib3 ships with minio
        return isinstance(exc, ConnectionError)
    return isinstance(exc, ConnectionError | u3.MaxRetryError | u3.ProtocolError | u3.NewConnectionError)


def _already_aborted(context: grpc.ServicerContext) -> bool:
    """True when the servicer itself called context.abort (its exception must propagate untouched)."""
    code = context.code() if hasattr(context, "code") else None
    return code is not None and code != grpc.StatusCode.OK


MAX_DETAIL_BYTES = 1000
"""Longest status message sent (UTF-8 bytes): one that echoes a huge request string (a 200 kB key or speaker name)
was bigger than the caller's metadata limit, so the caller got RESOURCE_EXHAUSTED "metadata size exceeds hard
limit" instead of the answer."""


def _shortened(message: str) -> str:
    data = message.encode()
    if len(data) <= MAX_DETAIL_BYTES:
        return message
    return data[: MAX_DETAIL_BYTES - 40].decode(errors="ignore") + f"... ({len(data)} bytes in all)"


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    code, message = status_for(exc)
    message = _shortened(message)
    if code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
        log.info("%s rejected: %s %s", method, code.name, message)
    elif code == grpc.StatusCode.UNAVAILABLE:
        log.warning("%s failed: %s %s", method, code.name, message)
    context.abort(code, message)


def grpc_errors(method: Callable) -> Callable:
    """Decorate a servicer method (unary or server-streaming) so every exception maps to one status."""
    name = method.__qualname__

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:
                if _already_aborted(context):
                    raise
                _abort(context, exc, name)

        return streaming

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:
            if _already_aborted(context):
                raise
            _abort(context, exc, name)

    return unary
