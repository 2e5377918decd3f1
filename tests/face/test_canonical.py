"""Canonical template, similarity alignment, and the lower-face warp round trip on real frames."""

from __future__ import annotations

import numpy as np
import pytest

from services.face.landmarks import LandmarkDetector
from services.runtime.canonical import (
    CANONICAL_TEMPLATE,
    DEFAULT_GEOMETRY,
    MIRROR,
    TEMPLATE_ID,
    CanonicalGeometry,
    LowerFaceWarp,
    apply_similarity,
    camera_matrix,
    canonical_template,
    euler_angles,
    eye_openness,
    fit_similarity,
    head_motion,
    head_pose,
    landmark_jitter,
    project_face,
    rotation_matrix,
    template_id,
    to_canonical,
)
from services.runtime.errors import InvalidInput
from services.runtime.media import iter_frames
from tests.face.helpers import KATIE, OBAMA

needs_data = pytest.mark.skipif(not OBAMA.is_file(), reason="shared data not present")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


@pytest.fixture(scope="module")
def detector() -> LandmarkDetector:
    return LandmarkDetector()


def random_similarities(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.uniform(100, 400, n) * np.exp(1j * rng.uniform(-0.4, 0.4, n))
    t = rng.uniform(0, 800, n) + 1j * rng.uniform(0, 600, n)
    return a, t


def test_template_is_symmetric_and_in_face_box_units():
    tpl = CANONICAL_TEMPLATE
    assert tpl.shape == (68, 2) and tpl.dtype == np.float32 and not tpl.flags.writeable
    mirrored = tpl[MIRROR].copy()
    mirrored[:, 0] = 1 - mirrored[:, 0]
    np.testing.assert_allclose(mirrored, tpl, atol=1e-4)
    mouth = tpl[48:68]
    assert mouth[:, 0].min() > 0.3 and mouth[:, 0].max() < 0.7
    assert mouth[:, 1].min() > 0.65 and mouth[:, 1].max() < 0.9
    assert 1.0 < tpl[8, 1] < 1.1  # chin just below the face box
    assert template_id(tpl) == TEMPLATE_ID and TEMPLATE_ID.startswith("tpl-")


def test_similarity_alignment_recovers_the_template():
    a, t = random_similarities(5)
    shapes = apply_similarity(a, t, np.broadcast_to(CANONICAL_TEMPLATE, (5, 68, 2)))
    np.testing.assert_allclose(to_canonical(shapes), np.broadcast_to(CANONICAL_TEMPLATE, (5, 68, 2)), atol=1e-5)
    fa, ft = fit_similarity(shapes, CANONICAL_TEMPLATE)
    np.testing.assert_allclose(fa, 1 / a, rtol=1e-6)


def test_canonical_template_is_procrustes_mean():
    rng = np.random.default_rng(1)
    a, t = random_similarities(30, seed=2)
    base = CANONICAL_TEMPLATE.astype(np.float64)
    shapes = apply_similarity(a, t, base + rng.normal(0, 0.004, (30, 68, 2)))
    valid = np.ones(30, bool)
    valid[:3] = False
    shapes[:3] = np.nan  # invalid frames are ignored
    mean = canonical_template(shapes, valid)
    assert mean.dtype == np.float32 and mean.shape == (68, 2)
    assert np.abs(mean - base).max() < 0.01
    with pytest.raises(InvalidInput, match="no valid frame"):
        canonical_template(shapes, np.zeros(30, bool))
    with pytest.raises(InvalidInput):
        canonical_template(np.zeros((4, 20, 2)))


def test_geometry_maps_pixels_and_validates():
    g = DEFAULT_GEOMETRY
    assert g.crop_shape == (180, 150) and g.template_id == TEMPLATE_ID
    corner = g.crop_to_canonical(np.array([[-0.5, -0.5], [149.5, 179.5]]))
    np.testing.assert_allclose(corner, [[0.25, 0.5], [0.75, 1.1]], atol=1e-12)
    pts = np.random.default_rng(0).uniform(0, 1, (10, 2))
    np.testing.assert_allclose(g.crop_to_canonical(g.canonical_to_crop(pts)), pts, atol=1e-12)
    with pytest.raises(InvalidInput, match="crop region"):
        CanonicalGeometry.create(crop_region=(0.75, 0.5, 0.25, 1.1))
    with pytest.raises(InvalidInput, match="crop size"):
        CanonicalGeometry.create(crop_size=(4, 180))


@needs_data
@pytest.mark.parametrize(("path", "index", "min_psnr"), [(OBAMA, 10, 40.0), (KATIE, 3, 38.0)])
def test_crop_round_trips_onto_the_frame(detector, path, index, min_psnr):
    frame = next(f for i, _, f in iter_frames(path, start=index, stop=index + 1))
    landmarks, _ = detector.detect(frame)
    warp = LowerFaceWarp(landmarks)
    crop, mask = warp.to_crop(frame)
    assert crop.shape == (180, 150, 3) and crop.dtype == np.uint8 and mask.all()
    patch = warp.to_frame(crop, frame.shape, crop_mask=mask)
    h, w = patch.mask.shape
    region = patch.mask.astype(bool)
    assert region.sum() > 0.5 * h * w
    original = frame[patch.y0 : patch.y0 + h, patch.x0 : patch.x0 + w]
    assert psnr(patch.image[region], original[region]) > min_psnr
    # The mouth is inside the warped region, and pasting changes nothing outside it.
    mouth = np.round(landmarks[48:68]).astype(int) - [patch.x0, patch.y0]
    assert region[mouth[:, 1], mouth[:, 0]].all()
    pasted = patch.paste(frame)
    outside = np.ones(frame.shape[:2], bool)
    outside[patch.y0 : patch.y0 + h, patch.x0 : patch.x0 + w] = ~region
    assert np.array_equal(pasted[outside], frame[outside])


@needs_data
def test_mouth_appears_at_its_canonical_coordinates(detector):
    frame = next(f for i, _, f in iter_frames(OBAMA, start=20, stop=21))
    landmarks, _ = detector.detect(frame)
    warp = LowerFaceWarp(landmarks)
    canonical = to_canonical(landmarks)
    # Points inside the outer lip map by the frame's similarity, so the crop shows the mouth where
    # canonical_mouth says; the rigid anchors land on the template.
    in_crop = warp.frame_points_to_crop(landmarks[48:68].astype(np.float64))
    np.testing.assert_allclose(in_crop, DEFAULT_GEOMETRY.canonical_to_crop(canonical[48:68]), atol=1e-6)
    anchors = warp.frame_points_to_crop(landmarks[[31, 33, 35]].astype(np.float64))
    np.testing.assert_allclose(anchors, DEFAULT_GEOMETRY.canonical_to_crop(CANONICAL_TEMPLATE[[31, 33, 35]]), atol=1e-6)
    # Point maps are inverse to each other.
    grid = np.stack(np.meshgrid(np.linspace(0, 149, 7), np.linspace(0, 179, 9)), -1).reshape(-1, 2)
    np.testing.assert_allclose(warp.frame_points_to_crop(warp.crop_points_to_frame(grid)), grid, atol=1e-6)


def test_warp_handles_faces_partly_outside_the_frame():
    frame = np.full((120, 160, 3), 90, np.uint8)
    a, t = 150 * np.exp(0.1j), -40 + 10j  # face centred near the left edge
    landmarks = apply_similarity(a, t, CANONICAL_TEMPLATE)
    warp = LowerFaceWarp(landmarks)
    crop, mask = warp.to_crop(frame)
    assert 0 < mask.mean() < 1 and (crop[mask == 0] == 0).all() and (crop[mask == 1] == 90).all()
    patch = warp.to_frame(crop, frame.shape, crop_mask=mask)
    assert patch.x0 == 0 and (patch.image[patch.mask == 1] == 90).all()
    with pytest.raises(InvalidInput):
        LowerFaceWarp(np.zeros((68, 2)))
    with pytest.raises(InvalidInput):
        warp.to_frame(crop[:10], frame.shape)


def test_pose_motion_and_eye_measures():
    a, t = random_similarities(6, seed=4)
    shapes = apply_similarity(a, t, np.broadcast_to(CANONICAL_TEMPLATE, (6, 68, 2)))
    pose = head_pose(shapes)
    assert pose.shape == (6, 6) and pose.dtype == np.float32
    # The flat template is frontal (to the perspective of the near-orthographic camera: 0.04 degrees).
    np.testing.assert_allclose(pose[:, :2], 0, atol=2e-3)
    np.testing.assert_allclose(pose[:, 2], np.angle(a), atol=1e-4)
    centre = a * (0.5 + 0.5j) + t
    np.testing.assert_allclose(pose[:, 3], centre.real, rtol=1e-5)
    np.testing.assert_allclose(pose[:, 5], np.abs(a) * 0.4193, rtol=1e-3)
    assert np.isnan(head_pose(np.full((1, 68, 2), np.nan))[0, :3]).all()

    track = np.broadcast_to(CANONICAL_TEMPLATE * 100, (10, 68, 2)).copy()
    track = np.broadcast_to(CANONICAL_TEMPLATE * 100, (10, 68, 2)).copy()
    track += np.arange(10)[:, None, None] * np.array([2.0, 0.0])  # 2 px per frame to the right
    valid = np.ones(10, bool)
    valid[4] = False
    track[4] = np.nan
    motion = head_motion(track, valid)
    iod = 0.4193 * 100
    np.testing.assert_allclose(motion, 2 / iod, rtol=2e-3)
    openness = eye_openness(track, valid)
    assert np.isfinite(openness).all() and 0.02 < openness[0] < 0.05


@pytest.mark.parametrize(
    ("yaw", "pitch", "roll"), [(0.0, 0.0, 0.0), (0.35, 0.0, 0.0), (-0.6, 0.15, 0.05), (0.2, -0.3, -0.2)]
)
def test_head_pose_recovers_the_rotation_of_the_generic_face(yaw, pitch, roll):
    """solvePnP on the generic face seen by the frame's camera gives back its rotation (signs as documented)."""
    camera = camera_matrix((640, 480))
    points = project_face(rotation_matrix(yaw, pitch, roll), np.array([-0.3, -0.6, 4.0]), camera)
    np.testing.assert_allclose(euler_angles(rotation_matrix(yaw, pitch, roll)), (yaw, pitch, roll), atol=1e-12)
    pose = head_pose(points[None], frame_size=(640, 480))[0]
    np.testing.assert_allclose(pose[:3], (yaw, pitch, roll), atol=1e-4)
    # Yaw > 0: the nose tip moves towards +x (image right) of the eyes' midpoint; pitch > 0: it moves down.
    assert np.sign(points[30, 0] - points[[39, 42], 0].mean()) == np.sign(yaw) or yaw == 0
    if yaw == 0 and pitch == 0:
        noisy = points + np.random.default_rng(0).normal(0, 0.5, points.shape)  # half a pixel of tracker noise
        assert np.abs(np.degrees(head_pose(noisy[None], frame_size=(640, 480))[0, :2])).max() < 3


def test_landmark_jitter():
    smooth = np.broadcast_to(CANONICAL_TEMPLATE * 200, (3, 68, 2)).copy()
    raw = smooth.copy()
    raw[1, 27:48] += np.array([0.0, 8.4])  # every rigid point 8.4 px off: 0.1 inter-ocular distances
    raw[2] = np.nan
    jitter = landmark_jitter(raw, smooth)
    assert jitter.dtype == np.float32 and jitter[0] == 0 and np.isnan(jitter[2])
    np.testing.assert_allclose(jitter[1], 8.4 / (200 * 0.4193), rtol=1e-3)
    with pytest.raises(InvalidInput):
        landmark_jitter(raw[:, :10], smooth)
