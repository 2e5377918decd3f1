"""Image metrics on synthetic frames with known answers: sharpness, blend region, seam energy, flicker."""

import math

import cv2
import numpy as np
import pytest

from evaluation import image
from services.composite.render import feather_mask
from services.runtime.canonical import CANONICAL_TEMPLATE
from services.runtime.errors import InvalidInput

SIZE = 400


def face_landmarks(scale: float = 200.0, offset=(100.0, 60.0)) -> np.ndarray:
    """The canonical template placed in a 400 x 400 frame: a frontal face box of `scale` pixels."""
    return (CANONICAL_TEMPLATE.astype(np.float64) * scale + np.array(offset)).astype(np.float32)


def texture(seed: int = 0, sigma: float = 2.0, amplitude: float = 40.0) -> np.ndarray:
    """A BGR uint8 frame of smooth random texture (no edges), grey level std `amplitude`."""
    noise = np.random.default_rng(seed).standard_normal((SIZE, SIZE, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), sigma)
    return np.clip(128 + amplitude * smooth / smooth.std(), 0, 255).astype(np.uint8)


def test_a_blurred_frame_is_less_sharp():
    frame = texture(sigma=1.0)
    blurred = cv2.GaussianBlur(frame, (0, 0), 2.0)
    sharp, soft = image.laplacian_variance(frame), image.laplacian_variance(blurred)
    assert soft < 0.3 * sharp
    assert image.ratio(soft, sharp) == pytest.approx(soft / sharp)
    assert image.laplacian_variance(np.full((20, 20, 3), 90, np.uint8)) == 0.0


def test_mouth_sharpness_sees_only_the_mouth_box():
    frame = texture(sigma=1.0)
    landmarks = face_landmarks()
    x0, y0, x1, y1 = image.mouth_box(landmarks, frame.shape)
    blurred_mouth = frame.copy()
    blurred_mouth[y0:y1, x0:x1] = cv2.GaussianBlur(frame[y0:y1, x0:x1], (0, 0), 2.0)
    blurred_elsewhere = cv2.GaussianBlur(frame, (0, 0), 2.0)
    blurred_elsewhere[y0:y1, x0:x1] = frame[y0:y1, x0:x1]
    reference = image.mouth_sharpness(frame, landmarks)
    assert image.ratio(image.mouth_sharpness(blurred_mouth, landmarks), reference) < 0.3
    assert image.mouth_sharpness(blurred_elsewhere, landmarks) == pytest.approx(reference)


def test_mouth_box_holds_the_mouth_with_a_margin_and_stays_in_the_frame():
    landmarks = face_landmarks()
    mouth = landmarks[48:68]
    width = float(np.linalg.norm(mouth[0] - mouth[6]))  # 0.34 x 200 = 68.8 px
    x0, y0, x1, y1 = image.mouth_box(landmarks, (SIZE, SIZE, 3), margin=0.25)
    assert x0 == pytest.approx(mouth[:, 0].min() - 0.25 * width, abs=1.5)
    assert x1 == pytest.approx(mouth[:, 0].max() + 0.25 * width, abs=2.5)
    assert y0 <= mouth[:, 1].min() and y1 >= mouth[:, 1].max()
    assert image.mouth_box(landmarks + np.float32([170, 0]), (SIZE, SIZE))[2] == SIZE  # cut at the right edge
    with pytest.raises(InvalidInput, match="outside"):
        image.mouth_box(landmarks + 1000, (SIZE, SIZE))
    with pytest.raises(InvalidInput, match=r"\[68, 2\]"):
        image.mouth_box(landmarks[:60], (SIZE, SIZE))


def test_blend_region_is_the_lower_face_between_nose_and_jaw():
    landmarks = face_landmarks()
    mask = image.blend_region(landmarks, (SIZE, SIZE, 3))
    ys, xs = np.nonzero(mask)
    nose_bottom = landmarks[31:36, 1].max()
    assert mask.dtype == np.uint8 and mask.shape == (SIZE, SIZE)
    assert ys.min() >= nose_bottom  # 0.03 template units (6 px) under the nose
    assert ys.min() == pytest.approx(nose_bottom + 6, abs=2)
    assert ys.max() <= landmarks[8, 1] + 1  # not below the chin
    # The crop region (0.25..0.75 template units) cuts the sides: 150..250 px.
    assert xs.min() == pytest.approx(150, abs=2) and xs.max() == pytest.approx(250, abs=2)
    centre = landmarks[48:68].mean(axis=0).round().astype(int)
    assert mask[centre[1], centre[0]] == 1


def test_a_hard_seam_has_more_seam_energy_than_a_smooth_blend():
    base = texture(seed=1, sigma=3.0, amplitude=15.0)  # skin-like: smooth, low contrast
    overlay = np.clip(base.astype(np.int16) + 25, 0, 255).astype(np.uint8)  # brighter: a colour mismatch
    landmarks = face_landmarks()
    hard = image.blend_region(landmarks, base.shape)
    band = image.seam_band_px(landmarks)
    soft = feather_mask(hard, 12.0)[..., None]
    hard_paste = np.where(hard[..., None] > 0, overlay, base)
    smooth = (soft * overlay + (1 - soft) * base).round().astype(np.uint8)
    untouched = image.seam_energy(base, hard, band_px=band)
    hard_energy = image.seam_energy(hard_paste, hard, band_px=band)
    smooth_energy = image.seam_energy(smooth, hard, band_px=band)
    assert untouched == pytest.approx(1.0, abs=0.15)  # a texture with no edge at the boundary
    assert hard_energy > 1.5 * smooth_energy
    assert smooth_energy == pytest.approx(untouched, abs=0.15)
    assert image.frame_seam_energy(hard_paste, landmarks) == pytest.approx(hard_energy)
    assert band == pytest.approx(0.05 * 0.419 * 200, abs=0.01)  # the template's eye centres are 0.419 apart


def test_flicker_of_identical_videos_is_equal_and_of_a_still_one_zero():
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (12, 30, 40, 3), dtype=np.uint8)
    use = np.ones(12, bool)
    a, b = image.flicker(frames, use), image.flicker(frames.copy(), use)
    assert a.pairs == 11 and a.mean_abs_diff > 50
    assert image.ratio(b.mean_abs_diff, a.mean_abs_diff) == 1.0
    still = image.flicker(np.repeat(frames[:1], 12, axis=0), use)
    assert still.mean_abs_diff == 0.0 and still.pairs == 11


def test_flicker_counts_only_pairs_of_usable_frames_inside_the_box():
    frames = np.zeros((6, 20, 20), np.uint8)
    frames[1::2, 5:10, 5:10] = 100  # blinks in the box every other frame
    frames[:, 15:, 15:] = np.arange(6)[:, None, None] * 40  # changes outside the box
    use = np.array([True, True, True, False, True, True])
    result = image.flicker(frames, use, box=(5, 5, 10, 10))
    assert result.pairs == 3  # (0,1), (1,2), (4,5)
    assert result.mean_abs_diff == pytest.approx(100.0)
    none = image.flicker(frames, np.array([True, False] * 3))
    assert none.pairs == 0 and math.isnan(none.mean_abs_diff)


def test_canonical_mouth_box_lies_inside_the_crop():
    from services.runtime.canonical import DEFAULT_GEOMETRY

    x0, y0, x1, y1 = image.canonical_mouth_box(DEFAULT_GEOMETRY)
    h, w = DEFAULT_GEOMETRY.crop_shape
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert (x1 - x0, y1 - y0) == pytest.approx((133, 94), abs=2)  # 0.44 x 0.31 template units at 300 px / unit


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: image.laplacian_variance(np.zeros((2, 2))), "h, w >= 3"),
        (lambda: image.laplacian_variance(np.zeros((5, 5, 4))), r"\[h, w, 3\]"),
        (lambda: image.seam_energy(np.zeros((10, 10)), np.ones((9, 10)), band_px=2), "mask must be"),
        (lambda: image.seam_energy(np.zeros((10, 10)), np.zeros((10, 10)), band_px=2), "no edge"),
        (lambda: image.seam_energy(np.zeros((10, 10)), np.eye(10), band_px=0), "band_px"),
        (lambda: image.flicker(np.zeros((4, 5, 5)), np.ones(3, bool)), "use must be"),
        (lambda: image.flicker(np.zeros((5, 5)), np.ones(5, bool)), r"\[F, h, w\]"),
        (lambda: image.flicker(np.zeros((4, 5, 5)), np.ones(4, bool), box=(0, 0, 9, 5)), "box"),
        (lambda: image.blend_region(np.full((68, 2), np.nan), (10, 10)), "finite"),
    ],
)
def test_bad_inputs_raise_invalid_input(call, message):
    with pytest.raises(InvalidInput, match=message):
        call()
