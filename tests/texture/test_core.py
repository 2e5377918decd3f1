"""Texture core: exact weighted median, candidate selection on a real clip, width solving, coherence, errors."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from services.face.core import LandmarkDetector, VideoAnalysis, analyze_video
from services.runtime.canonical import DEFAULT_GEOMETRY
from services.runtime.errors import Cancelled, InvalidInput, NoFace
from services.runtime.media import iter_frames
from services.texture import core
from services.texture.core import (
    MIN_CANDIDATES,
    TextureOptions,
    flicker,
    mouth_region_mask,
    prepare_target,
    quantize_weights,
    restore_detail,
    select_candidates,
    shape_distances,
    solve_widths,
    synthesize,
    weighted_median,
    weighted_median_reference,
)
from tests.face.helpers import OBAMA, encode_clip

FRAMES = 60


# ---------------------------------------------------------------------- helpers
def python_median(values, weights, valid=None):
    """The definition, one pixel at a time: smallest value whose cumulative weight reaches half the total;
    the chosen candidate is the best-ranked voter with positive weight at that value."""
    k, p = values.shape
    median = np.zeros(p, np.uint8)
    chosen = np.full(p, -1, np.int32)
    for col in range(p):
        voters = [i for i in range(k) if valid is None or valid[i, col]]
        total = sum(int(weights[i]) for i in voters)
        if total == 0:
            continue
        for level in range(256):
            below = sum(int(weights[i]) for i in voters if values[i, col] <= level)
            if 2 * below >= total:
                median[col] = level
                chosen[col] = min(i for i in voters if values[i, col] == level and weights[i] > 0)
                break
    return median, chosen


def random_case(rng, k, p, *, levels=256, max_weight=5, mask_share=0.0):
    values = rng.integers(0, levels, (k, p)).astype(np.uint8)
    if levels < 256:
        values = (values * (255 // max(levels - 1, 1))).astype(np.uint8)
    weights = rng.integers(0, max_weight + 1, k)
    weights[rng.integers(0, k)] += 1  # at least one positive weight
    valid = None
    if mask_share > 0:
        valid = rng.random((k, p)) >= mask_share
        valid[:, 0] = False  # a pixel no candidate rendered
    return values, weights, valid


@pytest.fixture(scope="module")
def analysis() -> VideoAnalysis:
    if not OBAMA.is_file():
        pytest.skip("shared data not present")
    frames = [f for _, _, f in iter_frames(OBAMA, stop=FRAMES)]
    return analyze_video(encode_clip(frames), detector=LandmarkDetector())


@pytest.fixture(scope="module")
def bank(analysis):
    return prepare_target(
        analysis.canonical_mouth,
        analysis.face_valid,
        analysis.crops,
        analysis.crop_masks,
        analysis.geometry,
        jaw_lines=analysis.jaw,
    )


def region_error(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    """Mean |a - b| (uint8 levels, channel mean) inside a region."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).mean(axis=-1)
    return float((diff * region).sum() / region.sum())


# ---------------------------------------------------------------------- weighted median
@pytest.mark.parametrize(
    ("k", "p", "levels", "max_weight", "mask_share"),
    [
        (1, 40, 256, 3, 0.0),
        (2, 60, 3, 1, 0.0),  # equal weights, cumulative weight exactly half
        (4, 80, 4, 2, 0.3),
        (7, 80, 256, 0, 0.0),  # one positive weight, the rest zero
        (16, 60, 5, 3, 0.5),
        (33, 40, 256, 9, 0.2),
    ],
)
def test_weighted_median_equals_the_definition(k, p, levels, max_weight, mask_share):
    rng = np.random.default_rng(k * 1000 + p)
    values, weights, valid = random_case(rng, k, p, levels=levels, max_weight=max_weight, mask_share=mask_share)
    expected = python_median(values, weights, valid)
    for fn in (weighted_median, weighted_median_reference):
        median, chosen = fn(values, weights, valid)
        assert median.dtype == np.uint8 and chosen.dtype == np.int32
        np.testing.assert_array_equal(median, expected[0], err_msg=fn.__name__)
        np.testing.assert_array_equal(chosen, expected[1], err_msg=fn.__name__)


@pytest.mark.parametrize(("k", "p", "mask_share"), [(100, 27000, 0.0), (100, 5000, 0.1), (300, 3000, 0.0)])
def test_fast_median_equals_the_sort_reference_on_large_random_data(k, p, mask_share):
    rng = np.random.default_rng(k + p)
    values, _, valid = random_case(rng, k, p, mask_share=mask_share)
    # Realistic weights: quantized Gaussian weights with many equal neighbours.
    weights = quantize_weights(np.round(np.exp(-np.linspace(0, 3, k)), 2))
    fast = weighted_median(values, weights, valid)
    reference = weighted_median_reference(values, weights, valid)
    np.testing.assert_array_equal(fast[0], reference[0])
    np.testing.assert_array_equal(fast[1], reference[1])


def test_weighted_median_hand_cases():
    values = np.array([[10, 10, 200], [20, 30, 100], [30, 20, 100]], np.uint8)
    median, chosen = weighted_median(values, np.array([1, 1, 1]))
    np.testing.assert_array_equal(median, [20, 20, 100])
    np.testing.assert_array_equal(chosen, [1, 2, 1])  # ties at the median value: the best-ranked candidate
    # Exactly half at 10: the lower median.
    median, _ = weighted_median(np.array([[10], [90]], np.uint8), np.array([5, 5]))
    assert median[0] == 10
    # A heavy candidate wins; masked candidates do not vote.
    valid = np.array([[True], [False], [True]])
    median, chosen = weighted_median(np.array([[50], [0], [0]], np.uint8), np.array([3, 100, 1]), valid)
    assert (median[0], chosen[0]) == (50, 0)


def test_weighted_median_rejects_bad_inputs():
    values = np.zeros((3, 4), np.uint8)
    with pytest.raises(InvalidInput, match="uint8"):
        weighted_median(values.astype(np.float32), np.ones(3, int))
    with pytest.raises(InvalidInput, match="weights"):
        weighted_median(values, np.ones(2, int))
    with pytest.raises(InvalidInput, match="integer"):
        weighted_median(values, np.ones(3))
    with pytest.raises(InvalidInput, match=">= 0"):
        weighted_median(values, np.array([1, -1, 1]))
    with pytest.raises(InvalidInput, match="2\\*\\*24"):
        weighted_median(values, np.array([1 << 24, 1, 0]))
    with pytest.raises(InvalidInput, match="valid"):
        weighted_median(values, np.ones(3, int), np.ones((3, 5), bool))


# ---------------------------------------------------------------------- width solving
@pytest.mark.parametrize(("n", "share"), [(100, 0.9), (100, 0.5), (20, 0.99), (1, 0.9)])
def test_width_gives_the_n_best_their_share(n, share):
    rng = np.random.default_rng(n)
    d2 = rng.gamma(2.0, 0.01, (5, 2000)) + 1e-3
    order = np.argsort(d2, axis=1)
    beta, held = solve_widths(d2, order, n, share)
    assert (beta > 0).all()
    np.testing.assert_allclose(held, share, atol=1e-6)
    w = np.exp(-beta[:, None] * (d2 - d2.min(axis=1, keepdims=True)))
    direct = np.take_along_axis(w, order[:, :n], axis=1).sum(axis=1) / w.sum(axis=1)
    np.testing.assert_allclose(direct, share, atol=1e-6)


def test_width_degenerate_cases():
    d2 = np.array([[0.0, 1.0, 2.0, 3.0]])
    order = np.argsort(d2, axis=1)
    beta, held = solve_widths(d2, order, 2, 0.4)  # equal weights already give the 2 best 0.5 >= 0.4
    assert beta[0] == 0 and held[0] == pytest.approx(0.5)
    beta, held = solve_widths(d2, order, 4, 0.9)  # every frame among the n best
    assert beta[0] == 0 and held[0] == 1
    tie = np.array([[0.0, 0.0, 0.0, 1.0]])  # the 2 best of 3 equal frames hold at most 2/3: unreachable
    beta, held = solve_widths(tie, np.argsort(tie, axis=1, kind="stable"), 2, 0.9)
    assert np.isfinite(beta[0]) and held[0] == pytest.approx(2 / 3, abs=1e-6)


def test_fewer_target_frames_than_candidates(bank):
    # 60 frames, n = 100: all frames are candidates, the width is solved for the 30 best.
    cands = select_candidates(bank.shapes[[3, 4]], bank, n_candidates=100)
    assert cands.index.shape == (2, FRAMES)
    np.testing.assert_allclose(cands.share, 0.9, atol=1e-6)
    np.testing.assert_allclose(cands.weights.sum(axis=1), 1.0)
    assert (np.diff(cands.weights, axis=1) <= 1e-15).all()


# ---------------------------------------------------------------------- real data
def test_candidates_are_the_closest_shapes(bank, analysis):
    target = 17
    cands = select_candidates(bank.shapes[[target]], bank, n_candidates=10, temporal_coherence_weight=0.0)
    assert cands.index[0, 0] == target
    # Brute force: translation-free Euclidean distance over the 20 points.
    shapes = analysis.canonical_mouth.astype(np.float64)
    centred = shapes - shapes.mean(axis=1, keepdims=True)
    dist = np.linalg.norm((centred - centred[target]).reshape(FRAMES, -1), axis=1)
    np.testing.assert_array_equal(cands.index[0], np.argsort(dist, kind="stable")[:10])
    np.testing.assert_allclose(shape_distances(bank.shapes[[target]], bank)[0], dist**2, atol=1e-12)


def test_own_shape_gives_a_texture_close_to_that_frame(bank, analysis):
    target = 40
    shapes = bank.shapes[[target] * 3]
    region = mouth_region_mask(analysis.canonical_mouth[target], analysis.geometry)
    crop = analysis.crops[target]
    others = [region_error(analysis.crops[i], crop, region) for i in range(FRAMES) if i != target]
    errors, shape_errors = {}, {}
    for n in (5, 100):
        options = TextureOptions(n_candidates=n, warmup_frames=1, max_candidate_share=1.0)  # n as given
        chunk = synthesize(bank, shapes, 1, 2, options=options)
        assert chunk.candidates[0, 0] == target
        errors[n] = region_error(chunk.textures[0], crop, region)
        shape_errors[n] = np.abs(chunk.mean_shapes[0] - analysis.canonical_mouth[target]).max()
    # Measured: 5.7 and 10.6 levels against a median of 18.7 over the clip's other frames (nearest 6.9).
    assert errors[5] < 0.45 * np.median(others), (errors, np.median(others))
    assert errors[100] < 0.7 * np.median(others), (errors, np.median(others))
    assert shape_errors[5] < 0.02 and shape_errors[5] < shape_errors[100], shape_errors


def test_a_short_target_gets_fewer_candidates_so_its_median_keeps_the_predicted_mouth(bank, analysis):
    """20 candidates of a 200-frame target are a tenth of its mouths: at most a 20th (5 at least) are taken."""
    options = TextureOptions()
    assert options.candidates_for(200) == 10 and options.candidates_for(7500) == 20
    assert options.candidates_for(40) == MIN_CANDIDATES and TextureOptions(n_candidates=3).candidates_for(40) == 3
    assert TextureOptions(max_candidate_share=1.0).candidates_for(40) == 20
    chunk = synthesize(bank, analysis.canonical_mouth, 5, 8, options=options)
    assert chunk.candidates.shape[1] == options.candidates_for(bank.usable_count) < options.n_candidates
    with pytest.raises(InvalidInput, match="max_candidate_share"):
        TextureOptions(max_candidate_share=0.0)


def test_synthesize_outputs(bank, analysis):
    n = 12
    plain = TextureOptions(n_candidates=20, detail_amount=0.0, max_candidate_share=1.0)  # the median alone
    chunk = synthesize(bank, analysis.canonical_mouth, 5, 5 + n, options=plain)
    h, w = analysis.geometry.crop_shape
    assert chunk.textures.shape == (n, h, w, 3) and chunk.textures.dtype == np.uint8
    assert chunk.valid.all() and chunk.frames_written == n and chunk.frames_skipped == 0
    assert chunk.texture_masks.shape == (n, h, w)
    # Candidates vote only inside their own face outline: the upper crop is covered, below the chin is not.
    assert chunk.texture_masks[:, : h // 2].all() and not chunk.texture_masks[:, -1, :10].any()
    assert chunk.mean_shapes.shape == (n, 20, 2) and chunk.mean_shapes.dtype == np.float32
    assert chunk.mean_jaw_lines.shape == (n, 17, 2)
    assert chunk.candidates.shape == (n, 20) and chunk.candidates.dtype == np.int32
    np.testing.assert_allclose(chunk.candidate_weights.sum(axis=1), 1.0, atol=1e-5)
    # Luminance mode copies colours: every pixel's colour is one of its candidates' colours there.
    for i in (0, n - 1):
        stack = analysis.crops[chunk.candidates[i]]
        assert (stack == chunk.textures[i][None]).all(axis=-1).any(axis=0)[chunk.texture_masks[i] > 0].all()
    reference = synthesize(bank, analysis.canonical_mouth, 5, 5 + n, options=plain, reference=True)
    np.testing.assert_array_equal(chunk.textures, reference.textures)


def test_detail_is_restored_over_the_mouth_only(bank, analysis):
    n = 6
    plain = synthesize(
        bank, analysis.canonical_mouth, 5, 5 + n, options=TextureOptions(n_candidates=20, detail_amount=0)
    )
    sharp = synthesize(bank, analysis.canonical_mouth, 5, 5 + n, options=TextureOptions(n_candidates=20))
    reference = synthesize(
        bank, analysis.canonical_mouth, 5, 5 + n, options=TextureOptions(n_candidates=20), reference=True
    )
    np.testing.assert_array_equal(sharp.textures, reference.textures)
    for i in range(n):
        region = mouth_region_mask(sharp.mean_shapes[i], analysis.geometry, margin=0.08, feather=0.03)
        inside, outside = region > 0.5, region == 0
        detail = [
            cv2.Laplacian(cv2.cvtColor(t, cv2.COLOR_BGR2GRAY), cv2.CV_64F)[inside].var()
            for t in (plain.textures[i], sharp.textures[i])
        ]
        assert detail[1] > 1.3 * detail[0], detail
        np.testing.assert_array_equal(sharp.textures[i][outside], plain.textures[i][outside])


def test_restore_detail_checks_and_identities():
    rng = np.random.default_rng(3)
    texture = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    region = np.zeros((40, 30), np.float32)
    region[10:30, 5:25] = 1.0
    np.testing.assert_array_equal(restore_detail(texture, region, amount=0.0, sigma_px=1.5), texture)
    np.testing.assert_array_equal(restore_detail(texture, np.zeros_like(region), amount=1.0, sigma_px=1.5), texture)
    out = restore_detail(texture, region, amount=1.0, sigma_px=1.5)
    np.testing.assert_array_equal(out[region == 0], texture[region == 0])
    base = texture.astype(np.float32)
    expected = np.clip(
        base + (base - cv2.GaussianBlur(base, (0, 0), 1.5, borderType=cv2.BORDER_REPLICATE)) + 0.5, 0, 255
    )
    np.testing.assert_array_equal(out[15, 10], expected.astype(np.uint8)[15, 10])
    with pytest.raises(InvalidInput, match="uint8"):
        restore_detail(texture.astype(np.float32), region, amount=1.0, sigma_px=1.5)
    with pytest.raises(InvalidInput, match="region"):
        restore_detail(texture, region[:10], amount=1.0, sigma_px=1.5)
    with pytest.raises(InvalidInput, match="sigma_px"):
        restore_detail(texture, region, amount=1.0, sigma_px=0.0)
    for bad in ({"detail_amount": -0.1}, {"detail_amount": 6.0}, {"detail_sigma_px": 0.0}):
        with pytest.raises(InvalidInput, match="detail"):
            TextureOptions(**bad)


def test_per_channel_and_mouth_region_modes(bank, analysis):
    opts = TextureOptions(n_candidates=15, median_mode="per_channel", detail_amount=0.0)
    chunk = synthesize(bank, analysis.canonical_mouth, 20, 22, options=opts)
    cand = chunk.candidates[0]
    q = quantize_weights(chunk.candidate_weights[0])
    keep = q > 0
    flat = analysis.crops[cand[keep]].reshape(keep.sum(), -1, 3)
    votes = bank.masks[cand[keep]]  # each candidate votes inside its own face outline
    for ch in range(3):
        expected, _ = weighted_median_reference(np.ascontiguousarray(flat[:, :, ch]), q[keep], votes)
        np.testing.assert_array_equal(chunk.textures[0].reshape(-1, 3)[:, ch], expected)
    opts = TextureOptions(n_candidates=15, median_region="mouth", detail_amount=0.0)
    mouth = synthesize(bank, analysis.canonical_mouth, 20, 22, options=opts)
    full = synthesize(bank, analysis.canonical_mouth, 20, 22, options=dataclasses.replace(opts, median_region="crop"))
    region = mouth_region_mask(
        mouth.mean_shapes[0], analysis.geometry, margin=opts.region_margin, feather=opts.region_feather
    )
    inside, outside = region >= 1.0, region <= 0.0
    np.testing.assert_array_equal(mouth.textures[0][inside], full.textures[0][inside])
    np.testing.assert_array_equal(mouth.textures[0][outside], analysis.crops[mouth.candidates[0, 0]][outside])


def test_crop_masks_are_respected(analysis):
    crops = analysis.crops.copy()
    masks = analysis.crop_masks.copy()
    green = np.array([0, 255, 0], np.uint8)
    # Left third of the crop unrendered in every other frame (filled with a colour that never occurs),
    # and the top-left corner unrendered everywhere.
    masks[::2, :, :50] = 0
    crops[::2, :, :50] = green
    masks[:, :4, :4] = 0
    crops[:, :4, :4] = green
    bank = prepare_target(analysis.canonical_mouth, analysis.face_valid, crops, masks, analysis.geometry)
    for mode in ("luminance", "per_channel"):
        chunk = synthesize(bank, analysis.canonical_mouth, 10, 14, options=TextureOptions(median_mode=mode))
        assert not (chunk.textures == green).all(axis=-1)[:, 4:, :].any(), mode
        assert (chunk.texture_masks[:, :4, :4] == 0).all() and (chunk.textures[:, :4, :4] == 0).all()
        assert chunk.texture_masks[:, 4:].all()
    ref = synthesize(bank, analysis.canonical_mouth, 10, 14, reference=True)
    fast = synthesize(bank, analysis.canonical_mouth, 10, 14)
    np.testing.assert_array_equal(fast.textures, ref.textures)


def test_white_pixels_and_holes_give_the_reference_median(analysis):
    # Pixels whose luminance is 255 where some candidates do not vote: the bank's sentinel and a real white pixel
    # look alike, so the fast path must read the masks there (it equals the masked sort reference).
    crops = analysis.crops.copy()
    masks = analysis.crop_masks.copy()
    crops[:, 30:60, 20:80] = 255
    masks[1::3, 30:45, 20:50] = 0
    masks[::2, 50:70, 60:100] = 0
    bank = prepare_target(analysis.canonical_mouth, analysis.face_valid, crops, masks, analysis.geometry)
    assert bank.holes.size == int((bank.masks == 0).sum()) and bank.hole_starts[-1] == bank.holes.size
    opts = TextureOptions(detail_amount=0.0)
    fast = synthesize(bank, analysis.canonical_mouth, 10, 16, options=opts)
    ref = synthesize(bank, analysis.canonical_mouth, 10, 16, options=opts, reference=True)
    np.testing.assert_array_equal(fast.textures, ref.textures)
    np.testing.assert_array_equal(fast.texture_masks, ref.texture_masks)


def test_mouth_region_mask_equals_the_whole_crop_computation(analysis):
    geometry = analysis.geometry
    h, w = geometry.crop_shape
    left, top, right, bottom = geometry.crop_region
    px_per_unit = 0.5 * (w / (right - left) + h / (bottom - top))
    for shift in (0.0, 0.25, -0.3):  # the last two push the region across the crop's edges
        shape = analysis.canonical_mouth[5] + shift
        for margin, feather in ((0.04, 0.015), (0.08, 0.03), (0.0, 0.0), (0.2, 0.0)):
            hull = cv2.convexHull(np.round(geometry.canonical_to_crop(shape[:12]) * 16).astype(np.int32))
            hard = np.zeros((h, w), np.uint8)
            cv2.fillConvexPoly(hard, hull, 1, lineType=cv2.LINE_8, shift=4)
            r = int(round(margin * px_per_unit))
            if r > 0:
                hard = cv2.dilate(hard, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
            expected = hard.astype(np.float32)
            if feather > 0:
                blurred = cv2.GaussianBlur(expected, (0, 0), feather * px_per_unit, borderType=cv2.BORDER_REPLICATE)
                expected = np.minimum(np.maximum(blurred * 2.0, hard), 1.0)
            region = mouth_region_mask(shape, geometry, margin=margin, feather=feather)
            np.testing.assert_allclose(region, expected, rtol=0, atol=1e-6)  # the blur's rounding, by window width


def test_retiming_map_skips_frames_without_face(analysis):
    valid = analysis.face_valid.copy()
    valid[7] = False
    shapes = analysis.canonical_mouth.copy()
    shapes[8] = np.nan  # a valid flag with a NaN shape is not usable either
    bank = prepare_target(shapes, valid, analysis.crops, analysis.crop_masks, analysis.geometry)
    assert bank.usable_count == FRAMES - 2
    retiming = np.arange(FRAMES, dtype=np.int32)
    chunk = synthesize(bank, analysis.canonical_mouth, 5, 10, retiming_map=retiming)
    np.testing.assert_array_equal(chunk.valid, [True, True, False, False, True])
    assert (chunk.textures[2:4] == 0).all() and chunk.frames_skipped == 2
    assert not np.isin(chunk.candidates, [7, 8]).any()


def test_chunks_equal_one_run_without_coherence(bank, analysis):
    # Without the coherence recursion a frame depends only on the shape track within the smoothing radius.
    opts = TextureOptions(n_candidates=10, temporal_coherence_weight=0.0, shape_smoothing_sigma_frames=1.5)
    whole = synthesize(bank, analysis.canonical_mouth, 0, 24, options=opts)
    parts = [synthesize(bank, analysis.canonical_mouth, a, a + 8, options=opts) for a in (0, 8, 16)]
    np.testing.assert_array_equal(np.concatenate([p.textures for p in parts]), whole.textures)
    np.testing.assert_array_equal(np.concatenate([p.candidates for p in parts]), whole.candidates)


def test_blocked_processing_gives_the_same_result(bank, analysis, monkeypatch):
    opts = TextureOptions(n_candidates=12)
    calls = []
    whole = synthesize(bank, analysis.canonical_mouth, 3, 9, options=opts, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 6) for i in range(1, 7)]
    monkeypatch.setattr(core, "_BLOCK_ELEMENTS", 150)  # 2 rows of distances, 12 pixels of the median at once
    blocked = synthesize(bank, analysis.canonical_mouth, 3, 9, options=opts)
    np.testing.assert_array_equal(blocked.candidates, whole.candidates)
    np.testing.assert_array_equal(blocked.candidate_weights, whole.candidate_weights)
    np.testing.assert_array_equal(blocked.textures, whole.textures)


def test_temporal_coherence_lowers_flicker(bank, analysis):
    # A slow mouth movement between two real shapes, with landmark jitter like a model's output.
    rng = np.random.default_rng(3)
    a, b = analysis.canonical_mouth[12], analysis.canonical_mouth[40]
    t = np.linspace(0.0, 1.0, 40)[:, None, None]
    track = ((1 - t) * a + t * b + rng.normal(0.0, 0.004, (40, 20, 2))).astype(np.float32)
    region = mouth_region_mask(analysis.canonical_mouth.mean(axis=0), analysis.geometry)
    base = TextureOptions(n_candidates=8, temporal_coherence_weight=0.3)
    results = {}
    for label, opts in (
        ("coherent", base),
        ("plain", dataclasses.replace(base, temporal_coherence_weight=0.0, shape_smoothing_sigma_frames=0.0)),
    ):
        chunk = synthesize(bank, track, 0, 40, options=opts)
        changes = np.mean([len(np.setdiff1d(chunk.candidates[i], chunk.candidates[i - 1])) for i in range(1, 40)])
        results[label] = (flicker(chunk.textures, region), changes)
    assert results["coherent"][0] < 0.8 * results["plain"][0], results
    assert results["coherent"][1] < results["plain"][1], results


def test_flicker_and_region():
    frames = np.zeros((4, 6, 5, 3), np.uint8)
    frames[1::2] = 10
    region = np.zeros((6, 5))
    region[2:4, 1:3] = 1
    assert flicker(frames, region) == pytest.approx(10.0)
    assert flicker(frames, region, np.array([True, True, False, False])) == pytest.approx(10.0)
    assert np.isnan(flicker(frames[:1], region))
    mask = mouth_region_mask(DEFAULT_GEOMETRY.template[48:68], DEFAULT_GEOMETRY)
    assert mask.shape == DEFAULT_GEOMETRY.crop_shape and mask.dtype == np.float32
    assert mask.min() >= 0.0 and mask.max() == 1.0
    centre = DEFAULT_GEOMETRY.canonical_to_crop(DEFAULT_GEOMETRY.template[62])
    assert mask[int(round(centre[1])), int(round(centre[0]))] == 1.0
    assert mask[0, 0] == 0.0 and mask[-1, -1] == 0.0


# ---------------------------------------------------------------------- errors
def test_bad_inputs(bank, analysis):
    shapes = analysis.canonical_mouth
    with pytest.raises(InvalidInput, match=r"mouth shapes must be float \[F, 20, 2\]"):
        synthesize(bank, shapes[:, :, :1], 0, 1)
    with pytest.raises(InvalidInput, match="empty or outside"):
        synthesize(bank, shapes, 5, 5)
    with pytest.raises(InvalidInput, match="empty or outside"):
        synthesize(bank, shapes, 50, FRAMES + 1)
    bad = shapes.copy()
    bad[3] = np.nan
    with pytest.raises(InvalidInput, match="not all finite"):
        synthesize(bank, bad, 0, 5)
    with pytest.raises(InvalidInput, match="retiming map"):
        synthesize(bank, shapes, 0, 5, retiming_map=np.zeros(FRAMES - 1, np.int32))
    with pytest.raises(InvalidInput, match="retiming map values"):
        synthesize(bank, shapes, 0, 5, retiming_map=np.full(FRAMES, FRAMES, np.int32))
    with pytest.raises(InvalidInput, match="n_candidates"):
        TextureOptions(n_candidates=0)
    for share in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(InvalidInput, match="mass_share"):
            TextureOptions(mass_share=share)
    with pytest.raises(InvalidInput, match="temporal_coherence_weight"):
        TextureOptions(temporal_coherence_weight=1.0)
    with pytest.raises(InvalidInput, match="median_mode"):
        TextureOptions(median_mode="mean")
    with pytest.raises(InvalidInput, match="warmup_frames"):
        TextureOptions(warmup_frames=-1)
    with pytest.raises(Cancelled):
        synthesize(bank, shapes, 0, 5, should_stop=lambda: True)


def test_bad_targets(analysis):
    a, g = analysis, analysis.geometry
    with pytest.raises(InvalidInput, match=r"crops must be uint8 \[60, 180, 150, 3\]"):
        prepare_target(a.canonical_mouth, a.face_valid, a.crops[:, :-1], a.crop_masks, g)
    with pytest.raises(InvalidInput, match="crop_masks"):
        prepare_target(a.canonical_mouth, a.face_valid, a.crops, a.crop_masks[:10], g)
    with pytest.raises(InvalidInput, match="face_valid"):
        prepare_target(a.canonical_mouth, a.face_valid[:5], a.crops, a.crop_masks, g)
    with pytest.raises(InvalidInput, match="target mouth shapes"):
        prepare_target(a.canonical_mouth[:, :12], a.face_valid, a.crops, a.crop_masks, g)
    with pytest.raises(InvalidInput, match="jaw lines"):
        prepare_target(a.canonical_mouth, a.face_valid, a.crops, a.crop_masks, g, jaw_lines=a.jaw[:3])
    with pytest.raises(NoFace, match="no frame with a face"):
        prepare_target(a.canonical_mouth, np.zeros(FRAMES, bool), a.crops, a.crop_masks, g)
