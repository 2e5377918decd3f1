"""Pure core of the `composite` stage: render a chunk of output frames into an H.264 segment; join and mux the result.

Per output frame i of a chunk: the re-timed target frame k = frame_map[i] is decoded (sequentially, one keyframe
seek at most per backward jump: `TargetFrames`), and when it has a face and texture i is valid, the synthesized
canonical texture is warped into its geometry, the jaw corrected, and the texture blended in (render.py);
otherwise the decoded frame passes through byte for byte. Frames are encoded at the target's size and frame
rate (encode.py), and `finalize` joins the segments and muxes the audio.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np

from services.composite.encode import (
    BT601,
    DEFAULT_CRF,
    DEFAULT_PRESET,
    X264_PRESETS,
    ColorSpec,
    FinalizeInfo,
    MediaSink,
    SegmentInfo,
    check_fps,
    encode_segment,
    finalize,
)
from services.composite.render import (
    COLOR_MATCH_MODES,
    JAW_GAIN,
    BlendSettings,
    CompositeResult,
    composite_frame,
    correct_jaw,
    inner_opening,
    jaw_displacement,
    pyramid_blend,
)
from services.runtime.canonical import DEFAULT_GEOMETRY, CanonicalGeometry
from services.runtime.errors import Cancelled, InvalidInput
from services.runtime.media import VideoSource, open_container, to_bgr


@dataclass(frozen=True)
class RenderOptions:
    """Knobs of Render (composite.v1.RenderOptions, with its defaults).

    Attributes:
        jaw_correction: Move the target's jaw line to the synthesized mouth opening.
        pyramid_levels: Laplacian pyramid levels, 1-8 (default 4).
        feather_px: Width of the mask's soft edge, target pixels, >= 0; 0 = 0.08 x the inter-ocular distance.
        color_match: "none", "mean_std" (default) or "histogram".
        crf: libx264 CRF, 0-51 (default 18).
        x264_preset: libx264 preset (default "veryfast").
        jaw_gain: Chin displacement per unit of extra inner-lip opening (canonical units), 0-2 (default 0.6).
        encoder_threads: x264 threads; 0 = x264's choice, 1 = one core.
        min_confidence: Frames whose confidence (`frame_confidence`) is below this keep the target's own mouth, in
            [0, 1]; 0 = never fall back. Default 0.5.
        fade_frames: Frames over which the synthesized mouth fades out before a frame that keeps its own (and back in
            after it), so nothing pops; also around frames without a face. In [0, 30]; default 4.
        max_yaw_degrees: Head turn (|yaw| of the target frame) at which the confidence reaches 0; full confidence up
            to 3/4 of it. In (0, 90]; default 35 (the frontal canonical warp compresses the far cheek beyond that).
        max_pitch_degrees: The same for the head's nod away from the target's median pitch (a generic face gives
            each person's pitch an offset). In (0, 90]; default 30.
        max_pose_difference_degrees: The same for the texture candidates' mean head-pose distance from the target
            frame (texture.v1 pose_differences): how far a mouth's pose is from the face it goes into. In (0, 90];
            default 15.
        max_landmark_jitter: The same for the tracker's jitter on the target frame (face.v1 landmark_jitter,
            inter-ocular units). In (0, 1]; default 0.05 (steady tracking is ~0.01).
        max_foreign_colour: The same for the colour the blend brought into the face that the frame's own face had
            nowhere near (`render.composite_frame` measure, mean delta E over the blended skin). In (0, 40]; default
            4.
        max_foreign_edges: The same for edges the blend brought that the frame had nowhere near (mean Lab L per
            pixel over the blended skin). In (0, 40]; default 1.
    """

    jaw_correction: bool = True
    pyramid_levels: int = 4
    feather_px: float = 0.0
    color_match: str = "mean_std"
    crf: int = DEFAULT_CRF
    x264_preset: str = DEFAULT_PRESET
    jaw_gain: float = JAW_GAIN
    encoder_threads: int = 0
    min_confidence: float = 0.5
    fade_frames: int = 4
    max_yaw_degrees: float = 35.0
    max_pitch_degrees: float = 30.0
    max_pose_difference_degrees: float = 15.0
    max_landmark_jitter: float = 0.05
    max_foreign_colour: float = 4.0
    max_foreign_edges: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= int(self.pyramid_levels) <= 8:
            raise InvalidInput(f"pyramid_levels must be in [1, 8], got {self.pyramid_levels}")
        if not (np.isfinite(self.feather_px) and 0 <= self.feather_px <= 500):
            raise InvalidInput(f"feather_px must be in [0, 500], got {self.feather_px}")
        if self.color_match not in COLOR_MATCH_MODES:
            raise InvalidInput(f"color_match must be one of {COLOR_MATCH_MODES}, got {self.color_match!r}")
        if not (isinstance(self.crf, int | np.integer) and 0 <= int(self.crf) <= 51):
            raise InvalidInput(f"crf must be an integer in [0, 51], got {self.crf!r}")
        if self.x264_preset not in X264_PRESETS:
            raise InvalidInput(f"x264_preset must be one of {X264_PRESETS}, got {self.x264_preset!r}")
        if not (np.isfinite(self.jaw_gain) and 0 <= self.jaw_gain <= 2):
            raise InvalidInput(f"jaw_gain must be in [0, 2], got {self.jaw_gain}")
        if self.encoder_threads < 0:
            raise InvalidInput(f"encoder_threads must be >= 0, got {self.encoder_threads}")
        if not (np.isfinite(self.min_confidence) and 0.0 <= self.min_confidence <= 1.0):
            raise InvalidInput(f"min_confidence must be in [0, 1], got {self.min_confidence}")
        if not (isinstance(self.fade_frames, int | np.integer) and 0 <= int(self.fade_frames) <= 30):
            raise InvalidInput(f"fade_frames must be an integer in [0, 30], got {self.fade_frames!r}")
        for name, top in (
            ("max_yaw_degrees", 90.0),
            ("max_pitch_degrees", 90.0),
            ("max_pose_difference_degrees", 90.0),
            ("max_landmark_jitter", 1.0),
            ("max_foreign_colour", 40.0),
            ("max_foreign_edges", 40.0),
        ):
            value = getattr(self, name)
            if not (np.isfinite(value) and 0.0 < value <= top):
                raise InvalidInput(f"{name} must be in (0, {top:g}], got {value}")

    @property
    def limits(self) -> dict[str, float]:
        """Confidence factor -> the value at which it reaches 0 (`frame_confidence`)."""
        return {
            "yaw": self.max_yaw_degrees,
            "pitch": self.max_pitch_degrees,
            "pose_difference": self.max_pose_difference_degrees,
            "landmark_jitter": self.max_landmark_jitter,
            "foreign_colour": self.max_foreign_colour,
            "foreign_edges": self.max_foreign_edges,
        }

    @property
    def blend(self) -> BlendSettings:
        """The per-frame part of the options."""
        return BlendSettings(
            jaw_correction=bool(self.jaw_correction),
            jaw_gain=float(self.jaw_gain),
            pyramid_levels=int(self.pyramid_levels),
            feather_px=float(self.feather_px),
            color_match=self.color_match,
        )


@dataclass(frozen=True)
class RenderedFrame:
    """One output frame.

    Attributes:
        image: uint8 [H, W, 3] BGR at the target's size.
        target_index: Target frame shown.
        composited: True when a texture was blended in (fully or faded); False when the decoded target frame passes
            through as is (no face, no texture, or its own mouth kept for low confidence).
        jaw_shift_px: Largest jaw displacement applied, target pixels.
        confidence: The frame's confidence in [0, 1] (`frame_confidence`; 0 without a face or texture).
        blend: How much of the synthesized mouth is shown, in [0, 1]: 1 synthesized, 0 the frame's own mouth, in
            between a cross-fade next to a frame that keeps its own.
        reason: The factor that limits the confidence ("" when it is 1; "no face" / "no texture" when nothing could
            be blended).
        factors: Each factor's measured value (NaN where unknown), as `RenderOptions.limits` names them.
    """

    image: np.ndarray
    target_index: int
    composited: bool
    jaw_shift_px: float = 0.0
    confidence: float = 1.0
    blend: float = 1.0
    reason: str = ""
    factors: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RenderSummary:
    """What `render_segment` did (composite.v1.RenderResult without the storage fields).

    Attributes:
        frames_written: Frames encoded (the chunk's length).
        frames_composited: Frames where a texture was blended in (synthesized + faded).
        frames_passthrough: Frames passed through untouched (no face, no texture, or low confidence).
        width: Width in pixels (the target's).
        height: Height in pixels (the target's).
        fps: Frame rate of the segment.
        color: YUV matrix the segment was encoded and tagged with.
        frames_synthesized: Frames showing the synthesized mouth fully (blend 1).
        frames_faded: Frames cross-fading between it and the frame's own mouth (0 < blend < 1).
        frames_low_confidence: Frames with a face and a texture whose confidence was below min_confidence (they
            keep their own mouth; part of frames_passthrough).
        confidence: float32 [n] each frame's confidence (0 without a face or texture).
        blend: float32 [n] each frame's blend.
        reasons: Each frame's limiting factor ("" at full confidence).
        values: float32 [n] the limiting factor's measured value per frame (NaN where none).
    """

    frames_written: int
    frames_composited: int
    frames_passthrough: int
    width: int
    height: int
    fps: Fraction
    color: ColorSpec
    frames_synthesized: int = 0
    frames_faded: int = 0
    frames_low_confidence: int = 0
    confidence: np.ndarray | None = None
    blend: np.ndarray | None = None
    reasons: tuple[str, ...] = ()
    values: np.ndarray | None = None


# ---------------------------------------------------------------------- target decoding
class TargetFrames:
    """Frames of the target video in the order a chunk needs them, decoded sequentially.

    The decoder only moves forward. A frame needed again later (a held frame, or one passed on the way to a later
    one that a backward jump of the map will ask for) is kept while the cache holds fewer than `max_cached`
    frames; any other backward jump, and the first frame, start the decoder at the keyframe before the wanted frame
    (seeking by the analysis timestamps; when the decoded times do not match them, or without timestamps, it
    decodes from the start). Frames are BGR uint8 with the container's rotation applied, converted as PyAV does
    (the stream's tagged matrix, BT.601 when untagged: the face stage's conversion).

    Args:
        source: Encoded target video (bytes or path).
        frame_map: int [n] target frame per output frame of the chunk.
        timestamps: float [M] presentation time of every target frame (seconds from the container start, the face
            analysis' timestamps), for keyframe seeks; None = always decode from the start (then frame k costs k
            decoded frames: fine for short targets and tests).
        max_cached: Most frames kept for later use.
        decode_threads: FFmpeg decoder threads (0 = FFmpeg's choice, 1 = one core).
    """

    def __init__(
        self,
        source: VideoSource,
        frame_map: np.ndarray,
        *,
        timestamps: np.ndarray | None = None,
        max_cached: int = 32,
        decode_threads: int = 0,
    ) -> None:
        self.source = source
        self.frame_map = np.asarray(frame_map, dtype=np.int64)
        self.timestamps = None if timestamps is None else np.asarray(timestamps, dtype=np.float64)
        self.max_cached = max(int(max_cached), 0)
        self.decode_threads = int(decode_threads)
        # last_use[k]: the last output position that shows target frame k.
        self._last_use: dict[int, int] = {}
        for position, k in enumerate(self.frame_map.tolist()):
            self._last_use[k] = position
        self._cache: dict[int, np.ndarray] = {}
        self._container: av.container.InputContainer | None = None
        self._frames: Iterator[tuple[int, np.ndarray]] | None = None
        self._next_index = 0  # index of the frame the decoder yields next
        self._seeked = False
        self.decoded = 0  # frames decoded (for the benchmark and tests)
        self.restarts = 0

    def close(self) -> None:
        """Close the decoder."""
        if self._container is not None:
            self._container.close()
        self._container = None
        self._frames = None

    def __enter__(self) -> TargetFrames:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (target index, frame uint8 [H, W, 3]) per output frame of the chunk."""
        try:
            for position, k in enumerate(self.frame_map.tolist()):
                frame = self._cache.get(k)
                if frame is None:
                    frame = self._advance_to(k, position)
                if self._last_use[k] > position:
                    self._cache[k] = frame
                else:
                    self._cache.pop(k, None)
                yield k, frame
        finally:
            self.close()

    def _open_decoder(self, k: int, *, seek: bool) -> None:
        """(Re)open the decoder so that it yields frame k or an earlier one next (seeking to a keyframe if asked)."""
        self.close()
        self.restarts += 1
        container = open_container(self.source, what="target video", require_video=True)
        stream = container.streams.video[0]
        if self.decode_threads != 1:
            stream.thread_type = "AUTO"
        stream.codec_context.thread_count = max(self.decode_threads, 0)
        origin = container.start_time / 1e6 if container.start_time is not None else 0.0
        seek = seek and self.timestamps is not None and 0 < k < len(self.timestamps) and stream.time_base is not None
        if seek:
            try:
                container.seek(
                    int((self.timestamps[k] + origin) / stream.time_base), stream=stream, backward=True, any_frame=False
                )
            except av.FFmpegError:
                container.close()
                return self._open_decoder(k, seek=False)
        self._container = container
        self._seeked = seek
        self._frames = self._decode(container, stream, origin, located=seek)
        self._next_index = 0

    def _decode(
        self, container: av.container.InputContainer, stream: av.video.stream.VideoStream, origin: float, located: bool
    ) -> Iterator[tuple[int, av.VideoFrame]]:
        """Yields (index, frame); after a seek the index comes from matching the frame's time to the timestamps."""
        index = -1
        time_base = stream.time_base
        try:
            for frame in container.decode(stream):
                if located:
                    if frame.pts is None:
                        raise _LostTrack
                    t = float(frame.pts * time_base) - origin
                    j = int(np.clip(np.searchsorted(self.timestamps, t), 1, len(self.timestamps) - 1))
                    index = j - 1 if abs(self.timestamps[j - 1] - t) <= abs(self.timestamps[j] - t) else j
                    if abs(self.timestamps[index] - t) > 1e-3:
                        raise _LostTrack
                else:
                    index += 1
                self.decoded += 1
                yield index, frame
        except av.FFmpegError as exc:
            raise InvalidInput(f"target video cannot be decoded at frame {index + 1}: {exc}") from exc

    def _advance_to(self, k: int, position: int) -> np.ndarray:
        """Decode forward to frame k, keeping frames passed on the way that later output frames show."""
        if self._frames is None or k < self._next_index:
            self._open_decoder(k, seek=True)
        while True:
            try:
                for index, frame in self._frames:
                    self._next_index = index + 1
                    if index == k:
                        return to_bgr(frame)
                    if index > k:
                        raise _LostTrack  # a seek landed after the wanted frame
                    if self._last_use.get(index, -1) > position and len(self._cache) < self.max_cached:
                        self._cache.setdefault(index, to_bgr(frame))
                raise InvalidInput(f"target frame {k} is out of range: the video holds {self._next_index} frames")
            except _LostTrack:
                if not self._seeked:
                    raise InvalidInput(f"target frame {k} cannot be located in the video") from None
                self._open_decoder(k, seek=False)  # the timestamps do not place the frames: decode from the start


class _LostTrack(Exception):
    """A seek landed somewhere the timestamps cannot place."""


def target_color(source: VideoSource) -> ColorSpec:
    """The YUV matrix PyAV decodes the target with (its first frame's tags; BT.601 when untagged)."""
    container = open_container(source, what="target video", require_video=True)
    try:
        for frame in container.decode(video=0):
            return ColorSpec.from_decoded(frame.colorspace, frame.color_primaries, frame.color_trc)
    except av.FFmpegError as exc:
        raise InvalidInput(f"target video cannot be decoded: {exc}") from exc
    finally:
        container.close()
    raise InvalidInput("target video holds no decodable frame")


# ---------------------------------------------------------------------- validation
def _check_inputs(
    frame_map: np.ndarray,
    landmarks: np.ndarray,
    face_valid: np.ndarray,
    textures: np.ndarray,
    mouth_shapes: np.ndarray | None,
    texture_valid: np.ndarray | None,
    texture_masks: np.ndarray | None,
    mean_jaw_lines: np.ndarray | None,
    timestamps: np.ndarray | None,
    geometry: CanonicalGeometry,
) -> tuple[np.ndarray, ...]:
    fmap = np.asarray(frame_map)
    if fmap.ndim != 1 or len(fmap) == 0:
        raise InvalidInput(f"frame_map must be a non-empty int array [n], got shape {fmap.shape}")
    if not np.issubdtype(fmap.dtype, np.integer):
        raise InvalidInput(f"frame_map must hold integers, got {fmap.dtype}")
    n = len(fmap)
    lms = np.asarray(landmarks)
    if lms.ndim != 3 or lms.shape[1:] != (68, 2) or len(lms) == 0:
        raise InvalidInput(f"landmarks must be float [M, 68, 2] with M >= 1, got {lms.shape}")
    m = len(lms)
    valid = np.asarray(face_valid)
    if valid.shape != (m,):
        raise InvalidInput(f"face_valid must be [{m}] like landmarks, got {valid.shape}")
    valid = valid.astype(bool)
    bad = (fmap < 0) | (fmap >= m)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidInput(f"frame_map[{i}] = {int(fmap[i])} is outside the target's frames [0, {m})")
    h, w = geometry.crop_shape
    tex = np.asarray(textures)
    if tex.shape != (n, h, w, 3) or tex.dtype != np.uint8:
        raise InvalidInput(f"textures must be uint8 [{n}, {h}, {w}, 3], got {tex.dtype} {tex.shape}")
    if mouth_shapes is not None and np.shape(mouth_shapes) != (n, 20, 2):
        raise InvalidInput(f"mouth_shapes must be float [{n}, 20, 2], got {np.shape(mouth_shapes)}")
    if texture_valid is not None and np.shape(texture_valid) != (n,):
        raise InvalidInput(f"texture_valid must be [{n}], got {np.shape(texture_valid)}")
    if texture_masks is not None and np.shape(texture_masks) != (n, h, w):
        raise InvalidInput(f"texture_masks must be uint8 [{n}, {h}, {w}], got {np.shape(texture_masks)}")
    if mean_jaw_lines is not None and np.shape(mean_jaw_lines) != (n, 17, 2):
        raise InvalidInput(f"mean_jaw_lines must be float [{n}, 17, 2], got {np.shape(mean_jaw_lines)}")
    if timestamps is not None and np.shape(timestamps) != (m,):
        raise InvalidInput(f"timestamps must be float [{m}] like landmarks, got {np.shape(timestamps)}")
    shown = np.unique(fmap)
    usable = valid[shown] & np.isfinite(lms[shown]).all(axis=(1, 2))
    valid = valid.copy()
    valid[shown] = usable  # a "valid" frame with non-finite landmarks passes through instead of failing
    tex_valid = np.ones(n, bool) if texture_valid is None else np.asarray(texture_valid).astype(bool)
    return fmap.astype(np.int64), lms, valid, tex, tex_valid


# ---------------------------------------------------------------------- confidence
def factor_score(value: float, limit: float) -> float:
    """A confidence factor's score in [0, 1]: 1 up to 3/4 of `limit`, falling linearly to 0 at it (NaN = unknown: 1)."""
    if not np.isfinite(value):
        return 1.0
    return float(np.clip(4.0 * (1.0 - value / limit), 0.0, 1.0))


def frame_confidence(factors: dict[str, float], limits: dict[str, float]) -> tuple[float, str]:
    """A frame's confidence and the factor that sets it.

    The confidence is the least score of its factors (`factor_score` against `limits`); the name is that factor's
    ("" when every factor scores 1).
    """
    confidence, reason = 1.0, ""
    for name, value in factors.items():
        score = factor_score(value, limits[name])
        if score < confidence:
            confidence, reason = score, name
    return confidence, reason


def fade_weights(keep_own: np.ndarray, fade_frames: int) -> np.ndarray:
    """Blend of each frame: 0 where `keep_own`, rising linearly over `fade_frames` frames on either side to 1.

    blend[t] = min(1, min over s with keep_own[s] of |t - s| / (fade_frames + 1)).

    Args:
        keep_own: bool [n] frames that show their own mouth.
        fade_frames: >= 0.

    Returns:
        float64 [n] in [0, 1].
    """
    own = np.asarray(keep_own, bool)
    blend = np.ones(len(own))
    for s in np.flatnonzero(own):
        lo, hi = max(0, s - fade_frames), min(len(own), s + fade_frames + 1)
        ramp = np.abs(np.arange(lo, hi) - s) / (fade_frames + 1.0)
        blend[lo:hi] = np.minimum(blend[lo:hi], ramp)
    return blend


NO_BLEND_REASONS = ("no face", "no texture", "degenerate landmarks")
"""Reasons of frames that keep their own mouth because nothing could be blended (not for low confidence)."""


@dataclass
class _Row:
    """A decoded frame waiting for its neighbours' verdicts before its blend is known."""

    index: int
    target_index: int
    frame: np.ndarray
    result: CompositeResult | None
    confidence: float
    reason: str
    factors: dict[str, float]


# ---------------------------------------------------------------------- rendering
def render_frames(
    target: VideoSource,
    frame_map: np.ndarray,
    landmarks: np.ndarray,
    face_valid: np.ndarray,
    textures: np.ndarray,
    mouth_shapes: np.ndarray | None = None,
    *,
    texture_valid: np.ndarray | None = None,
    texture_masks: np.ndarray | None = None,
    mean_jaw_lines: np.ndarray | None = None,
    timestamps: np.ndarray | None = None,
    geometry: CanonicalGeometry = DEFAULT_GEOMETRY,
    options: RenderOptions | None = None,
    decode_threads: int = 0,
    head_pose: np.ndarray | None = None,
    landmark_jitter: np.ndarray | None = None,
    pose_differences: np.ndarray | None = None,
    context: tuple[int, int] = (0, 0),
) -> Iterator[RenderedFrame]:
    """Composite a chunk of output frames; the inputs are checked before the iterator is returned.

    Every frame gets a confidence (`frame_confidence` of its factors: the target frame's head pose and tracking
    jitter, the texture candidates' pose difference, the foreign colour and edges the blend brought). A frame below
    `options.min_confidence`, and a frame without a face or texture, keeps the target's own mouth; the synthesized
    mouth fades out over `options.fade_frames` frames before it and back in after it (the jaw correction too). So
    that fades run across chunk seams, the arrays may hold `context` extra frames before and after the chunk: they
    are composited and judged but not returned.

    Args:
        target: The target video (encoded bytes or a path), as analysed.
        frame_map: int [n] target frame shown at each output frame of the chunk (the chunk's slice of the
            retiming map), each in [0, M).
        landmarks: float32 [M, 68, 2] the target's smoothed landmarks, frame pixels (NaN where no face).
        face_valid: bool/uint8 [M] the target's face flags.
        textures: uint8 [n, h, w, 3] BGR synthesized canonical textures (h, w = geometry.crop_shape).
        mouth_shapes: float32 [n, 20, 2] synthesized mouth shapes, canonical units (jaw correction); None = no jaw
            correction unless mean_jaw_lines are given.
        texture_valid: bool [n]; False = no texture for that frame (it passes through). None = all valid.
        texture_masks: uint8 [n, h, w] valid pixels of each texture (1); None = all valid.
        mean_jaw_lines: float32 [n, 17, 2] the texture candidates' mean jaw lines, canonical units; where finite
            they set the jaw correction instead of the mouth opening.
        timestamps: float64 [M] target frame times (seconds from the container start) for keyframe seeks.
        geometry: Canonical geometry of the analysis (template, crop region and size).
        options: Render options (defaults when None).
        decode_threads: FFmpeg decoder threads (0 = FFmpeg's choice).
        head_pose: float [M, >= 2] the target frames' yaw and pitch, radians (face.v1 head_pose); None = unknown.
        landmark_jitter: float [M] the target frames' tracking jitter (face.v1 landmark_jitter); None = unknown.
        pose_differences: float [n] the texture candidates' pose difference, degrees (texture.v1 pose_differences);
            None = unknown.
        context: (before, after) rows of the arrays (n of them in all) outside the chunk: judged for the fades,
            not returned. Each >= 0, together < n.

    Returns:
        An iterator of n - before - after RenderedFrame, in output order, at the target's native size.

    Raises:
        InvalidInput: mismatched shapes, an empty chunk, a target index out of range (also when the video holds
            fewer frames than the analysis), an undecodable video (the last two while iterating).
    """
    opts = options or RenderOptions()
    fmap, lms, valid, tex, tex_valid = _check_inputs(
        frame_map,
        landmarks,
        face_valid,
        textures,
        mouth_shapes,
        texture_valid,
        texture_masks,
        mean_jaw_lines,
        timestamps,
        geometry,
    )
    n, m = len(fmap), len(lms)
    before, after = (int(v) for v in context)
    if before < 0 or after < 0 or before + after >= n:
        raise InvalidInput(f"context must be two counts >= 0 leaving frames of the {n} given, got {context}")
    poses = None
    if head_pose is not None:
        poses = np.asarray(head_pose, dtype=np.float64)
        if poses.ndim != 2 or poses.shape[0] != m or poses.shape[1] < 2:
            raise InvalidInput(f"head_pose must be float [{m}, >= 2] like landmarks, got {poses.shape}")
    jitter = None
    if landmark_jitter is not None:
        jitter = np.asarray(landmark_jitter, dtype=np.float64)
        if jitter.shape != (m,):
            raise InvalidInput(f"landmark_jitter must be float [{m}] like landmarks, got {jitter.shape}")
    differences = None
    if pose_differences is not None:
        differences = np.asarray(pose_differences, dtype=np.float64)
        if differences.shape != (n,):
            raise InvalidInput(f"pose_differences must be float [{n}] like the frame map, got {differences.shape}")
    reader = TargetFrames(target, fmap, timestamps=timestamps, decode_threads=decode_threads)
    extras = (mouth_shapes, texture_masks, mean_jaw_lines)
    return _render(
        reader, fmap, lms, valid, tex, tex_valid, *extras, geometry, opts, poses, jitter, differences, (before, after)
    )


def _render(
    reader: TargetFrames,
    fmap: np.ndarray,
    lms: np.ndarray,
    valid: np.ndarray,
    tex: np.ndarray,
    tex_valid: np.ndarray,
    mouth_shapes: np.ndarray | None,
    texture_masks: np.ndarray | None,
    mean_jaw_lines: np.ndarray | None,
    geometry: CanonicalGeometry,
    opts: RenderOptions,
    poses: np.ndarray | None,
    jitter: np.ndarray | None,
    differences: np.ndarray | None,
    context: tuple[int, int],
) -> Iterator[RenderedFrame]:
    settings = opts.blend
    limits = opts.limits
    fade = int(opts.fade_frames)
    n = len(fmap)
    first, stop = context[0], n - context[1]
    pitch_reference = 0.0
    if poses is not None and np.isfinite(poses[valid, 1]).any():
        pitch_reference = float(np.degrees(np.nanmedian(poses[valid, 1])))

    def blend(i: int, k: int, frame: np.ndarray, strength: float, measure: bool) -> CompositeResult:
        return composite_frame(
            frame,
            lms[k],
            tex[i],
            geometry=geometry,
            synth_mouth=None if mouth_shapes is None else mouth_shapes[i],
            mean_jaw=None if mean_jaw_lines is None else mean_jaw_lines[i],
            texture_mask=None if texture_masks is None else texture_masks[i],
            settings=settings,
            strength=strength,
            measure=measure,
        )

    def judge(i: int, k: int, frame: np.ndarray) -> _Row:
        if not valid[k]:
            return _Row(i, k, frame, None, 0.0, "no face", {})
        if not tex_valid[i]:
            return _Row(i, k, frame, None, 0.0, "no texture", {})
        factors = {
            "yaw": abs(float(np.degrees(poses[k, 0]))) if poses is not None else np.nan,
            "pitch": abs(float(np.degrees(poses[k, 1])) - pitch_reference) if poses is not None else np.nan,
            "pose_difference": float(differences[i]) if differences is not None else np.nan,
            "landmark_jitter": float(jitter[k]) if jitter is not None else np.nan,
        }
        confidence, reason = frame_confidence(factors, limits)
        if confidence < opts.min_confidence:  # it keeps its own mouth whatever the blend would look like
            return _Row(i, k, frame, None, confidence, reason, factors)
        try:
            result = blend(i, k, frame, 1.0, True)
        except InvalidInput:  # degenerate landmarks on one frame: show the frame rather than fail the chunk
            return _Row(i, k, frame, None, 0.0, "degenerate landmarks", factors)
        if not result.composited:
            return _Row(i, k, frame, None, 0.0, "no texture", factors)
        factors |= {"foreign_colour": result.foreign_colour, "foreign_edges": result.foreign_edges}
        confidence, reason = frame_confidence(factors, limits)
        return _Row(i, k, frame, result, confidence, reason, factors)

    own = np.zeros(n, bool)  # frames that keep their own mouth, known up to the newest decoded one

    def finish(row: _Row) -> RenderedFrame:
        i = row.index
        window = own[max(0, i - fade) : i + fade + 1]
        strength = float(fade_weights(window, fade)[min(i, fade)]) if window.any() else 1.0
        if row.result is None or own[i] or strength <= 0.0:
            return RenderedFrame(row.frame, row.target_index, False, 0.0, row.confidence, 0.0, row.reason, row.factors)
        result = row.result if strength >= 1.0 else blend(i, row.target_index, row.frame, strength, False)
        if not result.composited:
            return RenderedFrame(row.frame, row.target_index, False, 0.0, row.confidence, 0.0, row.reason, row.factors)
        return RenderedFrame(
            result.image, row.target_index, True, result.jaw_shift_px, row.confidence, strength, row.reason, row.factors
        )

    pending: deque[_Row] = deque()
    with reader:
        for i, (k, frame) in enumerate(reader):
            row = judge(i, k, frame)
            own[i] = row.result is None or row.confidence < opts.min_confidence
            pending.append(row)
            while pending and pending[0].index + fade <= i:
                done = pending.popleft()
                if first <= done.index < stop:
                    yield finish(done)
        while pending:
            done = pending.popleft()
            if first <= done.index < stop:
                yield finish(done)


def render_segment(  # noqa: D417 (the arrays are `render_frames` arguments, named in one entry)
    target: VideoSource,
    frame_map: np.ndarray,
    landmarks: np.ndarray,
    face_valid: np.ndarray,
    textures: np.ndarray,
    mouth_shapes: np.ndarray | None,
    out: MediaSink,
    *,
    width: int,
    height: int,
    fps: Fraction,
    texture_valid: np.ndarray | None = None,
    texture_masks: np.ndarray | None = None,
    mean_jaw_lines: np.ndarray | None = None,
    timestamps: np.ndarray | None = None,
    geometry: CanonicalGeometry = DEFAULT_GEOMETRY,
    options: RenderOptions | None = None,
    color: ColorSpec | None = None,
    start_frame: int = 0,
    decode_threads: int = 0,
    progress: Callable[[int, int], None] | None = None,
    progress_every: int = 25,
    should_stop: Callable[[], bool] | None = None,
    head_pose: np.ndarray | None = None,
    landmark_jitter: np.ndarray | None = None,
    pose_differences: np.ndarray | None = None,
    context: tuple[int, int] = (0, 0),
) -> RenderSummary:
    """Render a chunk (`render_frames`) and encode it as one H.264 segment (`encode_segment`).

    Args:
        target, frame_map, landmarks, face_valid, textures, mouth_shapes, texture_valid, texture_masks,
            mean_jaw_lines, timestamps, geometry, options, decode_threads, head_pose, landmark_jitter,
            pose_differences, context: as `render_frames` (the arrays hold the context rows too; the segment holds
            the frames between them).
        out: Segment path or writable binary file object.
        width: The target's width (decoded frames must have it).
        height: The target's height.
        fps: The output frame rate (normally the target's nominal rate, exact).
        color: YUV matrix of the segment; None = the one the target decodes with (`target_color`).
        start_frame: pts of the chunk's first frame, in frames (see `encode_segment`).
        progress: Called as progress(frames_done, n) every `progress_every` frames and at the end.
        progress_every: Frames between progress calls, >= 1.
        should_stop: Polled before each frame; True raises Cancelled.

    Returns:
        The RenderSummary.

    Raises:
        InvalidInput: as `render_frames`; decoded frames of another size than width x height.
        Cancelled: should_stop returned True.
    """
    opts = options or RenderOptions()
    rate = check_fps(fps)
    if progress_every < 1:
        raise InvalidInput(f"progress_every must be >= 1, got {progress_every}")
    frames = render_frames(
        target,
        frame_map,
        landmarks,
        face_valid,
        textures,
        mouth_shapes,
        texture_valid=texture_valid,
        texture_masks=texture_masks,
        mean_jaw_lines=mean_jaw_lines,
        timestamps=timestamps,
        geometry=geometry,
        options=opts,
        decode_threads=decode_threads,
        head_pose=head_pose,
        landmark_jitter=landmark_jitter,
        pose_differences=pose_differences,
        context=context,
    )
    spec = color or target_color(target)
    n = len(frame_map) - context[0] - context[1]
    counts = {"composited": 0, "passthrough": 0, "synthesized": 0, "faded": 0, "low": 0}
    confidence = np.zeros(n, np.float32)
    blend = np.zeros(n, np.float32)
    values = np.full(n, np.nan, np.float32)
    reasons: list[str] = []

    def images() -> Iterator[np.ndarray]:
        for i, rendered in enumerate(frames):
            if should_stop is not None and should_stop():
                raise Cancelled(f"render cancelled after {i} of {n} frames")
            if rendered.image.shape[:2] != (height, width):
                raise InvalidInput(
                    f"target frame {rendered.target_index} is {rendered.image.shape[1]}x{rendered.image.shape[0]}, "
                    f"expected {width}x{height}"
                )
            counts["composited" if rendered.composited else "passthrough"] += 1
            if rendered.composited:
                counts["synthesized" if rendered.blend >= 1.0 else "faded"] += 1
            elif rendered.reason not in NO_BLEND_REASONS and rendered.confidence < opts.min_confidence:
                counts["low"] += 1
            confidence[i], blend[i] = rendered.confidence, rendered.blend
            values[i] = rendered.factors.get(rendered.reason, np.nan)
            reasons.append(rendered.reason)
            yield rendered.image
            if progress is not None and ((i + 1) % progress_every == 0 or i + 1 == n):
                progress(i + 1, n)

    info: SegmentInfo = encode_segment(
        images(),
        width=width,
        height=height,
        fps=rate,
        path_or_buffer=out,
        crf=opts.crf,
        preset=opts.x264_preset,
        color=spec,
        start_frame=start_frame,
        threads=opts.encoder_threads,
    )
    return RenderSummary(
        frames_written=info.frames_written,
        frames_composited=counts["composited"],
        frames_passthrough=counts["passthrough"],
        width=info.width,
        height=info.height,
        fps=info.fps,
        color=spec,
        frames_synthesized=counts["synthesized"],
        frames_faded=counts["faded"],
        frames_low_confidence=counts["low"],
        confidence=confidence,
        blend=blend,
        reasons=tuple(reasons),
        values=values,
    )


__all__ = [
    "BT601",
    "ColorSpec",
    "CompositeResult",
    "FinalizeInfo",
    "RenderOptions",
    "RenderSummary",
    "RenderedFrame",
    "SegmentInfo",
    "TargetFrames",
    "composite_frame",
    "correct_jaw",
    "fade_weights",
    "factor_score",
    "frame_confidence",
    "encode_segment",
    "finalize",
    "inner_opening",
    "jaw_displacement",
    "pyramid_blend",
    "render_frames",
    "render_segment",
    "target_color",
]
