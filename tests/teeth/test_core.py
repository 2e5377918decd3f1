"""Teeth core: automatic proxy choice on a real clip, split line, overrides, passthrough, and the detail transfer."""

from __future__ import annotations

from dataclasses import dataclass

import av
import cv2
import numpy as np
import pytest

from services.face.core import analyze_video
from services.face.landmarks import LandmarkDetector
from services.runtime.canonical import DEFAULT_GEOMETRY as GEOMETRY
from services.runtime.errors import Cancelled, InvalidInput
from services.runtime.media import iter_frames
from services.teeth.core import (
    ProxyImages,
    TeethProxies,
    enhance,
    half_polygons,
    inner_mouth_masks,
    select_proxies,
    split_lines,
    teeth_likeness,
)
from tests.face.helpers import KATIE, encode_clip

needs_data = pytest.mark.skipif(not KATIE.is_file(), reason="shared data not present")
FRAMES = 150
H, W = GEOMETRY.crop_shape


@dataclass(frozen=True)
class Target:
    crops: np.ndarray
    masks: np.ndarray
    shapes: np.ndarray
    valid: np.ndarray


@pytest.fixture(scope="module")
def target() -> Target:
    """The first 150 frames of a clip where the speaker shows her teeth, analysed by the face core."""
    if not KATIE.is_file():
        pytest.skip("shared data not present")
    with av.open(str(KATIE)) as container:
        rate = container.streams.video[0].average_rate
    frames = [f for _, _, f in iter_frames(KATIE, stop=FRAMES)]
    a = analyze_video(encode_clip(frames, rate=rate), detector=LandmarkDetector())
    assert a.valid_frame_count > 100
    return Target(a.crops, a.crop_masks, a.canonical_mouth, a.face_valid)


@pytest.fixture(scope="module")
def proxies(target) -> TeethProxies:
    return select_proxies(target.crops, target.shapes, target.valid, masks=target.masks)


@pytest.fixture(scope="module")
def images(target, proxies) -> ProxyImages:
    return ProxyImages.from_target(proxies, target.crops, target.shapes)


@pytest.fixture(scope="module")
def blurred(target) -> np.ndarray:
    """Stand-ins for synthesized textures: the target's crops with their detail blurred away."""
    return np.stack([cv2.GaussianBlur(c, (0, 0), 2.0) for c in target.crops])


def inner_brightness(crops: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Mean HSV value inside the inner-mouth polygon, per frame (NaN where the polygon is empty)."""
    masks = inner_mouth_masks(shapes).astype(bool)
    value = np.stack([cv2.cvtColor(c, cv2.COLOR_BGR2HSV)[..., 2] for c in crops]).astype(np.float64)
    area = masks.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(area > 0, (value * masks).sum(axis=(1, 2)) / area, np.nan)


def half_brightness(crops: np.ndarray, polygons: np.ndarray) -> np.ndarray:
    """Mean HSV value inside each frame's polygon float [n, 8, 2] (crop pixels)."""
    contours = [np.round(p * 16).astype(np.int32) for p in polygons]
    means = []
    for crop, contour in zip(crops, contours, strict=True):
        mask = cv2.fillPoly(np.zeros((H, W), np.uint8), [contour], 1, shift=4).astype(bool)
        means.append(cv2.cvtColor(crop, cv2.COLOR_BGR2HSV)[..., 2][mask].mean() if mask.any() else np.nan)
    return np.array(means)


def laplacian_energy(image: np.ndarray, mask: np.ndarray) -> float:
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float64)
    return float(cv2.Laplacian(gray, cv2.CV_64F)[mask].var())


def teeth_region(crop: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """bool [H, W]: teeth-like pixels at least 3 px inside the inner mouth."""
    inner = inner_mouth_masks(shape[None])[0]
    inner = cv2.erode(inner, np.ones((7, 7), np.uint8)).astype(bool)
    return inner & teeth_likeness(crop)


# ---------------------------------------------------------------------- proxy selection on real data
@needs_data
def test_proxies_show_visible_teeth(target, proxies):
    assert proxies.has_visible_teeth and not proxies.overridden
    valid = target.valid
    brightness = inner_brightness(target.crops, target.shapes)
    upper_poly, lower_poly = half_polygons(target.shapes)
    for frame, poly in ((proxies.upper_frame, upper_poly), (proxies.lower_frame, lower_poly)):
        assert 0 <= frame < len(target.crops) and valid[frame]
        assert brightness[frame] > np.nanmedian(brightness[valid]), frame
        # The half it was chosen for is clearly brighter than that half in a typical frame.
        half = half_brightness(target.crops[valid], poly[valid])
        assert half[np.flatnonzero(valid) == frame][0] > np.nanmedian(half) + 10, frame
    assert proxies.upper_score == pytest.approx(np.nanmax(proxies.upper_scores))
    assert proxies.lower_score == pytest.approx(np.nanmax(proxies.lower_scores))
    assert proxies.upper_score > 2 * proxies.median_upper_score > 0
    assert proxies.lower_score > 2 * proxies.median_lower_score > 0
    assert proxies.upper_score >= proxies.min_score
    assert np.isnan(proxies.upper_scores[~valid]).all() and np.isfinite(proxies.upper_scores[valid]).all()


@needs_data
def test_scores_are_area_share_times_teeth_share(target, proxies):
    frame = proxies.upper_frame
    upper, lower = half_polygons(target.shapes[frame])
    ys, xs = np.mgrid[0:H, 0:W]
    teeth = teeth_likeness(target.crops[frame]) & (target.masks[frame] > 0)
    for poly, score in ((upper, proxies.upper_scores[frame]), (lower, proxies.lower_scores[frame])):
        # Independent rasterisation: pixel centres inside (or on) the polygon.
        contour = poly.astype(np.float32).reshape(-1, 1, 2)
        inside = np.array(
            [
                cv2.pointPolygonTest(contour, (float(x), float(y)), False) >= 0
                for x, y in zip(xs.flat, ys.flat, strict=True)
            ]
        ).reshape(H, W)
        area_share = inside.sum() / (H * W)
        teeth_share = (teeth & inside).sum() / inside.sum()
        assert score == pytest.approx(area_share * teeth_share, rel=0.1, abs=2e-3)


@needs_data
def test_split_line_lies_between_inner_lips(target, proxies):
    px = GEOMETRY.canonical_to_crop(target.shapes)
    for frame, row, line in (
        (proxies.upper_frame, proxies.upper_split_row_px, proxies.upper_split_line),
        (proxies.lower_frame, proxies.lower_split_row_px, proxies.lower_split_line),
    ):
        top, bottom = px[frame, 14, 1], px[frame, 18, 1]  # points 62 and 66
        assert top + 2 < row < bottom - 2
        assert row == pytest.approx((top + bottom) / 2)
        np.testing.assert_allclose(line[[0, 4]], px[frame, [12, 16]])  # ends at the mouth corners 60 and 64
    # Every face frame: each midline point lies between its facing upper and lower inner-lip points.
    lines = split_lines(target.shapes[target.valid])
    p = px[target.valid]
    upper_y, lower_y = p[:, [13, 14, 15], 1], p[:, [19, 18, 17], 1]
    lo, hi = np.minimum(upper_y, lower_y), np.maximum(upper_y, lower_y)
    assert ((lines[:, 1:4, 1] >= lo - 1e-9) & (lines[:, 1:4, 1] <= hi + 1e-9)).all()


@needs_data
def test_override_is_honoured(target, proxies):
    frame = int(np.flatnonzero(target.valid)[3])
    chosen = select_proxies(target.crops, target.shapes, target.valid, upper_override=frame)
    assert chosen.upper_frame == frame and chosen.overridden and chosen.has_visible_teeth
    assert chosen.lower_frame == proxies.lower_frame
    assert chosen.upper_score == pytest.approx(proxies.upper_scores[frame])
    both = select_proxies(target.crops, target.shapes, target.valid, upper_override=frame, lower_override=frame)
    assert (both.upper_frame, both.lower_frame) == (frame, frame)


@needs_data
@pytest.mark.parametrize("which", ["upper_override", "lower_override"])
@pytest.mark.parametrize(
    ("index", "message"),
    [(-1, "outside"), (FRAMES, "outside"), (10**12, "outside"), (2.5, "integer"), ("3", "integer")],
)
def test_override_out_of_range(target, which, index, message):
    with pytest.raises(InvalidInput, match=f"{which} .*{message}"):
        select_proxies(target.crops, target.shapes, target.valid, **{which: index})


@needs_data
def test_face_valid_as_stored_uint8(target, proxies):
    assert select_proxies(target.crops, target.shapes, target.valid.astype(np.uint8), masks=target.masks) == proxies


@needs_data
def test_override_on_frame_without_face(target):
    valid = target.valid.copy()
    valid[7] = False
    with pytest.raises(InvalidInput, match="upper_override 7 is a frame without a face"):
        select_proxies(target.crops, target.shapes, valid, upper_override=7)


# ---------------------------------------------------------------------- no visible teeth
def closed_mouths(shapes: np.ndarray) -> np.ndarray:
    """The same shapes with the inner lower lip (65, 66, 67) moved onto the inner upper lip (63, 62, 61)."""
    closed = np.array(shapes, copy=True)
    closed[:, [17, 18, 19]] = closed[:, [15, 14, 13]]
    return closed


@needs_data
@pytest.mark.parametrize("variant", ["closed", "blacked_out"])
def test_no_visible_teeth_passes_through(target, blurred, variant):
    crops, shapes = target.crops, target.shapes
    if variant == "closed":
        shapes = closed_mouths(shapes)
    else:
        grown = np.stack([cv2.dilate(m, np.ones((5, 5), np.uint8)) for m in inner_mouth_masks(shapes)])
        crops = np.where(grown[..., None] > 0, 0, crops).astype(np.uint8)
    chosen = select_proxies(crops, shapes, target.valid, masks=target.masks)
    assert not chosen.has_visible_teeth
    assert (chosen.upper_frame, chosen.lower_frame) == (-1, -1)
    assert np.isnan(chosen.upper_split_row_px) and np.isnan(chosen.lower_split_line).all()
    assert chosen.upper_score < chosen.min_score and chosen.lower_score < chosen.min_score
    with pytest.raises(InvalidInput, match="no visible teeth"):
        ProxyImages.from_target(chosen, crops, shapes)
    textures = blurred[:20]
    before = textures.tobytes()
    out = enhance(textures, target.shapes[:20], chosen)
    assert out.passthrough and out.passthrough_reason == "target has no visible teeth"
    assert out.frames_enhanced == 0 and out.textures.tobytes() == before


# ---------------------------------------------------------------------- enhancement
@needs_data
def test_enhance_changes_only_the_inner_mouth(target, proxies, images, blurred):
    valid = np.flatnonzero(target.valid)
    textures, shapes = blurred[valid], target.shapes[valid]
    out = enhance(textures, shapes, proxies, images)
    assert not out.passthrough and out.textures.shape == textures.shape and out.textures.dtype == np.uint8
    assert out.frames_enhanced > len(valid) // 2
    inner = inner_mouth_masks(shapes).astype(bool)
    diff = np.abs(out.textures.astype(np.int16) - textures.astype(np.int16)).max(axis=3)
    assert diff[~inner].max() <= 1
    assert (diff[~inner] == 0).all()
    assert diff[inner].max() > 20  # something happened inside
    np.testing.assert_array_equal(out.enhanced, (diff > 0).any(axis=(1, 2)))


@needs_data
def test_enhance_adds_high_frequency_energy_to_teeth(target, proxies, images, blurred):
    score = np.nan_to_num(proxies.upper_scores + proxies.lower_scores)
    frames = np.flatnonzero(score > 0.03)
    assert len(frames) >= 10
    out = enhance(blurred[frames], target.shapes[frames], proxies, images)
    gain, level = [], []
    for i, frame in enumerate(frames):
        region = teeth_region(target.crops[frame], target.shapes[frame])
        before = laplacian_energy(blurred[frame], region)
        after = laplacian_energy(out.textures[i], region)
        sharp = laplacian_energy(target.crops[frame], region)
        assert after > 2 * before, frame
        gain.append(after / before)
        level.append(after / sharp)
    assert np.median(gain) > 5.0
    # Back to the sharpness of real frames, not beyond it (one sharpening, not two).
    assert 0.2 < np.median(level) < 1.5


@needs_data
@pytest.mark.parametrize(("angle", "scale", "dx", "dy"), [(0, 1.0, 0, 0), (0, 1.0, 4, -3), (4, 1.1, -2.5, 1.5)])
def test_detail_is_aligned_by_landmarks(target, proxies, images, angle, scale, dx, dy):
    """The upper proxy, moved and blurred, gets its own detail back in place (the similarity follows the move)."""
    frame = proxies.upper_frame
    move = cv2.getRotationMatrix2D((75.0, 80.0), angle, scale)
    move[:, 2] += (dx, dy)
    sharp = cv2.warpAffine(target.crops[frame], move, (W, H), borderMode=cv2.BORDER_REPLICATE)
    texture = cv2.GaussianBlur(sharp, (0, 0), 2.0)
    points = GEOMETRY.canonical_to_crop(target.shapes[frame])
    shape = GEOMETRY.crop_to_canonical(points @ move[:, :2].T + move[:, 2]).astype(np.float32)

    def correlation(mouth: np.ndarray) -> float:
        out = enhance(texture[None], mouth[None], proxies, images, sharpen_amount=0.0).textures[0]
        region = teeth_region(sharp, shape) & (inner_mouth_masks(mouth[None])[0] > 0)
        added = (out.astype(np.float64) - texture)[region].mean(axis=1)
        missing = (sharp.astype(np.float64) - texture)[region].mean(axis=1)
        return float(np.corrcoef(added, missing)[0, 1])

    assert correlation(shape) > 0.65
    # Aligned by landmarks 3.6 px off, the detail lands in the wrong place.
    assert correlation(shape + np.float32([0.012, 0.0])) < 0.4


def synthetic_mouth() -> tuple[np.ndarray, np.ndarray]:
    """A bright, grey textured patch with a large open inner mouth over it: teeth weight 1 well inside."""
    rng = np.random.default_rng(3)
    gray = cv2.GaussianBlur(rng.uniform(150, 250, (H, W)).astype(np.float32), (0, 0), 0.8)
    texture = np.repeat(np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    centre, rx, ry = np.array([W / 2, 80.0]), 50.0, 30.0
    angles = np.deg2rad([180, 135, 90, 45, 0, -45, -90, -135])  # 60..67: left corner, upper lip, right, lower
    inner = centre + np.stack([rx * np.cos(angles), -ry * np.sin(angles)], axis=1)
    around = np.deg2rad(np.linspace(180, -180, 12, endpoint=False))  # 48..59
    outer = centre + np.stack([1.3 * rx * np.cos(around), -1.4 * ry * np.sin(around)], axis=1)
    shape = GEOMETRY.crop_to_canonical(np.concatenate([outer, inner])).astype(np.float32)
    return texture, shape


def unsharp(image: np.ndarray, amount: float, sigma: float = 1.0) -> np.ndarray:
    base = image.astype(np.float32)
    return np.clip(np.rint(base + amount * (base - cv2.GaussianBlur(base, (0, 0), sigma))), 0, 255)


@needs_data
def test_sharpens_once(proxies, images):
    texture, shape = synthetic_mouth()
    out = enhance(texture[None], shape[None], proxies, images, detail_strength=0.0, sharpen_amount=0.5).textures[0]
    inner = inner_mouth_masks(shape[None])[0]
    deep = cv2.erode(inner, np.ones((11, 11), np.uint8)).astype(bool)  # full weight: 5 px inside the edge
    assert deep.sum() > 2000
    once = unsharp(texture, 0.5)
    twice = unsharp(once.astype(np.uint8), 0.5)
    assert np.abs(out[deep].astype(np.float32) - once[deep]).max() <= 1
    assert np.abs(out[deep].astype(np.float32) - twice[deep]).mean() > 1.5
    # Sharpening is linear in the amount: 1.0 doubles what 0.5 adds (no hidden second pass).
    out2 = enhance(texture[None], shape[None], proxies, images, detail_strength=0.0, sharpen_amount=1.0).textures[0]
    change1 = out[deep].astype(np.float32) - texture[deep]
    change2 = out2[deep].astype(np.float32) - texture[deep]
    assert np.abs(change2 - 2 * change1).max() <= 2
    np.testing.assert_array_equal(out[inner == 0], texture[inner == 0])


@needs_data
def test_enhance_skips_invalid_frames(target, proxies, images, blurred):
    frames = np.flatnonzero(target.valid)[:6]
    textures, shapes = blurred[frames], np.array(target.shapes[frames], copy=True)
    shapes[1] = np.nan
    flags = np.array([1, 1, 0, 1, 1, 1], np.uint8)
    calls: list[tuple[int, int]] = []
    out = enhance(textures, shapes, proxies, images, texture_valid=flags, progress=lambda d, t: calls.append((d, t)))
    for i in (1, 2):
        assert not out.enhanced[i]
        np.testing.assert_array_equal(out.textures[i], textures[i])
    assert calls[-1] == (6, 6)
    with pytest.raises(Cancelled):
        enhance(textures, shapes, proxies, images, should_stop=lambda: True)
    none = enhance(textures, shapes, proxies, images, texture_valid=np.zeros(6, bool))
    assert none.passthrough and none.textures is textures
    zero = enhance(textures, shapes, proxies, images, detail_strength=0.0, sharpen_amount=0.0)
    assert zero.passthrough and zero.frames_enhanced == 0


# ---------------------------------------------------------------------- bad inputs
@needs_data
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c, s, v: (c.astype(np.float32), s, v), "crops must be uint8"),
        (lambda c, s, v: (c[:, :, :100], s, v), r"crops must be uint8 \[n, 180, 150, 3\]"),
        (lambda c, s, v: (c[:0], s[:0], v[:0]), "crops is empty"),
        (lambda c, s, v: (c, s[:-1], v), r"shapes must be float \[150, 20, 2\]"),
        (lambda c, s, v: (c, s[:, :12], v), "shapes must be float"),
        (lambda c, s, v: (c, s, v.astype(np.float32)), r"face_valid must be bool or integer \[150\]"),
        (lambda c, s, v: (c, s, v[:-1]), r"face_valid must be bool or integer \[150\]"),
        (lambda c, s, v: (c, np.full_like(s, np.nan), np.ones_like(v)), "non-finite mouth shape"),
    ],
)
def test_select_bad_inputs(target, change, message):
    crops, shapes, valid = change(target.crops, target.shapes, target.valid)
    with pytest.raises(InvalidInput, match=message):
        select_proxies(crops, shapes, valid)


@needs_data
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_score": -0.1}, "min_score"),
        ({"min_score": 2.0}, "min_score"),
        ({"min_score": "high"}, "min_score must be a number"),
        ({"min_value": 300}, "min_value"),
        ({"min_value": 140.5}, "min_value must be an integer"),
        ({"max_saturation": -1}, "max_saturation"),
        ({"masks": np.zeros((3, H, W), np.uint8)}, "masks must be"),
    ],
)
def test_select_bad_options(target, options, message):
    with pytest.raises(InvalidInput, match=message):
        select_proxies(target.crops, target.shapes, target.valid, **options)


@needs_data
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t, s: (t[:0], s[:0], {}), "textures is empty"),
        (lambda t, s: (t[..., :2], s, {}), "textures must be uint8"),
        (lambda t, s: (t.astype(np.float32), s, {}), "textures must be uint8"),
        (lambda t, s: (t[:, :90], s, {}), r"\[n, 180, 150, 3\]"),
        (lambda t, s: (t, s[:3], {}), r"shapes must be float \[4, 20, 2\]"),
        (lambda t, s: (t, s.astype(np.int32), {}), "shapes must be float"),
        (lambda t, s: (t, s, {"texture_valid": np.ones(3, bool)}), r"texture_valid must be bool or integer \[4\]"),
        (lambda t, s: (t, s, {"detail_strength": -1.0}), "detail_strength"),
        (lambda t, s: (t, s, {"highpass_sigma_px": 0.0}), "highpass_sigma_px"),
        (lambda t, s: (t, s, {"sharpen_amount": float("nan")}), "sharpen_amount"),
        (lambda t, s: (t, s, {"sharpen_sigma_px": 0.0}), "sharpen_sigma_px"),
        (lambda t, s: (t, s, {"region_erode_px": 1.5}), "region_erode_px"),
        (lambda t, s: (t, s, {"region_erode_px": -1}), "region_erode_px"),
        (lambda t, s: (t, s, {"progress_every": 0}), "progress_every"),
    ],
)
def test_enhance_bad_inputs(proxies, images, blurred, target, change, message):
    textures, shapes, options = change(
        blurred[:4],
        target.shapes[:4],
    )
    with pytest.raises(InvalidInput, match=message):
        enhance(textures, shapes, proxies, images, **options)


@needs_data
def test_enhance_needs_matching_proxy_images(target, proxies, images, blurred):
    with pytest.raises(InvalidInput, match="proxy images are required"):
        enhance(blurred[:2], target.shapes[:2], proxies)
    other = ProxyImages(
        proxies.upper_frame + 1,
        proxies.lower_frame,
        images.upper_crop,
        images.upper_shape,
        images.lower_crop,
        images.lower_shape,
    )
    with pytest.raises(InvalidInput, match="proxy images are of frames"):
        enhance(blurred[:2], target.shapes[:2], proxies, other)
    small = ProxyImages(
        proxies.upper_frame,
        proxies.lower_frame,
        images.upper_crop[:50],
        images.upper_shape,
        images.lower_crop,
        images.lower_shape,
    )
    with pytest.raises(InvalidInput, match="upper proxy crop must be uint8"):
        enhance(blurred[:2], target.shapes[:2], proxies, small)
    with pytest.raises(InvalidInput, match="proxies must be a TeethProxies"):
        enhance(blurred[:2], target.shapes[:2], {"upper_frame": 1}, images)
