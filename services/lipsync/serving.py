"""Client of TensorFlow Serving's gRPC API (PredictionService, ModelService): the same code for the real
server and the local stand-in."""

from __future__ import annotations

import os
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the serving protos import tensorflow

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from services.runtime.clients import create_channel, rpc_failure
from services.runtime.errors import (
    A2VError,
    CallFailed,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    TooLarge,
    Unavailable,
)

SIGNATURE = "serving_default"
INPUT_KEY = "features"
OUTPUT_KEY = "coefficients"
SERVICES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")
State = get_model_status_pb2.ModelVersionStatus.State


_ERRORS = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: TooLarge,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def serving_error(exc: grpc.RpcError, address: str, what: str) -> A2VError:
    """TF Serving's failure with its own code: only UNAVAILABLE (the server is down or restarting) is
    Unavailable, which callers retry. INTERNAL (the model failed while running) and DEADLINE_EXCEEDED (it took
    too long) keep their codes: retrying them repeats the same failure, and a dozen times over (the channel's
    and the orchestrator's retries) it turned one broken model into minutes of UNAVAILABLE."""
    code, detail = rpc_failure(exc)
    message = f"TF Serving at {address}, {what}: {code.name} {detail}"
    error = _ERRORS.get(code)
    return error(message) if error is not None else CallFailed(code.name, message)


@dataclass(frozen=True)
class VersionStatus:
    """What the server says of one version of a model."""

    version: int
    state: str  # "START", "LOADING", "AVAILABLE", "UNLOADING", "END"
    error: str = ""


def tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    """A float32 TensorProto without importing TensorFlow's Python ops (only its protos)."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in array.shape])
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape, tensor_content=array.tobytes())


def tensor_array(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """float32 array of a TensorProto (packed `tensor_content` or repeated `float_val`)."""
    if proto.dtype != types_pb2.DT_FLOAT:
        raise InvalidInput(f"model output has dtype {types_pb2.DataType.Name(proto.dtype)}, expected DT_FLOAT")
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype="<f4").reshape(shape).copy()
    values = np.asarray(proto.float_val, np.float32)
    return np.broadcast_to(values, shape).copy() if values.size == 1 else values.reshape(shape)


class ServingClient:
    """One channel to TF Serving; deadlines and UNAVAILABLE retries come from the runtime's channel factory."""

    def __init__(self, address: str, *, timeout_seconds: float = 120.0, max_message_bytes: int = 64 << 20) -> None:
        self.address = address
        self.channel = create_channel(
            address, SERVICES, timeout_seconds=timeout_seconds, max_message_bytes=max_message_bytes
        )
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def versions(self, model: str) -> list[VersionStatus]:
        """Every version the server knows of `model` (empty when it knows none)."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model
        try:
            response = self.models.GetModelStatus(request)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return []
            raise serving_error(exc, self.address, f"status of {model!r}") from exc
        return [
            VersionStatus(int(s.version), State.Name(s.state), s.status.error_message)
            for s in response.model_version_status
        ]

    def latest_available(self, model: str) -> int:
        """Newest AVAILABLE version; NotFound when none is."""
        available = [s.version for s in self.versions(model) if s.state == "AVAILABLE"]
        if not available:
            raise NotFound(f"no version of the model of speaker {model!r} is available in TF Serving at {self.address}")
        return max(available)

    def predict(self, model: str, version: int, features: np.ndarray) -> np.ndarray:
        """Run the serving signature on one sequence: float32 [t, 28] -> float32 [t, K]."""
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = SIGNATURE
        if version:
            request.model_spec.version.value = version
        request.inputs[INPUT_KEY].CopyFrom(tensor_proto(features[None]))
        request.output_filter.append(OUTPUT_KEY)
        try:
            response = self.predictions.Predict(request)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(
                    f"TF Serving does not serve model {model!r} version {version or 'latest'}: {exc.details()}"
                ) from exc
            raise serving_error(exc, self.address, f"predicting with {model!r} version {version}") from exc
        if OUTPUT_KEY not in response.outputs:
            raise InvalidInput(f"model {model!r} has no output {OUTPUT_KEY!r}")
        output = tensor_array(response.outputs[OUTPUT_KEY])
        if output.ndim != 3 or output.shape[:2] != (1, len(features)):
            raise InvalidInput(f"model {model!r} returned shape {output.shape} for {len(features)} rows")
        return output[0]
