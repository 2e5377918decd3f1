"""Pure core of the `lipsync` stage: chunked model runs with the delay removed once, PCA to landmarks, resampling."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy.ndimage import gaussian_filter1d

from services.runtime.canonical import INNER_LIP_PAIRS, mouth_opening_ratio
from services.runtime.errors import InvalidInput

FEATURE_DIM = 28
MOUTH_POINTS = 20
# Inner-lip pairs (dlib 61-67, 62-66, 63-65 as indices into points 48-67) that meet when the mouth closes.

ModelRun = Callable[[np.ndarray], np.ndarray]
"""Runs the LSTM on float32 [t, 28] normalised features; returns float32 [t, K], row i = mouth at row i - delay."""


@dataclass(frozen=True)
class Chunk:
    """One model call of `plan_chunks`.

    Input rows [input_start, input_stop) (rows past the end are zero padding) give the outputs for feature
    rows [keep_start, keep_stop).
    """

    input_start: int
    input_stop: int
    keep_start: int
    keep_stop: int


def plan_chunks(n_rows: int, *, delay: int, chunk_rows: int = 3000, overlap_rows: int = 200) -> list[Chunk]:
    """Cut T rows into model calls whose kept outputs tile [0, T) exactly once.

    Each call starts `overlap_rows // 2` rows before the rows it keeps (warm-up of the LSTM state from
    zero) and reads `delay` rows past them (the look-ahead the delayed output needs), so a chunked run
    agrees with one call over the whole sequence up to the decay of the initial state.

    Raises:
        InvalidInput: non-positive sizes, or an overlap too short for the delay plus 10 rows of warm-up.
    """
    if n_rows <= 0:
        raise InvalidInput(f"no feature rows to predict from (T = {n_rows})")
    if delay < 0:
        raise InvalidInput(f"delay must be >= 0, got {delay}")
    if overlap_rows < 2 * (delay + 10):
        raise InvalidInput(f"chunk overlap of {overlap_rows} rows is shorter than 2 x (delay {delay} + 10 rows)")
    if chunk_rows <= overlap_rows:
        raise InvalidInput(f"chunk of {chunk_rows} rows must be longer than its overlap of {overlap_rows} rows")
    warm_up = overlap_rows // 2
    keep = chunk_rows - warm_up - delay
    chunks = []
    for start in range(0, n_rows, keep):
        stop = min(start + keep, n_rows)
        chunks.append(Chunk(max(0, start - warm_up), stop + delay, start, stop))
    return chunks


def predict_rows(
    features: np.ndarray, run_model: ModelRun, *, delay: int, chunk_rows: int = 3000, overlap_rows: int = 200
) -> np.ndarray:
    """Model output aligned to the features: row t = coefficients of the mouth at feature time t.

    The model's output row i belongs to input row i - delay; here each call's outputs are shifted back by
    `delay` (the only place the delay is removed), and the last `delay` rows are predicted from zero
    padding (the mean in normalised space) so the end of the audio gets a mouth shape too.

    Args:
        features: float32 [T, 28], normalised.
        run_model: see `ModelRun`.
        delay: the model's delay in rows.
        chunk_rows: Most input rows per model call (`plan_chunks`).
        overlap_rows: Context of each call (`plan_chunks`: half of it before the rows it keeps, LSTM warm-up).

    Returns:
        float32 [T, K].
    """
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or features.shape[1] != FEATURE_DIM:
        raise InvalidInput(f"features must be [T, {FEATURE_DIM}], got shape {features.shape}")
    if not np.isfinite(features).all():
        raise InvalidInput("features contain NaN or infinite values")
    padded = np.concatenate([features, np.zeros((delay, FEATURE_DIM), np.float32)])
    parts = []
    for chunk in plan_chunks(len(features), delay=delay, chunk_rows=chunk_rows, overlap_rows=overlap_rows):
        window = padded[chunk.input_start : chunk.input_stop]
        output = np.asarray(run_model(window), np.float32)
        if output.ndim != 2 or len(output) != len(window):
            raise InvalidInput(f"model returned shape {output.shape} for {len(window)} input rows")
        first = chunk.keep_start + delay - chunk.input_start
        parts.append(output[first : first + chunk.keep_stop - chunk.keep_start])
    return np.concatenate(parts)


def output_frame_times(count: int, fps: Fraction, start_seconds: float = 0.0) -> np.ndarray:
    """float64 [N]: output frame i is shown from start + i / fps (its presentation time)."""
    if count < 0:
        raise InvalidInput(f"output frame count must be >= 0, got {count}")
    return start_seconds + np.arange(count, dtype=np.float64) * (fps.denominator / fps.numerator)


def default_frame_count(n_rows: int, feature_rate: float, fps: Fraction) -> int:
    """N = ceil(duration x fps), duration = T / feature_rate."""
    return math.ceil(Fraction(n_rows) / Fraction(feature_rate).limit_denominator(1000) * fps)


def resample(values: np.ndarray, *, start_seconds: float, rate: float, times: np.ndarray) -> np.ndarray:
    """Linear interpolation of rows sampled at start + k / rate to `times` (clamped at both ends)."""
    values = np.asarray(values, np.float64)
    position = np.clip((np.asarray(times) - start_seconds) * rate, 0, len(values) - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, len(values) - 1)
    weight = (position - low).reshape((-1,) + (1,) * (values.ndim - 1))
    return ((1 - weight) * values[low] + weight * values[high]).astype(np.float32)


def shapes_from_coefficients(coefficients: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Float [N, K] PCA coefficients -> float32 [N, 20, 2] mouth landmarks (x48, y48, ..., x67, y67)."""
    coefficients = np.asarray(coefficients, np.float64)
    if coefficients.ndim != 2 or coefficients.shape[1] != components.shape[0]:
        raise InvalidInput(f"coefficients {coefficients.shape} do not match {components.shape[0]} PCA components")
    flat = np.asarray(mean, np.float64) + coefficients @ np.asarray(components, np.float64)
    return flat.reshape(len(flat), MOUTH_POINTS, 2).astype(np.float32)


def closed_mouth(shape: np.ndarray) -> np.ndarray:
    """The same outer lips with the inner lips meeting halfway: float32 [20, 2]."""
    closed = np.array(shape, np.float32)
    for upper, lower in INNER_LIP_PAIRS:
        middle = (closed[upper] + closed[lower]) / 2
        closed[upper] = closed[lower] = middle
    return closed


def uncross_lips(shapes: np.ndarray) -> np.ndarray:
    """Close inner lips that a scaled prediction pushed past each other (y down: the lower lip above the upper).

    Scaling coefficients about the mean (the training calibration) or a gain on a frame more closed than
    `closed_anchor` (amplitude normalisation) moves a closing mouth beyond
    closed; the gap measured from such a shape (and the candidates it selects) would read as open again.
    Such a pair meets halfway, as in `closed_mouth`. float32 [N, 20, 2] in, a new array out.
    """
    out = np.array(shapes, np.float32)
    for upper, lower in INNER_LIP_PAIRS:
        crossed = out[:, lower, 1] < out[:, upper, 1]
        middle = (out[crossed, upper] + out[crossed, lower]) / 2
        out[crossed, upper] = middle
        out[crossed, lower] = middle
    return out


def silence_weights(
    activity: np.ndarray, *, activity_rate: float, times: np.ndarray, ramp_seconds: float = 0.1
) -> np.ndarray:
    """float32 [N] in [0, 1]: 1 = speech (keep the prediction), 0 = silence (close the mouth), with ramps."""
    activity = np.asarray(activity, np.float32).ravel()
    if activity.size == 0 or activity_rate <= 0:
        raise InvalidInput("speech activity must be a non-empty series with a positive rate")
    index = np.clip(np.floor(np.asarray(times) * activity_rate).astype(np.int64), 0, activity.size - 1)
    speech = (activity[index] > 0).astype(np.float64)
    if ramp_seconds > 0 and len(times) > 1:
        step = float(np.median(np.diff(times)))
        sigma = max(ramp_seconds / step / 2, 1e-6)
        speech = gaussian_filter1d(speech, sigma, mode="nearest")
    return np.clip(speech, 0, 1).astype(np.float32)


def blend_silence(shapes: np.ndarray, weights: np.ndarray, rest_shape: np.ndarray) -> np.ndarray:
    """Move shapes towards a closed, still mouth where `weights` < 1."""
    closed = closed_mouth(rest_shape)[None]
    w = np.asarray(weights, np.float32)[:, None, None]
    return (w * shapes + (1 - w) * closed).astype(np.float32)


def smooth_track(shapes: np.ndarray, sigma_frames: float) -> np.ndarray:
    """Zero-phase Gaussian smoothing of a shape track over time (sigma in frames; 0 = unchanged)."""
    if sigma_frames <= 0 or len(shapes) < 2:
        return np.asarray(shapes, np.float32)
    return gaussian_filter1d(np.asarray(shapes, np.float32), sigma_frames, axis=0, mode="nearest")


def normalise_amplitude(
    coefficients: np.ndarray,
    mean: np.ndarray,
    components: np.ndarray,
    *,
    reference_std: float,
    max_gain: float = 1.0,
) -> tuple[np.ndarray, float]:
    """Scale the mouth's movement so its opening spreads as much as the speaker's own.

    opening = inner-lip gap / mouth width of the reconstructed shapes; gain = reference_std / its std over all
    frames, clipped to [1, max_gain]. All frames, pauses included, because the reference (the model card's
    opening_std) counts every training frame: measured over the speech frames only, the prediction's spread lost
    its pauses and read 15 % calmer than the same footage (GRID held-out speech: 1.21 against 1.03 over all
    frames), so the gain lifted the speaker's own speech as if it were an unfamiliar voice.

    The scaling pivots on the prediction's own most closed mouth (`closed_anchor`), not on the mean mouth:
    scaled about the mean, every closing mouth was pushed past closed, its lips crossed and then met halfway
    (`uncross_lips`), so all closures read alike and the rendered mouth lost correlation with the real one.
    Pivoting on the closed mouth, closures stay where the model put them and openings grow. Measured through the
    stack at gain cap 1.15 (`a2v eval resynth`, held-out speech, one render each): Obama r 0.440 -> 0.452, GRID
    r 0.780 -> 0.787; amplitude 1.07 -> 1.16 and 1.12 -> 1.14.

    Args:
        coefficients: float [N, K] PCA coefficients (about the training mean, so 0 is the mean mouth).
        mean: the PCA mean shape, float [40].
        components: the PCA components, float [K, 40].
        reference_std: the speaker's real opening spread (> 0), from the model card.
        max_gain: >= 1.

    Returns:
        (scaled float32 [N, K] coefficients, the gain applied).
    """
    coefficients = np.asarray(coefficients, np.float64)
    if not max_gain >= 1:
        raise InvalidInput(f"max_amplitude_gain must be >= 1, got {max_gain}")
    if not reference_std > 0 or len(coefficients) < 2:
        return coefficients.astype(np.float32), 1.0
    opening = mouth_opening_ratio(shapes_from_coefficients(coefficients, mean, components))
    spread = float(np.nanstd(opening))
    if not (math.isfinite(spread) and spread > 1e-6 * reference_std):
        return coefficients.astype(np.float32), 1.0
    gain = float(np.clip(reference_std / spread, 1.0, max_gain))
    if gain == 1.0:
        return coefficients.astype(np.float32), gain
    anchor = closed_anchor(coefficients, opening)
    return (anchor + gain * (coefficients - anchor)).astype(np.float32), gain


CLOSED_ANCHOR_PERCENTILE = 10.0


def closed_anchor(coefficients: np.ndarray, opening: np.ndarray) -> np.ndarray:
    """The prediction's most closed mouth: float64 [K] coefficients.

    The mean of the frames whose opening is at or below its `CLOSED_ANCHOR_PERCENTILE`th percentile (several
    frames, so one outlier cannot move it). `opening` [N] belongs to `coefficients` [N, K]; NaN is ignored.
    """
    finite = np.isfinite(opening)
    if not finite.any():
        return np.zeros(coefficients.shape[1])
    closest = finite & (opening <= np.percentile(opening[finite], CLOSED_ANCHOR_PERCENTILE))
    return coefficients[closest].mean(axis=0)
