"""gRPC servicer of the `composite` stage: render chunks into H.264 segments, then join them with the audio."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from audio2video.composite.v1 import composite_pb2, composite_pb2_grpc
from audio2video.face.v1 import face_pb2
from services.composite import core, encode
from services.runtime.analysis import analysis_sha256, load_array, load_frames, load_geometry, load_manifest
from services.runtime.blobstore import BlobStore
from services.runtime.canonical import CanonicalGeometry
from services.runtime.config import Config
from services.runtime.errors import InvalidInput
from services.runtime.keys import derive_prefix, validate_key
from services.runtime.progress import stream_events
from services.runtime.protos import (
    array_ref,
    blob_ref,
    frame_rate,
    frame_rate_message,
    input_sha256,
    load_result,
    object_ref,
    store_result,
)
from services.runtime.server import ServiceBinding, store_backed_bindings
from services.runtime.status import grpc_errors

log = logging.getLogger(__name__)
RESULT_FORMAT_VERSION = 3  # bump when the rendering changes: stored segments of older code are not reused
MAX_CHUNK_FRAMES = 5000
COLOR_MATCH = {
    composite_pb2.COLOR_MATCH_UNSPECIFIED: "mean_std",
    composite_pb2.COLOR_MATCH_NONE: "none",
    composite_pb2.COLOR_MATCH_MEAN_STD: "mean_std",
    composite_pb2.COLOR_MATCH_HISTOGRAM: "histogram",
}


def render_options(options: composite_pb2.RenderOptions) -> core.RenderOptions:
    """The proto's options with its defaults applied (validated by the core)."""
    if options.interpolate_holds:
        raise InvalidInput("interpolate_holds is not supported yet: held target frames are shown as they are")
    defaults = core.RenderOptions()
    return core.RenderOptions(
        jaw_correction=options.jaw_correction if options.HasField("jaw_correction") else True,
        pyramid_levels=options.pyramid_levels or 4,
        feather_px=options.feather_px,
        color_match=COLOR_MATCH.get(options.color_match, "mean_std"),
        crf=options.crf if options.HasField("crf") else encode.DEFAULT_CRF,
        x264_preset=options.x264_preset or encode.DEFAULT_PRESET,
        min_confidence=options.min_confidence if options.HasField("min_confidence") else defaults.min_confidence,
        fade_frames=options.fade_frames if options.HasField("fade_frames") else defaults.fade_frames,
        max_yaw_degrees=options.max_yaw_degrees or defaults.max_yaw_degrees,
        max_pitch_degrees=options.max_pitch_degrees or defaults.max_pitch_degrees,
        max_pose_difference_degrees=options.max_pose_difference_degrees or defaults.max_pose_difference_degrees,
        max_landmark_jitter=options.max_landmark_jitter or defaults.max_landmark_jitter,
        max_foreign_colour=options.max_foreign_colour or defaults.max_foreign_colour,
        max_foreign_edges=options.max_foreign_edges or defaults.max_foreign_edges,
    )


MAX_LISTED_FRAMES = 10


def lowest_confidence(summary: core.RenderSummary, start: int) -> list[composite_pb2.FrameConfidence]:
    """The chunk's frames of lowest confidence below 1 (frames without a face or texture left out), lowest first."""
    if summary.confidence is None:
        return []
    rows = [
        i
        for i, reason in enumerate(summary.reasons)
        if reason and reason not in core.NO_BLEND_REASONS and summary.confidence[i] < 1.0
    ]
    rows.sort(key=lambda i: (float(summary.confidence[i]), i))
    return [
        composite_pb2.FrameConfidence(
            frame=start + i,
            confidence=float(summary.confidence[i]),
            blend=float(summary.blend[i]),
            reason=summary.reasons[i],
            value=float(summary.values[i]) if summary.values is not None else float("nan"),
        )
        for i in rows[:MAX_LISTED_FRAMES]
    ]


@dataclass(frozen=True)
class TargetAnalysis:
    """The target's per-frame arrays that compositing reads (from the face stage's manifest)."""

    landmarks: np.ndarray
    face_valid: np.ndarray
    timestamps: np.ndarray
    geometry: CanonicalGeometry
    head_pose: np.ndarray | None
    landmark_jitter: np.ndarray | None


def render_prefix(
    store: BlobStore,
    request: composite_pb2.RenderRequest,
    manifest: face_pb2.VideoAnalysis,
    options: core.RenderOptions,
    fps: Fraction,
) -> str:
    """The derived key prefix of a Render call: the content of every input, the frames, the rate and the options.

    Each input counts by its content (`input_sha256`: a reference without a hash costs a stat), also the target's
    analysis (`analysis_sha256`), so a call after any input was rewritten under its key never reuses a segment.
    """

    def sha(ref, what: str, *, optional: bool = False) -> str:
        return input_sha256(store, ref.object, what=what, optional=optional)

    inputs = [
        input_sha256(store, request.target_video, what="target video"),
        analysis_sha256(store, request.target_analysis, manifest),
        sha(request.retiming_map, "retiming map"),
        sha(request.mouth_shapes, "mouth shapes"),
    ]
    for chunk in request.textures:
        inputs += [sha(chunk.textures, "textures"), sha(chunk.texture_masks, "texture masks", optional=True)]
        inputs += [sha(chunk.mean_jaw_lines, "mean jaw lines", optional=True)]
        inputs += [sha(chunk.pose_differences, "pose differences", optional=True)]
    return derive_prefix(
        "composite",
        inputs=inputs,
        version=RESULT_FORMAT_VERSION,
        params={
            "frames": [request.frames.start, request.frames.stop],
            "chunks": [[chunk.frames.start, chunk.frames.stop] for chunk in request.textures],
            "fps": str(fps),
            "options": repr(options),
        },
    )


def fade_context(request: composite_pb2.RenderRequest, options: core.RenderOptions, *, limit: int) -> tuple[int, int]:
    """The frames [lo, hi) a chunk renders with its context: the fades look up to fade_frames frames past the
    chunk, as far as the texture chunks given reach (and `limit`, the frames the map and shapes cover)."""
    start, stop = request.frames.start, request.frames.stop
    covered = {f for chunk in request.textures for f in range(chunk.frames.start, chunk.frames.stop)}
    lo, hi = start, stop
    while lo > max(0, start - options.fade_frames) and lo - 1 in covered:
        lo -= 1
    while hi < min(limit, stop + options.fade_frames) and hi in covered:
        hi += 1
    return lo, hi


class CompositeServicer(composite_pb2_grpc.CompositeServiceServicer):
    """Render and Finalize over the object store."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store

    # -- Render ----------------------------------------------------------------------------------

    @grpc_errors
    def Render(self, request: composite_pb2.RenderRequest, context):
        """Stream progress, then the segment of output frames [start, stop)."""
        start, stop = request.frames.start, request.frames.stop
        if not 0 <= start < stop or stop - start > MAX_CHUNK_FRAMES:
            raise InvalidInput(f"frames [{start}, {stop}) must be a non-empty range of at most {MAX_CHUNK_FRAMES}")
        options = render_options(request.options)
        manifest = load_manifest(self.store, request.target_analysis)
        fps = frame_rate(request.output_frame_rate, what="output_frame_rate") or frame_rate(
            manifest.info.frame_rate, what="target frame rate"
        )
        prefix = request.output_prefix.rstrip("/") or render_prefix(self.store, request, manifest, options, fps)
        result_key = validate_key(f"{prefix}/result.json")
        cached = load_result(self.store, result_key, composite_pb2.RenderResult)
        if cached is not None:
            cached.cached = True
            yield composite_pb2.RenderEvent(result=cached)
            return

        frame_map, _ = load_array(self.store, request.retiming_map, what="retiming map")
        if frame_map.ndim != 1 or len(frame_map) < stop:
            raise InvalidInput(
                f"retiming map of shape {frame_map.shape} does not cover output frames [{start}, {stop})"
            )
        shapes, _ = load_array(self.store, request.mouth_shapes, what="mouth shapes")
        if shapes.ndim != 3 or len(shapes) < stop:
            raise InvalidInput(f"mouth shapes of shape {shapes.shape} do not cover output frames [{start}, {stop})")
        lo, hi = fade_context(request, options, limit=min(len(frame_map), len(shapes)))
        textures, jaws, masks, differences = self._textures(request, lo, hi)
        target = self._target_analysis(manifest)
        video = blob_ref(request.target_video, default_bucket=self.store.bucket, what="target video")

        with tempfile.TemporaryDirectory(prefix="a2v-composite-") as folder:
            target_path, segment_path = Path(folder) / "target", Path(folder) / "segment.mp4"
            self.store.get_file(video.key, target_path, bucket=video.bucket, expected_sha256=video.sha256)

            def work(progress, should_stop) -> core.RenderSummary:
                return core.render_segment(
                    str(target_path),
                    frame_map[lo:hi].astype(np.int64),
                    target.landmarks,
                    target.face_valid.astype(bool),
                    textures,
                    shapes[lo:hi],
                    str(segment_path),
                    width=manifest.info.width,
                    height=manifest.info.height,
                    fps=fps,
                    texture_valid=textures.reshape(len(textures), -1).any(axis=1),
                    texture_masks=masks,
                    mean_jaw_lines=jaws,
                    timestamps=target.timestamps,
                    geometry=target.geometry,
                    options=options,
                    start_frame=start,
                    progress=progress,
                    should_stop=should_stop,
                    head_pose=target.head_pose,
                    landmark_jitter=target.landmark_jitter,
                    pose_differences=differences,
                    context=(start - lo, hi - stop),
                )

            def finish(summary: core.RenderSummary) -> composite_pb2.RenderResult:
                return self._store_segment(request, prefix, segment_path, summary, fps)

            yield from stream_events(
                context, work, event=composite_pb2.RenderEvent, finish=finish, stage="composite", unit="frames"
            )

    def _target_analysis(self, manifest) -> TargetAnalysis:
        """The per-frame arrays of the target that compositing reads, from its analysis (face.v1.VideoAnalysis)."""
        poses = jitter = None
        if manifest.format_version >= 2:  # earlier analyses' head poses came from a 2-D heuristic
            if manifest.head_pose.object.key:
                poses = load_array(self.store, manifest.head_pose, what="head pose")[0]
            if manifest.landmark_jitter.object.key:
                jitter = load_array(self.store, manifest.landmark_jitter, what="landmark jitter")[0]
        return TargetAnalysis(
            landmarks=load_array(self.store, manifest.landmarks, what="landmarks")[0],
            face_valid=load_array(self.store, manifest.face_valid, what="face validity")[0],
            timestamps=load_array(self.store, manifest.timestamps_seconds, what="timestamps")[0],
            geometry=load_geometry(self.store, manifest),
            head_pose=poses,
            landmark_jitter=jitter,
        )

    def _store_segment(
        self,
        request: composite_pb2.RenderRequest,
        prefix: str,
        segment_path: Path,
        summary: core.RenderSummary,
        fps: Fraction,
    ) -> composite_pb2.RenderResult:
        """Store a rendered segment, its confidence and blend arrays, and (last) the result that names them."""
        segment = self.store.put_file(f"{prefix}/segment.mp4", segment_path, content_type="video/mp4")
        result = composite_pb2.RenderResult(
            frames=request.frames,
            segment=object_ref(segment),
            frames_written=summary.frames_written,
            frames_composited=summary.frames_composited,
            frames_passthrough=summary.frames_passthrough,
            width=summary.width,
            height=summary.height,
            frame_rate=frame_rate_message(Fraction(fps)),
            frames_synthesized=summary.frames_synthesized,
            frames_faded=summary.frames_faded,
            frames_low_confidence=summary.frames_low_confidence,
            lowest_confidence=lowest_confidence(summary, request.frames.start),
        )
        if summary.confidence is not None:
            rate = float(fps)
            result.confidence.CopyFrom(
                array_ref(*self.store.put_array(f"{prefix}/confidence.npy", summary.confidence, fps=rate))
            )
            result.blend.CopyFrom(array_ref(*self.store.put_array(f"{prefix}/blend.npy", summary.blend, fps=rate)))
        store_result(self.store, validate_key(f"{prefix}/result.json"), result)
        return result

    def _textures(self, request: composite_pb2.RenderRequest, start: int, stop: int):
        """Rows [start, stop) gathered from the texture chunks: (textures, mean jaw lines, texture masks, pose
        differences); each of the last three only when every chunk has it, else None."""
        rows: dict[int, np.ndarray] = {}
        extra: dict[str, dict[int, np.ndarray]] = {"jaws": {}, "masks": {}, "poses": {}}
        for chunk in request.textures:
            lo, hi = max(chunk.frames.start, start), min(chunk.frames.stop, stop)
            if lo >= hi:
                continue
            offsets = list(range(lo - chunk.frames.start, hi - chunk.frames.start))
            images = load_frames(self.store, chunk.textures, what="textures", indices=offsets)
            found: dict[str, np.ndarray] = {}
            if chunk.mean_jaw_lines.object.key:
                found["jaws"] = load_array(self.store, chunk.mean_jaw_lines, what="mean jaw lines")[0][offsets]
            if chunk.texture_masks.object.key:
                found["masks"] = load_frames(self.store, chunk.texture_masks, what="texture masks", indices=offsets)
            if chunk.pose_differences.object.key:
                found["poses"] = load_array(self.store, chunk.pose_differences, what="pose differences")[0][offsets]
            for i, frame in enumerate(range(lo, hi)):
                rows[frame] = images[i]
                for name, values in found.items():
                    extra[name][frame] = values[i]
        missing = [f for f in range(start, stop) if f not in rows]
        if missing:
            raise InvalidInput(
                f"no texture chunk covers output frames {missing[:5]}{'...' if len(missing) > 5 else ''}"
            )
        frames = range(start, stop)
        textures = np.stack([rows[f] for f in frames])
        jaws, masks, poses = (
            np.stack([extra[name][f] for f in frames]) if len(extra[name]) == len(frames) else None
            for name in ("jaws", "masks", "poses")
        )
        return textures, jaws, masks, poses

    # -- Finalize --------------------------------------------------------------------------------

    @grpc_errors
    def Finalize(self, request: composite_pb2.FinalizeRequest, context):
        """Join the segments in order (no re-encode) and mux the audio as AAC into the final mp4."""
        segments = list(request.segments)
        if not segments:
            raise InvalidInput("no segments to join")
        expected = 0
        for segment in segments:
            if segment.frames.start != expected or segment.frames.stop <= segment.frames.start:
                raise InvalidInput(
                    f"segments must be contiguous from frame 0: expected one starting at {expected}, "
                    f"got [{segment.frames.start}, {segment.frames.stop})"
                )
            expected = segment.frames.stop
        audio = blob_ref(request.audio, default_bucket=self.store.bucket, what="audio")
        options = request.options
        sources = [blob_ref(s.segment, default_bucket=self.store.bucket, what="segment") for s in segments]
        output_key = request.output_key or (
            f"{request.output_prefix.rstrip('/')}/output.mp4"
            if request.output_prefix
            else derive_prefix(
                "output",
                inputs=[self.store.content_sha256(ref) for ref in [*sources, audio]],
                version=RESULT_FORMAT_VERSION,
                params={"frames": expected},
            )
            + "/output.mp4"
        )
        validate_key(output_key)
        with tempfile.TemporaryDirectory(prefix="a2v-finalize-") as folder:
            paths = []
            for index, source in enumerate(sources):
                path = Path(folder) / f"segment{index:05d}.mp4"
                self.store.get_file(source.key, path, bucket=source.bucket, expected_sha256=source.sha256)
                paths.append(str(path))
            audio_path = Path(folder) / "audio"
            self.store.get_file(audio.key, audio_path, bucket=audio.bucket, expected_sha256=audio.sha256)
            fps = frame_rate(request.frame_rate, what="frame_rate") or encode._probe_segment(paths[0], 0).rate
            if fps is None:
                raise InvalidInput("the segments do not record a frame rate: set FinalizeRequest.frame_rate")
            out_path = Path(folder) / "output.mp4"

            def work(progress, should_stop) -> encode.FinalizeInfo:
                return encode.finalize(
                    paths,
                    str(audio_path),
                    str(out_path),
                    fps=Fraction(fps),
                    audio_bitrate_kbps=options.audio_bitrate_kbps or encode.DEFAULT_AUDIO_KBPS,
                    audio_sample_rate_hz=options.audio_sample_rate_hz,
                    faststart=options.faststart if options.HasField("faststart") else True,
                    crf=options.crf if options.HasField("crf") else encode.DEFAULT_CRF,
                    preset=options.x264_preset or encode.DEFAULT_PRESET,
                    progress=progress,
                    should_stop=should_stop,
                )

            def finish(info: encode.FinalizeInfo):
                video = self.store.put_file(output_key, out_path, content_type="video/mp4")
                log.info(
                    "finalized %s: %d frames, %.2f s",
                    output_key,
                    info.frame_count,
                    info.duration_seconds,
                    extra={"request_id": request.request_id},
                )
                return composite_pb2.FinalizeResult(
                    video=object_ref(video),
                    duration_seconds=info.duration_seconds,
                    frame_count=info.frame_count,
                    width=info.width,
                    height=info.height,
                    frame_rate=frame_rate_message(info.fps),
                    audio_duration_seconds=info.audio_duration_seconds,
                )

            yield from stream_events(
                context, work, event=composite_pb2.FinalizeEvent, finish=finish, stage="finalize", unit="segments"
            )


def bindings(config: Config) -> list[ServiceBinding]:
    """What `python -m services.composite` serves."""
    return store_backed_bindings(config, composite_pb2, composite_pb2_grpc, "CompositeService", CompositeServicer)
