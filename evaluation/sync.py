"""Model-free audio-visual sync (pure): mouth opening vs the speech-energy envelope, cross-correlated in frames.

Lag convention: a positive lag means the video is behind the audio (the mouth moves `lag` frames after the
sound that goes with it); a negative lag means the video is ahead. Delaying a video's audio by s frames
therefore lowers its measured lag by s.

The estimator (chosen on the real clips of ../shared/data: obama, feifeili, kristinoem):
1. Audio: per video frame i, the log energy (dB) of the audio in the 800-3000 Hz band (the F2/F3 region,
   where mouth area and acoustic envelope are most coherent; Chandrasekaran et al. 2009) under a Hann window
   of two frame periods centred on the middle of the frame's interval [t_i, t_i + 1/fps) (the convention of
   `audio.core.detect_speech`); levels more than `dynamic_range_db` below the loud level are clamped, so room
   noise during pauses adds no variance.
2. Video: the inner-lip opening per frame (any series; the callers use `runtime.canonical.inner_lip_gap`).
3. Both series are band-passed 1-8 Hz (zero-phase Butterworth, no time shift): below 1 Hz phrase-level
   drifts broaden the peak, above 8 Hz there is only landmark jitter. On the sample clips this raised the
   peak correlation from ~0.3 to ~0.5 and narrowed the peak to a few frames.
4. Normalised cross-correlation (Pearson over the frame pairs where both are valid) at every lag in
   [-max_lag, max_lag]; the peak gives the lag, a parabola through the peak and its neighbours a sub-frame
   refinement, and peak minus the median of the curve a confidence (SyncNet's notion, for correlations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.signal

from services.runtime.errors import InvalidInput

DEFAULT_MAX_LAG = 15
DEFAULT_BAND_HZ = (800.0, 3000.0)
DEFAULT_MODULATION_HZ = (1.0, 8.0)
DEFAULT_DYNAMIC_RANGE_DB = 40.0
MIN_PAIRS = 30  # fewest valid frame pairs a lag's correlation may rest on
_BLOCK = 2048  # frames per FFT block: bounds memory on long inputs


@dataclass(frozen=True, eq=False)
class SyncResult:
    """Cross-correlation of a mouth-opening series with an audio envelope.

    Attributes:
        lags: int64 [2 L + 1], -L..L frames.
        correlation: float64 [2 L + 1], Pearson correlation at each lag (NaN where too few pairs).
        lag_frames: lag of the peak, frames; > 0 = video behind the audio.
        lag_ms: lag_frames in milliseconds (1000 / fps per frame).
        lag_refined_frames: sub-frame lag from a parabola through the peak and its neighbours (= lag_frames at
            the ends of the range).
        peak_correlation: correlation at the peak, in [-1, 1].
        confidence: peak minus the median of the curve (0 = no distinct peak).
        fps: frame rate the lags refer to.
        frames_used: valid frame pairs at lag 0.
        at_edge: True when the peak is at +-max_lag (the true lag may lie outside the range).
    """

    lags: np.ndarray
    correlation: np.ndarray
    lag_frames: int
    lag_ms: float
    lag_refined_frames: float
    peak_correlation: float
    confidence: float
    fps: float
    frames_used: int
    at_edge: bool

    def as_dict(self) -> dict:
        return {
            "lag_frames": self.lag_frames,
            "lag_ms": self.lag_ms,
            "lag_refined_frames": self.lag_refined_frames,
            "lag_refined_ms": self.lag_refined_frames * 1000.0 / self.fps,
            "peak_correlation": self.peak_correlation,
            "confidence": self.confidence,
            "fps": self.fps,
            "frames_used": self.frames_used,
            "at_edge": self.at_edge,
            "lag_convention": "positive = video behind audio",
            "lags": self.lags.tolist(),
            "correlation": [None if math.isnan(c) else c for c in self.correlation.tolist()],
        }


def _check_fps(fps: float) -> float:
    if not (isinstance(fps, int | float) and math.isfinite(fps) and fps > 0):
        raise InvalidInput(f"fps must be a finite number > 0, got {fps!r}")
    return float(fps)


def frame_energy_db(
    samples: np.ndarray,
    frame_times: np.ndarray,
    *,
    fps: float,
    sample_rate: int = 16000,
    band_hz: tuple[float, float] = DEFAULT_BAND_HZ,
    dynamic_range_db: float = DEFAULT_DYNAMIC_RANGE_DB,
) -> tuple[np.ndarray, np.ndarray]:
    """Speech-band energy of the audio around each video frame, in dB, and which frames the audio covers.

    Args:
        samples: float [S] mono audio; sample n is at time n / sample_rate (time 0 = the video's time 0).
        frame_times: float [F] start time of each video frame (its presentation time), seconds, increasing.
        fps: nominal frame rate (sets the window: a Hann window of 2 / fps seconds centred at t_i + 0.5 / fps).
        sample_rate: Hz of `samples`.
        band_hz: (low, high) band whose energy counts, 0 <= low < high <= sample_rate / 2.
        dynamic_range_db: levels below the 99th percentile minus this are raised to it (> 0).

    Returns:
        (float64 [F] levels in dB, bool [F] True where the frame's interval lies inside the audio).

    Raises:
        InvalidInput: bad shapes or values, or no frame inside the audio.
    """
    fps = _check_fps(fps)
    x = np.asarray(samples, np.float64)
    times = np.asarray(frame_times, np.float64)
    if x.ndim != 1 or x.size == 0:
        raise InvalidInput(f"samples must be a non-empty 1-D array, got shape {x.shape}")
    if times.ndim != 1 or times.size == 0:
        raise InvalidInput(f"frame_times must be a non-empty 1-D array, got shape {times.shape}")
    if not (np.isfinite(x).all() and np.isfinite(times).all()):
        raise InvalidInput("samples and frame_times must be finite")
    if times.size > 1 and np.any(np.diff(times) <= 0):
        raise InvalidInput("frame_times must strictly increase")
    low, high = band_hz
    if not (0 <= low < high <= sample_rate / 2):
        raise InvalidInput(f"band_hz must be (low, high) with 0 <= low < high <= {sample_rate / 2}, got {band_hz}")
    if not dynamic_range_db > 0:
        raise InvalidInput(f"dynamic_range_db must be > 0, got {dynamic_range_db}")
    half = max(1, round(sample_rate / fps))  # window = 2 frame periods
    n = 2 * half
    window = np.hanning(n + 2)[1:-1]  # no zero end points
    bins = np.fft.rfftfreq(n, 1.0 / sample_rate)
    in_band = (bins >= low) & (bins <= high)
    if not in_band.any():
        raise InvalidInput(f"band {band_hz} Hz holds no FFT bin at {fps:g} fps (window of {n} samples)")
    centres = np.round((times + 0.5 / fps) * sample_rate).astype(np.int64)
    starts = centres - half
    padded = np.concatenate([np.zeros(n), x, np.zeros(n)])
    power = np.empty(times.size)
    offsets = np.arange(n)
    for lo in range(0, times.size, _BLOCK):
        idx = starts[lo : lo + _BLOCK, None] + n + offsets[None, :]
        segments = padded[np.clip(idx, 0, padded.size - 1)] * window
        spectrum = np.fft.rfft(segments, axis=1)
        power[lo : lo + _BLOCK] = (np.abs(spectrum[:, in_band]) ** 2).sum(axis=1) / (n * (window**2).sum())
    frame_start = np.round(times * sample_rate)
    frame_stop = np.round((times + 1.0 / fps) * sample_rate)
    covered = (frame_start >= 0) & (frame_stop <= x.size)
    if not covered.any():
        raise InvalidInput(f"no video frame lies inside the audio ({x.size / sample_rate:.2f} s)")
    with np.errstate(divide="ignore"):
        levels = 10.0 * np.log10(power)
    finite = levels[covered & np.isfinite(levels)]
    floor = float(np.percentile(finite, 99.0)) - dynamic_range_db if finite.size else -200.0
    levels = np.where(np.isfinite(levels), np.maximum(levels, floor), floor)
    return levels, covered


def _fill_gaps(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Linear interpolation across invalid entries (held at the ends), so a filter can run over them."""
    index = np.arange(values.size)
    return np.interp(index, index[valid], values[valid])


def modulation_band(
    series: np.ndarray, fps: float, *, band_hz: tuple[float, float] = DEFAULT_MODULATION_HZ
) -> np.ndarray:
    """Zero-phase band-pass (Butterworth, order 2, forward-backward) of a per-frame series.

    The upper edge is capped at 0.45 fps (Nyquist); series too short for the filter's padding raise.

    Args:
        series: float [F], finite.
        fps: frames per second.
        band_hz: (low, high) Hz, 0 < low < high.

    Returns:
        float64 [F].
    """
    fps = _check_fps(fps)
    low, high = band_hz
    if not 0 < low < high:
        raise InvalidInput(f"modulation band must be (low, high) with 0 < low < high, got {band_hz}")
    high = min(high, 0.45 * fps)
    if high <= low:
        raise InvalidInput(f"fps {fps:g} is too low for a modulation band starting at {low:g} Hz")
    sos = scipy.signal.butter(2, [low, high], btype="bandpass", fs=fps, output="sos")
    values = np.asarray(series, np.float64)
    pad = 3 * (2 * len(sos) + 1)
    if values.size <= pad:
        raise InvalidInput(f"series of {values.size} frames is too short to filter (needs > {pad})")
    return scipy.signal.sosfiltfilt(sos, values)


def cross_correlation(
    video_signal: np.ndarray,
    audio_signal: np.ndarray,
    *,
    fps: float,
    max_lag: int = DEFAULT_MAX_LAG,
    valid: np.ndarray | None = None,
    min_pairs: int = MIN_PAIRS,
) -> SyncResult:
    """Normalised cross-correlation of two per-frame series and its peak.

    The correlation at lag k pairs video_signal[i] with audio_signal[i - k] (k > 0: the video is behind).

    Args:
        video_signal: float [F] (e.g. band-passed mouth opening).
        audio_signal: float [F] (e.g. band-passed energy envelope), same frames.
        fps: frame rate, for lag_ms.
        max_lag: L >= 1, lags -L..L frames.
        valid: bool [F] frames that may be used (both series meaningful); None = all.
        min_pairs: fewest valid pairs a lag needs (its correlation is NaN below).

    Returns:
        SyncResult.

    Raises:
        InvalidInput: shapes differ, non-finite values on valid frames, max_lag < 1, or fewer than
            max(min_pairs, 2 max_lag + 1) valid frames.
    """
    fps = _check_fps(fps)
    v = np.asarray(video_signal, np.float64)
    a = np.asarray(audio_signal, np.float64)
    if v.ndim != 1 or a.shape != v.shape:
        raise InvalidInput(f"video and audio signals must be 1-D of one length, got {v.shape} and {a.shape}")
    if not (isinstance(max_lag, int | np.integer) and max_lag >= 1):
        raise InvalidInput(f"max_lag must be an integer >= 1, got {max_lag!r}")
    ok = np.ones(v.shape, bool) if valid is None else np.asarray(valid, bool)
    if ok.shape != v.shape:
        raise InvalidInput(f"valid must be bool [{v.size}], got shape {ok.shape}")
    if not (np.isfinite(v[ok]).all() and np.isfinite(a[ok]).all()):
        raise InvalidInput("signals must be finite on the valid frames")
    needed = max(min_pairs, 2 * max_lag + 1)
    if int(ok.sum()) < needed:
        raise InvalidInput(f"only {int(ok.sum())} valid frames, need at least {needed} for lags of +-{max_lag}")
    lags = np.arange(-max_lag, max_lag + 1)
    correlation = np.full(lags.size, np.nan)
    n = v.size
    for j, k in enumerate(lags):
        # pairs (i, i - k) for i in [max(k, 0), n + min(k, 0))
        vi = v[max(k, 0) : n + min(k, 0)]
        ai = a[max(-k, 0) : n - max(k, 0)]
        both = ok[max(k, 0) : n + min(k, 0)] & ok[max(-k, 0) : n - max(k, 0)]
        if both.sum() < min_pairs:
            continue
        x, y = vi[both] - vi[both].mean(), ai[both] - ai[both].mean()
        denominator = math.sqrt(float(x @ x) * float(y @ y))
        if denominator > 0:
            correlation[j] = float(x @ y) / denominator
    if np.isnan(correlation).all():
        raise InvalidInput("no lag has a defined correlation (a signal is constant on the valid frames)")
    peak = int(np.nanargmax(correlation))
    refined = float(lags[peak])
    if 0 < peak < lags.size - 1 and np.isfinite(correlation[peak - 1 : peak + 2]).all():
        left, centre, right = correlation[peak - 1 : peak + 2]
        curvature = left - 2 * centre + right
        if curvature < 0:
            refined += 0.5 * (left - right) / curvature
    lag = int(lags[peak])
    return SyncResult(
        lags=lags,
        correlation=correlation,
        lag_frames=lag,
        lag_ms=lag * 1000.0 / fps,
        lag_refined_frames=refined,
        peak_correlation=float(correlation[peak]),
        confidence=float(correlation[peak] - np.nanmedian(correlation)),
        fps=fps,
        frames_used=int(ok.sum()),
        at_edge=peak in (0, lags.size - 1),
    )


def audio_visual_sync(
    mouth_opening: np.ndarray,
    face_valid: np.ndarray,
    samples: np.ndarray,
    frame_times: np.ndarray,
    *,
    fps: float,
    sample_rate: int = 16000,
    max_lag: int = DEFAULT_MAX_LAG,
    band_hz: tuple[float, float] = DEFAULT_BAND_HZ,
    modulation_hz: tuple[float, float] = DEFAULT_MODULATION_HZ,
    dynamic_range_db: float = DEFAULT_DYNAMIC_RANGE_DB,
) -> tuple[SyncResult, np.ndarray]:
    """Lag between a video's mouth opening and its audio (see the module docstring for the method).

    Args:
        mouth_opening: float [F] mouth opening per frame (any unit; NaN where no face).
        face_valid: bool [F] frames with a face.
        samples: float [S] mono audio at `sample_rate`, time 0 = the video's time 0.
        frame_times: float [F] presentation time of each frame, seconds.
        fps: nominal frame rate.
        sample_rate, max_lag, band_hz, modulation_hz, dynamic_range_db: see the functions above.

    Returns:
        (SyncResult, float64 [F] the energy envelope in dB, for plots).

    Raises:
        InvalidInput: mismatched shapes, too few valid frames, bad knobs.
    """
    opening = np.asarray(mouth_opening, np.float64)
    valid = np.asarray(face_valid, bool)
    if opening.ndim != 1 or valid.shape != opening.shape:
        raise InvalidInput(
            f"mouth_opening and face_valid must be [F] of one length, got {opening.shape} and {valid.shape}"
        )
    if np.shape(frame_times) != opening.shape:
        raise InvalidInput(f"frame_times must be [{opening.size}], got shape {np.shape(frame_times)}")
    valid = valid & np.isfinite(opening)
    if valid.sum() < 2:
        raise InvalidInput(f"only {int(valid.sum())} frames with a face: no mouth-opening signal")
    envelope, covered = frame_energy_db(
        samples, frame_times, fps=fps, sample_rate=sample_rate, band_hz=band_hz, dynamic_range_db=dynamic_range_db
    )
    video = modulation_band(_fill_gaps(opening, valid), fps, band_hz=modulation_hz)
    audio = modulation_band(envelope, fps, band_hz=modulation_hz)
    result = cross_correlation(video, audio, fps=fps, max_lag=max_lag, valid=valid & covered)
    return result, envelope


def shift_samples(samples: np.ndarray, frames: float, *, fps: float, sample_rate: int = 16000) -> np.ndarray:
    """The audio delayed by `frames` video frames (advanced when negative), same length, zeros shifted in.

    Delaying the audio of a video by s frames lowers its measured lag by s (the video gets ahead of it).
    """
    x = np.asarray(samples)
    shift = round(frames * sample_rate / _check_fps(fps))
    if abs(shift) >= x.size:
        raise InvalidInput(f"a shift of {frames} frames is longer than the audio ({x.size} samples)")
    out = np.zeros_like(x)
    if shift >= 0:
        out[shift:] = x[: x.size - shift]
    else:
        out[:shift] = x[-shift:]
    return out
