"""H.264 segment encoding and the final mux (segments joined without re-encoding, audio as AAC), with PyAV.

Colour: PyAV converts a decoded frame to BGR with the matrix its stream is tagged with, and with BT.601 when it is
untagged (FFmpeg's default; the face stage decodes the same way). `encode_segment` converts back with the same
matrix (`ColorSpec.from_decoded`), limited range, and tags the output with it, so a decoder that honours the tags
(FFmpeg, PyAV, browsers) gets the composited BGR values back. An untagged HD target is therefore tagged BT.601 in
the output, although players tend to show untagged HD as BT.709.

Timestamps: a segment's frame i has pts start_frame + i in a time base of 1 / fps (exact for 30000/1001). mp4
stores a non-zero start as an edit list rounded to the movie timescale (ms), so `finalize` never trusts a
segment's absolute times: it re-bases every segment's packets to its first frame and offsets them by the frames
of the segments before it, in a time base of 1 / fps.numerator (one frame = fps.denominator ticks). Decoding
times get one delay for the whole stream (the largest of the segments'), so they increase across joins.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from services.runtime.errors import Cancelled, InvalidInput
from services.runtime.media import MediaSource, open_container

MediaSink = str | os.PathLike | io.IOBase
"""Where an mp4 is written: a path or a writable binary file object."""

X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)
DEFAULT_PRESET = "veryfast"
DEFAULT_CRF = 18
DEFAULT_AUDIO_KBPS = 128

# FFmpeg AVColorSpace / AVColorPrimaries / AVColorTransferCharacteristic codes.
_MATRIX_CODES = {"bt709": 1, "bt601": 6, "bt2020": 9}
_DEFAULT_PRIMARIES = {"bt709": 1, "bt601": 6, "bt2020": 9}
_DEFAULT_TRC = {"bt709": 1, "bt601": 6, "bt2020": 14}
_RANGE_MPEG = 1  # limited ("tv") range
_SWS_MATRIX = {"bt601": "itu601", "bt709": "itu709", "bt2020": "bt2020"}  # PyAV reformatter names


@dataclass(frozen=True)
class ColorSpec:
    """The YUV matrix (and the primaries / transfer tags) a video is encoded and tagged with.

    Attributes:
        matrix: "bt601", "bt709" or "bt2020" (non-constant luminance).
        primaries: FFmpeg AVColorPrimaries code written to the stream.
        transfer: FFmpeg AVColorTransferCharacteristic code written to the stream.
    """

    matrix: str = "bt601"
    primaries: int = 6
    transfer: int = 6

    @classmethod
    def from_decoded(cls, colorspace: int, primaries: int = 2, transfer: int = 2) -> ColorSpec:
        """The spec matching how PyAV decoded a stream with these AVColorSpace / primaries / transfer codes.

        Untagged (2) and BT.601 variants (5, 6) decode as BT.601, BT.709 (1) as BT.709, BT.2020 (9, 10) as BT.2020;
        anything else decodes as BT.601 too. Unspecified primaries / transfer get the matrix's usual values.
        """
        code = int(colorspace)
        matrix = "bt709" if code == 1 else "bt2020" if code in (9, 10) else "bt601"
        prim = int(primaries) if primaries not in (0, 2, None) else _DEFAULT_PRIMARIES[matrix]
        trc = int(transfer) if transfer not in (0, 2, None) else _DEFAULT_TRC[matrix]
        return cls(matrix, prim, trc)

    @property
    def colorspace_code(self) -> int:
        """AVColorSpace code of the matrix (6 = SMPTE 170M for BT.601)."""
        return _MATRIX_CODES[self.matrix]


BT601 = ColorSpec()


@dataclass(frozen=True)
class SegmentInfo:
    """What `encode_segment` wrote.

    Attributes:
        frames_written: Frames encoded.
        width: Frame width, pixels.
        height: Frame height, pixels.
        fps: Frame rate (exact).
        start_frame: pts of the first frame, in frames.
        color: Matrix and tags used.
    """

    frames_written: int
    width: int
    height: int
    fps: Fraction
    start_frame: int
    color: ColorSpec


@dataclass(frozen=True)
class FinalizeInfo:
    """What `finalize` wrote.

    Attributes:
        frame_count: Video frames in the output.
        width: Width, pixels.
        height: Height, pixels.
        fps: Frame rate (exact).
        duration_seconds: Duration of the video stream (frame_count / fps).
        audio_duration_seconds: Duration of the input audio (decoded samples / rate); the AAC stream lasts as long.
        audio_sample_rate_hz: Sample rate of the AAC stream.
        frames_added: Frames appended (last frame repeated) to reach the audio's length; 0 normally.
        frames_dropped: Frames removed from the end to match the audio's length; 0 normally.
    """

    frame_count: int
    width: int
    height: int
    fps: Fraction
    duration_seconds: float
    audio_duration_seconds: float
    audio_sample_rate_hz: int
    frames_added: int = 0
    frames_dropped: int = 0


def check_fps(fps: Fraction | int | float | str) -> Fraction:
    """The frame rate as an exact positive Fraction (floats are snapped to a denominator of at most 1001)."""
    try:
        rate = Fraction(fps) if not isinstance(fps, float) else Fraction(fps).limit_denominator(1001)
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise InvalidInput(f"frame rate {fps!r} is not a number") from exc
    if not (0 < rate <= 1000):
        raise InvalidInput(f"frame rate must be in (0, 1000] fps, got {fps}")
    return rate


def _check_encoder_options(crf: int, preset: str) -> None:
    if not (isinstance(crf, int | np.integer) and 0 <= int(crf) <= 51):
        raise InvalidInput(f"crf must be an integer in [0, 51], got {crf!r}")
    if preset not in X264_PRESETS:
        raise InvalidInput(f"x264 preset must be one of {X264_PRESETS}, got {preset!r}")


def _open_output(sink: MediaSink, options: dict[str, str] | None = None) -> av.container.OutputContainer:
    if isinstance(sink, str | os.PathLike):
        return av.open(str(sink), mode="w", format="mp4", options=options or {})
    if hasattr(sink, "write"):
        return av.open(sink, mode="w", format="mp4", options=options or {})
    raise InvalidInput(f"output must be a path or a writable file object, got {type(sink).__name__}")


# ---------------------------------------------------------------------- segments
def encode_segment(
    frames: Iterable[np.ndarray],
    *,
    width: int,
    height: int,
    fps: Fraction,
    path_or_buffer: MediaSink,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
    color: ColorSpec = BT601,
    start_frame: int = 0,
    threads: int = 0,
) -> SegmentInfo:
    """Encode BGR frames as one H.264 (yuv420p, libx264) mp4 segment without audio, starting with an IDR frame.

    Args:
        frames: uint8 [height, width, 3] BGR frames, consumed lazily (a generator is fine).
        width: Frame width, even, >= 2.
        height: Frame height, even, >= 2.
        fps: Exact frame rate, e.g. Fraction(30000, 1001).
        path_or_buffer: Output path or writable binary file object.
        crf: libx264 constant rate factor, 0-51 (0 = lossless).
        preset: libx264 preset (X264_PRESETS).
        color: YUV matrix for the BGR -> YUV conversion, also tagged in the stream (with limited range).
        start_frame: pts of the first frame in frames (time base 1 / fps), >= 0. `finalize` does not need it.
        threads: x264 threads; 0 = x264's choice, 1 = one core.

    Returns:
        The SegmentInfo.

    Raises:
        InvalidInput: bad size, rate or options, a frame of another shape or dtype, or no frame at all.
    """
    rate = check_fps(fps)
    _check_encoder_options(crf, preset)
    if width < 2 or height < 2 or width % 2 or height % 2:
        raise InvalidInput(f"frame size must be even and >= 2 for yuv420p, got {width}x{height}")
    if start_frame < 0:
        raise InvalidInput(f"start_frame must be >= 0, got {start_frame}")
    time_base = 1 / rate
    matrix = _SWS_MATRIX[color.matrix]
    written = 0
    with _open_output(path_or_buffer) as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height = int(width), int(height)
        stream.pix_fmt = "yuv420p"
        ctx = stream.codec_context
        ctx.time_base = time_base
        ctx.colorspace = color.colorspace_code
        ctx.color_primaries = color.primaries
        ctx.color_trc = color.transfer
        ctx.color_range = _RANGE_MPEG
        ctx.thread_count = max(int(threads), 0)
        stream.options = {"crf": str(int(crf)), "preset": preset}
        for image in frames:
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != (height, width, 3):
                got = getattr(image, "shape", type(image).__name__), getattr(image, "dtype", "")
                raise InvalidInput(f"frame {written} must be uint8 [{height}, {width}, 3], got {got}")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
            frame = frame.reformat(format="yuv420p", dst_colorspace=matrix, dst_color_range=_RANGE_MPEG)
            frame.pts = start_frame + written
            frame.time_base = time_base
            out.mux(stream.encode(frame))
            written += 1
        if written == 0:
            raise InvalidInput("no frame to encode")
        out.mux(stream.encode())
    return SegmentInfo(written, int(width), int(height), rate, int(start_frame), color)


@dataclass(frozen=True)
class _SegmentMeta:
    frames: int
    first_pts: int
    first_dts: int
    time_base: Fraction
    width: int
    height: int
    extradata: bytes
    rate: Fraction | None


def _read_packets(container: av.container.InputContainer, index: int) -> Iterator[av.Packet]:
    stream = container.streams.video[0]
    try:
        for packet in container.demux(stream):
            if packet.size > 0 and packet.pts is not None and packet.dts is not None:
                yield packet
    except av.FFmpegError as exc:
        raise InvalidInput(f"segment {index} cannot be read: {exc}") from exc


def _probe_segment(source: MediaSource, index: int) -> _SegmentMeta:
    """Stream facts and frame count of a segment (its packets are read, not decoded)."""
    with open_container(source, what=f"segment {index}") as container:
        if not container.streams.video:
            raise InvalidInput(f"segment {index} has no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx.name != "h264":
            raise InvalidInput(f"segment {index} is {ctx.name}, not h264")
        frames, first_pts, first_dts = 0, None, None
        for packet in _read_packets(container, index):
            frames += 1
            first_pts = packet.pts if first_pts is None else min(first_pts, packet.pts)
            first_dts = packet.dts if first_dts is None else min(first_dts, packet.dts)
        if frames == 0:
            raise InvalidInput(f"segment {index} holds no frame")
        rate = stream.guessed_rate or stream.average_rate
        return _SegmentMeta(
            frames=frames,
            first_pts=int(first_pts),
            first_dts=int(first_dts),
            time_base=Fraction(stream.time_base),
            width=int(ctx.width),
            height=int(ctx.height),
            extradata=bytes(ctx.extradata or b""),
            rate=Fraction(rate) if rate else None,
        )


def _segment_frames(source: MediaSource) -> tuple[ColorSpec, Iterator[np.ndarray]]:
    """The colour spec a segment is tagged with and an iterator over its frames as BGR (decoded lazily)."""
    container = open_container(source, what="segment")
    frames = container.decode(video=0)
    try:
        first = next(frames)
    except (StopIteration, av.FFmpegError) as exc:
        container.close()
        raise InvalidInput(f"segment cannot be decoded: {exc}") from exc
    color = ColorSpec.from_decoded(first.colorspace, first.color_primaries, first.color_trc)

    def images() -> Iterator[np.ndarray]:
        try:
            yield first.to_ndarray(format="bgr24")
            for frame in frames:
                yield frame.to_ndarray(format="bgr24")
        finally:
            container.close()

    return color, images()


# ---------------------------------------------------------------------- audio
def _decode_audio(source: MediaSource, sample_rate: int) -> tuple[np.ndarray, int, str, float]:
    """Decode audio to float32 planar [channels, samples] at `sample_rate` (0 = native); also rate, layout, duration."""
    container = open_container(source, what="audio")
    try:
        if not container.streams.audio:
            raise InvalidInput("audio has no audio stream")
        stream = container.streams.audio[0]
        native = int(stream.codec_context.sample_rate or 0)
        if native <= 0:
            raise InvalidInput("audio stream has no sample rate")
        channels = int(stream.codec_context.channels or 1)
        layout = "mono" if channels == 1 else "stereo"
        rate = int(sample_rate) or native
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        chunks = []
        native_samples = 0
        try:
            for frame in container.decode(stream):
                native_samples += frame.samples
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
        except av.FFmpegError as exc:
            raise InvalidInput(f"audio cannot be decoded: {exc}") from exc
        if native_samples == 0:
            raise InvalidInput("audio holds no samples")
        samples = np.concatenate(chunks, axis=1) if chunks else np.zeros((1 if layout == "mono" else 2, 0))
        # The duration is the input's own (samples / native rate); the resampled signal is cut or padded to it.
        duration = native_samples / native
        want = int(round(duration * rate))
        if samples.shape[1] >= want:
            samples = samples[:, :want]
        else:
            samples = np.pad(samples, ((0, 0), (0, want - samples.shape[1])))
        return np.ascontiguousarray(samples, dtype=np.float32), rate, layout, duration
    finally:
        container.close()


def _encode_audio(
    out: av.container.OutputContainer, samples: np.ndarray, rate: int, layout: str, bitrate_kbps: int
) -> tuple[av.audio.stream.AudioStream, list[av.Packet]]:
    stream = out.add_stream("aac", rate=rate, layout=layout)
    stream.bit_rate = int(bitrate_kbps) * 1000
    stream.codec_context.time_base = Fraction(1, rate)
    packets: list[av.Packet] = []
    frame_size = 1024
    for start in range(0, samples.shape[1], frame_size):
        block = np.ascontiguousarray(samples[:, start : start + frame_size])
        frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        packets.extend(stream.encode(frame))
    packets.extend(stream.encode(None))
    return stream, packets


# ---------------------------------------------------------------------- finalize
def finalize(
    segments: Sequence[MediaSource],
    audio: MediaSource,
    out_path: MediaSink,
    *,
    fps: Fraction,
    audio_bitrate_kbps: int = DEFAULT_AUDIO_KBPS,
    audio_sample_rate_hz: int = 0,
    faststart: bool = True,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FinalizeInfo:
    """Join H.264 segments in order (packets remuxed, not re-encoded) and mux the audio as AAC into one mp4.

    The video's duration matches the audio's within one frame: when the segments hold N frames and the audio lasts
    D seconds with |N / fps - D| > 1 / fps, only the last segment is re-encoded (its frames decoded, the last one
    repeated or the extra ones dropped, so the output holds round(D x fps) frames), with `crf` and `preset`; those
    must be the segments' own settings, since a joined stream has one set of H.264 parameter sets.

    Args:
        segments: Segment mp4s (`encode_segment`) in output order, as bytes or paths; at least one.
        audio: The audio (WAV or anything FFmpeg decodes), bytes or path.
        out_path: Output mp4 path or writable binary file object.
        fps: Exact frame rate of the segments (the target's), e.g. Fraction(30000, 1001).
        audio_bitrate_kbps: AAC bit rate, 8-512 kbit/s.
        audio_sample_rate_hz: AAC sample rate; 0 = the audio's own.
        faststart: Put the mp4 index first (streaming playback).
        crf: libx264 CRF the segments were encoded with (used only when the tail is re-encoded).
        preset: libx264 preset the segments were encoded with (idem).
        progress: Called as progress(segments_done, segments_total).
        should_stop: Polled between segments; True raises Cancelled.

    Returns:
        The FinalizeInfo.

    Raises:
        InvalidInput: no segments, unreadable or non-H.264 segments, different sizes, rates or encoder settings, no
            audio, bad options.
        Cancelled: should_stop returned True.
    """
    rate = check_fps(fps)
    if not segments:
        raise InvalidInput("no segments to join")
    if faststart and not isinstance(out_path, str | os.PathLike):
        # FFmpeg moves the index by re-reading the finished file by name: go through a temporary file.
        with tempfile.TemporaryDirectory(prefix="a2v-finalize-") as folder:
            path = Path(folder) / "output.mp4"
            info = finalize(
                segments,
                audio,
                path,
                fps=rate,
                audio_bitrate_kbps=audio_bitrate_kbps,
                audio_sample_rate_hz=audio_sample_rate_hz,
                faststart=True,
                crf=crf,
                preset=preset,
                progress=progress,
                should_stop=should_stop,
            )
            with open(path, "rb") as handle:
                shutil.copyfileobj(handle, out_path)
            return info
    _check_audio_options(audio_bitrate_kbps, audio_sample_rate_hz)
    _check_encoder_options(crf, preset)
    samples, sample_rate, layout, audio_duration = _decode_audio(audio, int(audio_sample_rate_hz))
    sources: list[MediaSource] = list(segments)
    metas = _probe_segments(sources, rate, should_stop)

    total = sum(m.frames for m in metas)
    wanted = max(int(round(audio_duration * rate)), 1)
    added = dropped = 0
    if abs(Fraction(total) / rate - Fraction(audio_duration)) > 1 / rate:
        added, dropped = _fit_tail(metas, sources, wanted - total, rate=rate, crf=crf, preset=preset)
        total = sum(m.frames for m in metas)

    options = {"movflags": "+faststart"} if faststart else {}
    with _open_output(out_path, options) as out:
        template_container = open_container(sources[0], what="segment 0")
        try:
            video = out.add_stream_from_template(template_container.streams.video[0])
        finally:
            template_container.close()
        _, audio_packets = _encode_audio(out, samples, sample_rate, layout, audio_bitrate_kbps)
        _mux_interleaved(
            out, video, sources, metas, audio_packets, rate=rate, progress=progress, should_stop=should_stop
        )
    return FinalizeInfo(
        frame_count=total,
        width=metas[0].width,
        height=metas[0].height,
        fps=rate,
        duration_seconds=float(total / rate),
        audio_duration_seconds=float(audio_duration),
        audio_sample_rate_hz=sample_rate,
        frames_added=added,
        frames_dropped=dropped,
    )


def _check_audio_options(audio_bitrate_kbps: int, audio_sample_rate_hz: int) -> None:
    if not (8 <= int(audio_bitrate_kbps) <= 512):
        raise InvalidInput(f"audio bit rate must be in [8, 512] kbit/s, got {audio_bitrate_kbps}")
    if audio_sample_rate_hz and not (8000 <= int(audio_sample_rate_hz) <= 96000):
        raise InvalidInput(f"audio sample rate must be 0 or in [8000, 96000] Hz, got {audio_sample_rate_hz}")


def _probe_segments(
    sources: list[MediaSource], rate: Fraction, should_stop: Callable[[], bool] | None
) -> list[_SegmentMeta]:
    """Each segment's packet facts, checked to join: one size, the frame rate, the same H.264 settings."""
    metas: list[_SegmentMeta] = []
    for i, source in enumerate(sources):
        if should_stop is not None and should_stop():
            raise Cancelled(f"finalize cancelled after checking {i} segments")
        meta = _probe_segment(source, i)
        first = metas[0] if metas else meta
        if (meta.width, meta.height) != (first.width, first.height):
            raise InvalidInput(f"segment {i} is {meta.width}x{meta.height}, segment 0 is {first.width}x{first.height}")
        if meta.rate is not None and meta.frames > 1 and abs(meta.rate - rate) > rate / 1000:
            raise InvalidInput(f"segment {i} runs at {float(meta.rate):.4f} fps, not {float(rate):.4f}")
        if meta.extradata != first.extradata:
            raise InvalidInput(f"segment {i} was encoded with other H.264 settings than segment 0")
        metas.append(meta)
    return metas


def _mux_interleaved(
    out: av.container.OutputContainer,
    video: av.video.stream.VideoStream,
    sources: list[MediaSource],
    metas: list[_SegmentMeta],
    audio_packets: list[av.Packet],
    *,
    rate: Fraction,
    progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> None:
    """Write the segments' packets one after the other (re-timed to follow each other), the audio interleaved."""
    audio_packets = [p for p in audio_packets if p.dts is not None]
    audio_times = [p.dts * Fraction(p.time_base) for p in audio_packets]
    next_audio = 0
    video_tb = Fraction(1, rate.numerator)
    frame_ticks = rate.denominator
    # One decoding delay for the whole stream (x264 gives a one-frame segment none, longer ones 1-2 frames):
    # each segment's decoding times move back so they follow each other; pts never change.
    delay = max(round((m.first_pts - m.first_dts) * m.time_base / video_tb) for m in metas)
    offset = 0
    last_dts = None
    for i, (source, meta) in enumerate(zip(sources, metas, strict=True)):
        if should_stop is not None and should_stop():
            raise Cancelled(f"finalize cancelled after joining {i} segments")
        with open_container(source, what=f"segment {i}") as container:
            for packet in _read_packets(container, i):
                pts = round((packet.pts - meta.first_pts) * meta.time_base / video_tb) + offset * frame_ticks
                dts = round((packet.dts - meta.first_dts) * meta.time_base / video_tb) + offset * frame_ticks - delay
                if last_dts is not None and dts <= last_dts:
                    raise InvalidInput(f"segment {i} does not join: decoding times overlap the previous segment")
                last_dts = dts
                # Audio first up to this video packet's decoding time: the file is interleaved as written.
                while next_audio < len(audio_packets) and audio_times[next_audio] < dts * video_tb:
                    out.mux(audio_packets[next_audio])
                    next_audio += 1
                packet.stream = video
                packet.time_base = video_tb
                packet.pts, packet.dts = pts, dts
                packet.duration = frame_ticks
                out.mux(packet)
        offset += meta.frames
        if progress is not None:
            progress(i + 1, len(sources))
    for packet in audio_packets[next_audio:]:
        out.mux(packet)


def _fit_tail(
    metas: list[_SegmentMeta],
    sources: list[MediaSource],
    change: int,
    *,
    rate: Fraction,
    crf: int,
    preset: str,
) -> tuple[int, int]:
    """Change the total frame count by `change` by re-encoding the end of the video; returns (added, dropped).

    `change` > 0 repeats the last frame; < 0 drops whole trailing segments while they fit in the cut, then the
    last remaining segment's trailing frames. Updates `metas` and `sources` in place.
    """
    dropped = 0
    while change < 0 and len(metas) > 1 and metas[-1].frames <= -change:
        change += metas[-1].frames
        dropped += metas.pop().frames
        sources.pop()
    if change == 0:
        return 0, dropped
    color, frames = _segment_frames(sources[-1])
    last = metas[-1]
    keep = max(last.frames + change, 1)
    if change < 0:
        dropped += last.frames - keep

    def fitted() -> Iterator[np.ndarray]:
        last_image = None
        for i, image in enumerate(frames):
            if i >= keep:
                break
            last_image = image
            yield image
        for _ in range(max(change, 0)):
            yield last_image

    buffer = io.BytesIO()
    try:
        encode_segment(
            fitted(),
            width=last.width,
            height=last.height,
            fps=rate,
            path_or_buffer=buffer,
            crf=crf,
            preset=preset,
            color=color,
        )
    finally:
        frames.close()
    replacement = _probe_segment(buffer.getvalue(), len(metas) - 1)
    if replacement.extradata != metas[0].extradata:
        raise InvalidInput(
            "the video's end must be re-encoded to match the audio's length, but the given crf / preset differ "
            "from the segments' own: pass the settings they were rendered with"
        )
    metas[-1] = replacement
    sources[-1] = buffer.getvalue()
    return max(change, 0), dropped


__all__ = [
    "BT601",
    "DEFAULT_CRF",
    "DEFAULT_PRESET",
    "X264_PRESETS",
    "ColorSpec",
    "FinalizeInfo",
    "SegmentInfo",
    "check_fps",
    "encode_segment",
    "finalize",
]
