"""analyze_video end to end on real clips: flags, shapes, streaming = offline smoothing, errors, crop storage."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from services.face.core import (
    LandmarkDetector,
    VideoAnalysis,
    analyze_video,
    smooth_landmarks,
)
from services.runtime.canonical import CANONICAL_TEMPLATE, DEFAULT_GEOMETRY, TEMPLATE_ID
from services.runtime.errors import Cancelled, InvalidInput, NoFace, TooLarge
from services.runtime.frames import decode_frames, encode_frames
from services.runtime.media import iter_frames
from tests.face.helpers import KATIE, OBAMA, encode_clip

pytestmark = pytest.mark.skipif(not OBAMA.is_file(), reason="shared data not present")

NO_FACE = (30, 31, 32, 42)  # black, noise, flat grey frames inserted into the obama clip, black frame appended


@pytest.fixture(scope="module")
def detector() -> LandmarkDetector:
    return LandmarkDetector()


@pytest.fixture(scope="module")
def obama_clip() -> bytes:
    frames = [f for _, _, f in iter_frames(OBAMA, stop=42)]
    rng = np.random.default_rng(5)
    frames[30] = np.zeros_like(frames[30])
    frames[31] = rng.integers(0, 256, frames[31].shape, dtype=np.uint8)
    frames[32] = np.full_like(frames[32], 128)
    frames.append(np.zeros_like(frames[0]))
    return encode_clip(frames)


@pytest.fixture(scope="module")
def analysed(obama_clip, detector) -> tuple[VideoAnalysis, list[tuple[int, int]]]:
    calls: list[tuple[int, int]] = []
    result = analyze_video(obama_clip, detector=detector, progress=lambda d, t: calls.append((d, t)), progress_every=10)
    return result, calls


@pytest.fixture(scope="module")
def analysis(analysed) -> VideoAnalysis:
    return analysed[0]


def test_shapes_and_dtypes(analysis):
    f = 43
    a = analysis
    assert a.frame_count == f and a.info.frame_count == f and (a.info.width, a.info.height) == (256, 256)
    assert (a.info.fps_num, a.info.fps_den) == (30, 1) and not a.info.variable_frame_rate
    expected = {
        "timestamps": ((f,), np.float64),
        "landmarks": ((f, 68, 2), np.float32),
        "raw_landmarks": ((f, 68, 2), np.float32),
        "face_valid": ((f,), np.bool_),
        "detection_scores": ((f,), np.float32),
        "detected": ((f,), np.bool_),
        "canonical_landmarks": ((f, 68, 2), np.float32),
        "canonical_mouth": ((f, 20, 2), np.float32),
        "jaw": ((f, 17, 2), np.float32),
        "head_pose": ((f, 6), np.float32),
        "landmark_jitter": ((f,), np.float32),
        "head_motion": ((f,), np.float32),
        "eye_openness": ((f,), np.float32),
        "crops": ((f, 180, 150, 3), np.uint8),
        "crop_masks": ((f, 180, 150), np.uint8),
        "mean_shape": ((68, 2), np.float32),
    }
    for name, (shape, dtype) in expected.items():
        value = getattr(a, name)
        assert value.shape == shape and value.dtype == dtype, name
        assert not value.flags.writeable, name
    assert a.template_id == TEMPLATE_ID and np.array_equal(a.template, CANONICAL_TEMPLATE)
    np.testing.assert_allclose(a.timestamps, np.arange(f) / 30, atol=1e-9)


def test_frames_without_a_face_are_flagged_and_filled(analysis):
    a = analysis
    expected = np.array([i not in NO_FACE for i in range(a.frame_count)])
    np.testing.assert_array_equal(a.face_valid, expected)
    assert a.valid_frame_count == a.frame_count - len(NO_FACE)
    gap = list(NO_FACE)
    for name in (
        "landmarks",
        "raw_landmarks",
        "canonical_landmarks",
        "canonical_mouth",
        "jaw",
        "head_pose",
        "landmark_jitter",
    ):
        value = getattr(a, name)
        assert np.isnan(value[gap]).all() and np.isfinite(value[a.face_valid]).all(), name
    assert np.isnan(a.detection_scores[gap]).all()
    assert (a.crops[gap] == 0).all() and (a.crop_masks[gap] == 0).all()
    assert (a.crop_masks[a.face_valid] == 1).all()  # face well inside the frame
    assert np.isfinite(a.head_motion).all() and np.isfinite(a.eye_openness).all()
    assert a.detected[0] and a.detected[33]  # re-detected after the gap


def test_smoothing_streamed_equals_offline_and_stays_close(analysis):
    a = analysis
    offline = smooth_landmarks(a.raw_landmarks, a.face_valid, fps=a.info.fps, cutoff_hz=a.smoothing_cutoff_hz)
    np.testing.assert_allclose(a.landmarks, offline, atol=1e-4, equal_nan=True)
    diff = np.linalg.norm(a.landmarks - a.raw_landmarks, axis=-1)[a.face_valid]
    assert np.median(diff) < 1.0 and diff.max() < 6.0


def test_canonical_shapes_are_plausible(analysis):
    a = analysis
    mouth = a.canonical_mouth[a.face_valid]
    assert mouth[..., 0].min() > 0.28 and mouth[..., 0].max() < 0.72
    assert mouth[..., 1].min() > 0.6 and mouth[..., 1].max() < 1.0
    np.testing.assert_array_equal(a.canonical_mouth, a.canonical_landmarks[:, 48:68])
    np.testing.assert_array_equal(a.jaw, a.canonical_landmarks[:, :17])
    assert np.abs(a.mean_shape - CANONICAL_TEMPLATE).max() < 0.12
    pose = a.head_pose[a.face_valid]
    assert np.abs(pose[:, :3]).max() < 0.6  # a near-frontal speaker
    assert np.median(a.landmark_jitter[a.face_valid]) < 0.02  # steady tracking
    assert pose[:, 5].min() > 40 and pose[:, 5].max() < 80  # inter-ocular distance in pixels at 256x256
    assert 0.01 < np.median(a.eye_openness) < 0.06


def test_crops_show_the_mouth_and_round_trip(analysis):
    a = analysis
    i = 12
    warp = a.warp(i)
    crop, mask = warp.to_crop(next(f for _, _, f in iter_frames(OBAMA, start=i, stop=i + 1)))
    # The crop from the analysis' (re-encoded) frame is close to one from the original frame.
    assert np.abs(crop.astype(int) - a.crops[i].astype(int)).mean() < 6
    mouth_px = DEFAULT_GEOMETRY.canonical_to_crop(a.canonical_mouth[i])
    assert (mouth_px >= 0).all() and (mouth_px[:, 0] < 150).all() and (mouth_px[:, 1] < 180).all()
    with pytest.raises(InvalidInput, match="no face"):
        a.warp(NO_FACE[0])
    with pytest.raises(InvalidInput, match="outside"):
        a.warp(a.frame_count)


def test_progress_is_reported(analysed):
    calls = analysed[1]
    assert calls[-1] == (43, 43)
    assert [d for d, _ in calls[:-1]] == [10, 20, 30, 40]


def test_video_without_any_face_raises_no_face(detector):
    frames = [np.full((120, 160, 3), 100 + i, np.uint8) for i in range(8)]
    with pytest.raises(NoFace, match="8 frames"):
        analyze_video(encode_clip(frames), detector=detector)


def test_bad_input_limits_and_cancellation(obama_clip, detector):
    with pytest.raises(InvalidInput):
        analyze_video(b"\x00\x01garbage" * 100, detector=detector)
    with pytest.raises(InvalidInput, match="empty"):
        analyze_video(b"", detector=detector)
    with pytest.raises(TooLarge, match="frames"):
        analyze_video(obama_clip, detector=detector, max_frames=10)
    with pytest.raises(TooLarge, match="lasts"):
        analyze_video(obama_clip, detector=detector, max_duration_seconds=0.5)
    with pytest.raises(InvalidInput, match="smoothing"):
        analyze_video(obama_clip, detector=detector, smoothing_cutoff_hz=-1)
    with pytest.raises(InvalidInput, match="crop"):
        analyze_video(obama_clip, detector=detector, crop_size=(2, 2))
    polls = []

    def stop() -> bool:
        polls.append(1)
        return len(polls) > 5

    with pytest.raises(Cancelled, match="cancelled after 5 frames"):
        analyze_video(obama_clip, detector=detector, should_stop=stop)


def test_variable_frame_rate_clip_keeps_its_timestamps(detector):
    frames = [f for _, _, f in iter_frames(OBAMA, stop=10)]
    pts_ms = [0, 33, 67, 100, 200, 233, 267, 300, 450, 483]
    data = encode_clip(frames, time_base=Fraction(1, 1000), pts=pts_ms)
    a = analyze_video(data, detector=detector)
    np.testing.assert_allclose(a.timestamps, np.array(pts_ms) / 1000, atol=1e-9)
    assert a.info.variable_frame_rate and a.face_valid.all()


def test_512_clip_first_frames(detector):
    frames = [f for _, _, f in iter_frames(KATIE, stop=8)]
    a = analyze_video(encode_clip(frames, rate=Fraction(25)), detector=detector, crop_size=(96, 112))
    assert a.face_valid.all() and a.crops.shape == (8, 112, 96, 3)
    assert (a.info.fps_num, a.info.fps_den) == (25, 1)
    np.testing.assert_allclose(a.timestamps, np.arange(8) / 25, atol=1e-9)
    assert 90 < np.median(a.head_pose[:, 5]) < 200


def test_crops_handed_to_a_sink_are_the_ones_kept_otherwise(detector):
    frames = [f for _, _, f in iter_frames(KATIE, stop=8)]
    data = encode_clip(frames, rate=Fraction(25))
    kept = analyze_video(data, detector=detector, crop_size=(96, 112))
    streamed: list[tuple[np.ndarray, np.ndarray]] = []
    light = analyze_video(data, detector=detector, crop_size=(96, 112), crop_sink=lambda c, m: streamed.append((c, m)))
    assert light.crops is None and light.crop_masks is None
    np.testing.assert_array_equal(np.stack([c for c, _ in streamed]), kept.crops)
    np.testing.assert_array_equal(np.stack([m for _, m in streamed]), kept.crop_masks)
    np.testing.assert_array_equal(light.landmarks, kept.landmarks)


def test_crop_archive_is_lossless_and_smaller(analysis):
    crops = np.ascontiguousarray(analysis.crops)
    data = encode_frames(crops)
    assert len(data) < 0.7 * crops.nbytes
    np.testing.assert_array_equal(decode_frames(data), crops)
    np.testing.assert_array_equal(decode_frames(data, indices=[5, 1]), crops[[5, 1]])
    masks = encode_frames(analysis.crop_masks)
    assert len(masks) < 0.05 * analysis.crop_masks.nbytes
    np.testing.assert_array_equal(decode_frames(masks), analysis.crop_masks)
    with pytest.raises(InvalidInput, match="not a frame archive"):
        decode_frames(b"nope")
    with pytest.raises(InvalidInput, match="out of range"):
        decode_frames(data, indices=[99])
    with pytest.raises(InvalidInput, match="uint8"):
        encode_frames(crops.astype(np.float32))


@pytest.mark.slow
def test_whole_clip_is_tracked_without_loss(detector):
    a = analyze_video(OBAMA, detector=detector)
    assert a.frame_count == 602 and a.face_valid.all()
    assert a.detected.sum() < 602 / 5  # most frames are tracked, not detected
    jitter = np.linalg.norm(np.diff(a.landmarks[:, [27, 30, 33]], 2, axis=0), axis=-1)
    raw_jitter = np.linalg.norm(np.diff(a.raw_landmarks[:, [27, 30, 33]], 2, axis=0), axis=-1)
    assert jitter.mean() < raw_jitter.mean()
