"""The audio stage through a real gRPC server and the real S3 server."""

import io
import wave

import grpc
import numpy as np
import pytest

from audio2video.audio.v1 import audio_pb2, audio_pb2_grpc
from audio2video.common.v1 import common_pb2
from services.audio.servicer import AudioServicer
from services.runtime.clients import create_channel
from services.runtime.config import InputLimits
from services.runtime.protos import object_ref
from services.runtime.server import binding_for
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.integration
SERVICE = "audio2video.audio.v1.AudioService"
NTSC = common_pb2.FrameRate(numerator=30000, denominator=1001)


@pytest.fixture()
def audio_stub(store, run_server):
    port = run_server(
        [binding_for(audio_pb2, audio_pb2_grpc, "AudioService", AudioServicer(store, InputLimits(max_seconds=60)))]
    )
    channel = create_channel(f"127.0.0.1:{port}", [SERVICE], timeout_seconds=60)
    yield audio_pb2_grpc.AudioServiceStub(channel)
    channel.close()


def extract(stub, **request):
    events = list(stub.Extract(audio_pb2.ExtractRequest(**request)))
    assert events[-1].HasField("result") and all(e.HasField("progress") for e in events[:-1])
    return events[-1].result, events[:-1]


def upload(store, prefix, name, data, content_type="audio/wav"):
    return object_ref(store.put_bytes(f"{prefix}/{name}", data, content_type=content_type))


def test_extract_real_speech_stores_features_activity_and_wav(store, key_prefix, audio_stub):
    audio = upload(store, key_prefix, "arctic.wav", (SHARED_DATA / "audio" / "arctic_sentence_4s.wav").read_bytes())
    result, progress = extract(audio_stub, audio=audio, output_frame_rate=NTSC, request_id="t1")

    assert result.duration_seconds == pytest.approx(4.0, abs=0.01)
    assert (result.feature_frame_rate.numerator, result.feature_frame_rate.denominator) == (100, 1)
    features, info = store.get_array(result.features.object.key)
    assert features.dtype == np.float32 and features.shape[1] == 28
    assert abs(features.shape[0] - 400) <= 1 and info.fps == 100.0
    assert np.isfinite(features).all()

    # Output frames at the target's exact rate: ceil(4.0 s * 30000/1001) = 120 frames.
    assert result.output_frame_count == 120
    activity, activity_info = store.get_array(result.speech_activity.object.key)
    assert activity.shape == (120,) and activity.dtype == np.uint8
    assert activity_info.fps == pytest.approx(30000 / 1001)
    assert 0.3 < activity.mean() < 1.0  # a read sentence: mostly speech, with silence at the ends
    per_feature, _ = store.get_array(result.feature_speech_activity.object.key)
    assert per_feature.shape == (features.shape[0],)
    assert result.speech_fraction == pytest.approx(per_feature.mean())

    with wave.open(io.BytesIO(store.get_bytes(result.normalized_audio.key))) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        assert wav.getnframes() == pytest.approx(64000, abs=16)
    assert result.source_codec == "pcm_s16le" and result.source_sample_rate_hz == 16000
    assert not result.cached
    assert progress and progress[-1].progress.unit == "seconds"


def test_a_second_identical_request_reuses_the_stored_result(store, key_prefix, audio_stub):
    audio = upload(store, key_prefix, "arctic.wav", (SHARED_DATA / "audio" / "arctic_sentence_4s.wav").read_bytes())
    first, _ = extract(audio_stub, audio=audio, output_frame_rate=NTSC)
    second, progress = extract(audio_stub, audio=audio, output_frame_rate=NTSC)
    assert second.cached and not progress
    assert second.features == first.features
    other_rate, _ = extract(
        audio_stub, audio=audio, output_frame_rate=common_pb2.FrameRate(numerator=25, denominator=1)
    )
    assert not other_rate.cached and other_rate.output_frame_count == 100


def test_the_audio_track_of_a_video_container(store, key_prefix, audio_stub):
    video = SHARED_DATA / "speakers" / "feifeili" / "feifeili_clip3.mp4"
    ref = upload(store, key_prefix, "clip.mp4", video.read_bytes(), "video/mp4")
    result, _ = extract(audio_stub, audio=ref, output_frame_rate=common_pb2.FrameRate(numerator=30, denominator=1))
    assert result.source_codec == "aac"
    assert result.duration_seconds == pytest.approx(7.1, abs=0.2)


def test_explicit_output_prefix(store, key_prefix, audio_stub):
    audio = upload(store, key_prefix, "a.wav", (SHARED_DATA / "audio" / "arctic_sentence_4s.wav").read_bytes())
    result, _ = extract(audio_stub, audio=audio, output_prefix=f"{key_prefix}/jobs/j1/audio")
    assert result.features.object.key == f"{key_prefix}/jobs/j1/audio/features.npy"
    assert not result.HasField("speech_activity") and result.output_frame_count == 0
    assert store.exists(f"{key_prefix}/jobs/j1/audio/result.json")


def test_pure_silence_is_valid_input(store, key_prefix, audio_stub):
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(np.zeros(32000, np.int16).tobytes())
    ref = upload(store, key_prefix, "silence.wav", buffer.getvalue())
    result, _ = extract(audio_stub, audio=ref, output_frame_rate=NTSC)
    activity, _ = store.get_array(result.speech_activity.object.key)
    assert activity.sum() == 0 and result.speech_fraction == 0.0
    assert np.isfinite(store.get_array(result.features.object.key)[0]).all()


def rpc_error(stub, **request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        extract(stub, **request)
    return err.value


def test_bad_inputs_give_clear_status_codes_and_store_no_result(store, key_prefix, audio_stub):
    missing = rpc_error(audio_stub, audio=common_pb2.ObjectRef(key=f"{key_prefix}/none.wav"))
    assert missing.code() == grpc.StatusCode.NOT_FOUND and "none.wav" in missing.details()

    no_key = rpc_error(audio_stub, audio=common_pb2.ObjectRef())
    assert no_key.code() == grpc.StatusCode.INVALID_ARGUMENT and "no key" in no_key.details()

    garbage = upload(store, key_prefix, "garbage.wav", np.random.default_rng(1).bytes(5000))
    bad = rpc_error(audio_stub, audio=garbage, output_prefix=f"{key_prefix}/garbage-out")
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "decode" in bad.details()
    assert list(store.list_keys(f"{key_prefix}/garbage-out")) == []

    empty = upload(store, key_prefix, "empty.wav", b"")
    assert rpc_error(audio_stub, audio=empty).code() == grpc.StatusCode.INVALID_ARGUMENT

    speech = upload(store, key_prefix, "long.wav", (SHARED_DATA / "audio" / "arctic_sentence_4s.wav").read_bytes())
    too_long = rpc_error(audio_stub, audio=speech, max_duration_seconds=2.0)
    assert too_long.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in too_long.details()

    bad_rate = rpc_error(audio_stub, audio=speech, output_frame_rate=common_pb2.FrameRate(numerator=30, denominator=0))
    assert bad_rate.code() == grpc.StatusCode.INVALID_ARGUMENT

    bad_prefix = rpc_error(audio_stub, audio=speech, output_prefix="../escape")
    assert bad_prefix.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_reference_whose_content_changed_is_data_loss(store, key_prefix, audio_stub):
    speech = (SHARED_DATA / "audio" / "arctic_sentence_4s.wav").read_bytes()
    ref = upload(store, key_prefix, "changing.wav", speech)
    store.put_bytes(ref.key, speech[:-100])  # replaced after the caller took its reference
    assert rpc_error(audio_stub, audio=ref).code() == grpc.StatusCode.DATA_LOSS
