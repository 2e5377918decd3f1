"""The composite stage through a real gRPC server and the real S3 server, on a real analysed target."""

import io
import wave

import av
import grpc
import numpy as np
import pytest

from audio2video.common.v1 import common_pb2
from audio2video.composite.v1 import composite_pb2, composite_pb2_grpc
from services.composite.servicer import CompositeServicer
from services.runtime.clients import create_channel
from services.runtime.protos import array_ref, object_ref
from services.runtime.server import binding_for
from tests.support.refs import unhashed

pytestmark = pytest.mark.integration
SERVICE = "audio2video.composite.v1.CompositeService"


@pytest.fixture()
def composite(store, run_server):
    port = run_server([binding_for(composite_pb2, composite_pb2_grpc, "CompositeService", CompositeServicer(store))])
    channel = create_channel(f"127.0.0.1:{port}", [SERVICE], timeout_seconds=300)
    yield composite_pb2_grpc.CompositeServiceStub(channel)
    channel.close()


def speech_wav(seconds: float) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        t = np.arange(int(seconds * 16000)) / 16000
        out.writeframes((3000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16).tobytes())
    return buffer.getvalue()


def test_render_two_chunks_and_finalize_a_playable_video(store, key_prefix, composite, katie_target):
    video, analysis = katie_target
    manifest = analysis.analysis
    fps = manifest.info.frame_rate.numerator / manifest.info.frame_rate.denominator
    frames = 50
    retiming = array_ref(*store.put_array(f"{key_prefix}/map.npy", np.arange(frames, dtype=np.int32), fps=fps))
    shapes = store.get_array(manifest.mouth_shapes.object.key)[0][:frames]
    shapes_ref = array_ref(*store.put_array(f"{key_prefix}/shapes.npy", shapes, fps=fps))
    # The target's own crops as textures: re-compositing them must give the target back.
    crops = composite_pb2.TextureChunk(frames=common_pb2.FrameRange(start=0, stop=100), textures=manifest.crops)
    segments = []
    for start, stop in [(0, 25), (25, frames)]:
        request = composite_pb2.RenderRequest(
            frames=common_pb2.FrameRange(start=start, stop=stop),
            target_video=video,
            target_analysis=analysis.manifest,
            textures=[crops],
            retiming_map=retiming,
            mouth_shapes=shapes_ref,
        )
        events = list(composite.Render(request))
        result = events[-1].result
        assert result.frames_written == stop - start and result.frames_composited == stop - start
        assert (result.width, result.height) == (512, 512)
        assert result.frame_rate == manifest.info.frame_rate
        assert list(composite.Render(request))[-1].result.cached
        segments.append(composite_pb2.Segment(frames=result.frames, segment=result.segment))

    audio = object_ref(store.put_bytes(f"{key_prefix}/audio.wav", speech_wav(frames / fps), content_type="audio/wav"))
    final = list(
        composite.Finalize(
            composite_pb2.FinalizeRequest(segments=segments, audio=audio, output_key=f"{key_prefix}/out.mp4")
        )
    )[-1].result
    assert final.frame_count == frames and abs(final.duration_seconds - frames / fps) <= 1 / fps
    with av.open(io.BytesIO(store.get_bytes(final.video.key))) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and container.streams.audio[0].codec_context.name == "aac"
        assert (stream.width, stream.height) == (512, 512) and stream.average_rate == fps
        decoded = [frame.to_ndarray(format="bgr24") for frame in container.decode(stream)]
    assert len(decoded) == frames
    source = store.get_bytes(video.key)
    with av.open(io.BytesIO(source)) as original:
        first = next(original.decode(video=0)).to_ndarray(format="bgr24")
    psnr = 10 * np.log10(255**2 / np.mean((decoded[0].astype(float) - first) ** 2))
    assert psnr > 30  # its own texture composited back: nearly the original frame


def test_bad_requests(store, key_prefix, composite, katie_target):
    video, analysis = katie_target

    def code(method, request):
        with pytest.raises(grpc.RpcError) as err:
            list(method(request))
        return err.value.code(), err.value.details()

    status, _ = code(composite.Render, composite_pb2.RenderRequest(frames=common_pb2.FrameRange(start=3, stop=3)))
    assert status == grpc.StatusCode.INVALID_ARGUMENT
    status, details = code(
        composite.Render,
        composite_pb2.RenderRequest(
            frames=common_pb2.FrameRange(start=0, stop=5),
            target_video=video,
            target_analysis=analysis.manifest,
            options=composite_pb2.RenderOptions(interpolate_holds=True),
        ),
    )
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "interpolate_holds" in details
    missing = common_pb2.ArrayRef(object=common_pb2.ObjectRef(key=f"{key_prefix}/none.npy"))
    status, _ = code(
        composite.Render,
        composite_pb2.RenderRequest(
            frames=common_pb2.FrameRange(start=0, stop=5),
            target_video=video,
            target_analysis=analysis.manifest,
            retiming_map=missing,
            mouth_shapes=missing,
        ),
    )
    assert status == grpc.StatusCode.NOT_FOUND
    status, _ = code(composite.Finalize, composite_pb2.FinalizeRequest())
    assert status == grpc.StatusCode.INVALID_ARGUMENT
    gap = [composite_pb2.Segment(frames=common_pb2.FrameRange(start=5, stop=10), segment=video)]
    status, details = code(composite.Finalize, composite_pb2.FinalizeRequest(segments=gap, audio=video))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "contiguous" in details


def test_render_and_finalize_by_references_without_hashes_follow_rewritten_inputs(
    store, key_prefix, composite, katie_target
):
    """A cached segment or video is found by its inputs' content: rewriting one under its key renders anew."""
    video, analysis = katie_target
    manifest = analysis.analysis
    fps = manifest.info.frame_rate.numerator / manifest.info.frame_rate.denominator
    frames = 8
    map_key = f"{key_prefix}/map.npy"
    retiming = unhashed(array_ref(*store.put_array(map_key, np.arange(frames, dtype=np.int32), fps=fps)))
    shapes = store.get_array(manifest.mouth_shapes.object.key)[0][:frames]
    crops = composite_pb2.TextureChunk(
        frames=common_pb2.FrameRange(start=0, stop=100), textures=unhashed(manifest.crops)
    )
    request = composite_pb2.RenderRequest(
        frames=common_pb2.FrameRange(start=0, stop=frames),
        target_video=unhashed(video),
        target_analysis=unhashed(analysis.manifest),
        textures=[crops],
        retiming_map=retiming,
        mouth_shapes=unhashed(array_ref(*store.put_array(f"{key_prefix}/shapes.npy", shapes, fps=fps))),
    )
    first = list(composite.Render(request))[-1].result
    assert list(composite.Render(request))[-1].result.cached  # the same content: reused
    store.put_array(map_key, np.arange(frames, dtype=np.int32)[::-1].copy(), fps=fps)  # played backwards now
    second = list(composite.Render(request))[-1].result
    assert not second.cached and second.segment.key != first.segment.key

    audio_key = f"{key_prefix}/audio.wav"
    store.put_bytes(audio_key, speech_wav(frames / fps), content_type="audio/wav")
    finalize = composite_pb2.FinalizeRequest(
        segments=[composite_pb2.Segment(frames=second.frames, segment=unhashed(second.segment))],
        audio=common_pb2.ObjectRef(key=audio_key),
    )
    before = list(composite.Finalize(finalize))[-1].result
    store.put_bytes(audio_key, speech_wav(frames / fps + 0.5), content_type="audio/wav")  # other audio, same key
    after = list(composite.Finalize(finalize))[-1].result
    assert after.video.key != before.video.key
