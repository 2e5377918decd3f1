"""Media containers (PyAV), written once for every stage.

Opening a container from bytes or a path with one set of error messages, the display rotation of a
decoded frame and its BGR image with that rotation applied, a video's probe, and sequential frame
iteration with the container's real timestamps.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from services.runtime.errors import A2VError, InvalidInput, TooLarge

MediaSource = bytes | bytearray | memoryview | str | os.PathLike
"""A media file given as its encoded bytes or as a filesystem path."""

VideoSource = MediaSource
"""A video given as its encoded bytes or as a filesystem path."""

# Nominal rates that containers approximate (e.g. 29.97 stored as 2997/100 or 1798201/60000);
# an average within SNAP_TOLERANCE of one of them is reported as that exact rational.
STANDARD_RATES = tuple(
    Fraction(n, d)
    for n, d in (
        (24000, 1001),
        (24, 1),
        (25, 1),
        (30000, 1001),
        (30, 1),
        (48, 1),
        (50, 1),
        (60000, 1001),
        (60, 1),
        (100, 1),
        (120000, 1001),
        (120, 1),
        (15, 1),
        (12, 1),
        (10, 1),
    )
)
SNAP_TOLERANCE = 2e-4
# Header rates that differ by more than this (relative) mark a variable-frame-rate stream.
VFR_RATE_TOLERANCE = 5e-3


@dataclass(frozen=True)
class VideoInfo:
    """Facts about a video stream.

    Attributes:
        width: Frame width in pixels after the container's rotation is applied (portrait stays portrait).
        height: Frame height in pixels after rotation.
        frame_count: Number of frames. From `probe_video` it is the header's count or an estimate from
            duration x rate (0 = unknown); `analyze_video` replaces it with the exact decoded count.
        fps_num: Numerator of the nominal frame rate, an exact rational (30000 for NTSC 29.97).
        fps_den: Denominator of the nominal frame rate (1001 for NTSC 29.97).
        duration_seconds: Duration of the video stream in seconds (header; 0.0 when unknown).
        codec: FFmpeg codec name, e.g. "h264", "hevc", "mpeg2video".
        rotation_degrees: Rotation applied from the display matrix, degrees clockwise (0, 90, 180, 270).
        variable_frame_rate: True when timestamps are not evenly spaced. From `probe_video` this is a
            header guess (average and nominal rates disagree); `analyze_video` decides from the decoded
            timestamps.
        has_audio: True when the container also holds an audio stream.
        coded_width: Width of the decoded pictures before rotation.
        coded_height: Height of the decoded pictures before rotation.
    """

    width: int
    height: int
    frame_count: int
    fps_num: int
    fps_den: int
    duration_seconds: float
    codec: str
    rotation_degrees: int = 0
    variable_frame_rate: bool = False
    has_audio: bool = False
    coded_width: int = 0
    coded_height: int = 0

    @property
    def fps(self) -> float:
        """Nominal frame rate as a float (29.97002997... for 30000/1001)."""
        return self.fps_num / self.fps_den

    @property
    def frame_rate(self) -> Fraction:
        """Nominal frame rate as an exact fraction."""
        return Fraction(self.fps_num, self.fps_den)


def open_container(
    source: MediaSource,
    *,
    what: str = "video",
    require_video: bool = False,
    missing: type[A2VError] = InvalidInput,
) -> av.container.InputContainer:
    """Open a media container for reading, mapping every failure to one of our errors.

    Args:
        source: Encoded bytes or a filesystem path.
        what: What the source is, for the messages ("audio", "target video", "segment 3").
        require_video: Refuse a container without a video stream.
        missing: The error raised for a path that does not exist (InvalidInput or NotFound).

    Returns:
        The open container; the caller closes it.

    Raises:
        InvalidInput: empty input, a source that is neither bytes nor a path, undecodable bytes, no
            video stream where one is required.
        A2VError: `missing` for a path that does not exist.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if not data:
            raise InvalidInput(f"{what} is empty (0 bytes)")
        handle: object = io.BytesIO(data)
        name = f"{len(data)} bytes"
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.exists():
            raise missing(f"{what} file not found: {path}")
        if path.is_file() and path.stat().st_size == 0:
            raise InvalidInput(f"{what} is empty (0 bytes): {path}")
        handle = str(path)
        name = str(path)
    else:
        raise InvalidInput(f"{what} must be bytes or a path, got {type(source).__name__}")
    try:
        container = av.open(handle, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise InvalidInput(f"cannot decode {what} ({name}): {ffmpeg_reason(exc)}") from exc
    if require_video and not container.streams.video:
        container.close()
        raise InvalidInput(f"{what} has no video stream")
    return container


def ffmpeg_reason(exc: BaseException) -> str:
    """The reason FFmpeg gives for an error, without its errno prefix."""
    reason = getattr(exc, "strerror", None) or str(exc)
    return str(reason).strip() or type(exc).__name__


def _snap_rate(rate: Fraction) -> Fraction:
    for standard in STANDARD_RATES:
        if abs(rate - standard) <= standard * SNAP_TOLERANCE:
            return standard
    return rate


def _nominal_rate(stream: av.video.stream.VideoStream) -> tuple[Fraction, bool]:
    """Nominal frame rate of a stream and whether its header suggests a variable rate."""
    average = stream.average_rate
    guessed = stream.guessed_rate
    candidates = [Fraction(r) for r in (average, guessed, stream.base_rate) if r is not None and r > 0]
    if not candidates:
        raise InvalidInput("video stream has no frame rate in its header")
    average = Fraction(average) if average else None
    guessed = Fraction(guessed) if guessed else None
    vfr = bool(average and guessed and abs(average - guessed) > guessed * VFR_RATE_TOLERANCE)
    # For constant-rate streams the codec's rate (r_frame_rate) is exact while the average can carry
    # rounding of the container time base; a VFR stream's nominal rate is its average.
    rate = guessed if guessed and not vfr else candidates[0]
    rate = _snap_rate(rate)
    if rate > 1000:
        raise InvalidInput(f"video frame rate {float(rate):.1f} fps is implausible")
    return rate, vfr


def clockwise_rotation(frame: av.VideoFrame) -> int:
    """The frame's display rotation as clockwise degrees in {0, 90, 180, 270}."""
    try:
        ccw = frame.rotation
    except (AttributeError, ValueError):
        return 0
    if not ccw or not np.isfinite(ccw):
        return 0
    return int(round(-ccw / 90.0)) % 4 * 90


def rotate(image: np.ndarray, clockwise_degrees: int) -> np.ndarray:
    """An image turned clockwise by a multiple of 90 degrees (the same array when 0)."""
    if clockwise_degrees == 0:
        return image
    # np.rot90 rotates counter-clockwise for positive k.
    return np.ascontiguousarray(np.rot90(image, k=-(clockwise_degrees // 90)))


def to_bgr(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as BGR uint8 [H, W, 3] with its display rotation applied.

    The colour conversion is PyAV's: the stream's tagged matrix, BT.601 when untagged.
    """
    return rotate(frame.to_ndarray(format="bgr24"), clockwise_rotation(frame))


def probe_video(source: VideoSource, *, max_pixels: int = 4096 * 2304) -> VideoInfo:
    """Read a video's header and its first frame (to confirm it decodes and to read its rotation).

    Args:
        source: Encoded video bytes or a path. Any container/codec FFmpeg decodes.
        max_pixels: Largest accepted frame area (width x height); larger raises TooLarge. Default 4096 x 2304.

    Returns:
        The stream facts; `frame_count` comes from the header or is estimated (see VideoInfo).

    Raises:
        InvalidInput: empty or undecodable bytes, no video stream, no decodable frame.
        TooLarge: frames larger than `max_pixels`.
    """
    container = open_container(source, require_video=True)
    try:
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        coded_w, coded_h = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        rate, vfr = _nominal_rate(stream)
        try:
            first = next(iter(container.decode(stream)), None)
        except av.FFmpegError as exc:
            raise InvalidInput(f"video cannot be decoded: {exc}") from exc
        if first is None:
            raise InvalidInput("video stream holds no decodable frame")
        coded_w, coded_h = first.width, first.height
        rotation = clockwise_rotation(first)
        if coded_w < 2 or coded_h < 2:
            raise InvalidInput(f"video frames are {coded_w}x{coded_h} pixels, too small")
        if coded_w * coded_h > max_pixels:
            raise TooLarge(f"video frames are {coded_w}x{coded_h} pixels, above the limit of {max_pixels} pixels")
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1e6
        else:
            duration = 0.0
        frame_count = int(stream.frames or 0)
        if frame_count <= 0 and duration > 0:
            frame_count = int(round(duration * rate))
        width, height = (coded_h, coded_w) if rotation in (90, 270) else (coded_w, coded_h)
        return VideoInfo(
            width=width,
            height=height,
            frame_count=frame_count,
            fps_num=rate.numerator,
            fps_den=rate.denominator,
            duration_seconds=max(duration, 0.0),
            codec=codec,
            rotation_degrees=rotation,
            variable_frame_rate=vfr,
            has_audio=bool(container.streams.audio),
            coded_width=coded_w,
            coded_height=coded_h,
        )
    finally:
        container.close()


def iter_frames(
    source: VideoSource,
    *,
    start: int = 0,
    stop: int | None = None,
    decode_threads: int = 0,
) -> Iterator[tuple[int, float, np.ndarray]]:
    """Decode a video sequentially (no seeking) and yield its frames in presentation order.

    Timestamps come from each frame's pts in the stream time base, measured from the container's
    start time (the earliest start of any stream, so video and audio of one file share the origin).
    Variable frame rate is preserved. A frame without a pts (rare, broken streams) gets the previous
    timestamp plus one nominal frame period; timestamps are forced strictly increasing the same way.

    Args:
        source: Encoded video bytes or a path.
        start: First frame index to yield (earlier frames are decoded and dropped). >= 0.
        stop: Index after the last frame to yield; None = to the end.
        decode_threads: FFmpeg decoder threads; 0 = FFmpeg's choice (all usable cores), 1 = single-threaded.

    Yields:
        (index, timestamp_seconds, frame): index int from 0 over all decoded frames, timestamp float
        seconds, frame uint8 [H, W, 3] BGR with the container's rotation applied.

    Raises:
        InvalidInput: undecodable bytes, no video stream, bad range, a decoding error mid-stream.
    """
    if start < 0 or (stop is not None and stop < start):
        raise InvalidInput(f"bad frame range start={start} stop={stop}")
    container = open_container(source, require_video=True)
    try:
        stream = container.streams.video[0]
        if decode_threads != 1:
            stream.thread_type = "AUTO"
        stream.codec_context.thread_count = max(int(decode_threads), 0)
        rate, _ = _nominal_rate(stream)
        period = float(1 / rate)
        time_base = stream.time_base
        origin = container.start_time / 1e6 if container.start_time is not None else 0.0
        index = -1
        last_t = -np.inf
        try:
            for frame in container.decode(stream):
                index += 1
                if stop is not None and index >= stop:
                    break
                if frame.pts is not None and time_base is not None:
                    t = float(frame.pts * time_base) - origin
                else:
                    t = last_t + period if np.isfinite(last_t) else 0.0
                if t <= last_t:
                    t = last_t + period
                last_t = t
                if index < start:
                    continue
                yield index, t, to_bgr(frame)
        except av.FFmpegError as exc:
            raise InvalidInput(f"video cannot be decoded at frame {index + 1}: {exc}") from exc
    finally:
        container.close()
