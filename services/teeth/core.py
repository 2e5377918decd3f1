"""Pure core of the `teeth` stage: choose teeth proxy frames automatically and transfer their detail onto textures.

Everything happens in the canonical crop (services/runtime/canonical.py): target crops, synthesized textures and
mouth shapes share one frame, so one similarity transform fitted on inner-lip landmarks aligns a proxy with a
texture. Mouth shapes are the 20 dlib mouth points 48-67 in canonical template units; the inner lip (60-67) is
rows 12-19. The inner-mouth polygon is split into an upper and a lower half along the midline between the
facing inner-lip points (60, mid(61, 67), mid(62, 66), mid(63, 65), 64): the seed's manual lineU / lineL, now
derived from the landmarks of every frame.

`select_proxies` scores every target frame per half: (half area / crop area) x (share of teeth-like pixels in
the half), i.e. the share of crop pixels that are teeth-like (HSV value >= min_value, saturation <=
max_saturation) inside that half; the best frame per half is its proxy.

`enhance` adds, inside a feathered teeth mask of each texture (soft teeth-likeness x inner-mouth polygon,
feathered inwards so nothing outside the inner mouth changes), the similarity-aligned luminance high-pass of
the upper proxy's upper teeth (upper half) and of the lower proxy's lower teeth (lower half), plus one unsharp
mask of the texture itself. Both terms are computed from the input texture in a single pass: the teeth are
sharpened once, here, and never again downstream (the seed sharpened twice).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from services.runtime.canonical import DEFAULT_GEOMETRY, CanonicalGeometry
from services.runtime.errors import Cancelled, InvalidInput

__all__ = [
    "DEFAULT_MAX_SATURATION",
    "DEFAULT_MIN_SCORE",
    "DEFAULT_MIN_VALUE",
    "EnhanceOutput",
    "ProxyImages",
    "TeethProxies",
    "enhance",
    "half_polygons",
    "inner_mouth_masks",
    "select_proxies",
    "split_lines",
    "teeth_likeness",
    "teeth_scores",
]

MOUTH_POINTS = 20
# Rows of the 20-point mouth shape (dlib 48-67) that hold the inner lip 60-67.
INNER_LIP = np.arange(12, 20)
# Inner-lip points fitted by the per-half similarity: upper 60-64, lower 64-67 + 60 (crop pixels).
UPPER_FIT = np.array([12, 13, 14, 15, 16])
LOWER_FIT = np.array([16, 17, 18, 19, 12])

DEFAULT_MIN_SCORE = 0.01
DEFAULT_MIN_VALUE = 140
DEFAULT_MAX_SATURATION = 80

# Width (HSV levels) of the soft ramp below min_value / above max_saturation in enhance's teeth mask: the
# weighted-median textures are blurrier and a little darker than the frames they come from.
SOFT_RAMP_LEVELS = 30.0
# Inward feather of the inner-mouth polygon (pixels from its edge to full weight).
FEATHER_PX = 2.0
# Smoothing of the teeth-likeness map and of the upper / lower split (pixels).
TEETH_SIGMA_PX = 1.0
SPLIT_SIGMA_PX = 1.0
# A per-half alignment whose scale leaves this range is implausible (bad landmarks): that half is skipped.
SCALE_RANGE = (0.5, 2.0)


# ---------------------------------------------------------------------- results
@dataclass(frozen=True)
class TeethProxies:
    """Chosen teeth proxy frames of one target (mirrors teeth.v1.TeethProxies plus per-frame scores).

    Attributes:
        upper_frame: Target frame with the most visible upper teeth; -1 when has_visible_teeth is False.
        lower_frame: Target frame with the most visible lower teeth; -1 when has_visible_teeth is False.
        upper_split_row_px: Row (crop pixels from the top) midway between points 62 and 66 of the upper
            proxy; NaN when upper_frame is -1.
        lower_split_row_px: The same for the lower proxy.
        has_visible_teeth: False when no frame reaches min_score in either half (and nothing was overridden):
            `enhance` then passes textures through.
        upper_score: Upper-half score of the best upper frame (reported even when below min_score).
        lower_score: Lower-half score of the best lower frame.
        median_upper_score: Median upper-half score over frames with a face.
        median_lower_score: Median lower-half score over frames with a face.
        overridden: True when a user override chose at least one frame.
        min_score: The threshold used.
        upper_split_line: float64 [5, 2] crop pixels (x, y): the split polyline of the upper proxy (60, mid(61,
            67), mid(62, 66), mid(63, 65), 64); NaN when upper_frame is -1.
        lower_split_line: float64 [5, 2] the same for the lower proxy.
        upper_scores: float64 [M] upper-half score of every target frame (NaN without a face).
        lower_scores: float64 [M] lower-half score of every target frame (NaN without a face).
    """

    upper_frame: int
    lower_frame: int
    upper_split_row_px: float
    lower_split_row_px: float
    has_visible_teeth: bool
    upper_score: float
    lower_score: float
    median_upper_score: float
    median_lower_score: float
    overridden: bool
    min_score: float
    upper_split_line: np.ndarray = field(repr=False, compare=False)
    lower_split_line: np.ndarray = field(repr=False, compare=False)
    upper_scores: np.ndarray = field(repr=False, compare=False)
    lower_scores: np.ndarray = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("upper_split_line", "lower_split_line", "upper_scores", "lower_scores"):
            getattr(self, name).flags.writeable = False


@dataclass(frozen=True)
class ProxyImages:
    """The two proxy frames' canonical crops and mouth shapes: the pixels `enhance` transfers from.

    Attributes:
        upper_frame: Target frame index of the upper proxy (must equal TeethProxies.upper_frame).
        lower_frame: Target frame index of the lower proxy.
        upper_crop: uint8 [H, W, 3] BGR canonical crop of the upper proxy.
        upper_shape: float32 [20, 2] its canonical mouth shape (template units).
        lower_crop: uint8 [H, W, 3] BGR canonical crop of the lower proxy.
        lower_shape: float32 [20, 2] its canonical mouth shape.
    """

    upper_frame: int
    lower_frame: int
    upper_crop: np.ndarray = field(repr=False, compare=False)
    upper_shape: np.ndarray = field(repr=False, compare=False)
    lower_crop: np.ndarray = field(repr=False, compare=False)
    lower_shape: np.ndarray = field(repr=False, compare=False)

    @classmethod
    def from_target(cls, proxies: TeethProxies, crops: np.ndarray, shapes: np.ndarray) -> ProxyImages:
        """Pick the proxy frames out of a target's crops uint8 [M, H, W, 3] and mouth shapes float [M, 20, 2].

        Raises:
            InvalidInput: the proxies show no teeth (there is nothing to pick) or an index is out of range.
        """
        if not proxies.has_visible_teeth:
            raise InvalidInput("the target has no visible teeth: there are no proxy frames to pick")
        count = min(len(crops), len(shapes))
        for name, index in (("upper", proxies.upper_frame), ("lower", proxies.lower_frame)):
            if not 0 <= index < count:
                raise InvalidInput(f"{name} proxy frame {index} outside [0, {count})")
        return cls(
            upper_frame=proxies.upper_frame,
            lower_frame=proxies.lower_frame,
            upper_crop=np.asarray(crops[proxies.upper_frame]),
            upper_shape=np.asarray(shapes[proxies.upper_frame], dtype=np.float32),
            lower_crop=np.asarray(crops[proxies.lower_frame]),
            lower_shape=np.asarray(shapes[proxies.lower_frame], dtype=np.float32),
        )


@dataclass(frozen=True)
class EnhanceOutput:
    """Result of `enhance` for one chunk.

    Attributes:
        textures: uint8 [n, H, W, 3] BGR. On passthrough this is the input array itself (byte-identical).
        enhanced: bool [n] True where the frame's teeth region was changed.
        passthrough: True when the textures were returned unchanged without being processed.
        passthrough_reason: Why (e.g. "target has no visible teeth"); empty otherwise.
    """

    textures: np.ndarray = field(repr=False, compare=False)
    enhanced: np.ndarray = field(repr=False, compare=False)
    passthrough: bool
    passthrough_reason: str

    @property
    def frames_enhanced(self) -> int:
        """Number of frames whose teeth region was changed."""
        return int(np.count_nonzero(self.enhanced))


# ---------------------------------------------------------------------- geometry helpers
def _mouth_px(shapes: np.ndarray, geometry: CanonicalGeometry) -> np.ndarray:
    """Canonical mouth shapes float [..., 20, 2] -> crop pixel coordinates float64."""
    return geometry.canonical_to_crop(np.asarray(shapes, dtype=np.float64))


def _inner_lip(shapes_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inner lip 60-67 float64 [..., 8, 2] with crossed facing points closed, and the midline [..., 5, 2].

    A facing pair (61, 67), (62, 66), (63, 65) whose lower point lies above its upper point (a closed mouth
    with landmark noise) is moved to its midpoint, so the half polygons never self-intersect.
    """
    p = np.array(shapes_px[..., INNER_LIP, :], dtype=np.float64)  # local 0..7 = points 60..67
    upper, lower = p[..., [1, 2, 3], :], p[..., [7, 6, 5], :]
    mid = (upper + lower) / 2
    crossed = (lower[..., 1] < upper[..., 1])[..., None]
    p[..., [1, 2, 3], :] = np.where(crossed, mid, upper)
    p[..., [7, 6, 5], :] = np.where(crossed, mid, lower)
    midline = np.concatenate([p[..., [0], :], mid, p[..., [4], :]], axis=-2)
    return p, midline


def half_polygons(shapes: np.ndarray, *, geometry: CanonicalGeometry = DEFAULT_GEOMETRY):
    """Upper and lower halves of the inner-mouth polygon, split along the inner-lip midline.

    Args:
        shapes: float [..., 20, 2] canonical mouth shapes (template units).
        geometry: Crop geometry.

    Returns:
        (upper, lower), float64 [..., 8, 2] crop pixels each: upper = 60, 61, 62, 63, 64, mid(63, 65),
        mid(62, 66), mid(61, 67); lower = 60, mid(61, 67), mid(62, 66), mid(63, 65), 64, 65, 66, 67.
    """
    inner, mid = _inner_lip(_mouth_px(shapes, geometry))
    return _upper_half(inner, mid), np.concatenate([mid[..., 0:4, :], inner[..., 4:8, :]], axis=-2)


def _upper_half(inner: np.ndarray, mid: np.ndarray) -> np.ndarray:
    """Upper-half polygon [..., 8, 2] from the inner lip [..., 8, 2] and its midline [..., 5, 2]."""
    return np.concatenate([inner[..., 0:5, :], mid[..., [3, 2, 1], :]], axis=-2)


def split_lines(shapes: np.ndarray, *, geometry: CanonicalGeometry = DEFAULT_GEOMETRY) -> np.ndarray:
    """Line between upper and lower teeth: float64 [..., 5, 2] crop pixels.

    The points are (60, mid(61, 67), mid(62, 66), mid(63, 65), 64) of canonical mouth shapes float [..., 20, 2];
    its centre row is [..., 2, 1].
    """
    return _inner_lip(_mouth_px(shapes, geometry))[1]


def _fill(polygons: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise polygons float [n, k, 2] (pixel centres at integers) into uint8 [n, h, w] masks (0 / 1)."""
    out = np.zeros((len(polygons), *shape), dtype=np.uint8)
    fixed = np.round(np.nan_to_num(polygons, nan=-1e4) * 16.0).clip(-(2**20), 2**20)
    fixed = np.ascontiguousarray(fixed, dtype=np.int32)  # cv2 needs C order (fancy indexing may give F)
    finite = np.isfinite(polygons).all(axis=(1, 2))
    for i in np.flatnonzero(finite):
        cv2.fillPoly(out[i], [fixed[i]], 1, lineType=cv2.LINE_8, shift=4)
    return out


def inner_mouth_masks(shapes: np.ndarray, *, geometry: CanonicalGeometry = DEFAULT_GEOMETRY) -> np.ndarray:
    """Masks uint8 [n, H, W] (0 / 1) of the inner-mouth polygon (60-67) of canonical shapes float [n, 20, 2].

    All zero where a shape is not finite. `enhance` changes no pixel outside this mask.
    """
    inner, _ = _inner_lip(_mouth_px(shapes, geometry))
    return _fill(inner, geometry.crop_shape)


def teeth_likeness(
    images: np.ndarray,
    *,
    min_value: int = DEFAULT_MIN_VALUE,
    max_saturation: int = DEFAULT_MAX_SATURATION,
    soft: bool = False,
) -> np.ndarray:
    """How teeth-like (bright, low-saturation) each pixel of BGR images uint8 [..., H, W, 3] is.

    Args:
        images: uint8 [..., H, W, 3] BGR.
        min_value: HSV value (0-255) from which a pixel is bright enough.
        max_saturation: HSV saturation (0-255) up to which a pixel is grey enough.
        soft: False: bool (V >= min_value and S <= max_saturation). True: float32 in [0, 1], 1 there and
            ramping to 0 over SOFT_RAMP_LEVELS below min_value / above max_saturation.

    Returns:
        bool or float32 [..., H, W].
    """
    arr = np.ascontiguousarray(images)
    flat = arr.reshape(-1, arr.shape[-2], 3)  # one tall image: a single cv2 call for any batch
    hsv = cv2.cvtColor(flat, cv2.COLOR_BGR2HSV).reshape(arr.shape)
    sat, val = hsv[..., 1], hsv[..., 2]
    if not soft:
        return (val >= min_value) & (sat <= max_saturation)
    v = np.clip((val.astype(np.float32) - (min_value - SOFT_RAMP_LEVELS)) / SOFT_RAMP_LEVELS, 0.0, 1.0)
    s = np.clip(((max_saturation + SOFT_RAMP_LEVELS) - sat.astype(np.float32)) / SOFT_RAMP_LEVELS, 0.0, 1.0)
    return v * s


# ---------------------------------------------------------------------- validation
def _check_crops(crops: np.ndarray, geometry: CanonicalGeometry, what: str) -> np.ndarray:
    arr = np.asarray(crops)
    h, w = geometry.crop_shape
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (h, w, 3):
        raise InvalidInput(f"{what} must be uint8 [n, {h}, {w}, 3] BGR, got {arr.dtype} {list(arr.shape)}")
    if len(arr) == 0:
        raise InvalidInput(f"{what} is empty (0 frames)")
    return arr


def _check_shapes(shapes: np.ndarray, count: int, what: str) -> np.ndarray:
    arr = np.asarray(shapes)
    if arr.shape != (count, MOUTH_POINTS, 2) or not np.issubdtype(arr.dtype, np.floating):
        raise InvalidInput(
            f"{what} must be float [{count}, {MOUTH_POINTS}, 2] (one mouth shape per frame), "
            f"got {arr.dtype} {list(arr.shape)}"
        )
    return arr


def _check_flags(flags: np.ndarray | None, count: int, what: str) -> np.ndarray:
    if flags is None:
        return np.ones(count, dtype=bool)
    arr = np.asarray(flags)
    if arr.shape != (count,) or not (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer)):
        raise InvalidInput(f"{what} must be bool or integer [{count}], got {arr.dtype} {list(arr.shape)}")
    return arr.astype(bool)


def _check_range(name: str, value: float, lo: float, hi: float, *, open_low: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v > hi or v < lo or (open_low and v == lo):
        bracket = "(" if open_low else "["
        raise InvalidInput(f"{name} must be in {bracket}{lo}, {hi}], got {value}")
    return v


def _check_hsv(min_value: int, max_saturation: int) -> None:
    for name, value in (("min_value", min_value), ("max_saturation", max_saturation)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value <= 255:
            raise InvalidInput(f"{name} must be an integer in [0, 255], got {value}")


# ---------------------------------------------------------------------- proxy selection
def teeth_scores(
    crops: np.ndarray,
    shapes: np.ndarray,
    face_valid: np.ndarray,
    *,
    masks: np.ndarray | None = None,
    geometry: CanonicalGeometry = DEFAULT_GEOMETRY,
    min_value: int = DEFAULT_MIN_VALUE,
    max_saturation: int = DEFAULT_MAX_SATURATION,
    chunk_frames: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame upper- and lower-half teeth scores (inputs as in `select_proxies`, assumed validated).

    Score of a half = (half area / crop area) x (share of its pixels that are teeth-like and rendered), which
    is the number of teeth-like rendered pixels in the half over the crop area. Pixels on the split line
    belong to both halves.

    Returns:
        (upper, lower) float64 [M]; NaN where the frame has no face.
    """
    count = len(crops)
    h, w = geometry.crop_shape
    upper_poly, lower_poly = half_polygons(shapes, geometry=geometry)
    upper = np.full(count, np.nan)
    lower = np.full(count, np.nan)
    valid = np.flatnonzero(face_valid)
    for start in range(0, len(valid), chunk_frames):  # bounded memory for long targets
        idx = valid[start : start + chunk_frames]
        teeth = teeth_likeness(crops[idx], min_value=min_value, max_saturation=max_saturation)
        if masks is not None:
            teeth &= masks[idx] > 0
        upper[idx] = (teeth & (_fill(upper_poly[idx], (h, w)) > 0)).sum(axis=(1, 2)) / (h * w)
        lower[idx] = (teeth & (_fill(lower_poly[idx], (h, w)) > 0)).sum(axis=(1, 2)) / (h * w)
    return upper, lower


def _check_override(name: str, index: int | None, face_valid: np.ndarray) -> int | None:
    if index is None:
        return None
    if isinstance(index, bool) or not isinstance(index, int | np.integer):
        raise InvalidInput(f"{name} must be an integer frame index, got {index!r}")
    index = int(index)
    count = len(face_valid)
    if not 0 <= index < count:
        raise InvalidInput(f"{name} {index} outside the target's frames [0, {count})")
    if not face_valid[index]:
        raise InvalidInput(f"{name} {index} is a frame without a face")
    return index


def select_proxies(
    crops: np.ndarray,
    shapes: np.ndarray,
    face_valid: np.ndarray,
    *,
    masks: np.ndarray | None = None,
    geometry: CanonicalGeometry = DEFAULT_GEOMETRY,
    upper_override: int | None = None,
    lower_override: int | None = None,
    min_score: float = DEFAULT_MIN_SCORE,
    min_value: int = DEFAULT_MIN_VALUE,
    max_saturation: int = DEFAULT_MAX_SATURATION,
) -> TeethProxies:
    """Choose the upper- and lower-teeth proxy frames of a target automatically (or validate an override).

    Args:
        crops: uint8 [M, H, W, 3] BGR canonical lower-face crops of the target (H, W = geometry.crop_shape).
        shapes: float [M, 20, 2] canonical mouth shapes (template units); NaN where there is no face.
        face_valid: bool or uint8 [M] frames with a face (non-zero); only these are scored.
        masks: Optional uint8 [M, H, W] crop masks (1 = rendered from inside the frame); 0 never counts as teeth.
        geometry: Crop geometry of the crops.
        upper_override: A user's upper proxy frame index (a frame with a face); None = automatic.
        lower_override: A user's lower proxy frame index; None = automatic.
        min_score: Teeth count as visible when a half's best score is >= this; in [0, 1], default 0.01.
        min_value: HSV value (0-255) from which a pixel is teeth-like; default 140.
        max_saturation: HSV saturation (0-255) up to which a pixel is teeth-like; default 80.

    Returns:
        The TeethProxies. An override forces has_visible_teeth True (the user says the frame shows teeth); the
        other half is still chosen automatically.

    Raises:
        InvalidInput: wrong shapes or dtypes, a face frame with a non-finite shape, options out of range, an
            override out of range or on a frame without a face.
    """
    crops = _check_crops(crops, geometry, "crops")
    count = len(crops)
    shapes = _check_shapes(shapes, count, "shapes")
    if face_valid is None:
        raise InvalidInput("face_valid is required")
    valid = _check_flags(face_valid, count, "face_valid")
    if masks is not None:
        masks = np.asarray(masks)
        if masks.shape != crops.shape[:3]:
            raise InvalidInput(f"masks must be [{', '.join(map(str, crops.shape[:3]))}], got {list(masks.shape)}")
    bad = valid & ~np.isfinite(shapes).all(axis=(1, 2))
    if bad.any():
        raise InvalidInput(f"frames {np.flatnonzero(bad)[:5].tolist()} have a face but a non-finite mouth shape")
    min_score = _check_range("min_score", min_score, 0.0, 1.0)
    _check_hsv(min_value, max_saturation)
    upper_override = _check_override("upper_override", upper_override, valid)
    lower_override = _check_override("lower_override", lower_override, valid)

    upper_scores, lower_scores = teeth_scores(
        crops, shapes, valid, masks=masks, geometry=geometry, min_value=min_value, max_saturation=max_saturation
    )
    if valid.any():
        best_upper = int(np.nanargmax(upper_scores))
        best_lower = int(np.nanargmax(lower_scores))
        median_upper = float(np.nanmedian(upper_scores))
        median_lower = float(np.nanmedian(lower_scores))
    else:  # the face stage never stores such an analysis; a result, not a crash
        best_upper = best_lower = -1
        median_upper = median_lower = 0.0
    overridden = upper_override is not None or lower_override is not None
    visible = overridden or (best_upper >= 0 and max(upper_scores[best_upper], lower_scores[best_lower]) >= min_score)
    upper_frame = upper_override if upper_override is not None else best_upper
    lower_frame = lower_override if lower_override is not None else best_lower

    def score(scores: np.ndarray, frame: int) -> float:
        return float(scores[frame]) if frame >= 0 else 0.0

    upper_score, lower_score = score(upper_scores, upper_frame), score(lower_scores, lower_frame)
    if not visible:
        upper_frame = lower_frame = -1
    lines = split_lines(shapes[[max(upper_frame, 0), max(lower_frame, 0)]], geometry=geometry)
    if upper_frame < 0:
        lines[0] = np.nan
    if lower_frame < 0:
        lines[1] = np.nan
    return TeethProxies(
        upper_frame=upper_frame,
        lower_frame=lower_frame,
        upper_split_row_px=float(lines[0, 2, 1]),
        lower_split_row_px=float(lines[1, 2, 1]),
        has_visible_teeth=bool(visible),
        upper_score=upper_score,
        lower_score=lower_score,
        median_upper_score=median_upper,
        median_lower_score=median_lower,
        overridden=overridden,
        min_score=min_score,
        upper_split_line=lines[0],
        lower_split_line=lines[1],
        upper_scores=upper_scores,
        lower_scores=lower_scores,
    )


# ---------------------------------------------------------------------- enhancement
@dataclass(frozen=True)
class _Params:
    detail_strength: float
    highpass_sigma_px: float
    sharpen_amount: float
    sharpen_sigma_px: float
    region_erode_px: int
    min_value: int
    max_saturation: int


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
    """Least-squares similarity float64 [2, 3] taking points src [k, 2] onto dst [k, 2]; None if degenerate."""
    z = src[:, 0] + 1j * src[:, 1]
    t = dst[:, 0] + 1j * dst[:, 1]
    zc, tc = z - z.mean(), t - t.mean()
    norm = float((np.abs(zc) ** 2).sum())
    if not (np.isfinite(norm) and norm > 1e-6):
        return None
    a = (tc * np.conj(zc)).sum() / norm
    if not SCALE_RANGE[0] <= abs(a) <= SCALE_RANGE[1]:
        return None
    b = t.mean() - a * z.mean()
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def _region_weight(
    crop: np.ndarray, inner: np.ndarray, upper_poly: np.ndarray, params: _Params
) -> tuple[np.ndarray, np.ndarray]:
    """Teeth weight float32 [h, w] in [0, 1] (zero outside the inner polygon) and the soft upper-half share.

    Args:
        crop: uint8 [h, w, 3] BGR (a crop or a region of one).
        inner: float64 [8, 2] inner-lip polygon in the same pixel frame.
        upper_poly: float64 [8, 2] upper-half polygon in the same pixel frame.
        params: The enhancement settings (region erosion, the brightness and saturation that count as teeth).
    """
    h, w = crop.shape[:2]
    mask = _fill(inner[None], (h, w))[0]
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    # Feathered inwards from the polygon edge: pixels outside it keep weight 0 exactly.
    inside = np.clip((dist - params.region_erode_px - 0.5) / FEATHER_PX, 0.0, 1.0)
    teeth = teeth_likeness(crop, min_value=params.min_value, max_saturation=params.max_saturation, soft=True)
    teeth = cv2.GaussianBlur(teeth, (0, 0), TEETH_SIGMA_PX)
    upper = cv2.GaussianBlur(_fill(upper_poly[None], (h, w))[0].astype(np.float32), (0, 0), SPLIT_SIGMA_PX)
    return inside * teeth, upper


def _proxy_layer(crop: np.ndarray, shape_px: np.ndarray, half: str, params: _Params) -> np.ndarray:
    """The proxy's luminance high-pass float32 [H, W], kept only on its teeth in the given half, times the gain.

    The high-pass is taken on the whole crop (no black cut at a split line, unlike the seed, so no artificial
    edge) and weighted afterwards.
    """
    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY).astype(np.float32)
    highpass = gray - cv2.GaussianBlur(gray, (0, 0), params.highpass_sigma_px)
    inner, mid = _inner_lip(shape_px)
    weight, upper = _region_weight(crop, inner, _upper_half(inner, mid), params)
    share = upper if half == "upper" else 1.0 - upper
    return (params.detail_strength * highpass * weight * share).astype(np.float32)


def _enhance_frame(
    texture: np.ndarray,
    shape_px: np.ndarray,
    layers: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    params: _Params,
) -> np.ndarray | None:
    """Enhanced copy of one texture uint8 [H, W, 3], or None when its teeth region is empty."""
    h, w = texture.shape[:2]
    inner, mid = _inner_lip(shape_px)
    # Work in the inner mouth's bounding box plus a margin wider than every filter's reach, so the result
    # equals the full-crop computation (up to float rounding: at most 1 level on a handful of pixels).
    margin = int(math.ceil(4 * max(params.sharpen_sigma_px, TEETH_SIGMA_PX, SPLIT_SIGMA_PX))) + 3
    x0 = max(int(math.floor(inner[:, 0].min())) - margin, 0)
    y0 = max(int(math.floor(inner[:, 1].min())) - margin, 0)
    x1 = min(int(math.ceil(inner[:, 0].max())) + margin + 1, w)
    y1 = min(int(math.ceil(inner[:, 1].max())) + margin + 1, h)
    if x1 <= x0 or y1 <= y0:
        return None
    offset = np.array([x0, y0], dtype=np.float64)
    region = texture[y0:y1, x0:x1]
    weight, upper = _region_weight(region, inner - offset, _upper_half(inner, mid) - offset, params)
    if not weight.any():
        return None
    base = region.astype(np.float32)
    delta = np.zeros(weight.shape, dtype=np.float32)
    if params.detail_strength > 0:
        for (layer, proxy_pts), points, share in (
            (layers[0], UPPER_FIT, upper),
            (layers[1], LOWER_FIT, 1.0 - upper),
        ):
            matrix = _similarity(proxy_pts, shape_px[points])
            if matrix is None:
                continue
            matrix[:, 2] -= offset  # proxy crop -> this region
            warped = cv2.warpAffine(
                layer, matrix, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
            )
            delta += share * warped
    change = delta[..., None]
    if params.sharpen_amount > 0:
        blurred = cv2.GaussianBlur(base, (0, 0), params.sharpen_sigma_px)
        change = change + params.sharpen_amount * (base - blurred)
    out = texture.copy()
    out[y0:y1, x0:x1] = np.clip(np.rint(base + weight[..., None] * change), 0, 255).astype(np.uint8)
    return out


def enhance(
    textures: np.ndarray,
    shapes: np.ndarray,
    proxies: TeethProxies,
    images: ProxyImages | None = None,
    *,
    geometry: CanonicalGeometry = DEFAULT_GEOMETRY,
    texture_valid: np.ndarray | None = None,
    detail_strength: float = 1.0,
    highpass_sigma_px: float = 3.0,
    sharpen_amount: float = 0.5,
    sharpen_sigma_px: float = 1.0,
    region_erode_px: int = 1,
    min_value: int = DEFAULT_MIN_VALUE,
    max_saturation: int = DEFAULT_MAX_SATURATION,
    progress: Callable[[int, int], None] | None = None,
    progress_every: int = 25,
    should_stop: Callable[[], bool] | None = None,
) -> EnhanceOutput:
    """Transfer the proxies' high-frequency teeth detail onto the teeth region of synthesized textures.

    Per texture: teeth weight = soft teeth-likeness (bright, low-saturation) x the inner-mouth polygon of its
    shape, feathered inwards; the upper proxy's masked luminance high-pass (image - Gaussian blur) is aligned
    by a similarity fitted on the inner-lip points 60-64 (proxy -> texture) and added in the upper half, the
    lower proxy's on 64-67 + 60 in the lower half; then one unsharp mask of the texture's own detail. Both
    terms come from the input texture in one pass (sharpened once). Pixels outside the inner mouth are never
    changed.

    Args:
        textures: uint8 [n, H, W, 3] BGR synthesized canonical textures, n >= 1 (H, W = geometry.crop_shape).
        shapes: float [n, 20, 2] their mouth shapes (canonical units); frames with a non-finite shape are
            copied unchanged.
        proxies: From `select_proxies` for the same target.
        images: The proxy frames' pixels (`ProxyImages.from_target`); required when proxies.has_visible_teeth.
        geometry: Crop geometry of textures and proxies.
        texture_valid: Optional bool / uint8 [n]; frames with 0 are copied unchanged.
        detail_strength: Gain of the proxies' high-pass, in [0, 10]; default 1.0; 0 = no transfer.
        highpass_sigma_px: Gaussian sigma separating the high-pass, pixels in (0, 50]; default 3.0.
        sharpen_amount: Unsharp-mask amount on the teeth region, in [0, 10]; default 0.5; 0 = none.
        sharpen_sigma_px: Unsharp-mask sigma, pixels in (0, 20]; default 1.0.
        region_erode_px: Inward erosion of the inner-lip region, pixels in [0, 20]; default 1.
        min_value: HSV value (0-255) where the teeth mask reaches full weight; default 140.
        max_saturation: HSV saturation (0-255) up to which the teeth mask has full weight; default 80.
        progress: Called as progress(done, n) every `progress_every` frames and at the end.
        progress_every: Frames between progress calls, >= 1.
        should_stop: Polled before each frame; True raises Cancelled.

    Returns:
        The EnhanceOutput; passthrough (the input array itself) when the target has no visible teeth, when
        both gains are 0, or when no frame of the chunk has a texture.

    Raises:
        InvalidInput: wrong shapes or dtypes, empty chunk, options out of range, missing or mismatched proxy
            images.
        Cancelled: should_stop returned True.
    """
    textures = _check_crops(textures, geometry, "textures")
    count = len(textures)
    shapes = _check_shapes(shapes, count, "shapes")
    valid = _check_flags(texture_valid, count, "texture_valid")
    if not isinstance(proxies, TeethProxies):
        raise InvalidInput(f"proxies must be a TeethProxies, got {type(proxies).__name__}")
    if isinstance(region_erode_px, bool) or int(region_erode_px) != region_erode_px:
        raise InvalidInput(f"region_erode_px must be an integer, got {region_erode_px!r}")
    if progress_every < 1:
        raise InvalidInput(f"progress_every must be >= 1, got {progress_every}")
    _check_hsv(min_value, max_saturation)
    params = _Params(
        detail_strength=_check_range("detail_strength", detail_strength, 0.0, 10.0),
        highpass_sigma_px=_check_range("highpass_sigma_px", highpass_sigma_px, 0.0, 50.0, open_low=True),
        sharpen_amount=_check_range("sharpen_amount", sharpen_amount, 0.0, 10.0),
        sharpen_sigma_px=_check_range("sharpen_sigma_px", sharpen_sigma_px, 0.0, 20.0, open_low=True),
        region_erode_px=int(_check_range("region_erode_px", region_erode_px, 0, 20)),
        min_value=int(min_value),
        max_saturation=int(max_saturation),
    )

    def passthrough(reason: str) -> EnhanceOutput:
        if progress is not None:
            progress(count, count)
        return EnhanceOutput(textures, np.zeros(count, dtype=bool), True, reason)

    if not proxies.has_visible_teeth:
        return passthrough("target has no visible teeth")
    if images is None:
        raise InvalidInput("the target shows teeth: proxy images are required")
    if (images.upper_frame, images.lower_frame) != (proxies.upper_frame, proxies.lower_frame):
        raise InvalidInput(
            f"proxy images are of frames ({images.upper_frame}, {images.lower_frame}), the proxies name "
            f"({proxies.upper_frame}, {proxies.lower_frame})"
        )
    for name, crop, shape in (
        ("upper", images.upper_crop, images.upper_shape),
        ("lower", images.lower_crop, images.lower_shape),
    ):
        _check_crops(np.asarray(crop)[None], geometry, f"{name} proxy crop")
        if not np.isfinite(_check_shapes(np.asarray(shape)[None], 1, f"{name} proxy shape")).all():
            raise InvalidInput(f"{name} proxy mouth shape must be finite")
    proxy_crops = np.stack([images.upper_crop, images.lower_crop])
    proxy_shapes = np.stack([images.upper_shape, images.lower_shape])
    if params.detail_strength == 0 and params.sharpen_amount == 0:
        return passthrough("detail_strength and sharpen_amount are both 0")
    work = valid & np.isfinite(shapes).all(axis=(1, 2))
    if not work.any():
        return passthrough("no frame of the chunk has a texture")

    proxy_px = _mouth_px(proxy_shapes, geometry)
    layers = (
        (_proxy_layer(proxy_crops[0], proxy_px[0], "upper", params), proxy_px[0][UPPER_FIT]),
        (_proxy_layer(proxy_crops[1], proxy_px[1], "lower", params), proxy_px[1][LOWER_FIT]),
    )
    shapes_px = _mouth_px(shapes, geometry)
    out = textures.copy()
    enhanced = np.zeros(count, dtype=bool)
    for i in range(count):
        if should_stop is not None and should_stop():
            raise Cancelled(f"teeth enhancement cancelled after {i} of {count} frames")
        if work[i]:
            frame = _enhance_frame(textures[i], shapes_px[i], layers, params)
            if frame is not None:
                enhanced[i] = not np.array_equal(frame, textures[i])
                out[i] = frame
        if progress is not None and ((i + 1) % progress_every == 0 or i + 1 == count):
            progress(i + 1, count)
    return EnhanceOutput(out, enhanced, False, "")
