"""The lipsync stage through real gRPC servers: our servicer, the TF Serving stand-in, the S3 server."""

import json
import os

import grpc
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf

from audio2video.common.v1 import common_pb2
from audio2video.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc
from services.lipsync import model as lstm
from services.lipsync.servicer import LipsyncServicer
from services.lipsync.serving import ServingClient
from services.runtime.clients import create_channel
from services.runtime.protos import array_ref
from services.runtime.server import binding_for
from services.tfserving.models import ModelManager
from services.tfserving.servicer import bindings as tfserving_bindings
from tests.conftest import free_port
from tests.support.refs import unhashed

pytestmark = pytest.mark.integration
DELAY = 20
K = 3
SERVICE = "audio2video.lipsync.v1.LipsyncService"
SPEAKER = "lipsync-test"  # not a speaker the trainer tests store in the shared bucket


class DelayedLinear(tf.Module):
    """The serving contract with a known delay: output step t = W . features[t - DELAY] (zeros before)."""

    def __init__(self) -> None:
        super().__init__()
        weights = np.zeros((28, K), np.float32)
        weights[0, 0] = 1.0  # coefficient 0 follows feature 0 (normalised)
        self.weights = tf.Variable(weights)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 28], tf.float32)])
    def serve(self, features):
        shifted = tf.pad(features, [[0, 0], [DELAY, 0], [0, 0]])[:, : tf.shape(features)[1]]
        return {"coefficients": tf.einsum("btf,fk->btk", shifted, self.weights)}


def save_delayed_linear(root, speaker: str, version: int = 1) -> None:
    """A `DelayedLinear` SavedModel where TF Serving looks for the speaker's version: root/speaker/version."""
    module = DelayedLinear()
    tf.saved_model.save(module, str(root / speaker / str(version)), signatures={"serving_default": module.serve})


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_delayed_linear(root, SPEAKER)
    return root


def opening_pca() -> tuple[np.ndarray, np.ndarray]:
    """A mouth PCA (mean [40], components [K, 40]) whose first component opens the inner lips of a real-looking
    mouth, 0.34 wide, so its opening (gap / width) is defined."""
    mean = np.zeros((20, 2))
    mean[:, 0] = np.linspace(0.33, 0.67, 20)
    mean[0, 0], mean[6, 0] = 0.33, 0.67
    mean[[19, 18, 17], 0] = mean[[13, 14, 15], 0]
    mean[[19, 18, 17], 1] = 0.05
    components = np.zeros((K, 20, 2))
    components[0, [17, 18, 19], 1] = 1.0  # opens the inner lips
    components[1, [2, 3, 4], 1] = 1.0  # raises the upper outer lip
    components[2, [8, 9, 10], 1] = 1.0  # lowers the lower outer lip
    components = components.reshape(K, 40) / np.sqrt(3)
    return mean.reshape(40).astype(np.float32), components.astype(np.float32)


def store_model_assets(store, speaker=None, version=1, pca=None, **card_fields):
    """What the trainer stores beside the SavedModel: PCA, normalisation, model card (last, with `card_fields`)."""
    speaker = speaker or SPEAKER
    if pca is None:
        rng = np.random.default_rng(3)
        components = np.linalg.qr(rng.standard_normal((40, K)))[0].T.astype(np.float32)
        mean = np.tile([0.5, 0.8], 20).astype(np.float32)
    else:
        mean, components = pca
    extra = f"models/{speaker}/{version}/assets.extra"
    store.put_arrays(
        f"{extra}/pca.npz",
        {
            "mean": mean,
            "components": components,
            "explained_variance": np.ones(K, np.float32),
            "template_id": np.array("tpl-test"),
        },
    )
    store.put_arrays(
        f"{extra}/normalization.npz",
        {"feature_mean": np.zeros(28, np.float32), "feature_std": np.full(28, 2.0, np.float32)},
    )
    card = {
        "speaker": speaker,
        "version": version,
        "created": "2026-11-25T12:00:00Z",
        "delay_steps": DELAY,
        "feature_dim": 28,
        "feature_rate_hz": 100.0,
        "pca_components": K,
        "template_id": "tpl-test",
        "training": {"hidden_units": 60, "delay_steps": DELAY},
        "metrics": {"validation_loss": 0.5, "epochs": 3},
    } | card_fields
    store.put_bytes(f"{extra}/model_card.json", json.dumps(card).encode(), content_type="application/json")
    return mean, components


@pytest.fixture()
def lipsync(store, run_server, models_dir):
    manager = ModelManager(models_dir, poll_seconds=0.2)
    serving_port = run_server(tfserving_bindings(manager, load_wait_seconds=10), max_message_bytes=64 << 20)
    serving = ServingClient(f"127.0.0.1:{serving_port}", timeout_seconds=30)
    port = run_server([binding_for(lipsync_pb2, lipsync_pb2_grpc, "LipsyncService", LipsyncServicer(store, serving))])
    channel = create_channel(f"127.0.0.1:{port}", [SERVICE], timeout_seconds=60)
    yield lipsync_pb2_grpc.LipsyncServiceStub(channel)
    channel.close()
    serving.close()
    manager.close()


def pulse_features(store, key, rows=400, peak_row=150):
    features = np.zeros((rows, 28), np.float32)
    features[peak_row - 4 : peak_row + 5, 0] = 2.0 * np.hanning(9)
    return array_ref(*store.put_array(key, features, fps=100.0, start_seconds=0.0125))


NTSC = common_pb2.FrameRate(numerator=30000, denominator=1001)


def test_a_pulse_in_the_audio_opens_the_mouth_at_that_time(store, key_prefix, lipsync):
    mean, components = store_model_assets(store)
    features = pulse_features(store, f"{key_prefix}/features.npy")
    request = lipsync_pb2.PredictRequest(
        model=lipsync_pb2.ModelSpec(speaker=SPEAKER), features=features, output_frame_rate=NTSC
    )
    response = lipsync.Predict(request)
    assert response.model.version == 1 and response.output_frame_count == 120  # ceil(4.0 s x 29.97)
    shapes, info = store.get_array(response.mouth_shapes.object.key)
    assert shapes.shape == (120, 20, 2) and info.fps == pytest.approx(30000 / 1001)
    rows, _ = store.get_array(response.feature_coefficients.object.key)
    assert int(np.argmax(rows[:, 0])) == 150  # the model's 20-row delay removed exactly once
    coefficients, _ = store.get_array(response.coefficients.object.key)
    peak_time = np.argmax(coefficients[:, 0]) * 1001 / 30000
    assert abs(peak_time - 1.5125) <= 1001 / 30000  # within one output frame, no constant offset
    assert np.allclose(shapes[:10], mean.reshape(20, 2), atol=1e-5)  # silence before: the mean shape, no garbage
    np.testing.assert_allclose(shapes.reshape(120, 40), mean + coefficients @ components, atol=1e-5)

    again = lipsync.Predict(request)
    assert again.cached and again.mouth_shapes == response.mouth_shapes


def test_silence_closes_the_mouth_when_asked_and_the_model_keeps_it_by_default(store, key_prefix, lipsync):
    store_model_assets(store)
    features = pulse_features(store, f"{key_prefix}/f.npy")
    activity = np.zeros(120, np.uint8)
    activity[40:50] = 1
    activity_ref = array_ref(*store.put_array(f"{key_prefix}/activity.npy", activity, fps=30000 / 1001))

    def openings(options: lipsync_pb2.PredictOptions) -> np.ndarray:
        response = lipsync.Predict(
            lipsync_pb2.PredictRequest(
                model=lipsync_pb2.ModelSpec(speaker=SPEAKER, version=1),
                features=features,
                output_frame_rate=NTSC,
                speech_activity=activity_ref,
                options=options,
            )
        )
        shapes, _ = store.get_array(response.mouth_shapes.object.key)
        return np.linalg.norm(shapes[:, 14] - shapes[:, 18], axis=1)

    closing = openings(lipsync_pb2.PredictOptions(silence=lipsync_pb2.SilenceOptions(enabled=True)))
    assert closing[:30].max() < 1e-4 and closing[90:].max() < 1e-4  # closed in silence
    assert closing[45] > 1e-3
    # Speech marked elsewhere: the pulse at 1.5 s (frame 45) falls in "silence".
    activity[:] = 0
    activity[80:90] = 1
    activity_ref = array_ref(*store.put_array(f"{key_prefix}/activity2.npy", activity, fps=30000 / 1001))
    assert openings(lipsync_pb2.PredictOptions(silence=lipsync_pb2.SilenceOptions(enabled=True)))[45] < 1e-4
    assert openings(lipsync_pb2.PredictOptions())[45] == pytest.approx(closing[45], rel=0.01)  # the model's mouth


def test_the_amplitude_gain_is_capped_by_the_models_card_or_its_regime_unless_the_caller_asks(
    store, key_prefix, lipsync
):
    """A hesitant prediction (the card's real spread far above it) is lifted by the model's cap, not more."""

    def spread(peak_row: int, **options) -> float:
        response = lipsync.Predict(
            lipsync_pb2.PredictRequest(
                model=lipsync_pb2.ModelSpec(speaker=SPEAKER, version=1),
                features=pulse_features(store, f"{key_prefix}/f{peak_row}.npy", peak_row=peak_row),
                output_frame_rate=NTSC,
                options=lipsync_pb2.PredictOptions(**options),
            )
        )
        coefficients, _ = store.get_array(response.coefficients.object.key)
        return float(coefficients[:, 0].std())

    # (each case its own features, none another test uses: a model version's card never changes, so results
    # are keyed by the features, the options and the version, not by the card)
    pca = opening_pca()
    store_model_assets(store, pca=pca, opening_std=10.0, regime={"name": "large"})  # a card older than its cap
    assert spread(151) / spread(151, max_amplitude_gain=1.0) == pytest.approx(lstm.predict_gain_cap("large"))
    store_model_assets(store, pca=pca, opening_std=10.0, regime={"name": "large"}, max_amplitude_gain=1.2)
    assert spread(161) / spread(161, max_amplitude_gain=1.0) == pytest.approx(1.2)
    assert spread(171, max_amplitude_gain=1.4) / spread(171, max_amplitude_gain=1.0) == pytest.approx(1.4)
    store_model_assets(store, pca=pca, opening_std=10.0)  # no regime either: the small-data cap
    assert spread(181) / spread(181, max_amplitude_gain=1.0) == pytest.approx(lstm.DEFAULT_PREDICT_GAIN_CAP)
    store_model_assets(store)


def test_predict_by_references_without_hashes_follows_a_rewritten_speech_activity(store, key_prefix, lipsync):
    """An outside caller's references may carry no sha256: the derived key still counts every input's content."""
    store_model_assets(store)
    features = unhashed(pulse_features(store, f"{key_prefix}/f.npy"))
    activity = np.zeros(120, np.uint8)
    activity[40:50] = 1
    activity_ref = unhashed(array_ref(*store.put_array(f"{key_prefix}/activity.npy", activity, fps=30000 / 1001)))
    request = lipsync_pb2.PredictRequest(
        model=lipsync_pb2.ModelSpec(speaker=SPEAKER, version=1),
        features=features,
        output_frame_rate=NTSC,
        speech_activity=activity_ref,
        options=lipsync_pb2.PredictOptions(silence=lipsync_pb2.SilenceOptions(enabled=True)),
    )
    first = lipsync.Predict(request)
    assert lipsync.Predict(request).cached  # the same content: served from the cache

    activity[:] = 0
    activity[80:90] = 1  # the pulse at frame 45 now falls in silence
    store.put_array(f"{key_prefix}/activity.npy", activity, fps=30000 / 1001)
    second = lipsync.Predict(request)
    assert second.mouth_shapes.object.key != first.mouth_shapes.object.key  # (cached only if computed for it)
    before, _ = store.get_array(first.mouth_shapes.object.key)
    after, _ = store.get_array(second.mouth_shapes.object.key)
    assert np.linalg.norm(before[45, 14] - before[45, 18]) > 1e-3
    assert np.linalg.norm(after[45, 14] - after[45, 18]) < 1e-4


def test_describe_model_reports_the_stored_version_and_its_serving_state(store, lipsync):
    store_model_assets(store)
    response = lipsync.DescribeModel(lipsync_pb2.DescribeModelRequest(speaker=SPEAKER))
    assert response.latest_available_version == 1
    version = response.versions[0]
    assert version.state == lipsync_pb2.MODEL_STATE_AVAILABLE
    assert (version.delay_steps, version.pca_components, version.template_id) == (DELAY, K, "tpl-test")
    assert version.model_card.key.endswith("assets.extra/model_card.json")
    assert version.training.hidden_units == 60 and version.metrics.epochs == 3
    assert version.created.seconds > 0


def test_bad_requests(store, key_prefix, lipsync):
    store_model_assets(store)
    features = pulse_features(store, f"{key_prefix}/f.npy")

    def code(**request):
        with pytest.raises(grpc.RpcError) as err:
            lipsync.Predict(lipsync_pb2.PredictRequest(**request))
        return err.value.code()

    obama = lipsync_pb2.ModelSpec(speaker=SPEAKER)
    assert (
        code(model=lipsync_pb2.ModelSpec(speaker="nobody"), features=features, output_frame_rate=NTSC)
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        code(model=lipsync_pb2.ModelSpec(speaker="Bad!"), features=features, output_frame_rate=NTSC)
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code(model=obama, features=features) == grpc.StatusCode.INVALID_ARGUMENT  # no frame rate
    wrong = array_ref(*store.put_array(f"{key_prefix}/wrong.npy", np.zeros((50, 13), np.float32), fps=100.0))
    assert code(model=obama, features=wrong, output_frame_rate=NTSC) == grpc.StatusCode.INVALID_ARGUMENT
    missing = common_pb2.ArrayRef(object=common_pb2.ObjectRef(key=f"{key_prefix}/none.npy"))
    assert (
        code(model=lipsync_pb2.ModelSpec(speaker=SPEAKER, version=1), features=missing, output_frame_rate=NTSC)
        == grpc.StatusCode.NOT_FOUND
    )
    with pytest.raises(grpc.RpcError) as err:
        lipsync.DescribeModel(lipsync_pb2.DescribeModelRequest(speaker="nobody"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_tf_serving_down_is_unavailable(store, key_prefix, run_server):
    store_model_assets(store)
    serving = ServingClient(f"127.0.0.1:{free_port()}", timeout_seconds=5)
    port = run_server([binding_for(lipsync_pb2, lipsync_pb2_grpc, "LipsyncService", LipsyncServicer(store, serving))])
    stub = lipsync_pb2_grpc.LipsyncServiceStub(create_channel(f"127.0.0.1:{port}", [SERVICE], timeout_seconds=30))
    features = pulse_features(store, f"{key_prefix}/f.npy")
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(
            lipsync_pb2.PredictRequest(
                model=lipsync_pb2.ModelSpec(speaker=SPEAKER), features=features, output_frame_rate=NTSC
            )
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
