"""TF Serving's models from the object store (issue 15): the model sync copies every stored version, writes the
model list and sends it with HandleReloadConfigRequest; a restarted TF Serving starts with the same list. Real S3
server, the TF Serving stand-in on loopback."""

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from services.lipsync.model_sync import CONFIG_NAME, ModelSync, SyncConfig
from services.lipsync.versions import extra_key, version_prefix
from services.runtime.config import ServerConfig
from services.runtime.server import create_server
from services.tfserving.models import ModelManager, read_model_config_file
from services.tfserving.servicer import bindings

pytestmark = pytest.mark.integration


class Tiny(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, None, 28], tf.float32)])
    def serve(self, features):
        return {"coefficients": tf.reduce_sum(features, axis=-1, keepdims=True)}


def store_version(store, speaker: str, version: int, tmp_path: Path) -> None:
    """A complete version in the store, as the trainer leaves it (SavedModel files, then the model card)."""
    folder = tmp_path / f"export-{speaker}-{version}"
    module = Tiny()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        store.put_file(version_prefix(speaker, version) + path.relative_to(folder).as_posix(), path)
    store.put_bytes(extra_key(speaker, version, "model_card.json"), json.dumps({"speaker": speaker}).encode())


def serve(config_file: Path):
    manager = ModelManager(config=read_model_config_file(config_file), poll_seconds=0.2)
    server, port = create_server(ServerConfig(service="tfserving"), bindings(manager, reload_wait_seconds=20))
    server.start()
    server.load_and_mark_serving()
    return manager, server, f"127.0.0.1:{port}"


def predict(address: str, speaker: str) -> int:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = speaker
    request.inputs["features"].CopyFrom(tf.make_tensor_proto(np.ones((1, 3, 28), np.float32)))
    with grpc.insecure_channel(address) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    return response.model_spec.version.value


def test_a_trained_speaker_reaches_tf_serving_and_stays_listed_across_a_restart(s3_server, tmp_path):
    from services.runtime.blobstore import BlobStore

    store = BlobStore.from_config(s3_server.config(bucket="model-sync"))
    store.ensure_bucket()
    folder = tmp_path / "tfserving"
    init = ModelSync(store, SyncConfig(folder=folder, serving_address="127.0.0.1:1"))
    init.once(send=False)  # the init step on a fresh stack: an empty list, so TF Serving is up at once
    assert read_model_config_file(folder / CONFIG_NAME) == []
    manager, server, address = serve(folder / CONFIG_NAME)
    try:
        sync = ModelSync(store, SyncConfig(folder=folder, serving_address=address))
        store_version(store, "alice", 1, tmp_path)
        store.put_bytes(version_prefix("bob", 1) + "saved_model.pb", b"half a version: no model card yet")
        sync.once()
        assert [m.name for m in read_model_config_file(folder / CONFIG_NAME)] == ["alice"]
        assert predict(address, "alice") == 1  # the reload answered once it was loaded
        store_version(store, "alice", 2, tmp_path)
        sync.once()
        assert predict(address, "alice") == 1 or predict(address, "alice") == 2
        assert (folder / "alice" / "2" / "saved_model.pb").exists() and not (folder / "bob").exists()
    finally:
        manager.close()
        server.stop(0).wait()
    # TF Serving restarted: it reads the list the sync wrote and serves the same speakers with no reload.
    manager, server, address = serve(folder / CONFIG_NAME)
    try:
        assert predict(address, "alice") == 2
    finally:
        manager.close()
        server.stop(0).wait()


def test_versions_and_speakers_deleted_from_the_store_leave_the_folder(s3_server, tmp_path):
    from services.runtime.blobstore import BlobStore

    store = BlobStore.from_config(s3_server.config(bucket="model-sync-prune"))
    store.ensure_bucket()
    folder = tmp_path / "tfserving"
    sync = ModelSync(store, SyncConfig(folder=folder, serving_address="127.0.0.1:1"))
    for speaker, version in (("alice", 1), ("alice", 2), ("carol", 1)):
        store_version(store, speaker, version, tmp_path)
    sync.once(send=False)
    assert sorted(str(p.relative_to(folder)) for p in folder.glob("*/*")) == ["alice/1", "alice/2", "carol/1"]
    (folder / "alice" / ".incoming-3").mkdir()  # a copy cut short by a restart
    (folder / "notes").mkdir()  # not the sync's: left alone
    for key in [*store.list_keys(version_prefix("alice", 1)), *store.list_keys("models/carol/")]:
        store.delete(key)

    sync.once(send=False)

    assert sorted(str(p.relative_to(folder)) for p in folder.glob("*/*")) == ["alice/2"]
    assert (folder / "notes").is_dir() and not (folder / "carol").exists()
    assert [m.name for m in read_model_config_file(folder / CONFIG_NAME)] == ["alice"]


def test_nothing_is_pruned_while_tf_serving_has_not_taken_the_new_list(s3_server, tmp_path):
    from services.runtime.blobstore import BlobStore

    store = BlobStore.from_config(s3_server.config(bucket="model-sync-unsent"))
    store.ensure_bucket()
    folder = tmp_path / "tfserving"
    store_version(store, "alice", 1, tmp_path)
    ModelSync(store, SyncConfig(folder=folder, serving_address="127.0.0.1:1")).once(send=False)
    for key in store.list_keys("models/alice/"):
        store.delete(key)

    ModelSync(store, SyncConfig(folder=folder, serving_address="127.0.0.1:1")).once()  # TF Serving unreachable

    assert (folder / "alice" / "1" / "saved_model.pb").exists()  # still served by the old list: kept
    assert read_model_config_file(folder / CONFIG_NAME) == []


def test_a_list_tf_serving_could_not_load_is_sent_again_and_nothing_is_pruned(s3_server, tmp_path):
    """TF Serving answers a reload whose models do not all load with an error status: the sync must not take the
    list as served (it tried once and never again), and keeps every file until a list is taken."""
    from services.runtime.blobstore import BlobStore

    store = BlobStore.from_config(s3_server.config(bucket="model-sync-refused"))
    store.ensure_bucket()
    folder = tmp_path / "tfserving"
    ModelSync(store, SyncConfig(folder=folder, serving_address="127.0.0.1:1")).once(send=False)
    manager = ModelManager(config=read_model_config_file(folder / CONFIG_NAME), poll_seconds=0.2)
    server, port = create_server(ServerConfig(service="tfserving"), bindings(manager, reload_wait_seconds=3))
    server.start()
    server.load_and_mark_serving()
    try:
        sync = ModelSync(store, SyncConfig(folder=folder, serving_address=f"127.0.0.1:{port}"))
        store_version(store, "alice", 1, tmp_path)
        store.put_bytes(version_prefix("bob", 1) + "saved_model.pb", b"not a SavedModel")
        store.put_bytes(extra_key("bob", 1, "model_card.json"), b"{}")
        sync.once()
        assert sync.sent is None  # refused: sent again next pass
        assert predict(f"127.0.0.1:{port}", "alice") == 1  # the models that loaded serve meanwhile
        for key in [*store.list_keys("models/bob/")]:
            store.delete(key)
        sync.once()
        assert sync.sent is not None and not (folder / "bob").exists()
    finally:
        manager.close()
        server.stop(0).wait()
