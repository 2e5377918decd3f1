"""Composite, issue 14: one jaw line. A bearded chin whose texture comes from a more open mouth (its chin lower) gets
the whole chin moved there, beard and edge together, so no second contour remains, and nothing beside the face
bends."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from deploy.samples import SAMPLE_DATA
from services.composite.render import JAW_MOVING, composite_frame, correct_jaw
from services.face.core import analyze_video
from services.face.landmarks import LandmarkDetector
from services.runtime.canonical import LowerFaceWarp, apply_similarity
from services.runtime.media import iter_frames
from tests.face.helpers import encode_clip

KATIE = SAMPLE_DATA / "targets" / "hdtf_katiehill_512.mp4"

pytestmark = pytest.mark.skipif(not KATIE.is_file(), reason="shared data not present")


def bearded(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The frame with a dark beard along the jaw line (points 3..13), from the line to a band below it."""
    out = frame.copy()
    jaw = landmarks[3:14]
    warp = LowerFaceWarp(landmarks)
    a, t = warp.similarity
    below = apply_similarity(1 / a, -t / a, warp.canonical[3:14] + [0.0, 0.07])
    band = np.vstack([jaw, below[::-1]])
    cv2.fillPoly(out, [np.round(band * 16).astype(np.int32)], (38, 42, 52), lineType=cv2.LINE_AA, shift=4)
    return out


@pytest.fixture(scope="module")
def chin():
    """A bearded target frame A, and B: the same face with the chin moved down as a more open mouth moves it (the
    candidates' frame), its canonical crop and jaw line."""
    frame = next(f for _, _, f in iter_frames(KATIE, stop=1))
    analysis = analyze_video(encode_clip([frame]), detector=LandmarkDetector(), smoothing_cutoff_hz=0.0)
    landmarks = analysis.landmarks[0].astype(np.float64)
    a_frame = bearded(frame, landmarks)
    warp = LowerFaceWarp(landmarks, analysis.geometry)
    taper = np.clip((warp.canonical[JAW_MOVING, 1] - 0.7) / 0.39, 0, 1)[:, None]
    delta = np.array([0.0, 0.05]) * taper  # the chin 0.05 lower, the jaw angles not at all
    b_frame, moved, shift = correct_jaw(a_frame, landmarks, warp, delta)
    assert shift > 5
    # B's chin region moves as one: the beard below the jaw line as far as the line (the followers of correct_jaw).
    b_landmarks = landmarks.copy()
    b_landmarks[JAW_MOVING] = moved
    b_warp = LowerFaceWarp(b_landmarks.astype(np.float32), analysis.geometry)
    crop, mask = b_warp.to_crop(b_frame)
    return analysis, a_frame, landmarks, b_frame, b_landmarks, crop, mask, b_warp.canonical[:17]


def jaw_band(landmarks: np.ndarray, shape) -> np.ndarray:
    """Pixels within 0.1 face widths of the jaw line 4..12 (both sides of it)."""
    band = np.zeros(shape[:2], np.uint8)
    width = max(int(0.1 / abs(LowerFaceWarp(landmarks).similarity[0])), 2)
    cv2.polylines(band, [np.round(landmarks[4:13]).astype(np.int32)], False, 1, thickness=width)
    return band.astype(bool)


def test_the_chin_moves_beard_and_edge_together(chin):
    analysis, a_frame, landmarks, b_frame, b_landmarks, crop, mask, b_jaw = chin
    result = composite_frame(a_frame, landmarks, crop, geometry=analysis.geometry, mean_jaw=b_jaw, texture_mask=mask)
    assert result.composited
    band = jaw_band(b_landmarks, a_frame.shape) | jaw_band(landmarks, a_frame.shape)
    error = np.abs(result.image.astype(int) - b_frame)[band].mean()
    moved = np.abs(a_frame.astype(int) - b_frame)[band].mean()
    # The output's chin is B's: its beard and its edge where B has them, nothing left where A had them.
    assert error < 0.25 * moved, (error, moved)
    # Along the jaw, the output has one dark-to-skin edge per column, as B has (a second contour would add one).
    x_points = b_landmarks[5:12, 0]
    for x in np.round(x_points).astype(int):
        column = cv2.cvtColor(result.image, cv2.COLOR_BGR2GRAY)[:, x].astype(int)
        reference = cv2.cvtColor(b_frame, cv2.COLOR_BGR2GRAY)[:, x].astype(int)
        lo = int(landmarks[48:68, 1].max()) + 5
        edges = np.flatnonzero(np.abs(np.diff(column[lo:])) > 25)
        expected = np.flatnonzero(np.abs(np.diff(reference[lo:])) > 25)
        assert len(np.unique(edges // 4)) <= len(np.unique(expected // 4)) + 1, (x, edges, expected)
    # Beside the face (beyond the jaw angles) nothing moved.
    left = int(landmarks[:17, 0].min()) - int(0.1 / abs(LowerFaceWarp(landmarks).similarity[0]))
    assert np.array_equal(result.image[:, :left], a_frame[:, :left])
