"""Composite, issue 14: the blend stays inside the target face's own silhouette, on frontal and turned faces."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from deploy.samples import SAMPLE_DATA
from services.composite.render import BlendSettings, composite_frame, face_outline
from services.face.core import analyze_video
from services.face.landmarks import LandmarkDetector
from services.runtime.canonical import DEFAULT_GEOMETRY
from services.runtime.media import iter_frames
from tests.face.helpers import encode_clip

NEWS = SAMPLE_DATA / "targets" / "news_man_844.mp4"
GREEN = np.array([0, 255, 0], np.uint8)

pytestmark = pytest.mark.skipif(not NEWS.is_file(), reason="shared data not present")


def shear(frame: np.ndarray, k: float) -> np.ndarray:
    """Horizontal shear about the frame centre: x' = x + k (y - h / 2) (a face leaning like a turned one)."""
    h, w = frame.shape[:2]
    m = np.array([[1.0, k, -k * h / 2], [0.0, 1.0, 0.0]])
    return cv2.warpAffine(frame, m, (w, h), borderMode=cv2.BORDER_REFLECT)


@pytest.fixture(scope="module")
def faces():
    """Two frames of a real clip (downscaled to 422 px), the same frames sheared both ways, and one cropped so that
    the face touches the frame's edge, analysed."""
    frames = [cv2.resize(f, (422, 422), interpolation=cv2.INTER_AREA) for _, _, f in iter_frames(NEWS, stop=2)]
    frames += [shear(frames[0], 0.35), shear(frames[1], -0.35)]
    frames.append(cv2.copyMakeBorder(frames[0][:, 110:], 0, 0, 0, 110, cv2.BORDER_REPLICATE))  # face at the left edge
    analysis = analyze_video(encode_clip(frames), detector=LandmarkDetector(), smoothing_cutoff_hz=0.0)
    assert analysis.face_valid.all()
    decoded = [f for _, _, f in iter_frames(encode_clip(frames))]
    return analysis, decoded


def outline_mask(landmarks: np.ndarray, shape, grow: int) -> np.ndarray:
    mask = np.zeros(shape[:2], np.uint8)
    outline = face_outline(landmarks, landmarks[3:14])
    cv2.fillPoly(mask, [np.round(outline * 16).astype(np.int32)], 1, shift=4)
    return cv2.dilate(mask, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)).astype(bool)


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4])
def test_a_garish_texture_changes_nothing_outside_the_face(faces, index):
    """A texture that is all green (as if every candidate brought background) never shows past the jaw line or the
    cheeks: every changed pixel lies inside the face outline (plus the pyramid's roll-off of two pixels)."""
    analysis, frames = faces
    frame, landmarks = frames[index], analysis.landmarks[index]
    texture = np.broadcast_to(GREEN, (*DEFAULT_GEOMETRY.crop_shape, 3)).copy()
    result = composite_frame(
        frame, landmarks, texture, geometry=analysis.geometry, settings=BlendSettings(color_match="none")
    )
    assert result.composited
    changed = np.abs(result.image.astype(int) - frame.astype(int)).max(axis=-1) > 6
    assert changed.sum() > 1000
    inside = outline_mask(landmarks, frame.shape, grow=2)
    assert not (changed & ~inside).any(), int((changed & ~inside).sum())


def test_texture_mask_zero_shows_the_target(faces):
    """Where the texture has no face (mask 0: below every candidate's chin), the target frame shows."""
    analysis, frames = faces
    frame, landmarks = frames[2], analysis.landmarks[2]
    h, w = DEFAULT_GEOMETRY.crop_shape
    texture = analysis.crops[2].copy()
    mask = np.ones((h, w), np.uint8)
    texture[h // 2 :] = GREEN
    mask[h // 2 - 6 :] = 0
    result = composite_frame(frame, landmarks, texture, geometry=analysis.geometry, texture_mask=mask)
    assert result.composited
    greenish = result.image[..., 1].astype(int) - result.image[..., [0, 2]].max(axis=-1) > 60
    assert not greenish.any()
