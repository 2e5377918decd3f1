"""What a replica can hold (issue 15): inputs that cannot fit the pod's memory or scratch disk are refused with
RESOURCE_EXHAUSTED before any work, through real stage servers on loopback and the real S3 server."""

import threading

import grpc
import pytest

from audio2video.audio.v1 import audio_pb2, audio_pb2_grpc
from audio2video.face.v1 import face_pb2, face_pb2_grpc
from services.audio.servicer import AudioServicer
from services.face.servicer import BASELINE_MEMORY_BYTES, FaceServicer
from services.runtime.analysis import load_frames
from services.runtime.budget import MIB, Budget, Busy
from services.runtime.clients import create_channel, is_busy
from services.runtime.config import InputLimits, Resources
from services.runtime.errors import TooLarge
from services.runtime.protos import object_ref
from services.runtime.server import binding_for
from tests.conftest import SHARED_DATA

LONG_CLIP = SHARED_DATA / "speakers" / "cnn_anchor" / "cnn_anchor_71s.mp4"  # 1779 frames (71 s at 25 fps), 3.7 MB


def test_a_budget_refuses_what_never_fits_and_what_does_not_fit_now():
    budget = Budget(100, what="memory", variable="A2V_MEMORY_BYTES")
    with pytest.raises(TooLarge, match=r"more than this replica has .*A2V_MEMORY_BYTES"), budget.reserve(101, "long"):
        pass
    held = threading.Event()
    with budget.reserve(60, "one call"):
        with pytest.raises(Busy) as busy, budget.reserve(60, "another call"):
            held.set()
        assert is_busy(grpc.StatusCode.RESOURCE_EXHAUSTED, str(busy.value)) and not held.is_set()
    with budget.reserve(100, "after it"):
        assert budget.used == 100
    assert budget.used == 0


@pytest.mark.integration
def test_face_memory_does_not_grow_with_the_video_and_what_cannot_fit_is_refused_before_decoding(
    store, key_prefix, run_server
):
    video = object_ref(store.put_file(f"{key_prefix}/long.mp4", LONG_CLIP, content_type="video/mp4"))

    def analyse(resources: Resources) -> list:
        servicer = FaceServicer(store, InputLimits(resources=resources))
        port = run_server([binding_for(face_pb2, face_pb2_grpc, "FaceService", servicer)])
        stub = face_pb2_grpc.FaceServiceStub(create_channel(f"127.0.0.1:{port}", timeout_seconds=300))
        return stub.Analyze(face_pb2.AnalyzeRequest(video=video, force_recompute=True))

    # A pod with no room beside the interpreter and models for a few decoded frames: refused before the first.
    events = []
    with pytest.raises(grpc.RpcError) as refused:
        events.extend(analyse(Resources(memory_bytes=BASELINE_MEMORY_BYTES + 1 * MIB)))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "A2V_MEMORY_BYTES" in refused.value.details() and "memory for decoding" in refused.value.details()
    assert events == []
    # A scratch folder that holds the video but not its crop archives: refused before decoding too.
    with pytest.raises(grpc.RpcError) as no_disk:
        list(analyse(Resources(scratch_bytes=8 * MIB)))
    assert no_disk.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "crops of" in no_disk.value.details()
    # A scratch folder smaller than the video: refused before the download.
    with pytest.raises(grpc.RpcError) as too_big:
        list(analyse(Resources(scratch_bytes=2 * MIB)))
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "A2V_SCRATCH_BYTES" in too_big.value.details()
    # The crops stream to disk as they are made: 96 MiB beside the baseline analyse all 1779 frames, whose crops
    # and masks take 192 MB in memory (the old in-memory analysis needed 440 MiB and refused a 768 MiB pod).
    result = list(analyse(Resources(memory_bytes=BASELINE_MEMORY_BYTES + 96 * MIB)))[-1].result
    crops = result.analysis.crops
    assert list(crops.meta.shape) == [1779, 180, 150, 3]
    assert list(result.analysis.crop_masks.meta.shape) == [1779, 180, 150]
    last = load_frames(store, crops, indices=[0, 1778])
    assert last.shape == (2, 180, 150, 3) and last.any()


@pytest.mark.integration
def test_audio_input_limit_follows_the_pods_memory(store, key_prefix, run_server):
    servicer = AudioServicer(
        store, InputLimits(resources=Resources(memory_bytes=256 * MIB + 8 * MIB))
    )  # 2 MiB per call
    assert servicer.max_input_bytes == 2 * MIB
    assert AudioServicer(store, InputLimits(resources=Resources(memory_bytes=1 << 30))).max_input_bytes == 192 * MIB
    port = run_server([binding_for(audio_pb2, audio_pb2_grpc, "AudioService", servicer)])
    stub = audio_pb2_grpc.AudioServiceStub(create_channel(f"127.0.0.1:{port}", timeout_seconds=60))
    audio = object_ref(store.put_file(f"{key_prefix}/long.mp4", LONG_CLIP, content_type="video/mp4"))
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Extract(audio_pb2.ExtractRequest(audio=audio)))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "A2V_MEMORY_BYTES" in refused.value.details()
