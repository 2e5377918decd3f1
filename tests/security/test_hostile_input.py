"""Hostile input, tried at scale (issue 16, item 6): every RPC of every service, through its real gRPC server on
loopback and the real S3 server, gets random and adversarial requests (hypothesis; `hostile.py` says what they
hold). Each must end in a clean status code (never INTERNAL, UNKNOWN or a hang), and no object stored before the
call may change or disappear, in the service's bucket or in a neighbouring one.

The services share one bucket of this module's own, holding the fixture blobs the requests point at: garbage bytes,
an empty object, a short WAV and a short video without a face, arrays of wrong shapes and dtypes (NaN, empty,
0-d, complex, bool), an npz and a zip that are not what the stages expect, a speaker's model assets, and a few
orchestrator jobs. Servers start once per module. Runs are deterministic (`derandomize`).
"""

from __future__ import annotations

import io
import json
import os
import uuid
import wave
import zipfile

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audio2video.audio.v1 import audio_pb2, audio_pb2_grpc
from audio2video.common.v1 import common_pb2
from audio2video.composite.v1 import composite_pb2, composite_pb2_grpc
from audio2video.face.v1 import face_pb2, face_pb2_grpc
from audio2video.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc
from audio2video.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from audio2video.retiming.v1 import retiming_pb2, retiming_pb2_grpc
from audio2video.teeth.v1 import teeth_pb2, teeth_pb2_grpc
from audio2video.texture.v1 import texture_pb2, texture_pb2_grpc
from orchestrator.jobs import JobManager
from orchestrator.presign import Presigner, PresignSettings
from orchestrator.servicer import OrchestratorServicer
from orchestrator.speakers import Speakers
from services.audio.servicer import AudioServicer
from services.composite.servicer import CompositeServicer
from services.face.servicer import FaceServicer
from services.retiming.servicer import RetimingServicer
from services.runtime.blobstore import BlobStore
from services.runtime.config import InputLimits, ServerConfig
from services.runtime.errors import InvalidInput
from services.runtime.server import binding_for, create_server
from services.teeth.servicer import TeethServicer
from services.texture.servicer import TextureServicer
from tests.conftest import wait_until
from tests.security.hostile import (
    CLEAN_CODES,
    Hostile,
    call,
    chance,
    changed,
    message_class,
    register_messages,
    snapshot,
)

pytestmark = pytest.mark.integration
CALL_TIMEOUT = 60.0
EXAMPLES = int(os.environ.get("A2V_HOSTILE_EXAMPLES", "30"))
"""Examples per RPC (hypothesis max_examples); A2V_HOSTILE_EXAMPLES raises it for a longer hunt."""
SPEAKER = "hostile"

register_messages(
    audio_pb2,
    composite_pb2,
    face_pb2,
    lipsync_pb2,
    orchestrator_pb2,
    retiming_pb2,
    teeth_pb2,
    texture_pb2,
)


class FailingPipeline:
    """The orchestrator's pipeline: every job fails at once (this test is about the API, not about rendering)."""

    def render(self, spec, *, reporter, stop):
        raise InvalidInput("scripted pipeline: no render here")

    def train(self, spec, *, reporter, stop):
        raise InvalidInput("scripted pipeline: no training here")


def wav_bytes(seconds: float = 0.5, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def store_fixtures(store: BlobStore) -> dict[str, str]:
    """The blobs hostile requests point at; their keys and sha256."""
    from tests.face.helpers import encode_clip

    rng = np.random.default_rng(16)
    refs = []
    arrays = {
        "features.npy": (rng.standard_normal((60, 28)).astype(np.float32), 100.0),
        "features_3d.npy": (rng.standard_normal((5, 28, 2)).astype(np.float32), 100.0),
        "shapes.npy": (rng.random((12, 20, 2)).astype(np.float32), 30.0),
        "landmarks.npy": (rng.random((12, 68, 2)) * 64, 30.0),
        "activity.npy": (rng.integers(0, 2, 12).astype(np.uint8), 30.0),
        "int8.npy": (np.arange(7, dtype=np.int8), 0.0),
        "scalar.npy": (np.array(3.0), 0.0),
        "empty.npy": (np.zeros((0, 28), np.float32), 100.0),
        "nan.npy": (np.full((12, 20, 2), np.nan, np.float32), 30.0),
        "inf.npy": (np.full((12, 68, 2), np.inf), 1e300),
        "bool.npy": (np.ones(12, bool), 30.0),
        "complex.npy": (np.ones((12, 2), np.complex64), 30.0),
        "zero_dim.npy": (np.zeros((3, 0, 5), np.float32), 30.0),
        "wide.npy": (np.zeros((1, 4096), np.uint16), 30.0),
        "track.npy": (rng.random(12).astype(np.float32), 30.0),
        "pose.npy": (rng.random((12, 6)).astype(np.float32), 30.0),
        "template.npy": (rng.random((68, 2)).astype(np.float32), 0.0),
        "retiming.npy": (np.arange(12, dtype=np.int64), 30.0),
        "timestamps.npy": (np.arange(12) / 30.0, 30.0),
    }
    for name, (values, fps) in arrays.items():
        refs.append(store.put_array(f"fixtures/{name}", values, fps=fps)[0])
    blobs = {
        "garbage.bin": rng.bytes(4000),
        "empty.bin": b"",
        "speech.wav": wav_bytes(),
        "noise.mp4": encode_clip([rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(8)]),
        "not.npz": rng.bytes(300),
        "arrays.npz": None,
        "frames.zip": zip_bytes({"000000.png": b"not a png", "../escape.png": b"x", "/abs.png": b"y"}),
        "result.json": b'{"not": "a result"',
        "job.json": json.dumps({"id": "../../x", "state": 99}).encode(),
    }
    for name, data in blobs.items():
        if data is None:
            refs.append(
                store.put_arrays(
                    f"fixtures/{name}", {"mean": np.zeros(3), "x": np.ones((2, 2)), "../evil": np.zeros(1)}
                )
            )
        else:
            refs.append(store.put_bytes(f"fixtures/{name}", data))
    refs += store_manifests(store, {ref.key: ref for ref in refs})
    real = store_real_work(store)
    refs += real.pop("blobs")
    # A speaker's model assets (no SavedModel is served: Predict ends at TF Serving's NOT_FOUND at most).
    from tests.lipsync.test_servicer import store_model_assets

    store_model_assets(store, SPEAKER, version=1)
    for key in store.list_keys(f"models/{SPEAKER}/"):
        refs.append(store.stat(key))
    return {ref.key: ref.sha256 for ref in refs}, real


def serve_model(folder) -> None:
    """A SavedModel with the serving contract (tests/lipsync/test_servicer.py), so that Predict runs to the end."""
    import tensorflow as tf

    from tests.lipsync.test_servicer import DelayedLinear

    module = DelayedLinear()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})


def store_real_work(store: BlobStore) -> list:
    """A real analysis of 12 frames of a real clip and the real textures of one chunk made from it, so that
    plausible requests get as far as the work itself (their hostile parts then meet the deeper checks)."""
    from services.texture.servicer import TextureServicer
    from tests.conftest import analyse_clip
    from tests.face.helpers import OBAMA

    _, analysed = analyse_clip(store, "fixtures/obama12.mp4", OBAMA, 12)
    manifest = analysed.analysis
    copy = store.put_bytes("fixtures/analysis_real.json", store.get_bytes(analysed.manifest.key))
    retiming = store.stat("fixtures/retiming.npy")
    request = texture_pb2.SynthesizeRequest(
        frames=common_pb2.FrameRange(start=0, stop=12),
        mouth_shapes=manifest.mouth_shapes,
        target_analysis=common_pb2.ObjectRef(key=copy.key),
        retiming_map=common_pb2.ArrayRef(object=common_pb2.ObjectRef(key=retiming.key)),
    )
    events = list(TextureServicer(store).Synthesize(request, None))
    assert events[-1].HasField("result"), events[-1]
    folders = {analysed.manifest.key.rsplit("/", 1)[0], events[-1].result.textures.object.key.rsplit("/", 1)[0]}
    blobs = [store.stat(key) for folder in folders for key in store.list_keys(folder + "/")] + [copy]
    return {"blobs": blobs, "analysis": copy.key, "mouth_shapes": manifest.mouth_shapes, "synthesize": request}


def working_requests(real: dict) -> dict:
    """A request that works for each RPC where one is cheap: hypothesis makes one or two of its fields hostile."""
    analysis = ref(real["analysis"])
    requests = [
        audio_pb2.ExtractRequest(
            audio=ref("fixtures/speech.wav"), output_frame_rate=common_pb2.FrameRate(numerator=30, denominator=1)
        ),
        face_pb2.ProbeRequest(video=ref("fixtures/obama12.mp4")),
        face_pb2.AnalyzeRequest(video=ref("fixtures/noise.mp4")),
        lipsync_pb2.PredictRequest(
            features=array("fixtures/features.npy"),
            model=lipsync_pb2.ModelSpec(speaker=SPEAKER, version=1),
            output_frame_rate=common_pb2.FrameRate(numerator=30, denominator=1),
            speech_activity=array("fixtures/activity.npy"),
        ),
        lipsync_pb2.DescribeModelRequest(speaker=SPEAKER),
        retiming_pb2.RetimeRequest(
            target_analysis=analysis, speech_activity=array("fixtures/activity.npy"), output_frame_count=12
        ),
        teeth_pb2.SelectProxiesRequest(target_analysis=analysis),
        real["synthesize"],
        orchestrator_pb2.SubmitJobRequest(
            spec=orchestrator_pb2.RenderJobSpec(
                audio=ref("fixtures/speech.wav"), target_video=ref("fixtures/obama12.mp4"), model={"speaker": SPEAKER}
            )
        ),
        orchestrator_pb2.ListSpeakersRequest(),
    ]
    return {request.DESCRIPTOR.full_name: request for request in requests}


def store_manifests(store: BlobStore, blobs: dict) -> list:
    """Face analysis manifests that lie (a huge frame count, arrays of the wrong shape or dtype, NaN, frames that
    are no PNG archive), one too deeply nested to parse, and job records that are not job records."""
    from google.protobuf import json_format

    from services.runtime.blobstore import ArrayInfo
    from services.runtime.protos import array_ref, object_ref

    def ref(name: str):
        blob = blobs[f"fixtures/{name}"]
        return array_ref(blob, ArrayInfo((12,), "float32", 30.0))

    def manifest(frames: int, arrays: dict[str, str]) -> bytes:
        analysis = face_pb2.VideoAnalysis(format_version=2, video=object_ref(blobs["fixtures/noise.mp4"]))
        analysis.info.frame_count = frames
        analysis.info.frame_rate.numerator, analysis.info.frame_rate.denominator = 30, 1
        analysis.info.width = analysis.info.height = 64
        analysis.valid_frame_count = frames
        analysis.geometry.template.CopyFrom(ref(arrays.pop("template", "template.npy")))
        analysis.geometry.crop_width_px = analysis.geometry.crop_height_px = 32
        region = analysis.geometry.crop_region
        region.left, region.top, region.right, region.bottom = -1.0, -1.0, 1.0, 1.0
        for field, name in arrays.items():
            getattr(analysis, field).CopyFrom(ref(name))
        return json_format.MessageToJson(analysis).encode()

    plausible = {
        "timestamps_seconds": "timestamps.npy",
        "landmarks": "landmarks.npy",
        "face_valid": "activity.npy",
        "detection_scores": "track.npy",
        "mouth_shapes": "shapes.npy",
        "jaw_lines": "shapes.npy",
        "head_pose": "pose.npy",
        "head_motion": "track.npy",
        "eye_openness": "track.npy",
        "crops": "frames.zip",
        "crop_masks": "frames.zip",
        "landmark_jitter": "track.npy",
    }
    wrong = {
        field: name
        for field, name in zip(
            plausible,
            [
                "scalar.npy",
                "features_3d.npy",
                "complex.npy",
                "empty.npy",
                "nan.npy",
                "zero_dim.npy",
                "wide.npy",
                "bool.npy",
                "int8.npy",
                "garbage.bin",
                "inf.npy",
                "features.npy",
            ],
            strict=True,
        )
    }
    nan = {field: ("inf.npy" if "landmarks" in field else "nan.npy") for field in plausible}
    documents = {
        "fixtures/analysis.json": manifest(12, dict(plausible)),
        "fixtures/analysis_huge.json": manifest(2**62, dict(plausible)),
        "fixtures/analysis_wrong.json": manifest(12, wrong),
        "fixtures/analysis_nan.json": manifest(12, nan | {"template": "nan.npy"}),
        "fixtures/deep.json": b"[" * 100_000,
        "jobs/corrupt0/job.json": bytes(range(256)),
        "jobs/corrupt1/job.json": json.dumps({"id": "../../x", "state": 99, "kind": -1}).encode(),
    }
    return [store.put_bytes(key, data, content_type="application/json") for key, data in documents.items()]


@pytest.fixture(scope="module")
def world(s3_server, tmp_path_factory):
    """The module's bucket with its fixtures, a neighbouring bucket, and every service's server on loopback."""
    from services.lipsync.servicer import LipsyncServicer
    from services.lipsync.serving import ServingClient
    from services.lipsync.trainer_service import TrainerServicer
    from services.tfserving.models import ModelManager
    from services.tfserving.servicer import bindings as tfserving_bindings

    bucket = f"hostile-{uuid.uuid4().hex[:8]}"
    neighbour = f"neighbour-{uuid.uuid4().hex[:8]}"
    store = BlobStore.from_config(s3_server.config(bucket=bucket))
    store.ensure_bucket()
    other = BlobStore.from_config(s3_server.config(bucket=neighbour))
    other.ensure_bucket()
    other.put_bytes("fixtures/garbage.bin", b"the neighbour's")
    shas, real = store_fixtures(store)

    servers, closers = [], []

    def serve(bindings) -> grpc.Channel:
        server, port = create_server(ServerConfig(service="hostile"), bindings)
        server.start()
        server.load_and_mark_serving()
        servers.append(server)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        closers.append(channel.close)
        return channel

    served = tmp_path_factory.mktemp("served")
    serve_model(served / SPEAKER / "1")  # the model of the speaker whose assets store_fixtures stored
    manager = ModelManager(served, poll_seconds=0.5)
    assert manager.wait_ready(timeout=60)
    closers.append(manager.close)
    serving_channel = serve(tfserving_bindings(manager, load_wait_seconds=1))
    serving = ServingClient(serving_channel._channel.target().decode(), timeout_seconds=10)
    closers.append(serving.close)
    jobs = JobManager(store, FailingPipeline())
    presigner = Presigner(store, s3_server.config(bucket=bucket), PresignSettings())
    limits = InputLimits(max_seconds=60)
    lipsync = serve(
        [
            binding_for(lipsync_pb2, lipsync_pb2_grpc, "LipsyncService", LipsyncServicer(store, serving)),
            binding_for(
                lipsync_pb2,
                lipsync_pb2_grpc,
                "TrainerService",
                TrainerServicer(store, models_dir=tmp_path_factory.mktemp("models")),
            ),
        ]
    )
    speakers = Speakers(store, lipsync_pb2_grpc.LipsyncServiceStub(lipsync))
    channels = {
        "audio": serve([binding_for(audio_pb2, audio_pb2_grpc, "AudioService", AudioServicer(store, limits))]),
        "face": serve([binding_for(face_pb2, face_pb2_grpc, "FaceService", FaceServicer(store, limits))]),
        "lipsync": lipsync,
        "retiming": serve([binding_for(retiming_pb2, retiming_pb2_grpc, "RetimingService", RetimingServicer(store))]),
        "teeth": serve([binding_for(teeth_pb2, teeth_pb2_grpc, "TeethService", TeethServicer(store))]),
        "texture": serve([binding_for(texture_pb2, texture_pb2_grpc, "TextureService", TextureServicer(store))]),
        "composite": serve(
            [binding_for(composite_pb2, composite_pb2_grpc, "CompositeService", CompositeServicer(store))]
        ),
        "orchestrator": serve(
            [
                binding_for(
                    orchestrator_pb2,
                    orchestrator_pb2_grpc,
                    "OrchestratorService",
                    OrchestratorServicer(jobs, presigner, speakers=speakers),
                )
            ]
        ),
    }
    # Jobs the orchestrator's requests may name: they fail at once (FailingPipeline).
    audio = common_pb2.ObjectRef(key="fixtures/speech.wav")
    video = common_pb2.ObjectRef(key="fixtures/noise.mp4")
    job_ids = []
    for token in ("one", "two"):
        spec = orchestrator_pb2.RenderJobSpec(audio=audio, target_video=video, model={"speaker": SPEAKER})
        job_ids.append(jobs.submit(render=spec, client_token=token).id)
    hostile = Hostile(bucket, shas, shas, extra_text=job_ids)
    try:
        yield World(store, [bucket, neighbour], channels, hostile, jobs, working_requests(real))
    finally:
        for server in servers:
            server.stop(0).wait()
        for close in closers:
            close()
        for run in jobs.runs.values():
            run.stop.set()


class World:
    def __init__(
        self, store: BlobStore, buckets: list[str], channels: dict[str, grpc.Channel], hostile: Hostile, jobs, bases
    ) -> None:
        self.store, self.buckets, self.channels, self.hostile, self.jobs = store, buckets, channels, hostile, jobs
        self.bases = bases

    def settle(self) -> None:
        """Wait for the jobs earlier requests started (or ran again) to end: their manifests are written then."""
        assert wait_until(lambda: all(run.ended() for run in list(self.jobs.runs.values())), timeout=30)


SERVICES = {
    "audio": (audio_pb2, "AudioService"),
    "face": (face_pb2, "FaceService"),
    "lipsync": (lipsync_pb2, "LipsyncService"),
    "trainer": (lipsync_pb2, "TrainerService"),
    "retiming": (retiming_pb2, "RetimingService"),
    "teeth": (teeth_pb2, "TeethService"),
    "texture": (texture_pb2, "TextureService"),
    "composite": (composite_pb2, "CompositeService"),
    "orchestrator": (orchestrator_pb2, "OrchestratorService"),
}
RPCS = [
    (stage, module.DESCRIPTOR.services_by_name[service], method)
    for stage, (module, service) in SERVICES.items()
    for method in module.DESCRIPTOR.services_by_name[service].methods
]
MAY_CHANGE = {"RetryJob", "CancelJob"}
"""Methods whose very purpose is to change a job the request names (a real one: the others must not change)."""


def readable(error: grpc.RpcError) -> bool:
    """Whether the caller got the service's status, not the transport's (a status message over the caller's metadata
    limit comes as RESOURCE_EXHAUSTED "Stream removed")."""
    return not (error.details() or "").startswith("Stream removed")


def may_change(method_name: str, request, key: str) -> bool:
    job_id = getattr(request, "job_id", "")
    return method_name in MAY_CHANGE and bool(job_id) and key.startswith(f"jobs/{job_id}/")


@pytest.mark.parametrize(("stage", "service", "method"), RPCS, ids=[f"{s}.{m.name}" for s, _, m in RPCS])
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_a_hostile_request_gets_a_clean_status_and_changes_nothing_stored(world, stage, service, method, data):
    base = world.bases.get(method.input_type.full_name)
    if base is not None and data.draw(chance(1, 2), label="from a working request"):
        request = data.draw(world.hostile.mutated(base), label="request")
    else:
        request = data.draw(world.hostile.request(message_class(method.input_type)), label="request")
    channel = world.channels["lipsync" if stage == "trainer" else stage]
    world.settle()
    before = snapshot(world.store.client, world.buckets)
    error = call(channel, service.full_name, method, request, CALL_TIMEOUT)
    after = snapshot(world.store.client, world.buckets)
    if error is not None:
        assert error.code() in CLEAN_CODES, f"{method.name}: {error.code().name} {error.details()}"
        assert readable(error), f"{method.name}: the status did not reach the caller: {error.details()}"
    lost = [key for key in changed(before, after) if not may_change(method.name, request, key.split("/", 1)[1])]
    assert lost == [], f"{method.name} changed or removed stored objects: {lost}"


@pytest.mark.parametrize("stage", sorted(set(SERVICES) - {"trainer"}))
def test_a_request_over_the_message_limit_is_refused_before_the_service_sees_it(world, stage):
    module, service = SERVICES[stage]
    method = module.DESCRIPTOR.services_by_name[service].methods[0]
    request = message_class(method.input_type)()
    request.request_id = "x" * (5 << 20) if "request_id" in method.input_type.fields_by_name else ""
    if not request.request_id:
        string_field = next(f for f in method.input_type.fields if f.type == f.TYPE_STRING)
        setattr(request, string_field.name, "x" * (5 << 20))
    error = call(world.channels[stage], module.DESCRIPTOR.services_by_name[service].full_name, method, request, 30)
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def ref(key: str) -> common_pb2.ObjectRef:
    return common_pb2.ObjectRef(key=key)


def array(key: str) -> common_pb2.ArrayRef:
    return common_pb2.ArrayRef(object=ref(key))


FOUND = {
    # Each request below once ended in INTERNAL; hypothesis found them (docs/SECURITY.md, item 6).
    "a manifest that is not UTF-8 (an .npy named as the analysis)": (
        "retiming",
        retiming_pb2.RetimeRequest(target_analysis=ref("fixtures/activity.npy"), output_frame_count=1),
        grpc.StatusCode.DATA_LOSS,
    ),
    "the same through the teeth stage": (
        "teeth",
        teeth_pb2.SelectProxiesRequest(target_analysis=ref("fixtures/activity.npy")),
        grpc.StatusCode.DATA_LOSS,
    ),
    "an .npz archive named as an .npy array": (
        "retiming",
        retiming_pb2.RetimeRequest(
            target_analysis=ref("fixtures/analysis.json"),
            speech_activity=array("fixtures/arrays.npz"),
            output_frame_count=1,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "an .npy array named as an .npz archive": (
        "trainer",
        lipsync_pb2.TrainRequest(speaker=SPEAKER, dataset=ref("fixtures/features.npy"), pca=ref("fixtures/not.npz")),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "a status message echoing a huge speaker name (over the caller's metadata limit)": (
        "lipsync",
        lipsync_pb2.DescribeModelRequest(speaker="é" * 200_000),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "a huge output frame count (2^62 failed; billions asked for gigabytes per array)": (
        "lipsync",
        lipsync_pb2.PredictRequest(
            features=array("fixtures/features.npy"),
            model=lipsync_pb2.ModelSpec(speaker=SPEAKER, version=1),
            output_frame_rate=common_pb2.FrameRate(numerator=30, denominator=1),
            output_frame_count=2**62,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "a request id that is not ASCII (sent on as metadata of the call to TF Serving)": (
        "lipsync",
        lipsync_pb2.DescribeModelRequest(speaker=SPEAKER, request_id="é"),
        None,
    ),
    "a start time so late that frame times 1/30 s apart are equal": (
        "lipsync",
        lipsync_pb2.PredictRequest(
            features=array("fixtures/features.npy"),
            model=lipsync_pb2.ModelSpec(speaker=SPEAKER, version=1),
            output_frame_rate=common_pb2.FrameRate(numerator=30, denominator=1),
            start_seconds=2.0**49,
            speech_activity=array("fixtures/activity.npy"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "a smoothing sigma of 10^9 frames (a filter kernel of gigabytes: the hunt's process was killed for memory)": (
        "lipsync",
        lipsync_pb2.PredictRequest(
            features=array("fixtures/features.npy"),
            model=lipsync_pb2.ModelSpec(speaker=SPEAKER, version=1),
            output_frame_rate=common_pb2.FrameRate(numerator=30, denominator=1),
            options=lipsync_pb2.PredictOptions(smoothing_sigma_frames=1e9),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "an empty object named as an array": (
        "retiming",
        retiming_pb2.RetimeRequest(
            target_analysis=ref("fixtures/analysis.json"),
            speech_activity=array("fixtures/empty.bin"),
            output_frame_count=1,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "an unknown loop mode": (
        "retiming",
        retiming_pb2.RetimeRequest(
            target_analysis=ref("fixtures/analysis.json"),
            speech_activity=array("fixtures/activity.npy"),
            output_frame_count=1,
            options=retiming_pb2.RetimeOptions(loop_mode=-1),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_what_hypothesis_found_stays_fixed(world, name):
    stage, request, code = FOUND[name]
    module, service = SERVICES[stage]
    descriptor = module.DESCRIPTOR.services_by_name[service]
    method = next(m for m in descriptor.methods if m.input_type.full_name == request.DESCRIPTOR.full_name)
    world.settle()
    before = snapshot(world.store.client, world.buckets)
    error = call(world.channels["lipsync" if stage == "trainer" else stage], descriptor.full_name, method, request, 60)
    if code is None:
        assert error is None, f"{error.code().name} {error.details()}"
    else:
        assert error is not None and error.code() == code and readable(error), error
    assert changed(before, snapshot(world.store.client, world.buckets)) == []


def test_the_working_requests_that_hypothesis_spoils_do_work(world):
    for name, request in sorted(world.bases.items()):
        stage, service, method = next(
            (stage, service, method) for stage, service, method in RPCS if method.input_type.full_name == name
        )
        error = call(world.channels[stage], service.full_name, method, request, CALL_TIMEOUT)
        if name == "audio2video.face.v1.AnalyzeRequest":  # a video of noise: no face, at once
            assert error is not None and error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
        else:
            assert error is None, f"{name}: {error.code().name} {error.details()}"
