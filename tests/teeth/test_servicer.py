"""The teeth stage through a real gRPC server and the real S3 server, on a real analysed target."""

import cv2
import grpc
import numpy as np
import pytest

from audio2video.common.v1 import common_pb2
from audio2video.teeth.v1 import teeth_pb2, teeth_pb2_grpc
from services.runtime.analysis import load_frames
from services.runtime.blobstore import ArrayInfo
from services.runtime.clients import create_channel
from services.runtime.frames import FRAMES_CONTENT_TYPE, encode_frames
from services.runtime.protos import array_ref, object_ref, store_result
from services.runtime.server import binding_for
from services.teeth.servicer import TeethServicer
from tests.support.refs import unhashed

pytestmark = pytest.mark.integration
SERVICE = "audio2video.teeth.v1.TeethService"


@pytest.fixture()
def teeth(store, run_server):
    port = run_server([binding_for(teeth_pb2, teeth_pb2_grpc, "TeethService", TeethServicer(store))])
    channel = create_channel(f"127.0.0.1:{port}", [SERVICE], timeout_seconds=120)
    yield teeth_pb2_grpc.TeethServiceStub(channel)
    channel.close()


def test_proxies_are_chosen_automatically_and_detail_is_transferred(store, key_prefix, teeth, katie_target):
    _, analysis = katie_target
    proxies = teeth.SelectProxies(teeth_pb2.SelectProxiesRequest(target_analysis=analysis.manifest)).proxies
    assert proxies.has_visible_teeth and not proxies.overridden
    assert 0 <= proxies.upper_frame < 100 and 0 <= proxies.lower_frame < 100
    assert proxies.upper_score > proxies.median_upper_score

    # A chunk of blurred textures (what a weighted median of many candidates looks like).
    crops = load_frames(store, analysis.analysis.crops)[10:20]
    blurred = np.stack([cv2.GaussianBlur(c, (0, 0), 2) for c in crops])
    shapes = store.get_array(analysis.analysis.mouth_shapes.object.key)[0][10:20]
    textures = array_ref(
        store.put_bytes(f"{key_prefix}/tex.zip", encode_frames(blurred), content_type=FRAMES_CONTENT_TYPE),
        ArrayInfo(blurred.shape, "uint8"),
    )
    shapes_ref = array_ref(*store.put_array(f"{key_prefix}/shapes.npy", shapes))
    request = teeth_pb2.EnhanceRequest(
        textures=textures, frames=common_pb2.FrameRange(start=10, stop=20), proxies=proxies, mouth_shapes=shapes_ref
    )
    events = list(teeth.Enhance(request))
    result = events[-1].result
    assert not result.passthrough and result.frames_enhanced == 10
    enhanced = load_frames(store, result.textures)
    assert enhanced.shape == blurred.shape and not np.array_equal(enhanced, blurred)
    assert list(teeth.Enhance(request))[-1].result.cached


def test_override_and_bad_requests(store, key_prefix, teeth, katie_target):
    _, analysis = katie_target
    chosen = teeth.SelectProxies(
        teeth_pb2.SelectProxiesRequest(target_analysis=analysis.manifest, upper_frame_override=5)
    ).proxies
    assert chosen.upper_frame == 5 and chosen.overridden
    with pytest.raises(grpc.RpcError) as err:
        teeth.SelectProxies(teeth_pb2.SelectProxiesRequest(target_analysis=analysis.manifest, upper_frame_override=500))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        teeth.SelectProxies(
            teeth_pb2.SelectProxiesRequest(target_analysis=common_pb2.ObjectRef(key=f"{key_prefix}/none.json"))
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        list(teeth.Enhance(teeth_pb2.EnhanceRequest(frames=common_pb2.FrameRange(start=5, stop=5))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_target_without_teeth_passes_textures_through(store, key_prefix, teeth):
    textures = array_ref(
        store.put_bytes(
            f"{key_prefix}/t.zip", encode_frames(np.zeros((3, 180, 150, 3), np.uint8)), content_type=FRAMES_CONTENT_TYPE
        ),
        ArrayInfo((3, 180, 150, 3), "uint8"),
    )
    shapes = array_ref(*store.put_array(f"{key_prefix}/s.npy", np.full((3, 20, 2), 0.5, np.float32)))
    proxies = teeth_pb2.TeethProxies(has_visible_teeth=False, upper_frame=-1, lower_frame=-1)
    result = list(
        teeth.Enhance(
            teeth_pb2.EnhanceRequest(
                textures=textures, frames=common_pb2.FrameRange(start=0, stop=3), proxies=proxies, mouth_shapes=shapes
            )
        )
    )[-1]
    assert result.result.passthrough and result.result.textures == textures
    assert "teeth" in result.result.passthrough_reason


def test_enhance_by_references_without_hashes_follows_a_rewritten_input(store, key_prefix, teeth, katie_target):
    """A cached result is found by its inputs' content: rewriting the textures under their key computes anew."""
    _, analysis = katie_target
    proxies = teeth.SelectProxies(teeth_pb2.SelectProxiesRequest(target_analysis=analysis.manifest)).proxies
    crops = load_frames(store, analysis.analysis.crops)[10:20]

    def put_textures(sigma: float):
        blurred = np.stack([cv2.GaussianBlur(c, (0, 0), sigma) for c in crops])
        blob = store.put_bytes(f"{key_prefix}/tex.zip", encode_frames(blurred), content_type=FRAMES_CONTENT_TYPE)
        return array_ref(blob, ArrayInfo(blurred.shape, "uint8"))

    shapes = store.get_array(analysis.analysis.mouth_shapes.object.key)[0][10:20]
    request = teeth_pb2.EnhanceRequest(
        textures=unhashed(put_textures(2)),
        frames=common_pb2.FrameRange(start=10, stop=20),
        proxies=proxies,
        mouth_shapes=unhashed(array_ref(*store.put_array(f"{key_prefix}/shapes.npy", shapes))),
    )
    first = list(teeth.Enhance(request))[-1].result
    assert list(teeth.Enhance(request))[-1].result.cached  # the same content: reused
    put_textures(5)
    second = list(teeth.Enhance(request))[-1].result
    assert not second.cached and second.textures.object.key != first.textures.object.key
    assert not np.array_equal(load_frames(store, second.textures), load_frames(store, first.textures))


def test_select_proxies_reads_crops_rewritten_under_their_key(store, key_prefix, teeth, katie_target):
    """The per-replica cache of crops is keyed by content, not by key, for a manifest whose refs carry no hash."""
    _, analysis = katie_target
    copy = type(analysis.analysis)()
    copy.CopyFrom(analysis.analysis)
    crops_key = f"{key_prefix}/crops.frames.zip"
    store.put_bytes(crops_key, store.get_bytes(analysis.analysis.crops.object.key), content_type=FRAMES_CONTENT_TYPE)
    copy.crops.object.key, copy.crops.object.sha256 = crops_key, ""
    manifest = unhashed(object_ref(store_result(store, f"{key_prefix}/manifest.json", copy)))
    first = teeth.SelectProxies(teeth_pb2.SelectProxiesRequest(target_analysis=manifest)).proxies
    assert first.has_visible_teeth
    gray = np.full_like(load_frames(store, analysis.analysis.crops), 128)
    store.put_bytes(crops_key, encode_frames(gray), content_type=FRAMES_CONTENT_TYPE)
    second = teeth.SelectProxies(teeth_pb2.SelectProxiesRequest(target_analysis=manifest)).proxies
    assert (second.upper_score, second.lower_score) != (first.upper_score, first.lower_score)
