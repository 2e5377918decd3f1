"""Error types that stage cores raise; each names the gRPC status a caller will see (no grpc import here)."""

from __future__ import annotations


class A2VError(Exception):
    """Base of the errors a stage raises on purpose; `status` is the gRPC status code's name."""

    status: str = "INTERNAL"


class InvalidInput(A2VError, ValueError):
    """The request or its data is malformed: wrong shape, undecodable bytes, empty range."""

    status = "INVALID_ARGUMENT"


class NotFound(A2VError, LookupError):
    """A referenced object, bucket, model or job does not exist."""

    status = "NOT_FOUND"


class FailedPrecondition(A2VError):
    """The input is well-formed but the system is not in a state to process it."""

    status = "FAILED_PRECONDITION"


class NoFace(FailedPrecondition):
    """A video (or every frame of it) has no detectable face."""


class Forbidden(A2VError):
    """The request names something this service may not touch (a bucket other than its own)."""

    status = "PERMISSION_DENIED"


class TooLarge(A2VError):
    """A request or its data exceeds a configured limit (duration, bytes, frames)."""

    status = "RESOURCE_EXHAUSTED"


class Unavailable(A2VError):
    """A dependency (object store, TF Serving, another stage) cannot be reached; the caller may retry."""

    status = "UNAVAILABLE"


class IntegrityError(A2VError):
    """Stored bytes do not match their recorded sha256: the object is corrupt."""

    status = "DATA_LOSS"


class CallFailed(A2VError):
    """Another service answered a call with an error; `status` is the code it answered with."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class Cancelled(A2VError):
    """The caller cancelled the work."""

    status = "CANCELLED"
