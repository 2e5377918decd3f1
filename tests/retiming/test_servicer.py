"""The retiming stage through a real gRPC server and the real S3 server."""

import io

import grpc
import numpy as np
import pytest

from audio2video.common.v1 import common_pb2
from audio2video.retiming.v1 import retiming_pb2, retiming_pb2_grpc
from services.retiming.servicer import RetimingServicer
from services.runtime.clients import create_channel
from services.runtime.protos import array_ref
from services.runtime.server import binding_for
from tests.support.analysis import store_analysis

pytestmark = pytest.mark.integration
SERVICE = "audio2video.retiming.v1.RetimingService"


@pytest.fixture()
def retiming(store, run_server):
    port = run_server([binding_for(retiming_pb2, retiming_pb2_grpc, "RetimingService", RetimingServicer(store))])
    channel = create_channel(f"127.0.0.1:{port}", [SERVICE], timeout_seconds=60)
    yield retiming_pb2_grpc.RetimingServiceStub(channel)
    channel.close()


@pytest.fixture()
def target(store, key_prefix):
    rng = np.random.default_rng(0)
    frames = 90
    return store_analysis(
        store,
        f"{key_prefix}/analysis",
        head_motion=np.abs(rng.normal(0.02, 0.01, frames)).astype(np.float32),
        eye_openness=np.full(frames, 0.035, np.float32),
        face_valid=np.ones(frames, np.uint8),
    )


def activity_ref(store, key, activity, fps=30.0):
    return array_ref(*store.put_array(key, np.asarray(activity, np.uint8), fps=fps))


def test_retime_audio_three_times_longer_than_the_target(store, key_prefix, retiming, target):
    activity = np.zeros(270, np.uint8)
    activity[60:200] = 1
    request = retiming_pb2.RetimeRequest(
        speech_activity=activity_ref(store, f"{key_prefix}/activity.npy", activity),
        target_analysis=target,
        output_frame_count=270,
        enabled=True,
    )
    response = retiming.Retime(request)
    mapping, info = store.get_array(response.retiming_map.object.key)
    assert mapping.shape == (270,) and mapping.dtype == np.int32 and info.fps == 30.0
    assert mapping.min() >= 0 and mapping.max() < 90
    assert (response.target_frame_count, response.output_frame_count, response.enabled) == (90, 270, True)
    assert response.wraps >= 2
    assert retiming.Retime(request).cached


def test_disabled_is_plain_playback_and_100hz_activity_is_resampled(store, key_prefix, retiming, target):
    activity = np.ones(300, np.uint8)  # 3 s at 100 Hz
    response = retiming.Retime(
        retiming_pb2.RetimeRequest(
            speech_activity=activity_ref(store, f"{key_prefix}/a100.npy", activity, fps=100.0),
            target_analysis=target,
            output_frame_count=60,
            enabled=False,
        )
    )
    mapping, _ = store.get_array(response.retiming_map.object.key)
    np.testing.assert_array_equal(mapping, np.arange(60))
    assert not response.enabled and response.total_cost == 0


def test_bad_requests(store, key_prefix, retiming, target):
    activity = activity_ref(store, f"{key_prefix}/a.npy", np.ones(30))

    def code(**request):
        with pytest.raises(grpc.RpcError) as err:
            retiming.Retime(retiming_pb2.RetimeRequest(**request))
        return err.value.code(), err.value.details()

    assert (
        code(speech_activity=activity, target_analysis=target, output_frame_count=0)[0]
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    missing = target.__class__(key=f"{key_prefix}/nothing/manifest.json")
    assert (
        code(speech_activity=activity, target_analysis=missing, output_frame_count=30)[0] == grpc.StatusCode.NOT_FOUND
    )
    bad = retiming_pb2.RetimeOptions(hold_penalty_weight=-1)
    status, details = code(speech_activity=activity, target_analysis=target, output_frame_count=30, options=bad)
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "hold_penalty_weight" in details


def test_references_without_a_hash_never_share_a_cached_answer(store, key_prefix, retiming, target):
    """A caller that names its speech activity by key only: the answer is reused by the object's content, so a
    different activity is retimed afresh (it was served the first one's cached map) and the same one is reused."""
    talking, silent = np.ones(270, np.uint8), np.zeros(270, np.uint8)
    answers = []
    for name, activity in (("talking", talking), ("silent", silent), ("talking-again", talking)):
        ref = activity_ref(store, f"{key_prefix}/{name}.npy", activity)
        ref.object.sha256 = ""  # by key only
        answers.append(
            retiming.Retime(
                retiming_pb2.RetimeRequest(
                    speech_activity=ref, target_analysis=target, output_frame_count=270, enabled=True
                )
            )
        )
    assert not answers[1].cached and answers[1].total_cost != answers[0].total_cost
    assert answers[2].cached and answers[2].retiming_map.object.key == answers[0].retiming_map.object.key


def test_an_activity_written_by_another_tool_is_retimed_and_its_rewrite_is_not_served_the_old_map(
    store, key_prefix, retiming, target
):
    """An object without the project's sha256 metadata (another system's upload) counts by its stored version."""
    key = f"{key_prefix}/foreign.npy"

    def upload(activity):
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(activity, np.uint8))
        store.client.put_object(store.bucket, key, io.BytesIO(buffer.getvalue()), len(buffer.getvalue()))

    upload(np.ones(270))
    request = retiming_pb2.RetimeRequest(
        speech_activity=common_pb2.ArrayRef(object=common_pb2.ObjectRef(key=key)),
        target_analysis=target,
        output_frame_count=270,
        enabled=True,
    )
    talking = retiming.Retime(request)
    assert retiming.Retime(request).cached
    upload(np.zeros(270))
    silent = retiming.Retime(request)
    assert not silent.cached and silent.total_cost != talking.total_cost
