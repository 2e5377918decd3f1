"""Pure core of the `composite` stage: render a chunk of output frames into an H.264 segment; join and mux the result.

Per output frame i of a chunk: the re-timed target frame k = frame_map[i] is decoded (sequentially, one keyframe
seek at most per backward jump: `TargetFrames`), and when it has a face and texture i is valid, the synthesized
canonical texture is warped into its geometry, the jaw corrected, and the texture blended in (render.py);
otherwise the decoded frame passes through byte for byte. Frames are encoded at the target's size and frame
rate (encode.py), and `finalize` joins the segments and muxes the audio.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

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

VideoSource = bytes | bytearray | memoryview | str | os.PathLike
"""A video given as its encoded bytes or as a filesystem path."""


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
    """

    jaw_correction: bool = True
    pyramid_levels: int = 4
    feather_px: float = 0.0
    color_match: str = "mean_std"
    crf: int = DEFAULT_CRF
    x264_preset: str = DEFAULT_PRESET
    jaw_gain: float = JAW_GAIN
    encoder_threads: int = 0

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
        composited: True when a texture was blended in; False when the decoded target frame passes through as is.
        jaw_shift_px: Largest jaw displacement applied, target pixels.
    """

    image: np.ndarray
    target_index: int
    composited: bool
    jaw_shift_px: float = 0.0


@dataclass(frozen=True)
class RenderSummary:
    """What `render_segment` did (composite.v1.RenderResult without the storage fields).

    Attributes:
        frames_written: Frames encoded (the chunk's length).
        frames_composited: Frames where a texture was blended in.
        frames_passthrough: Frames passed through untouched.
        width: Width in pixels (the target's).
        height: Height in pixels (the target's).
        fps: Frame rate of the segment.
        color: YUV matrix the segment was encoded and tagged with.
    """

    frames_written: int
    frames_composited: int
    frames_passthrough: int
    width: int
    height: int
    fps: Fraction
    color: ColorSpec


# ---------------------------------------------------------------------- target decoding
def _open(source: VideoSource) -> av.container.InputContainer:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if not data:
            raise InvalidInput("target video is empty (0 bytes)")
        handle: object = io.BytesIO(data)
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file() or path.stat().st_size == 0:
            raise InvalidInput(f"target video {str(path)!r} does not exist or is empty")
        handle = str(path)
    else:
        raise InvalidInput(f"target video must be bytes or a path, got {type(source).__name__}")
    try:
        container = av.open(handle, mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise InvalidInput(f"target video cannot be decoded: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise InvalidInput("target video has no video stream")
    return container


def _rotation(frame: av.VideoFrame) -> int:
    """Display rotation, clockwise degrees in {0, 90, 180, 270} (as the face stage applies it)."""
    try:
        ccw = frame.rotation
    except (AttributeError, ValueError):
        return 0
    if not ccw or not np.isfinite(ccw):
        return 0
    return int(round(-ccw / 90.0)) % 4 * 90


def _to_bgr(frame: av.VideoFrame) -> np.ndarray:
    image = frame.to_ndarray(format="bgr24")
    turn = _rotation(frame)
    return image if turn == 0 else np.ascontiguousarray(np.rot90(image, k=-(turn // 90)))


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
        container = _open(self.source)
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
                        return _to_bgr(frame)
                    if index > k:
                        raise _LostTrack  # a seek landed after the wanted frame
                    if self._last_use.get(index, -1) > position and len(self._cache) < self.max_cached:
                        self._cache.setdefault(index, _to_bgr(frame))
                raise InvalidInput(f"target frame {k} is out of range: the video holds {self._next_index} frames")
            except _LostTrack:
                if not self._seeked:
                    raise InvalidInput(f"target frame {k} cannot be located in the video") from None
                self._open_decoder(k, seek=False)  # the timestamps do not place the frames: decode from the start


class _LostTrack(Exception):
    """A seek landed somewhere the timestamps cannot place."""


def target_color(source: VideoSource) -> ColorSpec:
    """The YUV matrix PyAV decodes the target with (its first frame's tags; BT.601 when untagged)."""
    container = _open(source)
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
) -> Iterator[RenderedFrame]:
    """Composite a chunk of output frames; the inputs are checked before the iterator is returned.

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

    Returns:
        An iterator of n RenderedFrame, in output order, at the target's native size.

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
    reader = TargetFrames(target, fmap, timestamps=timestamps, decode_threads=decode_threads)
    extras = (mouth_shapes, texture_masks, mean_jaw_lines)
    return _render(reader, fmap, lms, valid, tex, tex_valid, *extras, geometry, opts)


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
) -> Iterator[RenderedFrame]:
    settings = opts.blend
    with reader:
        for i, (k, frame) in enumerate(reader):
            if not (valid[k] and tex_valid[i]):
                yield RenderedFrame(frame, k, False)
                continue
            try:
                result: CompositeResult = composite_frame(
                    frame,
                    lms[k],
                    tex[i],
                    geometry=geometry,
                    synth_mouth=None if mouth_shapes is None else mouth_shapes[i],
                    mean_jaw=None if mean_jaw_lines is None else mean_jaw_lines[i],
                    texture_mask=None if texture_masks is None else texture_masks[i],
                    settings=settings,
                )
            except InvalidInput:
                # Degenerate landmarks on one frame: show the frame rather than fail the chunk.
                yield RenderedFrame(frame, k, False)
                continue
            yield RenderedFrame(result.image, k, result.composited, result.jaw_shift_px)


def render_segment(
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
) -> RenderSummary:
    """Render a chunk (`render_frames`) and encode it as one H.264 segment (`encode_segment`).

    Args:
        target, frame_map, landmarks, face_valid, textures, mouth_shapes, texture_valid, texture_masks,
            mean_jaw_lines, timestamps, geometry, options, decode_threads: as `render_frames`.
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
    )
    spec = color or target_color(target)
    n = len(frame_map)
    counts = {"composited": 0, "passthrough": 0}

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
    "encode_segment",
    "finalize",
    "inner_opening",
    "jaw_displacement",
    "pyramid_blend",
    "render_frames",
    "render_segment",
    "target_color",
]
