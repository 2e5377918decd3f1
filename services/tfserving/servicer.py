"""gRPC servicers of the TF Serving stand-in: TensorProtos in and out, the model manager in between."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import error_codes_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
    status_pb2,
)

from services.runtime.config import ConfigError, Env, ServerConfig
from services.runtime.errors import InvalidInput
from services.runtime.server import ServiceBinding, binding_for
from services.runtime.status import grpc_errors
from services.tfserving.models import (
    DEFAULT_SIGNATURE,
    LoadedModel,
    ModelConfig,
    ModelManager,
    model_configs,
    read_model_config_file,
)

SERVICE = "tfserving"
PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
"""`tensorflow.serving.PredictionService`: its health entry turns SERVING after the first scan."""
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
"""`tensorflow.serving.ModelService`."""
MODELS_DIR_VARIABLE = "A2V_MODELS_DIR"
"""The `<model>/<version>/saved_model.pb` tree (same name as `deploy.catalog.MODELS_DIR_VARIABLE`)."""
POLL_SECONDS_VARIABLE = "A2V_TFSERVING_POLL_SECONDS"
MODEL_CONFIG_VARIABLE = "A2V_TFSERVING_MODEL_CONFIG"
"""TF Serving's --model_config_file: the ModelServerConfig (text) listing the models to serve."""
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Default request/response size limit here (other services: 4 MiB); A2V_MAX_MESSAGE_BYTES overrides it."""
SIGNATURE_DEF_FIELD = "signature_def"
"""The one `GetModelMetadataRequest.metadata_field` TF Serving (and this server) supports."""


@dataclass(frozen=True)
class TFServingConfig:
    """Settings of `python -m services.tfserving`, read from the environment.

    A2V_LISTEN etc. as every service (`ServerConfig`), except that messages may be up to 64 MiB
    unless A2V_MAX_MESSAGE_BYTES says otherwise. A2V_TFSERVING_MODEL_CONFIG: the model list, a
    ModelServerConfig text file as TF Serving's --model_config_file (only these models are served;
    HandleReloadConfigRequest replaces the list). Without it, every folder of A2V_MODELS_DIR (default
    `./models`, relative to the working directory) is a model (a stand-in convenience). A2V_TFSERVING_POLL_SECONDS
    (default 2, 0.05-3600): how often the base paths are scanned for new versions.
    """

    server: ServerConfig
    models_dir: Path
    poll_seconds: float = 2.0
    model_config: tuple[ModelConfig, ...] | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TFServingConfig:
        """Read the config; raises ConfigError listing every problem."""
        environ = os.environ if environ is None else environ
        env = Env(environ)
        server = ServerConfig.read(env, SERVICE)
        if not environ.get("A2V_MAX_MESSAGE_BYTES", "").strip():
            server = dataclasses.replace(server, max_message_bytes=MAX_MESSAGE_BYTES)
        config = cls(
            server=server,
            models_dir=Path(env.get_str(MODELS_DIR_VARIABLE, "models")).expanduser().resolve(),
            poll_seconds=env.get_float(POLL_SECONDS_VARIABLE, cls.poll_seconds, minimum=0.05, maximum=3600.0),
        )
        config_file = env.get_str(MODEL_CONFIG_VARIABLE, "")
        env.check()
        if config_file:
            try:
                config = dataclasses.replace(config, model_config=tuple(read_model_config_file(Path(config_file))))
            except InvalidInput as exc:
                raise ConfigError(f"{MODEL_CONFIG_VARIABLE}: {exc}") from exc
        return config

    def manager(self) -> ModelManager:
        """The model manager these settings describe."""
        if self.model_config is not None:
            return ModelManager(config=self.model_config, poll_seconds=self.poll_seconds)
        return ModelManager(self.models_dir, poll_seconds=self.poll_seconds)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """`tensorflow.serving.PredictionService`: Predict and GetModelMetadata.

    Classify, Regress and MultiInference (tf.Example based APIs that the LSTM does not use) are not
    implemented: the generated base class answers them UNIMPLEMENTED.
    """

    def __init__(self, manager: ModelManager, *, load_wait_seconds: float = 30.0) -> None:
        self.manager = manager
        self.load_wait_seconds = load_wait_seconds

    @grpc_errors
    def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        """Run a signature (default "serving_default") of the requested (default: newest) version."""
        version, model = _resolve(self.manager, request.model_spec, context, self.load_wait_seconds)
        signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
        inputs = {key: _to_array(key, proto) for key, proto in request.inputs.items()}
        outputs = model.predict(signature, inputs, output_filter=list(request.output_filter))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = version
        response.model_spec.signature_name = signature
        for key, array in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(array))
        return response

    @grpc_errors
    def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """The SignatureDefMap of a version (metadata_field must be exactly ["signature_def"])."""
        if not request.metadata_field:
            raise InvalidInput("GetModelMetadataRequest must specify at least one metadata_field")
        for field_name in request.metadata_field:
            if field_name != SIGNATURE_DEF_FIELD:
                raise InvalidInput(f"Metadata field {field_name} is not supported")
        version, model = _resolve(self.manager, request.model_spec, context, self.load_wait_seconds)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = version
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_def_map(model))
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """`tensorflow.serving.ModelService`: GetModelStatus and HandleReloadConfigRequest."""

    def __init__(self, manager: ModelManager, *, reload_wait_seconds: float = 30.0) -> None:
        self.manager = manager
        self.reload_wait_seconds = reload_wait_seconds

    @grpc_errors
    def HandleReloadConfigRequest(
        self, request: model_management_pb2.ReloadConfigRequest, context
    ) -> model_management_pb2.ReloadConfigResponse:
        """Serve exactly the models of `request.config` from now on; answers once the new ones are loaded.

        A malformed list is INVALID_ARGUMENT (the models served stay as they were). Models that have no version
        to serve after the wait are named in the response's status (NOT_FOUND), the others serve.
        """
        models = model_configs(request.config)
        missing = self.manager.reload(models, timeout=self.reload_wait_seconds)
        response = model_management_pb2.ReloadConfigResponse()
        if missing:
            response.status.error_code = error_codes_pb2.NOT_FOUND
            response.status.error_message = f"no version of {', '.join(sorted(missing))} could be loaded yet"
        return response

    @grpc_errors
    def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context
    ) -> get_model_status_pb2.GetModelStatusResponse:
        """State of every tracked version of the model, or of `model_spec.version` when set."""
        spec = request.model_spec
        if not spec.name:
            raise InvalidInput("model_spec.name is empty")
        statuses = self.manager.status(spec.name, _requested_version(spec))
        response = get_model_status_pb2.GetModelStatusResponse()
        for status in statuses:
            entry = response.model_version_status.add(version=status.version, state=int(status.state))
            if status.error is not None:
                entry.status.CopyFrom(
                    status_pb2.StatusProto(
                        error_code=error_codes_pb2.Code.Value(status.error.code), error_message=status.error.message
                    )
                )
        return response


def signature_def_map(model: LoadedModel) -> get_model_metadata_pb2.SignatureDefMap:
    """Every SignatureDef of the model's `serve` MetaGraph, as TF Serving's GetModelMetadata sends it."""
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, signature_def in model.signature_defs.items():
        signature_map.signature_def[name].CopyFrom(signature_def)
    return signature_map


def _requested_version(spec) -> int | None:
    choice = spec.WhichOneof("version_choice")
    if choice == "version_label":
        raise InvalidInput(
            f"Unrecognized servable version label: {spec.version_label} (this server has no version labels)"
        )
    return spec.version.value if choice == "version" else None


def _resolve(manager: ModelManager, spec, context, load_wait_seconds: float) -> tuple[int, LoadedModel]:
    if not spec.name:
        raise InvalidInput("model_spec.name is empty")
    remaining = context.time_remaining() if context is not None else None
    timeout = load_wait_seconds if remaining is None else max(0.0, min(load_wait_seconds, remaining - 0.05))
    return manager.get(spec.name, _requested_version(spec), timeout=timeout)


def _to_array(key: str, proto) -> np.ndarray:
    try:
        return tf.make_ndarray(proto)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"input {key!r} is not a valid TensorProto: {exc}") from exc


def bindings(
    manager: ModelManager, *, load_wait_seconds: float = 30.0, reload_wait_seconds: float = 30.0
) -> list[ServiceBinding]:
    """Both TF Serving services over `manager`; they turn SERVING once every listed model has a version loaded.

    TF Serving opens its ports only then: a listed model without a version (a speaker not trained yet) keeps it
    closed. Here health stays NOT_SERVING instead, so `make up` and the tests see the same wait; an empty list
    is ready at once.
    """

    def load() -> None:
        manager.start()
        manager.wait_ready()

    return [
        binding_for(
            prediction_service_pb2,
            prediction_service_pb2_grpc,
            "PredictionService",
            PredictionServicer(manager, load_wait_seconds=load_wait_seconds),
            load=load,
        ),
        binding_for(
            model_service_pb2,
            model_service_pb2_grpc,
            "ModelService",
            ModelServicer(manager, reload_wait_seconds=reload_wait_seconds),
        ),
    ]
