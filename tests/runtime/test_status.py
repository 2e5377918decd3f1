"""One mapping from exceptions to gRPC status codes."""

import logging

import grpc
import pytest
import urllib3

from services.runtime import errors
from services.runtime.status import status_for


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidInput("bad shape (3, 2)"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("object not found: b/k"), grpc.StatusCode.NOT_FOUND),
        (errors.NoFace("no face in any frame"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.TooLarge("too long"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable("store down"), grpc.StatusCode.UNAVAILABLE),
        (errors.IntegrityError("corrupt"), grpc.StatusCode.DATA_LOSS),
        (errors.Cancelled("cancelled"), grpc.StatusCode.CANCELLED),
    ],
)
def test_known_errors_keep_their_message(exc, code):
    assert status_for(exc) == (code, str(exc))


def test_connection_errors_mean_unavailable():
    exc = urllib3.exceptions.MaxRetryError(None, "http://127.0.0.1:1/", reason="refused")
    code, _ = status_for(exc)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert status_for(ConnectionRefusedError())[0] == grpc.StatusCode.UNAVAILABLE


def test_unexpected_errors_are_internal_logged_and_never_sent(caplog):
    with caplog.at_level(logging.ERROR):
        code, message = status_for(KeyError("secret internal detail"))
    assert code == grpc.StatusCode.INTERNAL
    assert "secret internal detail" not in message
    reference = message.split("ref ")[1].split(")")[0]
    assert any(reference in record.getMessage() and record.exc_info for record in caplog.records)


class _FakeDownstream(grpc.RpcError, grpc.Call):
    """A downstream failure as the gRPC client raises it (grpc.RpcError that is also a grpc.Call)."""

    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "downstream detail"

    def initial_metadata(self): ...
    def trailing_metadata(self): ...
    def is_active(self): ...
    def time_remaining(self): ...
    def cancel(self): ...
    def add_callback(self, callback): ...


def test_downstream_verdicts_on_input_pass_through_other_failures_are_unavailable():
    assert status_for(_FakeDownstream(grpc.StatusCode.NOT_FOUND))[0] == grpc.StatusCode.NOT_FOUND
    assert status_for(_FakeDownstream(grpc.StatusCode.INTERNAL))[0] == grpc.StatusCode.UNAVAILABLE
    assert status_for(_FakeDownstream(grpc.StatusCode.DEADLINE_EXCEEDED))[0] == grpc.StatusCode.UNAVAILABLE
