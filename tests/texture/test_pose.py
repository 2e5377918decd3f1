"""Texture core, issue 14: candidates vote only inside their own face, and are ranked by head pose as well as shape."""

from __future__ import annotations

import numpy as np
import pytest

from services.runtime.canonical import CANONICAL_TEMPLATE, DEFAULT_GEOMETRY
from services.runtime.errors import InvalidInput
from services.texture.core import (
    TextureOptions,
    face_masks,
    pose_distances,
    pose_penalty,
    prepare_target,
    synthesize,
)

M = 40
GREEN = np.array([0, 255, 0], np.uint8)
FRONTAL_SKIN = np.array([90, 120, 170], np.uint8)
TURNED_SKIN = np.array([60, 90, 140], np.uint8)


def synthetic_target(seed: int = 0):
    """M frames: the first half frontal (yaw 0), the second turned (yaw 30 degrees); the same range of mouth
    shapes in both; crops are flat skin of a colour per pose inside the face outline and green outside it."""
    rng = np.random.default_rng(seed)
    geometry = DEFAULT_GEOMETRY
    mouth = np.broadcast_to(CANONICAL_TEMPLATE[48:68], (M, 20, 2)).astype(np.float32).copy()
    opening = np.tile(np.linspace(0.0, 0.06, M // 2), 2)
    mouth[:, 12:, 1] += opening[:, None] * (np.arange(8) >= 4)[None, :]  # lower inner lip opens
    mouth += rng.normal(0, 0.002, mouth.shape).astype(np.float32)
    jaw = np.broadcast_to(CANONICAL_TEMPLATE[:17], (M, 17, 2)).astype(np.float32).copy()
    pose = np.zeros((M, 6), np.float32)
    pose[M // 2 :, 0] = np.radians(30.0)
    inside = face_masks(jaw, np.ones(M, bool), geometry, margin=0.0).astype(bool)
    h, w = geometry.crop_shape
    crops = np.empty((M, h, w, 3), np.uint8)
    crops[:] = GREEN
    for i in range(M):
        crops[i][inside[i]] = FRONTAL_SKIN if i < M // 2 else TURNED_SKIN
    masks = np.ones((M, h, w), np.uint8)
    return mouth, jaw, pose, crops, masks, geometry


@pytest.fixture(scope="module")
def target():
    mouth, jaw, pose, crops, masks, geometry = synthetic_target()
    bank = prepare_target(mouth, np.ones(M, bool), crops, masks, geometry, jaw_lines=jaw, head_pose=pose)
    return bank, mouth


def test_face_masks_follow_the_jaw_line():
    jaw = CANONICAL_TEMPLATE[None, :17].astype(np.float32)
    geometry = DEFAULT_GEOMETRY
    mask = face_masks(jaw, np.ones(1, bool), geometry)[0]
    h, w = geometry.crop_shape
    chin = geometry.canonical_to_crop(CANONICAL_TEMPLATE[8])
    assert mask[: h // 2].all()  # cheeks and mouth
    assert mask[int(chin[1]) - 8, int(chin[0])] == 1 and mask[int(chin[1]) + 2, int(chin[0])] == 0
    assert mask[-1, 0] == 0 and mask[-1, -1] == 0  # below the jaw line on both sides
    # The margin keeps votes off the outline: 0.012 units are 3.6 crop pixels.
    loose = face_masks(jaw, np.ones(1, bool), geometry, margin=0.0)[0]
    assert loose.sum() > mask.sum() and (mask <= loose).all()
    assert face_masks(np.full((1, 17, 2), np.nan), np.ones(1, bool), geometry).all()  # no jaw: the crop mask decides


def test_no_candidate_brings_its_background(target):
    bank, mouth = target
    chunk = synthesize(bank, mouth, 0, M, options=TextureOptions(n_candidates=10, detail_amount=0.0))
    covered = chunk.texture_masks.astype(bool)
    assert covered.any(axis=0)[:90].all() and not covered[:, -1, 0].any()
    assert not (chunk.textures[covered] == GREEN).all(axis=-1).any()  # green never enters the texture


def test_candidates_come_from_the_target_frames_pose(target):
    bank, mouth = target
    n = 10
    # Output frames 0-19 show frontal target frames, 20-39 turned ones; the same mouth shapes drive both halves.
    shown = np.arange(M)
    options = TextureOptions(n_candidates=n, detail_amount=0.0, warmup_frames=0)
    chunk = synthesize(bank, mouth, 0, M, options=options, retiming_map=shown)
    turned = shown >= M // 2
    assert (chunk.candidates[turned] >= M // 2).all() and (chunk.candidates[~turned] < M // 2).all()
    np.testing.assert_allclose(chunk.pose_differences, 0.0, atol=1e-4)
    face = chunk.texture_masks[0].astype(bool)
    assert (chunk.textures[M - 1][face] == TURNED_SKIN).all() and (chunk.textures[0][face] == FRONTAL_SKIN).all()
    # The seed (pose ignored) mixes the poses, and the reported pose difference says so.
    seed = synthesize(
        bank,
        mouth,
        0,
        M,
        options=TextureOptions(n_candidates=n, detail_amount=0.0, warmup_frames=0, pose_tolerance_degrees=0.0),
        retiming_map=shown,
    )
    mixed = ((seed.candidates >= M // 2) != turned[:, None]).any(axis=1)
    assert mixed.mean() > 0.8
    assert np.nanmax(seed.pose_differences) > 10.0
    # Without a retiming map the displayed frame is unknown: no pose term, no pose difference.
    plain = synthesize(bank, mouth, 0, 4, options=options)
    assert np.isnan(plain.pose_differences).all()


def test_pose_penalty_and_distances(target):
    bank, _ = target
    assert bank.poses.shape == (M, 2) and bank.spread > 0
    tol = np.radians(6.0)
    rows = np.array([[0.0, 0.0], [np.radians(30.0), 0.0], [np.nan, np.nan]])
    penalty = pose_penalty(rows, bank, tol)
    assert penalty.shape == (3, M)
    assert (penalty[0, : M // 2] == 0).all() and (penalty[1, M // 2 :] == 0).all()
    # 30 degrees apart with a 6 degree tolerance: (24 / 6)^2 = 16 spreads.
    np.testing.assert_allclose(penalty[0, M // 2 :], 16 * bank.spread, rtol=1e-6)
    assert (penalty[2] == 0).all()  # unknown pose: no penalty
    np.testing.assert_allclose(pose_distances([0.3, 0.4], [0.0, 0.0]), 0.5)
    with pytest.raises(InvalidInput):
        TextureOptions(pose_tolerance_degrees=-1.0)
    mouth, jaw, pose, crops, masks, geometry = synthetic_target()
    with pytest.raises(InvalidInput):
        prepare_target(mouth, np.ones(M, bool), crops, masks, geometry, head_pose=pose[:3])
