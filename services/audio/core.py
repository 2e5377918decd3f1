"""Pure core of the `audio` stage: decode any audio to 16 kHz mono, 28-D speech features at 100 Hz, speech activity."""

from __future__ import annotations

import functools
import io
import math
import numbers
import os
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import av.error
import numpy as np
import scipy.fft
import scipy.ndimage

from services.runtime.errors import InvalidInput, NotFound, TooLarge
from services.runtime.media import ffmpeg_reason, open_container

SAMPLE_RATE = 16000
"""Rate of every decoded signal and of the feature analysis, in Hz."""
FEATURE_RATE = 100.0
"""Rows of `AudioFeatures.values` per second (10 ms hop)."""
FEATURE_DIM = 28
"""Columns of `AudioFeatures.values`: 13 MFCC + log energy, then their 14 first temporal derivatives."""

_AV_TIME_BASE = 1_000_000  # FFmpeg's AV_TIME_BASE: container start/duration are in microseconds
_BLOCK_FRAMES = 4096  # analysis frames per vectorised block: bounds memory on 30-minute inputs
_PROGRESS_EVERY_SECONDS = 10.0
# A declared duration can be a bit-rate estimate (VBR MP3 without a Xing header, ADTS) that overstates the
# truth; refuse on it alone only when it is clearly over, the exact check while decoding catches the rest
# after decoding at most `max_seconds` of audio.
_DECLARED_SLACK = 1.25

ProgressCallback = Callable[[float, float], None]
"""`progress(done_seconds, total_seconds)`; total is 0.0 when unknown. It may raise (e.g. `Cancelled`) to stop."""


@dataclass(frozen=True, eq=False)
class DecodedAudio:
    """Audio decoded, down-mixed and resampled for the pipeline.

    Attributes:
        samples: float32 [S], mono at `sample_rate`, clipped to [-1, 1]. Sample n covers the time
            interval [n / sample_rate, (n + 1) / sample_rate) s, time 0 = the start of the container.
            Read-only.
        sample_rate: Hz, always `SAMPLE_RATE` (16000).
        source_sample_rate: Hz of the source audio stream before resampling.
        source_channels: channel count of the source stream before down-mixing.
        source_codec: FFmpeg codec name of the source stream, e.g. "pcm_s16le", "mp3", "aac".
        duration_seconds: S / sample_rate.
        leading_silence_seconds: silence inserted before the first decoded sample because the audio
            stream starts after the container's start (e.g. an mp4 whose audio begins late); 0.0 for
            plain audio files.
    """

    samples: np.ndarray
    sample_rate: int
    source_sample_rate: int
    source_channels: int
    source_codec: str
    duration_seconds: float
    leading_silence_seconds: float = 0.0


@dataclass(frozen=True, eq=False)
class AudioFeatures:
    """Speech features at a fixed frame rate.

    Attributes:
        values: float32 [T, 2 * (n_mfcc + 1)] (= [T, 28] by default): columns 0..12 MFCC c0..c12,
            column 13 natural-log frame energy, columns 14..27 the first temporal derivatives of
            columns 0..13 in units per frame (per 10 ms). Not normalised. Read-only.
        times: float64 [T], centre time in seconds of each analysis window:
            times[k] = start_seconds + k / rate. Read-only.
        rate: rows per second (100.0 by default).
        start_seconds: times[0] = window / 2 (0.0125 s by default).
    """

    values: np.ndarray
    times: np.ndarray
    rate: float
    start_seconds: float = 0.0125


@dataclass(frozen=True, eq=False)
class SpeechActivity:
    """Where the audio holds speech, on the feature time base and on the output video time base.

    Attributes:
        per_feature_frame: bool [T], True = speech, one entry per row of `extract_features` run with
            the same window, hop and sample rate (same length, same centre times). Read-only.
        per_output_frame: float32 [N] in [0, 1], share of output frame i's interval
            [i / output_fps, (i + 1) / output_fps) (cut at the end of the audio) that is speech;
            empty when no output rate was given. Read-only.
        noise_floor_db: the file's noise floor, 10*log10 of the mean square of a frame (a full-scale
            sine is -3.0 dB), clamped at the digital-silence level.
        threshold_db: the level a frame had to reach to count as speech before bridging and pruning.
        output_fps: the output frame rate used for `per_output_frame` (None if none was given).
    """

    per_feature_frame: np.ndarray
    per_output_frame: np.ndarray
    noise_floor_db: float
    threshold_db: float
    output_fps: float | None = None

    @property
    def speech_fraction(self) -> float:
        """Share of feature frames marked as speech, in [0, 1] (0.0 for no frames)."""
        n = self.per_feature_frame.size
        return float(np.count_nonzero(self.per_feature_frame)) / n if n else 0.0


# ---------------------------------------------------------------------------------------------
# decoding


def decode_audio(
    source: bytes | bytearray | memoryview | str | os.PathLike,
    *,
    max_seconds: float = 1800.0,
    progress: ProgressCallback | None = None,
) -> DecodedAudio:
    """Decodes the audio track of anything FFmpeg reads to 16 kHz mono float32.

    WAV (int16/int24/int32/float32), MP3, M4A/AAC, FLAC, Ogg (Vorbis/Opus), and the audio of video
    containers (mp4, mkv, mpg with MP2, ...), at any rate and channel count. Channels are averaged to
    mono (a signal in one channel of a stereo file comes out at half amplitude); the rate is converted
    with FFmpeg's resampler (linear-phase filter with its delay compensated: no time shift). Time 0 is
    the container's start: when the audio stream starts later, silence is prepended so that audio time
    and the container's video timestamps agree. Packets that fail to decode are skipped (as FFmpeg's
    command line does); a file cut short decodes up to the cut.

    Args:
        source: the encoded file's bytes (read from memory) or a filesystem path.
        max_seconds: longest accepted duration in seconds, > 0. A file whose container declares more than
            1.25 x max_seconds is refused before decoding (the declared value may be a bit-rate estimate);
            otherwise decoding stops, and the file is refused, as soon as the decoded audio passes the limit.
        progress: optional `progress(done_seconds, total_seconds)` called about every 10 s of decoded
            audio (total 0.0 when the container does not declare a duration); it may raise to cancel.

    Returns:
        The decoded audio (see `DecodedAudio`), samples float32 [S] at 16 kHz.

    Raises:
        InvalidInput: empty input, undecodable bytes, no audio stream, zero decoded samples, non-finite
            samples, or a non-positive `max_seconds`.
        NotFound: `source` is a path that does not exist.
        TooLarge: the audio lasts longer than `max_seconds`.
    """
    if not (isinstance(max_seconds, int | float) and math.isfinite(max_seconds) and max_seconds > 0):
        raise InvalidInput(f"max_seconds must be a finite number > 0, got {max_seconds!r}")
    container = open_container(source, what="audio", missing=NotFound)
    try:
        return _decode_container(container, max_seconds=float(max_seconds), progress=progress)
    finally:
        container.close()


def _audio_stream(container: av.container.InputContainer) -> av.audio.stream.AudioStream:
    if not container.streams.audio:
        kinds = ", ".join(f"{s.type} {s.codec_context.name if s.codec_context else '?'}" for s in container.streams)
        raise InvalidInput(f"no audio stream in the input (streams: {kinds or 'none'})")
    try:
        return container.streams.best("audio") or container.streams.audio[0]
    except (AttributeError, av.error.FFmpegError):
        return container.streams.audio[0]


def _declared_seconds(container: av.container.InputContainer, stream: av.audio.stream.AudioStream) -> float | None:
    """Duration the headers declare (the audio stream's own when present), None when unknown."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and container.duration > 0:
        return container.duration / _AV_TIME_BASE
    return None


def _packets(container: av.container.InputContainer, stream: av.audio.stream.AudioStream) -> Iterator[av.Packet]:
    """Demuxes the stream's packets; a demuxing error ends the stream like a truncated file."""
    demux = container.demux(stream)
    while True:
        try:
            packet = next(demux)
        except StopIteration:
            return
        except av.error.FFmpegError as exc:
            raise _DemuxStopped(exc) from exc
        yield packet


class _DemuxStopped(Exception):
    def __init__(self, cause: av.error.FFmpegError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _to_mono(frame: av.AudioFrame) -> np.ndarray:
    planes = frame.to_ndarray()  # fltp: [channels, samples]
    if planes.shape[0] == 1:
        return np.array(planes[0], dtype=np.float32)
    return planes.mean(axis=0, dtype=np.float32)


def _decode_container(
    container: av.container.InputContainer, *, max_seconds: float, progress: ProgressCallback | None
) -> DecodedAudio:
    stream = _audio_stream(container)
    declared = _declared_seconds(container, stream)
    if declared is not None and declared > max_seconds * _DECLARED_SLACK:
        raise TooLarge(f"audio lasts {declared:.1f} s, over the limit of {max_seconds:g} s")
    origin = container.start_time / _AV_TIME_BASE if container.start_time is not None else 0.0
    codec_context = stream.codec_context
    source_codec = (codec_context.codec.canonical_name if codec_context.codec else None) or codec_context.name
    source_rate = int(codec_context.sample_rate or 0)
    source_channels = int(codec_context.channels or 0)

    chunks: list[np.ndarray] = []
    resampler: av.AudioResampler | None = None
    setup: tuple | None = None
    leading = None  # seconds of silence before the first frame, set at the first frame
    decoded_seconds = 0.0
    next_report = _PROGRESS_EVERY_SECONDS
    failed_packets = 0
    first_failure: BaseException | None = None

    def flush() -> None:
        if resampler is not None:
            chunks.extend(_to_mono(out) for out in resampler.resample(None))

    try:
        for packet in _packets(container, stream):
            try:
                frames = packet.decode()
            except (av.error.FFmpegError, ValueError) as exc:
                failed_packets += 1
                first_failure = first_failure or exc
                continue
            for frame in frames:
                if leading is None:
                    start = frame.time
                    leading = max(0.0, start - origin) if start is not None else 0.0
                    decoded_seconds = leading
                    if leading > max_seconds:  # check before allocating the silence
                        raise TooLarge(
                            f"audio starts {leading:.1f} s after the start of the container, over the limit "
                            f"of {max_seconds:g} s"
                        )
                    if leading > 0:
                        chunks.append(np.zeros(round(leading * SAMPLE_RATE), np.float32))
                    source_rate = source_rate or frame.sample_rate
                    source_channels = source_channels or frame.layout.nb_channels
                decoded_seconds += frame.samples / frame.sample_rate
                if decoded_seconds > max_seconds:
                    declares = f"; the container declares {declared:.1f} s" if declared else ""
                    raise TooLarge(
                        f"audio lasts over the limit of {max_seconds:g} s (decoding stopped at "
                        f"{decoded_seconds:.1f} s{declares})"
                    )
                key = (frame.format.name, frame.layout.name, frame.layout.nb_channels, frame.sample_rate)
                if key != setup:  # FFmpeg streams may change layout or rate mid-way: restart the resampler
                    flush()
                    resampler = av.AudioResampler(format="fltp", rate=SAMPLE_RATE)
                    setup = key
                frame.pts = None  # we keep our own time line; avoids resampler gaps/overlaps from jittery pts
                chunks.extend(_to_mono(out) for out in resampler.resample(frame))
                if progress is not None and decoded_seconds >= next_report:
                    progress(decoded_seconds, declared or 0.0)
                    next_report = decoded_seconds + _PROGRESS_EVERY_SECONDS
    except _DemuxStopped as stopped:
        if leading is None:  # nothing decoded at all: the file is unreadable, not truncated
            raise InvalidInput(f"cannot decode audio: {ffmpeg_reason(stopped.cause)}") from stopped.cause
    flush()

    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if samples.size == 0:
        if first_failure is not None:
            raise InvalidInput(
                f"cannot decode audio: {ffmpeg_reason(first_failure)} ({failed_packets} packets failed to decode)"
            )
        raise InvalidInput("audio is empty (0 samples)")
    duration = samples.size / SAMPLE_RATE
    if duration > max_seconds + 1.0 / SAMPLE_RATE:  # one sample of rounding from the resampler is fine
        raise TooLarge(f"audio lasts {duration:.1f} s, over the limit of {max_seconds:g} s")
    bad = np.count_nonzero(~np.isfinite(samples))
    if bad:
        raise InvalidInput(f"audio contains {bad} non-finite samples (NaN or infinity)")
    np.clip(samples, -1.0, 1.0, out=samples)
    samples.flags.writeable = False
    if progress is not None:
        progress(duration, duration)
    return DecodedAudio(
        samples=samples,
        sample_rate=SAMPLE_RATE,
        source_sample_rate=source_rate,
        source_channels=source_channels,
        source_codec=str(source_codec),
        duration_seconds=duration,
        leading_silence_seconds=float(leading or 0.0),
    )


def encode_wav(audio: DecodedAudio) -> bytes:
    """Encodes decoded audio as a 16-bit PCM mono WAV file (for the final mux).

    Args:
        audio: decoded (and possibly loudness-normalised) audio; samples float32 [S] in [-1, 1].

    Returns:
        The bytes of a RIFF/WAVE file: PCM int16 little-endian, 1 channel, `audio.sample_rate` Hz,
        sample = round(x * 32768) clipped to [-32768, 32767] (the inverse of FFmpeg's s16 -> float).

    Raises:
        InvalidInput: no samples, not 1-D, or non-finite samples.
    """
    samples = _check_samples(audio.samples, what="audio.samples")
    pcm = np.clip(np.rint(samples.astype(np.float64) * 32768.0), -32768, 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(int(audio.sample_rate))
        writer.writeframes(pcm.tobytes())
    return buffer.getvalue()


def normalize_loudness(
    audio: DecodedAudio,
    *,
    target_rms_dbfs: float = -23.0,
    max_gain_db: float = 40.0,
    peak_ceiling: float = 0.99,
) -> DecodedAudio:
    """Scales the audio to a target RMS level (as `ffmpeg-normalize -nt rms`, the paper's volume step).

    The gain is one constant for the whole file, limited so that the peak stays at or below
    `peak_ceiling` (no clipping: the result may then end below the target) and to at most
    `max_gain_db` (so near-silent noise is not blown up). Digital silence is returned unchanged.

    Args:
        audio: decoded audio, samples float32 [S] in [-1, 1].
        target_rms_dbfs: wanted 20*log10(RMS) of the whole file (a full-scale sine is -3.0), < 0.
        max_gain_db: largest gain applied, dB >= 0. Attenuation is not limited.
        peak_ceiling: largest absolute sample value after the gain, in (0, 1].

    Returns:
        A new `DecodedAudio` with scaled samples and the same metadata.

    Raises:
        InvalidInput: bad samples or knob values.
    """
    samples = _check_samples(audio.samples, what="audio.samples")
    if not (math.isfinite(target_rms_dbfs) and target_rms_dbfs < 0):
        raise InvalidInput(f"target_rms_dbfs must be a finite level < 0 dBFS, got {target_rms_dbfs!r}")
    if not (math.isfinite(max_gain_db) and max_gain_db >= 0):
        raise InvalidInput(f"max_gain_db must be finite and >= 0, got {max_gain_db!r}")
    if not (0 < peak_ceiling <= 1):
        raise InvalidInput(f"peak_ceiling must be in (0, 1], got {peak_ceiling!r}")
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    peak = float(np.max(np.abs(samples)))
    if rms == 0.0 or peak == 0.0:
        return audio
    gain = min(10 ** (target_rms_dbfs / 20) / rms, 10 ** (max_gain_db / 20), peak_ceiling / peak)
    scaled = np.clip(samples * np.float32(gain), -1.0, 1.0).astype(np.float32)
    scaled.flags.writeable = False
    return DecodedAudio(
        samples=scaled,
        sample_rate=audio.sample_rate,
        source_sample_rate=audio.source_sample_rate,
        source_channels=audio.source_channels,
        source_codec=audio.source_codec,
        duration_seconds=audio.duration_seconds,
        leading_silence_seconds=audio.leading_silence_seconds,
    )


def output_frame_count(n_samples: int, output_fps: float | Fraction, *, sample_rate: int = SAMPLE_RATE) -> int:
    """N = ceil(duration * fps), computed exactly (no float round-off at whole-frame durations).

    Args:
        n_samples: samples of the audio, >= 0.
        output_fps: output frame rate, > 0; a float such as 29.97 or 30000/1001 is read as the nearest
            fraction with a denominator <= 1e6 (30000/1001 stays exact), or pass a `Fraction`.
        sample_rate: Hz of the samples.

    Returns:
        Output frames that cover the audio (the last one may extend past its end).
    """
    fps = _fps_fraction(output_fps)
    return math.ceil(Fraction(int(n_samples), int(sample_rate)) * fps)


def _fps_fraction(output_fps: float | Fraction) -> Fraction:
    if isinstance(output_fps, numbers.Rational) and not isinstance(output_fps, bool):
        fps = Fraction(int(output_fps.numerator), int(output_fps.denominator))
    elif isinstance(output_fps, numbers.Real) and not isinstance(output_fps, bool) and math.isfinite(output_fps):
        fps = Fraction(float(output_fps)).limit_denominator(1_000_000)
    else:
        raise InvalidInput(f"output_fps must be a finite number > 0, got {output_fps!r}")
    if fps <= 0:
        raise InvalidInput(f"output_fps must be > 0, got {output_fps!r}")
    return fps


# ---------------------------------------------------------------------------------------------
# framing shared by features and speech activity


def _check_samples(samples: np.ndarray, *, what: str = "samples") -> np.ndarray:
    array = np.asarray(samples)
    if array.ndim != 1:
        raise InvalidInput(f"{what} must be 1-D mono [S], got shape {array.shape}")
    if array.size == 0:
        raise InvalidInput(f"audio is empty (0 samples in {what})")
    if not np.issubdtype(array.dtype, np.floating):
        raise InvalidInput(f"{what} must be floating point in [-1, 1], got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    bad = np.count_nonzero(~np.isfinite(array))
    if bad:
        raise InvalidInput(f"{what} contains {bad} non-finite values (NaN or infinity)")
    return array


def _framing(sample_rate: int, window_seconds: float, hop_seconds: float, n_fft: int | None = None) -> tuple[int, int]:
    """Window and hop in samples; both must be whole numbers of samples (so the rate is exact)."""
    if not (isinstance(sample_rate, int | np.integer) and sample_rate > 0):
        raise InvalidInput(f"sample_rate must be a positive integer in Hz, got {sample_rate!r}")
    window = window_seconds * sample_rate
    hop = hop_seconds * sample_rate
    for name, value, seconds in (("window", window, window_seconds), ("hop", hop, hop_seconds)):
        if not (math.isfinite(value) and value >= 1 and abs(value - round(value)) < 1e-6):
            raise InvalidInput(
                f"{name}_seconds={seconds!r} at {sample_rate} Hz is {value:g} samples; it must be a whole number >= 1"
            )
    window, hop = round(window), round(hop)
    if n_fft is not None and n_fft < window:
        raise InvalidInput(f"n_fft={n_fft} is shorter than the window ({window} samples)")
    return window, hop


def _frame_blocks(signal: np.ndarray, window: int, hop: int) -> Iterator[np.ndarray]:
    """Views [b, window] of consecutive frames k = 0..ceil(S / hop) - 1; frame k = signal[k*hop : k*hop + window].

    Frames running past the end are zero-padded: every frame whose start lies inside the signal
    exists, so T = ceil(S / hop).
    """
    n_frames = -(-signal.size // hop)
    padded = np.zeros((n_frames - 1) * hop + window, np.float32)
    padded[: signal.size] = signal
    frames = np.lib.stride_tricks.sliding_window_view(padded, window)[::hop]
    for start in range(0, n_frames, _BLOCK_FRAMES):
        yield frames[start : start + _BLOCK_FRAMES]


@functools.lru_cache(maxsize=16)
def _hamming(window: int) -> np.ndarray:
    values = np.hamming(window).astype(np.float32)  # symmetric, as in HTK / Sphinx
    values.flags.writeable = False
    return values


@functools.lru_cache(maxsize=16)
def mel_filterbank(*, sample_rate: int, n_fft: int, n_mels: int, fmin_hz: float, fmax_hz: float) -> np.ndarray:
    """Triangular mel filters (HTK mel scale, area-normalised as Sphinx / Slaney).

    Edges are equally spaced in mel(f) = 2595 * log10(1 + f / 700) between fmin_hz and fmax_hz; each
    triangle peaks at 2 / (its width in Hz). Same matrix as
    `librosa.filters.mel(..., htk=True, norm="slaney")`.

    Returns:
        float32 [n_mels, n_fft // 2 + 1], read-only.
    """
    if not (0 <= fmin_hz < fmax_hz <= sample_rate / 2):
        nyquist = sample_rate / 2
        raise InvalidInput(f"mel range must satisfy 0 <= fmin < fmax <= {nyquist:g} Hz, got {fmin_hz}..{fmax_hz}")
    if n_mels < 1:
        raise InvalidInput(f"n_mels must be >= 1, got {n_mels}")
    mel_lo, mel_hi = (2595.0 * np.log10(1.0 + f / 700.0) for f in (fmin_hz, fmax_hz))
    edges = 700.0 * (10.0 ** (np.linspace(mel_lo, mel_hi, n_mels + 2) / 2595.0) - 1.0)
    bins_hz = np.arange(n_fft // 2 + 1) * (sample_rate / n_fft)
    rising = (bins_hz[None, :] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    falling = (edges[2:, None] - bins_hz[None, :]) / (edges[2:] - edges[1:-1])[:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    weights = weights.astype(np.float32)
    weights.flags.writeable = False
    return weights


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


# ---------------------------------------------------------------------------------------------
# features


def extract_features(
    samples: np.ndarray,
    *,
    sample_rate: int = SAMPLE_RATE,
    n_mfcc: int = 13,
    window_seconds: float = 0.025,
    hop_seconds: float = 0.010,
    n_fft: int = 512,
    n_mels: int = 40,
    fmin_hz: float = 133.3333,
    fmax_hz: float = 6855.4976,
    preemphasis: float = 0.97,
    delta_width: int = 3,
    log_floor: float = 1e-10,
) -> AudioFeatures:
    """Computes MFCC + log energy and their first temporal derivatives (28-D at 100 Hz by default).

    Framing: frame k holds samples [k*hop, k*hop + window) (zero-padded past the end), so there are
    T = ceil(S / hop) frames (T = ceil(duration * 100) by default) and frame k is centred at
    times[k] = (k*hop + window/2) / sample_rate = k / 100 + 0.0125 s, taking sample n to cover
    [n / sample_rate, (n + 1) / sample_rate) s. Per frame (Sphinx-III style, vectorised):
    pre-emphasis y[n] = x[n] - preemphasis * x[n-1] over the whole signal, symmetric Hamming window,
    `n_fft`-point power spectrum, `mel_filterbank` (40 filters 133-6855 Hz), natural log floored at
    `log_floor`, orthonormal DCT-II -> c0..c(n_mfcc-1). Log energy = ln(max(mean(x^2), log_floor)) of
    the raw frame (before pre-emphasis and window). Derivatives: centred regression over `delta_width`
    frames, d[k] = sum_n n (f[k+n] - f[k-n]) / (2 sum_n n^2), n = 1..(delta_width-1)/2, ends repeated;
    width 3 is the centred difference (f[k+1] - f[k-1]) / 2, in units per frame.
    MFCCs are not bit-identical to the seed's Sphinx port (no bin snapping, orthonormal DCT).

    Args:
        samples: float [S] mono in [-1, 1] at `sample_rate`, S >= 1.
        sample_rate: Hz; window and hop must be whole numbers of samples at this rate.
        n_mfcc: cepstral coefficients kept (c0 included), 1..n_mels.
        window_seconds: analysis window (25 ms).
        hop_seconds: frame step (10 ms -> 100 Hz).
        n_fft: FFT size >= window in samples (512).
        n_mels: mel filters (40).
        fmin_hz: lowest filter edge (133.33 Hz, Sphinx).
        fmax_hz: highest filter edge (6855.5 Hz, Sphinx), <= sample_rate / 2.
        preemphasis: pre-emphasis coefficient in [0, 1) (0.97; 0 disables).
        delta_width: odd frame count >= 3 of the derivative regression (3).
        log_floor: floor of every energy before the log (1e-10): digital silence stays finite.

    Returns:
        `AudioFeatures` with values float32 [T, 2 * (n_mfcc + 1)] and times float64 [T].

    Raises:
        InvalidInput: empty, non-1-D, integer or non-finite samples, or bad knob values.
    """
    signal = _check_samples(samples)
    window, hop = _framing(sample_rate, window_seconds, hop_seconds, n_fft)
    if not (1 <= n_mfcc <= n_mels):
        raise InvalidInput(f"n_mfcc must be in 1..n_mels={n_mels}, got {n_mfcc}")
    if not (0.0 <= preemphasis < 1.0):
        raise InvalidInput(f"preemphasis must be in [0, 1), got {preemphasis!r}")
    if not (isinstance(delta_width, int) and delta_width >= 3 and delta_width % 2 == 1):
        raise InvalidInput(f"delta_width must be an odd integer >= 3, got {delta_width!r}")
    if not (log_floor > 0):
        raise InvalidInput(f"log_floor must be > 0, got {log_floor!r}")
    filters_t = np.ascontiguousarray(
        mel_filterbank(sample_rate=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin_hz=fmin_hz, fmax_hz=fmax_hz).T
    )
    hamming = _hamming(window)

    emphasised = signal.copy()
    if preemphasis:
        emphasised[1:] -= np.float32(preemphasis) * signal[:-1]

    n_frames = -(-signal.size // hop)
    static = np.empty((n_frames, n_mfcc + 1), np.float32)
    row = 0
    for raw, emph in zip(_frame_blocks(signal, window, hop), _frame_blocks(emphasised, window, hop), strict=True):
        rows = slice(row, row + raw.shape[0])
        spectrum = scipy.fft.rfft(emph * hamming, n=n_fft, axis=-1)
        power = spectrum.real**2 + spectrum.imag**2
        log_mel = np.log(np.maximum(power @ filters_t, log_floor))
        static[rows, :n_mfcc] = scipy.fft.dct(log_mel, type=2, norm="ortho", axis=-1)[:, :n_mfcc]
        energy = np.einsum("ij,ij->i", raw, raw, dtype=np.float64) / window
        static[rows, n_mfcc] = np.log(np.maximum(energy, log_floor))
        row = rows.stop

    half = (delta_width - 1) // 2
    taps = np.arange(-half, half + 1, dtype=np.float64)
    taps /= 2.0 * np.sum(np.arange(1, half + 1) ** 2)
    deltas = scipy.ndimage.correlate1d(static, taps.astype(np.float32), axis=0, mode="nearest")

    rate = sample_rate / hop
    start = window / 2 / sample_rate
    times = start + np.arange(n_frames, dtype=np.float64) / rate
    return AudioFeatures(
        values=_read_only(np.concatenate([static, deltas], axis=1)),
        times=_read_only(times),
        rate=float(rate),
        start_seconds=float(start),
    )


# ---------------------------------------------------------------------------------------------
# speech activity


def frame_levels_db(
    samples: np.ndarray,
    *,
    sample_rate: int = SAMPLE_RATE,
    window_seconds: float = 0.025,
    hop_seconds: float = 0.010,
    band_hz: tuple[float, float] = (100.0, 4000.0),
    n_fft: int = 512,
) -> np.ndarray:
    """Level of each analysis frame within the speech band, in dB (10*log10 of mean square).

    Frames are those of `extract_features` (same count, same centre times). The level is the
    Hamming-windowed frame's mean square restricted to `band_hz` (Parseval), so rumble and hiss
    outside speech do not count; a full-scale in-band sine reads about -3 dB, digital silence -inf.

    Returns:
        float64 [T] levels in dB (may hold -inf).
    """
    signal = _check_samples(samples)
    window, hop = _framing(sample_rate, window_seconds, hop_seconds, n_fft)
    low, high = band_hz
    if not (0 <= low < high):
        raise InvalidInput(f"band_hz must be (low, high) with 0 <= low < high, got {band_hz!r}")
    hamming = _hamming(window)
    bins_hz = np.arange(n_fft // 2 + 1) * (sample_rate / n_fft)
    # one-sided spectrum: every bin but DC and Nyquist stands for two
    weights = np.where((bins_hz == 0) | (bins_hz == sample_rate / 2), 1.0, 2.0)
    weights = weights * ((bins_hz >= low) & (bins_hz <= high))
    weights /= n_fft * float(np.sum(hamming.astype(np.float64) ** 2))
    levels = np.empty(-(-signal.size // hop), np.float64)
    row = 0
    for block in _frame_blocks(signal, window, hop):
        spectrum = scipy.fft.rfft(block * hamming, n=n_fft, axis=-1)
        power = (spectrum.real**2 + spectrum.imag**2).astype(np.float64)
        with np.errstate(divide="ignore"):
            levels[row : row + block.shape[0]] = 10.0 * np.log10(power @ weights)
        row += block.shape[0]
    return levels


def detect_speech(
    samples: np.ndarray,
    *,
    sample_rate: int = SAMPLE_RATE,
    output_fps: float | Fraction | None,
    n_output_frames: int | None = None,
    margin_db: float = 12.0,
    noise_floor_percentile: float = 10.0,
    dynamic_range_db: float = 50.0,
    min_pause_seconds: float = 0.5,
    min_speech_seconds: float = 0.05,
    silence_floor_db: float = -100.0,
    band_hz: tuple[float, float] = (100.0, 4000.0),
    window_seconds: float = 0.025,
    hop_seconds: float = 0.010,
) -> SpeechActivity:
    """Marks speech by energy relative to the file's own noise floor (loudness-invariant).

    1. Level of each 25 ms frame every 10 ms in the speech band (`frame_levels_db`).
    2. Frames below `silence_floor_db` are digital silence: never speech, left out of the floor.
    3. Noise floor = the `noise_floor_percentile`-th percentile of the other frames' levels.
    4. A frame is speech when its level >= threshold = max(floor + margin_db, loud - dynamic_range_db),
       loud = 99th percentile of the levels (so a studio-clean file does not turn breaths into
       speech). Scaling the audio shifts all three by the same dB: the decision does not change.
    5. Pauses shorter than `min_pause_seconds` between two speech runs are bridged, then speech runs
       shorter than `min_speech_seconds` are dropped (clicks).
    6. Per output frame i: the share of [i / fps, (i + 1) / fps) (cut at the end of the audio) covered by
       speech, where feature frame k stands for [times[k] - hop/2, times[k] + hop/2) (the first and last
       extended to the ends of the audio). Frames past the end of the audio get 0.

    Args:
        samples: float [S] mono in [-1, 1] at `sample_rate`, S >= 1.
        sample_rate: Hz.
        output_fps: output video frame rate (may be 30000/1001 or 29.97), or None for no per-output-frame
            result (then `per_output_frame` is empty).
        n_output_frames: N >= 0; default ceil(duration * output_fps) (see `output_frame_count`).
        margin_db: dB above the noise floor a frame needs (12; >= 0).
        noise_floor_percentile: percentile in (0, 100) of frame levels taken as the floor (10).
        dynamic_range_db: speech lies within this many dB of the loud level (50; > 0).
        min_pause_seconds: shorter pauses are bridged (0.5 s; 0 disables).
        min_speech_seconds: shorter speech runs are dropped (0.05 s; 0 keeps all).
        silence_floor_db: levels below this are digital silence (-100 dB).
        band_hz: band whose energy counts (100-4000 Hz).
        window_seconds: analysis window (25 ms, as the features).
        hop_seconds: frame step (10 ms, as the features).

    Returns:
        `SpeechActivity` with per_feature_frame bool [T] and per_output_frame float32 [N].

    Raises:
        InvalidInput: bad samples or knob values.
    """
    if not (math.isfinite(margin_db) and margin_db >= 0):
        raise InvalidInput(f"margin_db must be finite and >= 0, got {margin_db!r}")
    if not (0 < noise_floor_percentile < 100):
        raise InvalidInput(f"noise_floor_percentile must be in (0, 100), got {noise_floor_percentile!r}")
    if not (dynamic_range_db > 0):
        raise InvalidInput(f"dynamic_range_db must be > 0, got {dynamic_range_db!r}")
    if not (min_pause_seconds >= 0 and min_speech_seconds >= 0):
        raise InvalidInput(
            f"min_pause_seconds and min_speech_seconds must be >= 0, got {min_pause_seconds!r}, {min_speech_seconds!r}"
        )
    if not math.isfinite(silence_floor_db):
        raise InvalidInput(f"silence_floor_db must be finite, got {silence_floor_db!r}")
    fps = _fps_fraction(output_fps) if output_fps is not None else None
    if n_output_frames is not None and (int(n_output_frames) != n_output_frames or n_output_frames < 0):
        raise InvalidInput(f"n_output_frames must be an integer >= 0, got {n_output_frames!r}")

    signal = _check_samples(samples)
    window, hop = _framing(sample_rate, window_seconds, hop_seconds)
    levels = frame_levels_db(
        signal, sample_rate=sample_rate, window_seconds=window_seconds, hop_seconds=hop_seconds, band_hz=band_hz
    )
    audible = levels >= silence_floor_db
    if np.any(audible):
        heard = levels[audible]
        floor = float(np.percentile(heard, noise_floor_percentile))
        loud = float(np.percentile(heard, 99.0))
        threshold = max(floor + margin_db, loud - dynamic_range_db)
        active = audible & (levels >= threshold)
    else:
        floor = float(silence_floor_db)
        threshold = floor + margin_db
        active = np.zeros(levels.size, bool)

    frame_rate = sample_rate / hop
    active = _bridge_gaps(active, round(min_pause_seconds * frame_rate))
    active = _drop_short_runs(active, round(min_speech_seconds * frame_rate))

    if fps is None:
        per_output = np.zeros(0, np.float32)
    else:
        count = output_frame_count(signal.size, fps, sample_rate=sample_rate)
        count = count if n_output_frames is None else int(n_output_frames)
        per_output = _share_per_output_frame(
            active,
            first_centre=window / 2 / sample_rate,
            frame_period=hop / sample_rate,
            duration=signal.size / sample_rate,
            fps=float(fps),
            n_output_frames=count,
        )
    return SpeechActivity(
        per_feature_frame=_read_only(active),
        per_output_frame=_read_only(per_output),
        noise_floor_db=max(floor, float(silence_floor_db)),
        threshold_db=float(threshold),
        output_fps=float(fps) if fps is not None else None,
    )


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and stop (exclusive) indices of the True runs of a bool [T] mask."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def _fill(length: int, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Bool [length], True on [starts[i], stops[i]) for every i (vectorised)."""
    steps = np.zeros(length + 1, np.int32)
    np.add.at(steps, starts, 1)
    np.add.at(steps, stops, -1)
    return np.cumsum(steps[:-1]) > 0


def _bridge_gaps(active: np.ndarray, max_gap: int) -> np.ndarray:
    """Sets False runs shorter than `max_gap` frames that lie between two True runs to True."""
    starts, stops = _runs(active)
    if max_gap <= 0 or starts.size < 2:
        return active
    gap_starts, gap_stops = stops[:-1], starts[1:]
    short = (gap_stops - gap_starts) < max_gap
    return active | _fill(active.size, gap_starts[short], gap_stops[short])


def _drop_short_runs(active: np.ndarray, min_length: int) -> np.ndarray:
    """Keeps only True runs of at least `min_length` frames."""
    starts, stops = _runs(active)
    if min_length <= 1 or starts.size == 0:
        return active
    keep = (stops - starts) >= min_length
    return _fill(active.size, starts[keep], stops[keep])


def _share_per_output_frame(
    active: np.ndarray,
    *,
    first_centre: float,
    frame_period: float,
    duration: float,
    fps: float,
    n_output_frames: int,
) -> np.ndarray:
    """Share of each output frame's interval covered by active feature frames (exact, piecewise constant)."""
    if n_output_frames == 0:
        return np.zeros(0, np.float32)
    # Feature frame k holds [b_k, b_(k+1)) with b_0 = 0, b_k = centre_k - period/2, b_T = +inf (clipped at the end).
    bounds = first_centre + (np.arange(1, active.size) - 0.5) * frame_period
    knots = np.concatenate([[0.0], np.minimum(bounds, duration), [duration]])
    covered = np.concatenate([[0.0], np.cumsum(np.diff(knots) * active)])
    edges = np.minimum(np.arange(n_output_frames + 1, dtype=np.float64) / fps, duration)
    speech = np.diff(np.interp(edges, knots, covered))
    length = np.diff(edges)
    share = np.zeros(n_output_frames, np.float64)
    np.divide(speech, length, out=share, where=length > 0)
    return np.clip(share, 0.0, 1.0).astype(np.float32)
