"""The TF Serving stand-in through real gRPC servers, with TF Serving's own client stubs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.protobuf import error_codes_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from deploy import catalog
from services.runtime.clients import health_status, wait_for_serving
from services.runtime.config import ConfigError, ServerConfig
from services.runtime.server import create_server
from services.tfserving.models import LoadedModel, ModelConfig, ModelManager
from services.tfserving.servicer import (
    MAX_MESSAGE_BYTES,
    MODEL_SERVICE,
    MODELS_DIR_VARIABLE,
    PREDICTION_SERVICE,
    TFServingConfig,
    bindings,
)
from tests.conftest import REPO, free_port, wait_until

pytestmark = pytest.mark.integration
FEATURES = 28
COEFFICIENTS = 5
MODEL = "obama"
BAD_PROTO = tensor_pb2.TensorProto(dtype=1, tensor_content=b"abc", tensor_shape={"dim": [{"size": 2}]})
"""float32 [2] whose 3 bytes of content are no whole number of floats."""
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class PerStep(tf.Module):
    """The LSTM's signature contract with a per-step dense layer: features [b, t, 28] -> coefficients [b, t, 5]."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        self.weights = tf.Variable(rng.normal(size=(FEATURES, COEFFICIENTS)).astype(np.float32))
        self.bias = tf.Variable(rng.normal(size=(COEFFICIENTS,)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, None, FEATURES], tf.float32)])
    def serve(self, features):
        return {"coefficients": tf.tanh(tf.einsum("btf,fk->btk", features, self.weights) + self.bias)}

    @tf.function(input_signature=[tf.TensorSpec([None, None, FEATURES], tf.float32)])
    def linear(self, features):
        return {"linear": tf.einsum("btf,fk->btk", features, self.weights), "bias": tf.identity(self.bias)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[int, Path]:
    """Two SavedModels with different weights (stand-ins for two trained versions), by seed."""
    root = tmp_path_factory.mktemp("exports")
    paths = {}
    for seed in (1, 2):
        module = PerStep(seed)
        paths[seed] = root / str(seed)
        signatures = {"serving_default": module.serve, "linear": module.linear}
        tf.saved_model.save(module, str(paths[seed]), signatures=signatures)
    return paths


@pytest.fixture(scope="module")
def reference(exports):
    """Run a SavedModel directly (no server): seed -> features -> coefficients."""
    loaded = {seed: tf.saved_model.load(str(path)) for seed, path in exports.items()}

    def run(seed: int, features: np.ndarray) -> np.ndarray:
        return loaded[seed].signatures["serving_default"](features=tf.constant(features))["coefficients"].numpy()

    return run


def install(models_dir: Path, version: int, source: Path | None = None, *, garbage: bytes | None = None) -> Path:
    """Make `<models_dir>/obama/<version>` appear at once (renamed from a hidden staging folder), as a trainer does."""
    staging = models_dir / MODEL / f".incoming-{version}"
    if source is not None:
        shutil.copytree(source, staging)
    else:
        staging.mkdir(parents=True)
        if garbage is not None:
            (staging / "saved_model.pb").write_bytes(garbage)
    target = models_dir / MODEL / str(version)
    os.rename(staging, target)
    return target


def remove(models_dir: Path, version: int) -> None:
    """Take a version folder away at once (rename, then delete)."""
    gone = models_dir / MODEL / f".removed-{version}"
    os.rename(models_dir / MODEL / str(version), gone)
    shutil.rmtree(gone)


def features(time_steps: int = 30, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, time_steps, FEATURES)).astype(np.float32)


@dataclass
class Stand:
    """A started stand-in and TF Serving's client stubs dialled at it."""

    manager: ModelManager
    port: int
    channel: grpc.Channel

    @property
    def predictions(self):
        return prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    @property
    def models(self):
        return model_service_pb2_grpc.ModelServiceStub(self.channel)

    def predict(self, x=None, *, model=MODEL, version=None, signature="", inputs=None, output_filter=()):
        request = predict_pb2.PredictRequest(output_filter=list(output_filter))
        request.model_spec.name = model
        request.model_spec.signature_name = signature
        if version is not None:
            request.model_spec.version.value = version
        if inputs is None:
            inputs = {"features": features() if x is None else x}
        for key, value in inputs.items():
            proto = value if isinstance(value, tensor_pb2.TensorProto) else tf.make_tensor_proto(value)
            request.inputs[key].CopyFrom(proto)
        return self.predictions.Predict(request, timeout=20)

    def status(self, *, model=MODEL, version=None) -> dict[int, tuple[str, str, str]]:
        """version -> (state, error code, error message)."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = version
        response = self.models.GetModelStatus(request, timeout=10)
        return {
            s.version: (
                get_model_status_pb2.ModelVersionStatus.State.Name(s.state),
                error_codes_pb2.Code.Name(s.status.error_code),
                s.status.error_message,
            )
            for s in response.model_version_status
        }

    def state(self, version: int) -> str | None:
        try:
            return self.status(version=version)[version][0]
        except grpc.RpcError:
            return None


@pytest.fixture()
def models_dir(tmp_path) -> Path:
    return tmp_path / "models"


@pytest.fixture()
def start(run_server, models_dir):
    """Start the stand-in over `models_dir` (polled every 0.1 s) through `create_server` on port 0."""
    managers, channels = [], []

    def make(*, loader=LoadedModel.load, config=None) -> Stand:
        if config is None:
            manager = ModelManager(models_dir, poll_seconds=0.1, loader=loader)
        else:
            manager = ModelManager(config=config, poll_seconds=0.1, loader=loader)
        managers.append(manager)
        port = run_server(bindings(manager, reload_wait_seconds=2), max_message_bytes=MAX_MESSAGE_BYTES)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        channels.append(channel)
        return Stand(manager, port, channel)

    yield make
    for channel in channels:
        channel.close()
    for manager in managers:
        manager.close()


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as error:
        call(*args, **kwargs)
    return error.value.code(), error.value.details()


def output(response, key="coefficients") -> np.ndarray:
    return tf.make_ndarray(response.outputs[key])


# -- Predict ----------------------------------------------------------------------------------------


def test_predict_equals_running_the_saved_model(start, models_dir, exports, reference):
    install(models_dir, 1, exports[1])
    stand = start()
    x = features(time_steps=3000, batch=1)  # a 30 s chunk of features
    response = stand.predict(x)
    assert (response.model_spec.name, response.model_spec.version.value) == (MODEL, 1)
    assert response.model_spec.signature_name == "serving_default"
    assert list(response.outputs) == ["coefficients"]
    got = output(response)
    assert got.shape == (1, 3000, COEFFICIENTS) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference(1, x), rtol=0, atol=1e-6)


def test_signature_name_and_output_filter(start, models_dir, exports):
    install(models_dir, 1, exports[1])
    stand = start()
    x = features()
    both = stand.predict(x, signature="linear")
    assert both.model_spec.signature_name == "linear" and set(both.outputs) == {"linear", "bias"}
    filtered = stand.predict(x, signature="linear", output_filter=["bias"])
    assert list(filtered.outputs) == ["bias"]
    np.testing.assert_array_equal(output(filtered, "bias"), output(both, "bias"))
    code, details = code_of(stand.predict, x, output_filter=["nope"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "nope" in details


def test_messages_larger_than_grpcs_default_4_mib_pass(start, models_dir, exports, reference):
    install(models_dir, 1, exports[1])
    stand = start()
    x = features(time_steps=50_000, batch=1)  # 5.6 MB of float32
    np.testing.assert_allclose(output(stand.predict(x)), reference(1, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("inputs", "signature", "expected"),
    [
        ({"audio": features()}, "", "sent extra ['audio'], missing ['features']"),
        ({"features": features(), "extra": features()}, "", "sent extra ['extra']"),
        ({}, "", "missing ['features']"),
        ({"features": features().astype(np.float64)}, "", "expects float32 but float64 is provided"),
        ({"features": np.zeros((2, 3, FEATURES), np.int32)}, "", "expects float32 but int32 is provided"),
        ({"features": features()[0]}, "", "has shape [30, 28], expected [?, ?, 28]"),
        ({"features": np.zeros((2, 30, 27), np.float32)}, "", "has shape [2, 30, 27], expected [?, ?, 28]"),
        ({"features": features()}, "nope", 'signature key "nope" not found'),
        ({"features": BAD_PROTO}, "", "not a valid TensorProto"),
    ],
    ids=["wrong-key", "extra-key", "no-input", "float64", "int32", "rank-2", "27-features", "signature", "bad-proto"],
)
def test_bad_inputs_are_invalid_argument(start, models_dir, exports, inputs, signature, expected):
    install(models_dir, 1, exports[1])
    stand = start()
    code, details = code_of(stand.predict, inputs=inputs, signature=signature)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in details


def test_unknown_models_and_versions_are_not_found(start, models_dir, exports):
    install(models_dir, 1, exports[1])
    (models_dir / "empty").mkdir()
    stand = start()
    for kwargs in ({"model": "nobody"}, {"version": 7}, {"model": "empty"}, {"model": "../obama"}):
        code, details = code_of(stand.predict, **kwargs)
        assert code == grpc.StatusCode.NOT_FOUND, kwargs
        assert "Servable not found" in details
    assert code_of(stand.predict, model="")[0] == grpc.StatusCode.INVALID_ARGUMENT
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.version_label = MODEL, "stable"
    assert code_of(stand.predictions.Predict, request, timeout=10)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stand.status, model="nobody")[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(stand.status, version=7)[0] == grpc.StatusCode.NOT_FOUND


# -- versions: polling, policy, failures ------------------------------------------------------------


def test_both_services_are_serving_and_version_1_is_available(start, models_dir, exports):
    install(models_dir, 1, exports[1])
    stand = start()
    health = health_pb2_grpc.HealthStub(stand.channel)
    for service in (PREDICTION_SERVICE, MODEL_SERVICE):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == 1  # SERVING
    assert stand.status() == {1: ("AVAILABLE", "OK", "")}
    assert stand.status(version=1) == {1: ("AVAILABLE", "OK", "")}


def test_a_new_version_is_picked_up_and_becomes_the_default(start, models_dir, exports, reference):
    install(models_dir, 1, exports[1])
    stand = start()
    x = features()
    install(models_dir, 2, exports[2])
    assert wait_until(lambda: stand.state(2) == "AVAILABLE", timeout=5)
    latest = stand.predict(x)
    assert latest.model_spec.version.value == 2
    np.testing.assert_allclose(output(latest), reference(2, x), rtol=0, atol=1e-6)
    # The default policy (latest, one version) unloads version 1 once version 2 serves.
    assert wait_until(lambda: stand.state(1) == "END", timeout=5)
    assert code_of(stand.predict, x, version=1)[0] == grpc.StatusCode.NOT_FOUND
    assert {v: s[0] for v, s in stand.status().items()} == {2: "AVAILABLE", 1: "END"}


def test_an_empty_models_folder_is_serving_and_new_models_appear(start, models_dir, exports):
    stand = start()  # the folder does not even exist yet
    assert code_of(stand.predict)[0] == grpc.StatusCode.NOT_FOUND
    install(models_dir, 3, exports[1])
    assert wait_until(lambda: stand.state(3) == "AVAILABLE", timeout=5)
    assert stand.predict().model_spec.version.value == 3


def listed(models_dir: Path, policy: str = "latest", **fields) -> list[ModelConfig]:
    return [ModelConfig(MODEL, models_dir / MODEL, policy=policy, **fields)]


@pytest.mark.parametrize(
    ("policy", "fields", "served"),
    [
        ("latest", {}, {3}),
        ("latest", {"num_versions": 2}, {2, 3}),
        ("all", {}, {1, 2, 3}),
        ("specific", {"versions": (1, 3)}, {1, 3}),
    ],
)
def test_only_the_versions_the_policy_wants_are_loaded_others_are_not_found(
    start, models_dir, exports, policy, fields, served
):
    for version in (1, 2, 3):
        install(models_dir, version, exports[1 + version % 2])
    stand = start(config=listed(models_dir, policy, **fields))
    assert {v for v, s in stand.status().items() if s[0] == "AVAILABLE"} == served
    for version in (1, 2, 3):
        if version in served:
            assert stand.predict(version=version).model_spec.version.value == version
        else:  # on disk, but TF Serving does not load versions on request
            code, details = code_of(stand.predict, version=version)
            assert code == grpc.StatusCode.NOT_FOUND and f"Specific({MODEL}, {version})" in details
    assert stand.predict().model_spec.version.value == 3


def test_only_listed_models_are_served_and_a_reload_changes_the_list(start, models_dir, exports, tmp_path):
    install(models_dir, 1, exports[1])
    other = tmp_path / "other"
    shutil.copytree(exports[2], other / "e2e" / "4")
    (models_dir / "unlisted").mkdir()
    shutil.copytree(exports[1], models_dir / "unlisted" / "1")
    stand = start(config=listed(models_dir))
    assert stand.predict().model_spec.version.value == 1
    code, details = code_of(stand.predict, model="unlisted")
    assert code == grpc.StatusCode.NOT_FOUND and "not in the model list" in details
    config = model_server_config_pb2.ModelServerConfig()
    config.model_config_list.config.add(name="e2e", base_path=str(other / "e2e"), model_platform="tensorflow")
    reload = model_management_pb2.ReloadConfigRequest(config=config)
    assert stand.models.HandleReloadConfigRequest(reload, timeout=30).status.error_code == 0
    assert stand.predict(model="e2e").model_spec.version.value == 4  # loaded before the reload answered
    assert code_of(stand.predict)[0] == grpc.StatusCode.NOT_FOUND  # obama is no longer listed
    # A model without versions is named in the answer; a malformed list changes nothing.
    config.model_config_list.config.add(name="new", base_path=str(tmp_path / "none"))
    reload = model_management_pb2.ReloadConfigRequest(config=config)
    answer = stand.models.HandleReloadConfigRequest(reload, timeout=60)
    assert answer.status.error_code == error_codes_pb2.NOT_FOUND and "new" in answer.status.error_message
    bad = model_server_config_pb2.ModelServerConfig()
    bad.model_config_list.config.add(name="s3", base_path="s3://bucket/models/s3")
    code, details = code_of(
        stand.models.HandleReloadConfigRequest, model_management_pb2.ReloadConfigRequest(config=bad), timeout=10
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "absolute local path" in details
    assert stand.predict(model="e2e").model_spec.version.value == 4


def test_a_removed_version_is_unloaded_and_the_previous_one_serves(start, models_dir, exports):
    install(models_dir, 1, exports[1])
    install(models_dir, 2, exports[2])
    stand = start(config=listed(models_dir, "all"))
    assert stand.predict(version=1).model_spec.version.value == 1
    remove(models_dir, 2)
    assert wait_until(lambda: stand.state(2) == "END", timeout=5)
    assert stand.predict().model_spec.version.value == 1
    assert code_of(stand.predict, version=2)[0] == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("garbage", "error_code"),
    [(b"this is not a SavedModel", "DATA_LOSS"), (None, "NOT_FOUND")],
    ids=["garbage-saved_model.pb", "no-saved_model.pb"],
)
def test_a_broken_version_reports_its_error_and_the_good_one_keeps_serving(
    start, models_dir, exports, garbage, error_code
):
    install(models_dir, 1, exports[1])
    stand = start()
    install(models_dir, 2, garbage=garbage)
    assert wait_until(lambda: stand.state(2) == "END", timeout=5)
    state, code, message = stand.status(version=2)[2]
    assert code == error_code and str(models_dir / MODEL / "2") in message
    assert stand.status(version=1)[1][0] == "AVAILABLE"
    assert stand.predict().model_spec.version.value == 1
    code, details = code_of(stand.predict, version=2)
    assert code == grpc.StatusCode.NOT_FOUND and "failed to load" in details
    # Fixed in place (the trainer re-exports): the changed saved_model.pb is tried again.
    remove(models_dir, 2)
    install(models_dir, 2, exports[2])
    assert wait_until(lambda: stand.state(2) == "AVAILABLE", timeout=5)
    assert stand.predict().model_spec.version.value == 2


def test_a_broken_newest_version_at_start_leaves_the_model_without_a_version(start, models_dir, exports):
    install(models_dir, 1, exports[1])
    install(models_dir, 2, garbage=b"\x00garbage")
    stand = start()  # as TF Serving: the policy wants version 2 only; an older one is not tried instead
    assert {v: s[:2] for v, s in stand.status().items()} == {2: ("END", "DATA_LOSS")}
    code, details = code_of(stand.predict)
    assert code == grpc.StatusCode.NOT_FOUND and "version 2" in details


def test_a_model_still_loading_is_not_found(start, models_dir, exports):
    gate = threading.Event()

    def slow_loader(path: Path) -> LoadedModel:
        gate.wait(10)
        return LoadedModel.load(path)

    stand = start(loader=slow_loader)
    install(models_dir, 1, exports[1])
    try:
        assert wait_until(lambda: stand.state(1) == "LOADING", timeout=5)
        code, details = code_of(stand.predict)
        assert code == grpc.StatusCode.NOT_FOUND and "loading" in details  # TF Serving: "Servable not found"
    finally:
        gate.set()
    assert wait_until(lambda: stand.state(1) == "AVAILABLE", timeout=5)
    assert stand.predict().model_spec.version.value == 1


def test_concurrent_predicts_while_a_new_version_arrives(start, models_dir, exports, reference):
    install(models_dir, 1, exports[1])
    stand = start()
    x = features()
    expected = {1: reference(1, x), 2: reference(2, x)}
    failures, versions = [], set()

    def client():
        for _ in range(15):
            try:
                response = stand.predict(x)
                version = response.model_spec.version.value
                np.testing.assert_allclose(output(response), expected[version], rtol=0, atol=1e-6)
                versions.add(version)
            except Exception as exc:  # collected: assertions in threads would be lost
                failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    install(models_dir, 2, exports[2])
    for thread in threads:
        thread.join(30)
    assert not failures and 1 in versions and versions <= {1, 2}
    assert wait_until(lambda: stand.state(2) == "AVAILABLE", timeout=5)
    assert stand.predict(x).model_spec.version.value == 2


# -- metadata, unimplemented RPCs -------------------------------------------------------------------


def test_metadata_is_the_signature_def_map(start, models_dir, exports):
    install(models_dir, 1, exports[1])
    stand = start()
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = MODEL
    response = stand.predictions.GetModelMetadata(request, timeout=10)
    assert (response.model_spec.name, response.model_spec.version.value) == (MODEL, 1)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    serving = signatures.signature_def["serving_default"]
    assert list(serving.inputs) == ["features"] and list(serving.outputs) == ["coefficients"]
    assert serving.inputs["features"].dtype == tf.float32.as_datatype_enum
    assert [d.size for d in serving.inputs["features"].tensor_shape.dim] == [-1, -1, FEATURES]
    assert [d.size for d in serving.outputs["coefficients"].tensor_shape.dim] == [-1, -1, COEFFICIENTS]
    assert serving.method_name == "tensorflow/serving/predict"
    assert set(signatures.signature_def["linear"].outputs) == {"linear", "bias"}
    for fields in ([], ["signature_def", "graph"]):
        bad = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=fields)
        bad.model_spec.name = MODEL
        assert code_of(stand.predictions.GetModelMetadata, bad, timeout=10)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_apis_the_lstm_does_not_use_are_unimplemented(start, models_dir):
    stand = start()
    code, _ = code_of(stand.predictions.Classify, classification_pb2.ClassificationRequest(), timeout=10)
    assert code == grpc.StatusCode.UNIMPLEMENTED


# -- configuration and the real process --------------------------------------------------------------


def test_config_defaults_and_overrides(tmp_path):
    config = TFServingConfig.from_env({})
    assert config.models_dir == (Path.cwd() / "models").resolve()
    assert (config.poll_seconds, config.model_config) == (2.0, None)
    assert config.server.max_message_bytes == MAX_MESSAGE_BYTES == 64 * 1024 * 1024
    config = TFServingConfig.from_env(
        {
            "A2V_MODELS_DIR": str(tmp_path),
            "A2V_TFSERVING_POLL_SECONDS": "0.5",
            "A2V_MAX_MESSAGE_BYTES": "1048576",
            "A2V_LISTEN": "0.0.0.0:8500",
        }
    )
    assert (config.models_dir, config.poll_seconds) == (tmp_path, 0.5)
    assert (config.server.max_message_bytes, config.server.listen) == (1048576, "0.0.0.0:8500")
    with pytest.raises(ConfigError, match="A2V_TFSERVING_POLL_SECONDS"):
        TFServingConfig.from_env({"A2V_TFSERVING_POLL_SECONDS": "0"})
    listing = tmp_path / "models.config"
    listing.write_text('model_config_list { config { name: "obama" base_path: "/models/obama" } }')
    config = TFServingConfig.from_env({"A2V_TFSERVING_MODEL_CONFIG": str(listing)})
    assert config.model_config == (ModelConfig("obama", Path("/models/obama")),)
    listing.write_text("model_config_list { config { name: ")
    with pytest.raises(ConfigError, match="A2V_TFSERVING_MODEL_CONFIG"):
        TFServingConfig.from_env({"A2V_TFSERVING_MODEL_CONFIG": str(listing)})
    assert MODELS_DIR_VARIABLE == catalog.MODELS_DIR_VARIABLE


def test_the_process_serves_until_sigterm(tmp_path, exports, reference):
    models_dir = tmp_path / "models"
    install(models_dir, 1, exports[1])
    port = free_port()
    env = {**os.environ, "A2V_LISTEN": f"127.0.0.1:{port}", MODELS_DIR_VARIABLE: str(models_dir)}
    for variable in ("A2V_S3_ACCESS_KEY", "A2V_S3_SECRET_KEY"):  # it needs no object store
        env.pop(variable, None)
    log_path = tmp_path / "tfserving.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.tfserving"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for_serving(f"127.0.0.1:{port}", PREDICTION_SERVICE, timeout_seconds=60)
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            stand = Stand(manager=None, port=port, channel=channel)
            x = features()
            np.testing.assert_allclose(output(stand.predict(x)), reference(1, x), rtol=0, atol=1e-6)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text()
    assert "model obama version 1 AVAILABLE" in log and '"service": "tfserving"' in log, log


def test_a_listed_model_without_versions_keeps_it_from_serving_until_the_list_changes(models_dir, exports, tmp_path):
    """TF Serving waits for every listed model before opening its ports: listing a speaker not trained yet kept
    8500 closed on a fresh stack. The stand-in stays NOT_SERVING likewise, until a reload drops that model."""
    install(models_dir, 1, exports[1])
    config = listed(models_dir) + [ModelConfig("e2e", tmp_path / "e2e")]
    manager = ModelManager(config=config, poll_seconds=0.1)
    server, port = create_server(ServerConfig(service="tfserving"), bindings(manager, reload_wait_seconds=5))
    server.start()
    loading = threading.Thread(target=server.load_and_mark_serving, daemon=True)
    loading.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            time.sleep(1.0)
            assert health_status(channel, PREDICTION_SERVICE) == "NOT_SERVING"
            reload = model_management_pb2.ReloadConfigRequest()
            reload.config.model_config_list.config.add(name=MODEL, base_path=str(models_dir / MODEL))
            model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(reload, timeout=30)
            assert wait_until(lambda: health_status(channel, PREDICTION_SERVICE) == "SERVING", timeout=10)
    finally:
        manager.close()
        server.stop(0).wait()
