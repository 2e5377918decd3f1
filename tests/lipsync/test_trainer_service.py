"""The trainer service through a real gRPC server and the real S3 server: epochs streamed, version stored, bad
requests, cancellation."""

import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
import pytest

from audio2video.common.v1 import common_pb2
from audio2video.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc
from services.face.dataset import build_speaker_dataset
from services.lipsync import trainer
from services.lipsync.trainer_service import TrainerServicer, TrainerSettings, check_models_dir
from services.lipsync.versions import stored_versions
from services.runtime.clients import create_channel, wait_for_serving
from services.runtime.config import ConfigError, read_settings
from services.runtime.server import binding_for
from tests.conftest import REPO, free_port, wait_until
from tests.lipsync.test_trainer import TINY, clip, upload

pytestmark = pytest.mark.integration
SERVICE = "audio2video.lipsync.v1.TrainerService"
TINY_OPTIONS = trainer.settings_to_proto(TINY)


@pytest.fixture(scope="module")
def tiny_dataset():
    return build_speaker_dataset([clip("train_a", 6.0, 1), clip("held_out", 3.0, 2)], validation_clip_ids=["held_out"])


@pytest.fixture()
def refs(store, key_prefix, tiny_dataset) -> tuple[common_pb2.ObjectRef, common_pb2.ObjectRef]:
    dataset_key, pca_key = upload(store, key_prefix, tiny_dataset.arrays(), tiny_dataset.pca.arrays())
    return common_pb2.ObjectRef(key=dataset_key), common_pb2.ObjectRef(key=pca_key)


@pytest.fixture()
def speaker() -> str:
    return f"spk-{uuid.uuid4().hex[:10]}"


@pytest.fixture()
def service(store, run_server, tmp_path):
    """(stub, models folder) of a TrainerService on loopback."""
    models_dir = tmp_path / "models"
    servicer = TrainerServicer(store, models_dir=models_dir)
    port = run_server([binding_for(lipsync_pb2, lipsync_pb2_grpc, "TrainerService", servicer)])
    channel = create_channel(f"127.0.0.1:{port}", [SERVICE], timeout_seconds=120)
    yield lipsync_pb2_grpc.TrainerServiceStub(channel), models_dir
    channel.close()


def training_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "train-work"]


def test_train_streams_epochs_and_returns_the_stored_version(store, service, refs, speaker):
    stub, models_dir = service
    dataset, pca = refs
    request = lipsync_pb2.TrainRequest(speaker=speaker, dataset=dataset, pca=pca, options=TINY_OPTIONS, request_id="t")
    events = list(stub.Train(request))
    *progress, last = events
    assert all(e.HasField("progress") for e in progress) and last.HasField("result")
    assert [(e.progress.done, e.progress.total) for e in progress] == [(1, 2), (2, 2)]
    assert {(e.progress.stage, e.progress.unit) for e in progress} == {("train", "epochs")}

    result = last.result
    model = result.model
    prefix = f"models/{speaker}/1/"
    assert (model.speaker, model.version, model.prefix) == (speaker, 1, prefix)
    assert model.state == lipsync_pb2.MODEL_STATE_UNSPECIFIED  # the trainer does not ask TF Serving
    assert model.delay_steps == TINY.delay_steps and model.feature_dim == 28 and model.pca_components > 0
    assert trainer.settings_from_proto(model.training) == TINY
    assert model.metrics.epochs == 2 and model.metrics.validation_loss > 0
    assert model.model_card.key == f"{prefix}assets.extra/model_card.json" and model.model_card.sha256
    assert model.pca.key == f"{prefix}assets.extra/pca.npz" and model.normalization.key
    assert model.created.seconds > 0
    assert result.summary.startswith(f"stored {prefix}  epochs 2") and 1 <= result.best_epoch <= 2
    assert not result.stopped_early and result.training_seconds > 0

    assert stored_versions(store, speaker) == [1]
    assert (models_dir / speaker / "1" / "saved_model.pb").is_file()  # the folder TF Serving polls


def test_bad_requests_are_refused_with_their_status(service, refs, speaker, key_prefix):
    stub, _ = service
    dataset, pca = refs

    def code(**fields) -> grpc.StatusCode:
        request = lipsync_pb2.TrainRequest(speaker=speaker, dataset=dataset, pca=pca, options=TINY_OPTIONS)
        for name, value in fields.items():
            if isinstance(value, str):
                setattr(request, name, value)
            else:
                getattr(request, name).CopyFrom(value)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Train(request))
        return err.value.code()

    assert code(dataset=common_pb2.ObjectRef(key=f"{key_prefix}/nothing.npz")) == grpc.StatusCode.NOT_FOUND
    assert code(pca=common_pb2.ObjectRef(key=f"{key_prefix}/nothing.npz")) == grpc.StatusCode.NOT_FOUND
    assert code(speaker="Obama!") == grpc.StatusCode.INVALID_ARGUMENT
    assert code(dataset=common_pb2.ObjectRef()) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(dataset=common_pb2.ObjectRef(bucket="other", key=dataset.key)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(options=lipsync_pb2.TrainingOptions(dropout=1.5)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(dataset=pca) == grpc.StatusCode.INVALID_ARGUMENT  # a PCA archive is no dataset


def test_cancelling_the_call_stops_the_training_and_stores_nothing(store, service, refs, speaker):
    stub, models_dir = service
    dataset, pca = refs
    options = lipsync_pb2.TrainingOptions()
    options.CopyFrom(TINY_OPTIONS)
    options.max_epochs, options.early_stopping_patience = 100000, 0
    call = stub.Train(lipsync_pb2.TrainRequest(speaker=speaker, dataset=dataset, pca=pca, options=options))
    first = next(call)
    assert (first.progress.done, first.progress.total) == (1, 100000)
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        next(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert wait_until(lambda: not training_threads(), timeout=30), "the training went on after the cancel"
    assert stored_versions(store, speaker) == []
    assert not (models_dir / speaker).exists() or not any((models_dir / speaker).iterdir())


def test_the_models_folder_comes_from_the_environment_and_must_be_writable(tmp_path):
    assert read_settings(TrainerSettings.read, {}).models_dir is None
    settings = read_settings(TrainerSettings.read, {trainer.MODELS_DIR_VARIABLE: str(tmp_path / "m")})
    assert settings.models_dir == tmp_path / "m"
    check_models_dir(tmp_path / "m" / "new")
    assert (tmp_path / "m" / "new").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot be created"):
        check_models_dir(blocker / "models")


def test_the_module_serves_the_trainer_until_sigterm(s3_server, tmp_path):
    port = free_port()
    models_dir = tmp_path / "models"
    env = {**os.environ, **s3_server.env(), "A2V_LISTEN": f"127.0.0.1:{port}", "A2V_MODELS_DIR": str(models_dir)}
    env.pop("A2V_MAX_CONNECTION_AGE_GRACE_SECONDS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "services.lipsync.trainer_service"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_serving(f"127.0.0.1:{port}", SERVICE, timeout_seconds=60)
        assert models_dir.is_dir()  # made at start, where TF Serving will look
        # TensorFlow is loaded by the first training, not at start (the health check answers at once).
        assert "tensorflow" not in Path(f"/proc/{process.pid}/maps").read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert '"service": "trainer"' in process.stdout.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
