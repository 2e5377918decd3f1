"""The texture stage through a real gRPC server and the real S3 server, on a real analysed target."""

import grpc
import numpy as np
import pytest

from audio2video.common.v1 import common_pb2
from audio2video.texture.v1 import texture_pb2, texture_pb2_grpc
from services.runtime.analysis import load_frames
from services.runtime.clients import create_channel
from services.runtime.config import Env, Resources
from services.runtime.protos import array_ref, object_ref, store_result
from services.runtime.server import binding_for
from services.texture.servicer import TextureServicer, TextureSettings
from tests.support.refs import unhashed

pytestmark = pytest.mark.integration
SERVICE = "audio2video.texture.v1.TextureService"


@pytest.fixture()
def texture(store, run_server):
    servicer = TextureServicer(store)
    port = run_server([binding_for(texture_pb2, texture_pb2_grpc, "TextureService", servicer)])
    channel = create_channel(f"127.0.0.1:{port}", [SERVICE], timeout_seconds=120)
    yield texture_pb2_grpc.TextureServiceStub(channel), servicer
    channel.close()


def test_chunks_from_the_targets_own_shapes_look_like_the_target(store, key_prefix, texture, katie_target):
    stub, servicer = texture
    _, analysis = katie_target
    shapes = store.get_array(analysis.analysis.mouth_shapes.object.key)[0][:40]
    shapes_ref = array_ref(*store.put_array(f"{key_prefix}/shapes.npy", shapes, fps=30.0))
    results = []
    for start, stop in [(0, 20), (20, 40)]:
        request = texture_pb2.SynthesizeRequest(
            job_id="j1",
            frames=common_pb2.FrameRange(start=start, stop=stop),
            mouth_shapes=shapes_ref,
            target_analysis=analysis.manifest,
            options=texture_pb2.SynthesizeOptions(write_candidates=True),
        )
        events = list(stub.Synthesize(request))
        results.append(events[-1].result)
    assert servicer.cache.misses == 1 and servicer.cache.hits >= 1  # the second chunk reused the prepared target
    first = results[0]
    assert first.frames_written == 20 and first.frames_skipped == 0
    textures = load_frames(store, first.textures)
    crops = load_frames(store, analysis.analysis.crops)[:20]
    assert textures.shape == crops.shape
    assert np.abs(textures.astype(int) - crops).mean() < 25  # a median of similar mouths, not noise
    mean_shapes = store.get_array(first.mean_shapes.object.key)[0]
    assert mean_shapes.shape == (20, 20, 2)
    candidates = store.get_array(first.candidates.object.key)[0]
    assert candidates.shape[0] == 20
    assert list(stub.Synthesize(request))[-1].result.cached


def test_pose_aware_chunk_reports_masks_and_pose_differences(store, key_prefix, texture, katie_target):
    """With a retiming map, candidates are ranked by pose too; the masks and pose differences travel on."""
    stub, _ = texture
    _, analysis = katie_target
    shapes = store.get_array(analysis.analysis.mouth_shapes.object.key)[0][:30]
    shapes_ref = array_ref(*store.put_array(f"{key_prefix}/shapes.npy", shapes, fps=30.0))
    retiming = array_ref(*store.put_array(f"{key_prefix}/map.npy", np.arange(30, dtype=np.int32), fps=30.0))
    request = texture_pb2.SynthesizeRequest(
        frames=common_pb2.FrameRange(start=10, stop=30),
        mouth_shapes=shapes_ref,
        target_analysis=analysis.manifest,
        retiming_map=retiming,
    )
    result = list(stub.Synthesize(request))[-1].result
    masks = load_frames(store, result.texture_masks)
    h, w = analysis.analysis.geometry.crop_height_px, analysis.analysis.geometry.crop_width_px
    assert masks.shape == (20, h, w) and masks[:, : h // 2].all() and not masks[:, -1, 0].any()
    differences = store.get_array(result.pose_differences.object.key)[0]
    assert differences.shape == (20,) and np.isfinite(differences).all() and differences.max() < 12.0


def test_bad_requests(store, key_prefix, texture, katie_target):
    stub, _ = texture
    _, analysis = katie_target
    shapes_ref = array_ref(*store.put_array(f"{key_prefix}/s.npy", np.zeros((10, 20, 2), np.float32)))

    def code(**request):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Synthesize(texture_pb2.SynthesizeRequest(**request)))
        return err.value.code()

    assert code(frames=common_pb2.FrameRange(start=4, stop=4)) == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        code(frames=common_pb2.FrameRange(start=0, stop=20), mouth_shapes=shapes_ref, target_analysis=analysis.manifest)
        == grpc.StatusCode.INVALID_ARGUMENT
    )  # shapes cover only 10
    assert (
        code(
            frames=common_pb2.FrameRange(start=0, stop=5),
            mouth_shapes=shapes_ref,
            target_analysis=common_pb2.ObjectRef(key=f"{key_prefix}/none.json"),
        )
        == grpc.StatusCode.NOT_FOUND
    )
    bad = texture_pb2.SynthesizeOptions(mass_share=1.5)
    assert (
        code(
            frames=common_pb2.FrameRange(start=0, stop=5),
            mouth_shapes=shapes_ref,
            target_analysis=analysis.manifest,
            options=bad,
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )


def test_a_target_over_the_in_memory_limit_is_spilled_with_the_same_textures(
    store, key_prefix, run_server, katie_target
):
    """Issue 15: a long target's crops go to the scratch folder, not memory; the textures do not change."""
    _, analysis = katie_target
    shapes = store.get_array(analysis.analysis.mouth_shapes.object.key)[0][:30]
    shapes_ref = array_ref(*store.put_array(f"{key_prefix}/shapes.npy", shapes, fps=30.0))
    results = {}
    servicers = {
        "memory": TextureServicer(store),
        "spilled": TextureServicer(store, settings=TextureSettings(in_memory_bytes=0, resident_rows=24)),
        "no room": TextureServicer(
            store, settings=TextureSettings(in_memory_bytes=0, resources=Resources(scratch_bytes=4 << 20))
        ),
    }
    for name, servicer in servicers.items():
        port = run_server([binding_for(texture_pb2, texture_pb2_grpc, "TextureService", servicer)])
        channel = create_channel(f"127.0.0.1:{port}", [SERVICE], timeout_seconds=120)
        stub = texture_pb2_grpc.TextureServiceStub(channel)
        request = texture_pb2.SynthesizeRequest(
            frames=common_pb2.FrameRange(start=5, stop=25),
            mouth_shapes=shapes_ref,
            target_analysis=analysis.manifest,
            output_prefix=f"{key_prefix}/{name.replace(' ', '-')}",
        )
        try:
            results[name] = list(stub.Synthesize(request))[-1].result
        except grpc.RpcError as err:
            results[name] = err
        finally:
            channel.close()
    memory, spilled_textures = (load_frames(store, results[name].textures) for name in ("memory", "spilled"))
    assert np.array_equal(memory, spilled_textures)
    spilled = servicers["spilled"]
    assert spilled.cache.misses == 0 and len(spilled.spilled) == 1  # not in the memory cache
    (bank,) = spilled.spilled.values()
    assert bank.spilled and bank.nbytes < 100 * 1000  # shapes and flags only
    assert spilled.scratch.used == bank.spill.disk_bytes  # held for as long as the bank lives
    bank.spill.close()
    assert spilled.scratch.used == 0
    refused = results["no room"]
    assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "A2V_SCRATCH_BYTES" in refused.details() and servicers["no room"].scratch.used == 0


def test_texture_settings_bound_the_cache_by_the_replicas_memory():
    settings = TextureSettings.read(Env({"A2V_MEMORY_BYTES": str(1 << 30), "A2V_TEXTURE_IN_MEMORY_BYTES": "1000"}))
    assert settings.memory_cache_bytes == 512 << 20 and settings.in_memory_bytes == 1000
    assert TextureSettings().memory_cache_bytes == 1 << 30 and TextureSettings(cache_bytes=5).memory_cache_bytes == 5
    assert TextureServicer(None, settings=settings).cache.max_bytes == 512 << 20


def test_synthesize_by_references_without_hashes_follows_rewritten_inputs(store, key_prefix, texture, katie_target):
    """A cached chunk is found by its inputs' content: rewriting the shapes or the target under its key redoes it."""
    stub, servicer = texture
    _, analysis = katie_target
    shapes = store.get_array(analysis.analysis.mouth_shapes.object.key)[0]
    shapes_ref = unhashed(array_ref(*store.put_array(f"{key_prefix}/shapes.npy", shapes[:20], fps=30.0)))
    manifest_key = f"{key_prefix}/manifest.json"
    target = unhashed(object_ref(store_result(store, manifest_key, analysis.analysis)))
    request = texture_pb2.SynthesizeRequest(
        frames=common_pb2.FrameRange(start=0, stop=20), mouth_shapes=shapes_ref, target_analysis=target
    )
    first = list(stub.Synthesize(request))[-1].result
    assert list(stub.Synthesize(request))[-1].result.cached  # the same content: reused

    store.put_array(f"{key_prefix}/shapes.npy", shapes[40:60], fps=30.0)  # other mouths under the same key
    second = list(stub.Synthesize(request))[-1].result
    assert not second.cached and second.textures.object.key != first.textures.object.key
    assert not np.array_equal(load_frames(store, second.textures), load_frames(store, first.textures))

    # The same analysis with fewer frames valid, rewritten under the manifest's key: a new chunk, a new bank.
    fewer = type(analysis.analysis)()
    fewer.CopyFrom(analysis.analysis)
    valid = store.get_array(analysis.analysis.face_valid.object.key)[0].copy()
    valid[40:60] = 0
    fewer.face_valid.CopyFrom(array_ref(*store.put_array(f"{key_prefix}/valid.npy", valid)))
    store_result(store, manifest_key, fewer)
    misses = servicer.cache.misses
    third = list(stub.Synthesize(request))[-1].result
    assert not third.cached and third.textures.object.key != second.textures.object.key
    assert servicer.cache.misses == misses + 1
