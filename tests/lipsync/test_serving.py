"""The lipsync stage's TF Serving client against a real gRPC server that answers as TF Serving does when it fails:
only UNAVAILABLE is retried; INTERNAL and DEADLINE_EXCEEDED keep their codes (issue 15)."""

import time

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import prediction_service_pb2, prediction_service_pb2_grpc

from services.lipsync.serving import ServingClient
from services.runtime.errors import CallFailed, NotFound, Unavailable
from services.runtime.server import binding_for

pytestmark = pytest.mark.integration


class FailingServing(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict fails with `code` (or sleeps `delay` seconds first); counts the calls that reached it."""

    def __init__(self, code: grpc.StatusCode, delay: float = 0.0) -> None:
        self.code, self.delay, self.calls = code, delay, 0

    def Predict(self, request, context):
        self.calls += 1
        time.sleep(self.delay)
        context.abort(self.code, f"{self.code.name} from the model server")


@pytest.mark.parametrize(
    ("code", "delay", "error", "status", "calls"),
    [
        (grpc.StatusCode.INTERNAL, 0.0, CallFailed, "INTERNAL", 1),
        (grpc.StatusCode.OK, 4.0, CallFailed, "DEADLINE_EXCEEDED", 1),  # the client's deadline passes first
        (grpc.StatusCode.NOT_FOUND, 0.0, NotFound, "NOT_FOUND", 1),
        (grpc.StatusCode.UNAVAILABLE, 0.0, Unavailable, "UNAVAILABLE", 4),  # the channel tries it again
    ],
)
def test_tf_servings_errors_keep_their_codes_and_only_unavailable_is_retried(
    run_server, code, delay, error, status, calls
):
    servicer = FailingServing(code, delay)
    port = run_server([binding_for(prediction_service_pb2, prediction_service_pb2_grpc, "PredictionService", servicer)])
    # 3 s lets the slow server's case run past the deadline; the others get room for the channel's retries (with
    # backoff, on a loaded machine).
    client = ServingClient(f"127.0.0.1:{port}", timeout_seconds=3.0 if delay else 60.0)
    try:
        with pytest.raises(error) as failure:
            client.predict("obama", 1, np.zeros((10, 28), np.float32))
    finally:
        client.close()
    assert failure.value.status == status and servicer.calls == calls
