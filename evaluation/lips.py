"""The lip meter (pure): how closely one mouth track follows another, frame by frame.

It compares a candidate track (a render's measured lips, or a model's predicted shapes) with the real lips of
the same speech, both as the 20 dlib mouth points 48-67 per frame (any coordinates: pixels or canonical units):

- Mouth opening: the mean inner-lip gap (pairs 61-67, 62-66, 63-65) divided by the mouth width (48-54), so it
  is unitless and blind to head size, distance and roll. Compared as measured (no filtering: the meter must
  not hide a drift): Pearson r at lag 0; the best lag over +-max_lag frames (normalised cross-correlation,
  `sync.cross_correlation`; **positive = the candidate is behind the real mouth**, i.e. candidate[i] moves
  like real[i - lag]); the amplitude ratio std(candidate) / std(real) and the mean ratio, at lag 0.
- Lip landmarks: each frame's 20 points are similarity-aligned on their own (`normalise_mouths`: centred on
  their mean, rotated so the corner line 48 -> 54 is horizontal, scaled by the mouth width), then the mean
  point distance candidate vs real is taken over the outer lip (48-59) and the inner lip (60-67) separately,
  in units of mouth width. Alignment removes pose and size, so the error is shape alone.

Baselines, printed beside a result so it can be read:
- Loudness floor: the r of the held-out audio's loudness (`loudness_db`: RMS over each frame's own interval
  [t_i, t_i + 1/fps), in dB, levels more than 40 dB below the 99th percentile raised to it; one fixed
  definition, no tuning) against the real opening. Predicting "mouth open = loud" already scores this much.
- Mean shape: the landmark error of a constant mouth, the real clip's own mean normalised mouth (the best
  constant there is for that clip, so a slightly optimistic baseline that needs no training data); and, given the
  speaker model's training mean mouth, that mouth held constant (what a model predicts that learnt nothing from
  the audio: the baseline of "landmark error <= 0.6x the mean shape").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from evaluation.sync import DEFAULT_MAX_LAG, MIN_PAIRS, cross_correlation
from services.runtime.canonical import MOUTH_CORNERS, mouth_opening_ratio
from services.runtime.errors import InvalidInput

MOUTH_POINTS = 20  # dlib 48-67
FIRST_MOUTH_POINT = 48
CORNERS = MOUTH_CORNERS  # 48, 54
OUTER = slice(0, 12)  # 48-59
INNER = slice(12, 20)  # 60-67
LOUDNESS_RANGE_DB = 40.0
SILENCE_DB = -120.0  # level of an all-zero frame before the range clamp


def _check_mouths(mouths: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(mouths, np.float64)
    if array.ndim != 3 or array.shape[1:] != (MOUTH_POINTS, 2):
        raise InvalidInput(f"{what} must be float [F, {MOUTH_POINTS}, 2] mouth points 48-67, got {array.shape}")
    return array


def mouth_points(landmarks: np.ndarray) -> np.ndarray:
    """float64 [F, 20, 2]: points 48-67 of float [F, 68, 2] dlib landmarks."""
    array = np.asarray(landmarks, np.float64)
    if array.ndim != 3 or array.shape[1:] != (68, 2):
        raise InvalidInput(f"landmarks must be float [F, 68, 2], got {array.shape}")
    return array[:, FIRST_MOUTH_POINT : FIRST_MOUTH_POINT + MOUTH_POINTS]


def normalise_mouths(mouths: np.ndarray) -> np.ndarray:
    """Each frame's mouth similarity-aligned on its own: centred, corner line horizontal, mouth width 1.

    Args:
        mouths: float [F, 20, 2] points 48-67 (NaN where no face).

    Returns:
        float64 [F, 20, 2]; NaN rows where the input has a NaN or the corners coincide.
    """
    m = _check_mouths(mouths, "mouths")
    corner = m[:, CORNERS[1]] - m[:, CORNERS[0]]
    width = np.linalg.norm(corner, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos, sin = corner[:, 0] / width, corner[:, 1] / width
        centred = m - m.mean(axis=1, keepdims=True)
        # rotate by -angle of the corner line: x' = cos x + sin y, y' = -sin x + cos y
        x = (cos[:, None] * centred[..., 0] + sin[:, None] * centred[..., 1]) / width[:, None]
        y = (-sin[:, None] * centred[..., 0] + cos[:, None] * centred[..., 1]) / width[:, None]
    out = np.stack([x, y], axis=-1)
    bad = ~(np.isfinite(out).all(axis=(1, 2)) & (width > 0))
    out[bad] = np.nan
    return out


def opening(mouths: np.ndarray) -> np.ndarray:
    """float64 [F]: mean inner-lip gap (61-67, 62-66, 63-65) / mouth width (48-54); NaN where undefined."""
    ratio = mouth_opening_ratio(_check_mouths(mouths, "mouths"))
    return np.where(np.isfinite(ratio), ratio, np.nan)


def resample(values: np.ndarray, times: np.ndarray, at: np.ndarray, *, tolerance: float = 1e-6) -> np.ndarray:
    """Linear interpolation of a per-frame series (any trailing shape) onto other times; NaN-aware.

    A time within `tolerance` seconds of a source frame takes that frame as it is (so equal frame grids give
    the series back exactly); otherwise both neighbours must be finite. Times outside the source are NaN.

    Args:
        values: float [F, ...] per source frame.
        times: float [F] strictly increasing source times, seconds.
        at: float [G] wanted times, seconds.

    Returns:
        float64 [G, ...].
    """
    v = np.asarray(values, np.float64)
    t = np.asarray(times, np.float64)
    q = np.asarray(at, np.float64)
    if t.ndim != 1 or v.shape[:1] != t.shape or t.size == 0:
        raise InvalidInput(f"values [F, ...] and times [F] must agree, got {v.shape} and {t.shape}")
    if t.size > 1 and np.any(np.diff(t) <= 0):
        raise InvalidInput("source times must strictly increase")
    out = np.full((q.size, *v.shape[1:]), np.nan)
    right = np.clip(np.searchsorted(t, q), 0, t.size - 1)
    left = np.clip(right - 1, 0, t.size - 1)
    for i, time in enumerate(q):
        a, b = left[i], right[i]
        if abs(t[b] - time) <= tolerance:
            out[i] = v[b]
        elif abs(t[a] - time) <= tolerance:
            out[i] = v[a]
        elif t[a] < time < t[b]:
            w = (time - t[a]) / (t[b] - t[a])
            out[i] = (1.0 - w) * v[a] + w * v[b]
    return out


@dataclass(frozen=True, eq=False)
class OpeningComparison:
    """A candidate mouth-opening series against the real one on the same frames.

    Attributes:
        r_lag0: Pearson r at lag 0 (NaN when either is constant).
        best_lag_frames: lag of the highest correlation in +-max_lag; > 0 = candidate behind the real mouth.
        best_r: the correlation at that lag.
        amplitude_ratio: std(candidate) / std(real) over the frames both have, at lag 0.
        mean_ratio: mean(candidate) / mean(real) there.
        frames: frames both have.
        fps: frame rate the lags refer to.
        lags, correlation: the cross-correlation curve (int64, float64 [2 L + 1]).
    """

    r_lag0: float
    best_lag_frames: int | None
    best_r: float
    amplitude_ratio: float
    mean_ratio: float
    frames: int
    fps: float
    lags: np.ndarray
    correlation: np.ndarray

    def as_dict(self, *, scale: bool = True) -> dict:
        out = {
            "r_lag0": self.r_lag0,
            "best_lag_frames": self.best_lag_frames,
            "best_lag_ms": None if self.best_lag_frames is None else self.best_lag_frames * 1000.0 / self.fps,
            "best_r": self.best_r,
            "frames": self.frames,
            "lag_convention": "positive = candidate behind the real mouth",
            "lags": self.lags.tolist(),
            "correlation": [None if math.isnan(c) else c for c in self.correlation.tolist()],
        }
        if scale:
            out |= {"amplitude_ratio": self.amplitude_ratio, "mean_ratio": self.mean_ratio}
        return out


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else math.nan


def compare_openings(
    candidate: np.ndarray,
    real: np.ndarray,
    *,
    fps: float,
    max_lag: int = DEFAULT_MAX_LAG,
    min_pairs: int = MIN_PAIRS,
) -> OpeningComparison:
    """r at lag 0, best lag, amplitude and mean ratio of a candidate opening series against the real one.

    Args:
        candidate: float [F] (NaN where unmeasured).
        real: float [F] on the same frames (NaN where unmeasured).
        fps: frame rate, for the lag in ms.
        max_lag: L >= 1; the best lag is searched over -L..L frames.
        min_pairs: fewest frames both series must have.

    Raises:
        InvalidInput: shapes differ, or fewer than max(min_pairs, 2 L + 1) frames in common.
    """
    c, r = np.asarray(candidate, np.float64), np.asarray(real, np.float64)
    if c.ndim != 1 or c.shape != r.shape:
        raise InvalidInput(f"opening series must be 1-D of one length, got {c.shape} and {r.shape}")
    both = np.isfinite(c) & np.isfinite(r)
    needed = max(min_pairs, 2 * max_lag + 1)
    if int(both.sum()) < needed:
        raise InvalidInput(f"only {int(both.sum())} frames have both mouths, need at least {needed}")
    cb, rb = c[both], r[both]
    lags = np.arange(-max_lag, max_lag + 1)
    best_lag, best_r, correlation = None, math.nan, np.full(lags.size, np.nan)
    if np.ptp(cb) > 0 and np.ptp(rb) > 0:
        curve = cross_correlation(
            np.where(both, c, 0.0),
            np.where(both, r, 0.0),
            fps=fps,
            max_lag=max_lag,
            valid=both,
            min_pairs=min_pairs,
        )
        # cross_correlation pairs its first series at i with the second at i - k: k > 0 = candidate behind.
        lags, correlation = curve.lags, curve.correlation
        best_lag, best_r = curve.lag_frames, curve.peak_correlation
    std_r, mean_r = float(rb.std()), float(rb.mean())
    return OpeningComparison(
        r_lag0=_pearson(cb, rb),
        best_lag_frames=best_lag,
        best_r=best_r,
        amplitude_ratio=float(cb.std()) / std_r if std_r > 0 else math.nan,
        mean_ratio=float(cb.mean()) / mean_r if mean_r != 0 else math.nan,
        frames=int(both.sum()),
        fps=float(fps),
        lags=lags,
        correlation=correlation,
    )


@dataclass(frozen=True)
class LandmarkErrors:
    """Mean point distance between aligned mouths, in mouth widths.

    Attributes:
        inner: over the inner lip (60-67).
        outer: over the outer lip (48-59).
        all: over all 20 points.
        frames: frames both have.
    """

    inner: float
    outer: float
    all: float
    frames: int

    def as_dict(self) -> dict:
        return {"inner": self.inner, "outer": self.outer, "all": self.all, "frames": self.frames, "unit": "mouth width"}


def landmark_errors(candidate: np.ndarray, real: np.ndarray) -> LandmarkErrors:
    """Inner, outer and overall lip error of normalised candidate mouths against normalised real ones.

    Args:
        candidate: float [F, 20, 2] or [20, 2] (a constant mouth), `normalise_mouths` output.
        real: float [F, 20, 2] `normalise_mouths` output, same frames.

    Raises:
        InvalidInput: bad shapes, or no frame where both are finite.
    """
    r = _check_mouths(real, "real mouths")
    c = np.asarray(candidate, np.float64)
    if c.shape == (MOUTH_POINTS, 2):
        c = np.broadcast_to(c, r.shape)
    c = _check_mouths(c, "candidate mouths")
    if c.shape != r.shape:
        raise InvalidInput(f"candidate and real mouths differ in shape: {c.shape} and {r.shape}")
    both = np.isfinite(c).all(axis=(1, 2)) & np.isfinite(r).all(axis=(1, 2))
    if not both.any():
        raise InvalidInput("no frame has both mouths")
    distance = np.linalg.norm(c[both] - r[both], axis=-1)  # [n, 20]
    return LandmarkErrors(
        inner=float(distance[:, INNER].mean()),
        outer=float(distance[:, OUTER].mean()),
        all=float(distance.mean()),
        frames=int(both.sum()),
    )


def mean_mouth(normalised: np.ndarray) -> np.ndarray:
    """float64 [20, 2]: mean of the finite normalised mouths (the mean-shape baseline's constant mouth)."""
    m = _check_mouths(normalised, "mouths")
    finite = np.isfinite(m).all(axis=(1, 2))
    if not finite.any():
        raise InvalidInput("no frame has a mouth")
    return m[finite].mean(axis=0)


def loudness_db(
    samples: np.ndarray,
    frame_times: np.ndarray,
    *,
    fps: float,
    sample_rate: int = 16000,
    range_db: float = LOUDNESS_RANGE_DB,
) -> np.ndarray:
    """Loudness per video frame: RMS of the samples in [t_i, t_i + 1/fps), dB full scale, bottom clamped.

    Levels more than `range_db` below the 99th percentile of the frames inside the audio are raised to it, so
    room noise in pauses adds nothing. Frames (partly) outside the audio are NaN.

    Args:
        samples: float [S] mono audio, sample n at n / sample_rate (time 0 = the video's time 0).
        frame_times: float [F] start time of each frame, seconds.
        fps: frame rate (sets each frame's interval).
        sample_rate: Hz.
        range_db: dynamic range kept, > 0.

    Returns:
        float64 [F].
    """
    x = np.asarray(samples, np.float64)
    t = np.asarray(frame_times, np.float64)
    if x.ndim != 1 or x.size == 0 or t.ndim != 1:
        raise InvalidInput(f"samples [S] and frame_times [F] must be non-empty 1-D, got {x.shape}, {t.shape}")
    if not (math.isfinite(fps) and fps > 0 and range_db > 0):
        raise InvalidInput(f"fps and range_db must be > 0, got {fps}, {range_db}")
    start = np.round(t * sample_rate).astype(np.int64)
    stop = np.round((t + 1.0 / fps) * sample_rate).astype(np.int64)
    inside = (start >= 0) & (stop <= x.size) & (stop > start)
    cumulative = np.concatenate([[0.0], np.cumsum(x * x)])
    levels = np.full(t.size, np.nan)
    s, e = start[inside], stop[inside]
    power = np.maximum((cumulative[e] - cumulative[s]) / (e - s), 0.0)
    with np.errstate(divide="ignore"):
        levels[inside] = np.maximum(10.0 * np.log10(power), SILENCE_DB)
    if inside.any():
        levels[inside] = np.maximum(levels[inside], np.percentile(levels[inside], 99.0) - range_db)
    return levels


@dataclass(frozen=True, eq=False)
class MouthComparison:
    """A candidate mouth track against the real one: opening and lip landmarks."""

    opening: OpeningComparison
    landmarks: LandmarkErrors | None

    def as_dict(self) -> dict:
        return {
            "opening": self.opening.as_dict(),
            "landmarks": None if self.landmarks is None else self.landmarks.as_dict(),
        }


def compare_mouths(
    candidate: np.ndarray, real: np.ndarray, *, fps: float, max_lag: int = DEFAULT_MAX_LAG
) -> MouthComparison:
    """The meter: candidate mouths (float [F, 20, 2], NaN where none) against real ones on the same frames."""
    c, r = _check_mouths(candidate, "candidate mouths"), _check_mouths(real, "real mouths")
    if c.shape != r.shape:
        raise InvalidInput(f"candidate and real mouths differ in shape: {c.shape} and {r.shape}")
    return MouthComparison(
        opening=compare_openings(opening(c), opening(r), fps=fps, max_lag=max_lag),
        landmarks=landmark_errors(normalise_mouths(c), normalise_mouths(r)),
    )


@dataclass(frozen=True, eq=False)
class Baselines:
    """What trivial predictors score on the real clip (see the module docstring).

    Attributes:
        loudness: the loudness envelope against the real opening (its r at lag 0 is the floor; scale-free).
        mean_shape: landmark errors of the real clip's mean normalised mouth held constant (an oracle: it knows
            the held-out clip's average mouth).
        speaker_mean_shape: landmark errors of the speaker model's training mean mouth held constant (what a
            model that learnt nothing from the audio predicts), or None when the model is unknown.
    """

    loudness: OpeningComparison | None
    loudness_error: str | None
    mean_shape: LandmarkErrors
    speaker_mean_shape: LandmarkErrors | None = None

    def as_dict(self) -> dict:
        return {
            "loudness_floor": None if self.loudness is None else self.loudness.as_dict(scale=False),
            "loudness_floor_error": self.loudness_error,
            "loudness_definition": "RMS over each frame's interval, dB, clamped 40 dB below the 99th percentile",
            "mean_shape": self.mean_shape.as_dict(),
            "mean_shape_definition": "the held-out clip's own mean normalised mouth, held constant",
            "speaker_mean_shape": None if self.speaker_mean_shape is None else self.speaker_mean_shape.as_dict(),
            "speaker_mean_shape_definition": "the speaker model's training mean mouth (its PCA mean), held constant",
        }


def baselines(
    real: np.ndarray,
    samples: np.ndarray | None,
    frame_times: np.ndarray,
    *,
    fps: float,
    sample_rate: int = 16000,
    max_lag: int = DEFAULT_MAX_LAG,
    speaker_mean: np.ndarray | None = None,
) -> Baselines:
    """The loudness floor and the mean-shape baselines of a real mouth track with its audio.

    Args:
        real: float [F, 20, 2] the real mouths (NaN where no face).
        samples: its audio (16 kHz mono on the video's time line), or None (no loudness floor).
        frame_times: float [F] frame start times, seconds.
        fps, sample_rate, max_lag: as above.
        speaker_mean: float [20, 2] the speaker model's training mean mouth (any units: it is normalised), or None.
    """
    r = _check_mouths(real, "real mouths")
    normalised = normalise_mouths(r)
    loudness, error = None, "no audio"
    if samples is not None:
        try:
            levels = loudness_db(samples, frame_times, fps=fps, sample_rate=sample_rate)
            loudness, error = compare_openings(levels, opening(r), fps=fps, max_lag=max_lag), None
        except InvalidInput as exc:
            error = str(exc)
    trained = None
    if speaker_mean is not None:
        constant = normalise_mouths(np.asarray(speaker_mean, np.float64).reshape(1, MOUTH_POINTS, 2))[0]
        if np.isfinite(constant).all():  # a degenerate mouth (corners on one point) gives no baseline
            trained = landmark_errors(constant, normalised)
    return Baselines(loudness, error, landmark_errors(mean_mouth(normalised), normalised), trained)
