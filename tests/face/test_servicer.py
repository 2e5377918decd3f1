"""The face stage through a real gRPC server and the real S3 server."""

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from audio2video.common.v1 import common_pb2
from audio2video.face.v1 import face_pb2, face_pb2_grpc
from services.audio import core as audio_core
from services.face.servicer import AnalyzeSettings, DetectorPool, FaceServicer
from services.runtime.clients import create_channel
from services.runtime.config import InputLimits
from services.runtime.frames import decode_frames
from services.runtime.media import iter_frames
from services.runtime.protos import array_ref, object_ref
from services.runtime.server import binding_for
from tests.face.helpers import OBAMA, encode_clip

pytestmark = pytest.mark.integration
SERVICE = "audio2video.face.v1.FaceService"


@pytest.fixture(scope="module")
def obama_frames():
    """The first 2 s (60 frames) of a real clip: short enough for a fast analysis."""
    return [frame for index, _, frame in iter_frames(OBAMA, stop=60)]


@pytest.fixture(scope="module")
def detectors():
    pool = DetectorPool()
    pool.warm()
    return pool


@pytest.fixture()
def face_stub(store, run_server, detectors):
    servicer = FaceServicer(store, InputLimits(max_seconds=60), detectors=detectors)
    port = run_server([binding_for(face_pb2, face_pb2_grpc, "FaceService", servicer)])
    channel = create_channel(f"127.0.0.1:{port}", [SERVICE], timeout_seconds=120)
    yield face_pb2_grpc.FaceServiceStub(channel)
    channel.close()


def analyze(stub, video, **request):
    events = list(stub.Analyze(face_pb2.AnalyzeRequest(video=video, **request)))
    assert events[-1].HasField("result") and all(e.HasField("progress") for e in events[:-1])
    return events[-1].result, [e.progress for e in events[:-1]]


def upload(store, key, data, content_type="video/mp4"):
    return object_ref(store.put_bytes(key, data, content_type=content_type))


def test_probe_reads_exact_rate_and_size(store, key_prefix, face_stub):
    video = upload(store, f"{key_prefix}/obama.mp4", OBAMA.read_bytes())
    info = face_stub.Probe(face_pb2.ProbeRequest(video=video)).info
    assert (info.width, info.height, info.codec) == (256, 256, "h264")
    assert (info.frame_rate.numerator, info.frame_rate.denominator) == (30, 1)
    assert info.has_audio and info.duration_seconds == pytest.approx(20.1, abs=0.1)


def test_analyze_stores_every_array_and_a_manifest_then_serves_it_from_cache(
    store, key_prefix, face_stub, obama_frames
):
    video = upload(store, f"{key_prefix}/clip.mp4", encode_clip(obama_frames))
    result, progress = analyze(face_stub, video, request_id="t")
    assert not result.cached and progress and progress[-1].unit == "frames"
    analysis = result.analysis
    frames = analysis.info.frame_count
    assert frames == 60 and analysis.valid_frame_count == 60
    assert (analysis.info.frame_rate.numerator, analysis.info.frame_rate.denominator) == (30, 1)

    landmarks, info = store.get_array(analysis.landmarks.object.key)
    assert landmarks.shape == (60, 68, 2) and info.fps == 30.0
    mouths, _ = store.get_array(analysis.mouth_shapes.object.key)
    assert mouths.shape == (60, 20, 2) and np.isfinite(mouths).all()
    for field in (
        "timestamps_seconds",
        "face_valid",
        "detection_scores",
        "jaw_lines",
        "head_pose",
        "landmark_jitter",
        "head_motion",
        "eye_openness",
    ):
        ref = getattr(analysis, field)
        array, _ = store.get_array(ref.object.key, expected_sha256=ref.object.sha256)
        assert array.shape[0] == 60 and list(array.shape) == list(ref.meta.shape), field
    crops = decode_frames(store.get_bytes(analysis.crops.object.key))
    h, w = analysis.geometry.crop_height_px, analysis.geometry.crop_width_px
    assert crops.shape == (60, h, w, 3) and list(analysis.crops.meta.shape) == [60, h, w, 3]
    assert crops.mean() > 20  # real pixels, not an empty crop

    manifest = face_pb2.VideoAnalysis()
    json_format.Parse(store.get_bytes(result.manifest.key), manifest)
    assert manifest == analysis

    again, progress_again = analyze(face_stub, video)
    assert again.cached and not progress_again and again.analysis == analysis
    other = face_pb2.AnalyzeOptions(crop=face_pb2.CropOptions(width_px=96, height_px=112))
    resized, _ = analyze(face_stub, video, options=other)
    assert not resized.cached and resized.analysis.geometry.crop_width_px == 96


def test_video_without_face_is_failed_precondition_and_stores_no_manifest(store, key_prefix, face_stub):
    grey = [np.full((128, 128, 3), 127, np.uint8)] * 10
    video = upload(store, f"{key_prefix}/grey.mp4", encode_clip(grey))
    with pytest.raises(grpc.RpcError) as err:
        analyze(face_stub, video, output_prefix=f"{key_prefix}/grey-analysis")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not store.exists(f"{key_prefix}/grey-analysis/manifest.json")


@pytest.mark.parametrize(
    ("data", "code"),
    [(None, grpc.StatusCode.NOT_FOUND), (b"not a video at all", grpc.StatusCode.INVALID_ARGUMENT)],
)
def test_bad_videos(store, key_prefix, face_stub, data, code):
    key = f"{key_prefix}/bad.mp4"
    video = upload(store, key, data) if data is not None else common_pb2.ObjectRef(key=key)
    with pytest.raises(grpc.RpcError) as err:
        analyze(face_stub, video)
    assert err.value.code() == code
    with pytest.raises(grpc.RpcError) as err:
        face_stub.Probe(face_pb2.ProbeRequest(video=video))
    assert err.value.code() == code


def test_bad_options_are_invalid_argument(store, key_prefix, face_stub):
    video = upload(store, f"{key_prefix}/x.mp4", b"x")
    with pytest.raises(grpc.RpcError) as err:
        analyze(face_stub, video, options=face_pb2.AnalyzeOptions(detection_max_side_px=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "detection_max_side_px" in err.value.details()
    assert AnalyzeSettings.from_proto(face_pb2.AnalyzeOptions()) == AnalyzeSettings()


def test_speaker_dataset_from_two_analysed_clips(store, key_prefix, face_stub, obama_frames):
    audio = audio_core.decode_audio(OBAMA)
    clips = []
    for index, (start, stop) in enumerate([(0, 30), (30, 60)]):
        video = upload(store, f"{key_prefix}/part{index}.mp4", encode_clip(obama_frames[start:stop]))
        result, _ = analyze(face_stub, video)
        samples = audio.samples[start * 16000 // 30 : stop * 16000 // 30]
        features = audio_core.extract_features(samples)
        blob, info = store.put_array(
            f"{key_prefix}/features{index}.npy",
            features.values,
            fps=features.rate,
            start_seconds=features.start_seconds,
        )
        clips.append(
            face_pb2.SpeakerClip(
                clip_id=f"part{index}", analysis_manifest=result.manifest, features=array_ref(blob, info)
            )
        )
    request = face_pb2.BuildSpeakerDatasetRequest(
        speaker="obama", clips=clips, validation=face_pb2.ValidationSelection(validation_clip_ids=["part1"])
    )
    events = list(face_stub.BuildSpeakerDataset(request))
    result = events[-1].result
    assert list(result.train_clip_ids) == ["part0"] and list(result.validation_clip_ids) == ["part1"]
    assert result.retained_variance >= 0.99 and 1 <= result.n_components <= 40
    assert 80 <= result.train_frames <= 100 and 80 <= result.validation_frames <= 100
    assert result.template_id
    dataset = store.get_arrays(result.dataset.key)
    assert dataset["features"].shape == (result.train_frames + result.validation_frames, 28)
    assert dataset["coefficients"].shape[1] == result.n_components
    pca = store.get_arrays(result.pca.key)
    assert pca["components"].shape == (result.n_components, 40)
    assert str(pca["template_id"]) == result.template_id
    assert list(face_stub.BuildSpeakerDataset(request))[-1].result == result  # stored result reused

    with pytest.raises(grpc.RpcError) as err:
        list(face_stub.BuildSpeakerDataset(face_pb2.BuildSpeakerDatasetRequest(speaker="Bad Name!", clips=clips)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    missing = face_pb2.SpeakerClip(
        analysis_manifest=common_pb2.ObjectRef(key=f"{key_prefix}/none.json"), features=clips[0].features
    )
    with pytest.raises(grpc.RpcError) as err:
        list(face_stub.BuildSpeakerDataset(face_pb2.BuildSpeakerDatasetRequest(speaker="obama", clips=[missing])))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
