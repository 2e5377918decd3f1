"""Per-frame compositing: texture warp into the target frame, jaw correction, feathered mask, colour match, blend.

All functions are pure (numpy / OpenCV), work on BGR uint8 frames in OpenCV conventions (x right, y down, pixel
centres at integers) and touch only a bounding box around the lower face, so their cost scales with the face size,
not the frame size.

Jaw correction model (the seed omitted it; the paper warps the target's chin to the synthesized mouth opening):
the mandible rotates about the condyles, so the chin moves down by about `gain` times the extra opening of the
inner lips and the jaw line's displacement tapers to zero at the jaw angles (points 3 and 13). For jaw points
j = 3..13 the canonical displacement is

    delta_j = (0, gain * w_j * (open(synth) - open(target)))      open = mean y of 65-67 minus mean y of 61-63

with w_j = clip((y_j - y_angle) / (y_chin - y_angle), 0, 1) on the template (1 at the chin, 0 at points 3/13) and
gain 0.6 (the chin moved 0.57-0.65 times the lower lip on the analysed clips; the inner-lip gap is used because it
is 0 for a closed mouth whoever speaks, so a speaker model driving another person's face adds no bias). When the
texture stage reports the weighted-mean jaw line of its candidates, the chin goes there instead (the vertical part of
mean_jaw_j - target_jaw_j, tapered the same way: a sideways move of the jaw would bend the cheek contour and the
collar or wall beside it): that is where the texture's own chin lies. Canonical displacements become frame pixels
through the frame's similarity transform; the frame is then warped by a smooth backward field, a Gaussian
radial-basis interpolation (sigma = 0.18 face-box widths) of -delta at the moved jaw points and at points CHIN_BAND
below them (the beard, the shadow under the jaw and the edge move together), and 0 at fixed anchors (outer jaw 0-2
and 14-16, nose, eye corners, upper lip, three points below the chin), faded out above the upper lip (nothing moves
above the nose tip) and outside the face and the chin band (the background beside the face does not bend), and
applied with cv2.remap, never reading past the frame (near an edge it would read past, the field falls to 0: a chin
cut by the frame's bottom edge closes without streaks under it). A zero displacement leaves the frame untouched.
The blend then stays JAW_EDGE_MARGIN inside the moved jaw line: the only jaw edge in the output is the frame's own,
moved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from services.composite.artifacts import artifact_maps, score_maps
from services.runtime.canonical import (
    CanonicalGeometry,
    FramePatch,
    LowerFaceWarp,
    apply_similarity,
    interocular_distance,
)
from services.runtime.errors import InvalidInput
from services.runtime.morphology import dilate_ellipse

COLOR_MATCH_MODES = ("none", "mean_std", "histogram")

JAW_MOVING = np.arange(3, 14)  # jaw points that follow the mandible (3 and 13 get weight 0: the jaw angles)
# Frame landmarks that stay where they are when the jaw opens: outer jaw, nose, eye corners, upper lip.
JAW_ANCHORS = np.array([0, 1, 2, 14, 15, 16, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 39, 42, 45, 48, 49, 50, 51, 52])
# Canonical points below the chin (on the neck) that stay fixed: the chin slides over the neck, not the neck along.
NECK_ANCHORS = np.array([[0.15, 1.5], [0.5, 1.55], [0.85, 1.5]])
INNER_UPPER = np.array([61, 62, 63]) - 48  # indices into a 20-point mouth shape (points 48-67)
INNER_LOWER = np.array([67, 66, 65]) - 48
JAW_GAIN = 0.6
JAW_SIGMA = 0.18  # face-box widths
JAW_FADE = (0.5, 0.68)  # canonical y: no jaw displacement above the first (nose tip), full below the second
MAX_JAW_SHIFT = 0.2  # canonical units (a fifth of the face box): larger requests are clipped
# The chin region moves as one (beard, shadow under the jaw, the edge itself): points this far below each moved jaw
# point, along the jaw line's outward normal, move with it (canonical units); the field fades out below them.
CHIN_BAND = 0.06
# The blend stays this far inside the (corrected) jaw line and cheeks (canonical units), so the edge shown there is
# always the frame's own (moved) edge, never a second one from the texture's candidates.
JAW_EDGE_MARGIN = 0.025
JAW_FIELD_FADE = 0.05  # canonical units: outside the face and the chin band the jaw's field falls to 0 within this
FEATHER_FRACTION = 0.08  # of the inter-ocular distance
COLOR_GAIN_RANGE = (0.85, 1.18)  # mean_std contrast gain
HISTOGRAM_SLOPE_RANGE = (0.5, 2.0)  # local slopes of the histogram-matching curve
# Measuring a blend (`composite_frame(measure=True)`), in inter-ocular distances: colours that come from within
# MEASURE_RADIUS of the frame's own face belong; an edge within MEASURE_EDGE_RADIUS of one of the frame's is its own;
# the mouths (whose change is the point) are left out this far around their outer lips.
MEASURE_RADIUS = 0.12
MEASURE_EDGE_RADIUS = 0.04
MEASURE_MOUTH_MARGIN = 0.2
MEASURE_IOD_PX = 64.0  # faces larger than this (inter-ocular pixels) are measured scaled down to it


@dataclass(frozen=True)
class BlendSettings:
    """Per-frame compositing knobs (validated by the caller).

    Attributes:
        jaw_correction: Warp the target's jaw line to the synthesized mouth opening.
        jaw_gain: Chin displacement per unit of extra inner-lip opening (canonical units), >= 0.
        pyramid_levels: Laplacian pyramid levels (pyrDown steps), 1-8.
        feather_px: Width of the mask's soft edge in frame pixels; 0 = FEATHER_FRACTION x inter-ocular distance.
        color_match: "none", "mean_std" (Lab mean/std in a ring inside the mask edge) or "histogram".
    """

    jaw_correction: bool = True
    jaw_gain: float = JAW_GAIN
    pyramid_levels: int = 4
    feather_px: float = 0.0
    color_match: str = "mean_std"


@dataclass(frozen=True)
class CompositeResult:
    """One composited frame.

    Attributes:
        image: uint8 [H, W, 3] BGR, the target frame's size.
        composited: True when a texture was blended in (False: the input frame, returned as is).
        jaw_shift_px: Largest jaw displacement applied, frame pixels (0 when none).
        box: (x0, y0, x1, y1) of the blended region in the frame ((0, 0, 0, 0) when nothing was blended).
        mask: float32 [y1 - y0, x1 - x0] soft mask of the blend in `box` (empty when nothing was blended).
        foreign_colour: With `measure`: mean colour the blend brought into the face that the frame's own face had
            nowhere near (`artifacts.artifact_maps`, delta E beyond tolerance) over the blended skin; else NaN.
        foreign_edges: With `measure`: the same for edges the frame had nowhere near (Lab L per pixel); else NaN.
    """

    image: np.ndarray
    composited: bool
    jaw_shift_px: float = 0.0
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    mask: np.ndarray | None = None
    foreign_colour: float = math.nan
    foreign_edges: float = math.nan


# ---------------------------------------------------------------------- jaw correction
def inner_opening(mouth: np.ndarray) -> np.ndarray:
    """Inner-lip gap of mouth shapes float [..., 20, 2] (points 48-67): mean y of 65-67 minus mean y of 61-63."""
    m = np.asarray(mouth, dtype=np.float64)
    return m[..., INNER_LOWER, 1].mean(axis=-1) - m[..., INNER_UPPER, 1].mean(axis=-1)


def jaw_taper(template: np.ndarray) -> np.ndarray:
    """Weights float64 [11] of jaw points 3..13: 1 at the chin (8), 0 at the jaw angles (3, 13), by height."""
    y = np.asarray(template, dtype=np.float64)[:, 1]
    angle = (y[3] + y[13]) / 2
    return np.clip((y[JAW_MOVING] - angle) / max(y[8] - angle, 1e-6), 0.0, 1.0)


def jaw_displacement(
    target_canonical: np.ndarray,
    template: np.ndarray,
    *,
    synth_mouth: np.ndarray | None = None,
    mean_jaw: np.ndarray | None = None,
    gain: float = JAW_GAIN,
) -> np.ndarray:
    """Canonical displacement of jaw points 3..13 that matches the target's jaw to the synthesized mouth.

    Args:
        target_canonical: float [68, 2] the target frame's landmarks in canonical template units.
        template: float [68, 2] canonical template (for the taper).
        synth_mouth: float [20, 2] synthesized mouth shape (points 48-67), canonical units.
        mean_jaw: float [17, 2] weighted-mean jaw line of the texture's candidates, canonical units; when given
            (and finite) it wins over `synth_mouth`: its vertical offset from the target's jaw, tapered from the
            chin (1) to points 3 and 13 (0), is applied.
        gain: Chin displacement per unit of extra inner-lip opening.

    Returns:
        float64 [11, 2] displacement (canonical units) of points 3..13, each no longer than MAX_JAW_SHIFT.
    """
    current = np.asarray(target_canonical, dtype=np.float64)
    if mean_jaw is not None and np.isfinite(mean_jaw).all():
        # Only the vertical part, tapered like the opening model: the candidates' jaw lines also differ from the
        # target's sideways, and moving the cheek contour sideways tears it and bends what stands beside it. Where
        # the texture's jaw line still differs from the moved one, the blend's margin inside the jaw line
        # (JAW_EDGE_MARGIN) keeps the texture's own edge out of the frame.
        delta = np.zeros((len(JAW_MOVING), 2))
        delta[:, 1] = (np.asarray(mean_jaw, dtype=np.float64)[JAW_MOVING, 1] - current[JAW_MOVING, 1]) * jaw_taper(
            template
        )
    elif synth_mouth is not None and np.isfinite(synth_mouth).all():
        extra = float(inner_opening(synth_mouth) - inner_opening(current[48:68]))
        delta = np.zeros((len(JAW_MOVING), 2))
        delta[:, 1] = gain * jaw_taper(template) * extra
    else:
        return np.zeros((len(JAW_MOVING), 2))
    length = np.linalg.norm(delta, axis=1, keepdims=True)
    return delta * np.minimum(1.0, MAX_JAW_SHIFT / np.maximum(length, 1e-12))


def _gaussian_rbf(centres: np.ndarray, values: np.ndarray, sigma: float) -> np.ndarray:
    """Weights float64 [K, 2] of a Gaussian RBF interpolating `values` [K, 2] at `centres` [K, 2]."""
    d2 = ((centres[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    kernel = np.exp(-d2 / (2 * sigma * sigma))
    # A small ridge keeps near-coincident centres solvable; it barely changes the interpolation.
    return np.linalg.solve(kernel + 1e-6 * np.eye(len(centres)), values)


def _keep_reads_inside(field: np.ndarray, x0: int, y0: int, width: int, height: int) -> None:
    """Shrink a backward displacement field (float32 [h, w, 2] for the frame box at x0, y0) in place so that no
    pixel reads outside the frame: near a frame edge that a component reads towards, that component falls linearly
    to 0 at the edge over four times its largest magnitude (a chin cut by the frame's bottom edge closes over its own
    skin, the rows near the edge stretched at most 4:3 so that its contours do not bend, instead of the edge row
    replicated into vertical streaks under it; hdtf_edmarkey_512). Only the rows or columns near an edge are touched.
    """
    for c, start, length in ((0, x0, width), (1, y0, height)):
        along = field[..., c] if c == 1 else field[..., c].T  # axis 0 runs along this component's direction
        n = along.shape[0]
        reach = max(float(along.max()), -float(along.min()))
        if n == 0 or reach <= 0:
            continue
        band = np.float32(4.0 * reach)
        last = min(int(math.ceil(band - start)) + 1, n)  # reads towards 0 (negative values) in the rows before
        if last > 0:
            part = along[:last]
            scale = np.clip((np.float32(start) + np.arange(last, dtype=np.float32)) / band, 0, 1)[:, None]
            np.multiply(part, scale, out=part, where=part < 0)
        first = max(int(math.floor(length - 1 - band - start)), 0)  # reads towards length - 1 from this row on
        if first < n:
            part = along[first:]
            room = np.float32(length - 1 - start) - np.arange(first, n, dtype=np.float32)
            np.multiply(part, np.clip(room / band, 0, 1)[:, None], out=part, where=part > 0)


def correct_jaw(
    frame: np.ndarray,
    landmarks: np.ndarray,
    warp: LowerFaceWarp,
    delta: np.ndarray,
    *,
    min_shift_px: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Move the frame's jaw line by `delta` with a smooth displacement field (backward mapping, cv2.remap).

    Args:
        frame: uint8 [H, W, 3] BGR target frame.
        landmarks: float [68, 2] its landmarks (frame pixels).
        warp: The frame's LowerFaceWarp (for the similarity transform).
        delta: float [11, 2] canonical displacement of jaw points 3..13 (`jaw_displacement`).
        min_shift_px: Below this largest displacement (frame pixels) nothing is done.

    Returns:
        (frame: the corrected copy, or `frame` itself when nothing moved; jaw: float64 [11, 2] the moved jaw points
        3..13 in frame pixels; shift: largest displacement in pixels).
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    a, t = warp.similarity
    step = (delta[:, 0] + 1j * delta[:, 1]) / a  # canonical -> frame: z = (w - t) / a is linear in w
    moved = pts[JAW_MOVING] + np.stack([step.real, step.imag], axis=1)
    shift = float(np.abs(step).max()) if len(step) else 0.0
    if shift < min_shift_px:
        return frame, moved, 0.0
    face_px = 1.0 / abs(a)  # face-box width in pixels
    sigma = JAW_SIGMA * face_px
    neck = apply_similarity(1 / a, -t / a, NECK_ANCHORS)
    # Points CHIN_BAND below each moving jaw point (4..12), along the jaw line's outward normal, move with it.
    line = np.vstack([pts[JAW_MOVING[0] - 1], moved, pts[JAW_MOVING[-1] + 1]])
    tangent = line[2:] - line[:-2]
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)  # the face's outside (y down, jaw 0 -> 16)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
    inner = slice(1, len(moved) - 1)
    followers = moved[inner] + normal[inner] * CHIN_BAND * face_px
    centres = np.vstack([moved, followers, pts[JAW_ANCHORS], neck])
    values = np.zeros((len(centres), 2))
    values[: len(moved)] = pts[JAW_MOVING] - moved  # backward: output pixel at the moved point reads the old one
    values[len(moved) : len(moved) + len(followers)] = values[inner]
    weights = _gaussian_rbf(centres, values, sigma)
    h, w = frame.shape[:2]
    reach = 3.5 * sigma + shift
    moving = np.vstack([moved, followers])
    x0 = max(int(math.floor(moving[:, 0].min() - reach)), 0)
    x1 = min(int(math.ceil(moving[:, 0].max() + reach)) + 1, w)
    y0 = max(int(math.floor(moving[:, 1].min() - reach)), 0)
    y1 = min(int(math.ceil(moving[:, 1].max() + reach)) + 1, h)
    if a.real > 0:  # upright enough: rows above the fade's start (canonical y = JAW_FADE[0]) never move
        top = (JAW_FADE[0] - t.imag - a.imag * np.array([x0, x1])) / a.real
        y0 = max(y0, int(math.floor(top.min())))
    if x1 <= x0 or y1 <= y0:
        return frame, moved, 0.0
    # The field is smooth on the scale of sigma: evaluate it at the centres of step x step cells and upsample
    # bilinearly (cv2.resize by an integer factor puts each sample exactly at its cell centre).
    step = max(1, int(sigma / 6))
    nx, ny = -(-(x1 - x0) // step), -(-(y1 - y0) // step)
    xs = x0 + step * np.arange(nx) + (step - 1) / 2
    ys = y0 + step * np.arange(ny) + (step - 1) / 2
    # The Gaussian kernel is separable: field = Gy^T diag(w) Gx, one small matrix product per component.
    gx = np.exp(-((xs[None, :] - centres[:, :1]) ** 2) / (2 * sigma * sigma))  # [K, nx]
    gy = np.exp(-((ys[None, :] - centres[:, 1:2]) ** 2) / (2 * sigma * sigma))  # [K, ny]
    # The upper face stays exactly where it is: the field fades out between the upper lip and the nose tip
    # (canonical y from JAW_FADE[1] up to JAW_FADE[0]); canonical y is linear in the pixel coordinates.
    canonical_y = a.imag * xs[None, :] + a.real * ys[:, None] + t.imag
    fade = np.clip((canonical_y - JAW_FADE[0]) / (JAW_FADE[1] - JAW_FADE[0]), 0.0, 1.0)
    fade = fade * fade * (3.0 - 2.0 * fade)
    field = np.stack([gy.T @ (weights[:, c : c + 1] * gx) * fade for c in (0, 1)], axis=-1).astype(np.float32)
    # Only the face and the chin region below the jaw line move: the background beside the face and below its sides
    # stays (a moving jaw would otherwise bend the lines of a wall or a collar next to it). On the cells' grid.
    region = np.zeros((ny, nx), np.uint8)
    origin = np.array([x0 + (step - 1) / 2, y0 + (step - 1) / 2])
    chin = np.vstack([moved[inner], followers[::-1]])
    for polygon in (np.vstack([pts[:3], pts[JAW_MOVING], pts[14:17]]), np.vstack([pts[:3], moved, pts[14:17]]), chin):
        cells = (polygon - origin) / step
        cv2.fillPoly(region, [np.round(cells * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    outside = cv2.distanceTransform(1 - region, cv2.DIST_L2, 3) * np.float32(step)
    weight = np.clip(1.0 - outside / max(JAW_FIELD_FADE * face_px, 1.0), 0.0, 1.0)
    field *= (weight * weight * (3.0 - 2.0 * weight))[..., None]
    # Only cells that move by more than 1/50 pixel (or border them) are resampled.
    active = np.abs(field).max(axis=-1) > 0.02
    if not active.any():
        return frame, moved, 0.0
    rows, cols = np.flatnonzero(active.any(axis=1)), np.flatnonzero(active.any(axis=0))
    r0, r1 = max(rows[0] - 1, 0), min(rows[-1] + 2, ny)
    c0, c1 = max(cols[0] - 1, 0), min(cols[-1] + 2, nx)
    field = field[r0:r1, c0:c1]
    if step > 1:
        field = cv2.resize(field, ((c1 - c0) * step, (r1 - r0) * step), interpolation=cv2.INTER_LINEAR)
    x0, y0 = x0 + c0 * step, y0 + r0 * step
    x1, y1 = min(x0 + (c1 - c0) * step, x1), min(y0 + (r1 - r0) * step, y1)
    field = field[: y1 - y0, : x1 - x0]
    _keep_reads_inside(field, x0, y0, w, h)
    field[..., 0] += np.arange(x0, x1, dtype=np.float32)[None, :]
    field[..., 1] += np.arange(y0, y1, dtype=np.float32)[:, None]
    out = frame.copy()
    out[y0:y1, x0:x1] = cv2.remap(frame, field, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out, moved, shift


# ---------------------------------------------------------------------- mask
def lower_face_polygon(warp: LowerFaceWarp, jaw_points: np.ndarray) -> np.ndarray:
    """Frame polygon float64 [13, 2] of the blended region: below the nose, above the (corrected) jaw line 3..13.

    The top edge runs 0.03 template units under the lowest nose point (31-35), from above jaw point 3 to above
    jaw point 13; the crop region (the texture's extent) limits the sides.
    """
    canonical = warp.canonical
    a, t = warp.similarity
    top = float(canonical[31:36, 1].max()) + 0.03
    corners = np.array([[canonical[13, 0], top], [canonical[3, 0], top]])
    corners = apply_similarity(1 / a, -t / a, corners)
    return np.vstack([corners[1:], jaw_points, corners[:1]])


def face_outline(landmarks: np.ndarray, jaw_points: np.ndarray) -> np.ndarray:
    """Frame polygon float64 [17, 2] of the face's own silhouette: jaw line 0..16 with the (corrected) points 3..13,
    closed across the brows (the blend region lies below, so only the jaw line and the cheeks bound it)."""
    pts = np.asarray(landmarks, dtype=np.float64)
    return np.vstack([pts[0:3], np.asarray(jaw_points, dtype=np.float64), pts[14:17]])


def feather_mask(hard: np.ndarray, feather_px: float) -> np.ndarray:
    """Soft mask float32 in [0, 1]: 0 outside `hard` (uint8), rising smoothly to 1 at `feather_px` inside its edge."""
    if feather_px <= 0.5:
        return hard.astype(np.float32)
    dist = cv2.distanceTransform(hard, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    ramp = np.clip(dist / np.float32(feather_px), 0.0, 1.0)
    return ramp * ramp * (3.0 - 2.0 * ramp)  # smoothstep: no kink where the ramp meets 1


# ---------------------------------------------------------------------- colour
def _to_lab(image: np.ndarray) -> np.ndarray:
    scaled = image.astype(np.float32)
    scaled *= np.float32(1 / 255)
    return cv2.cvtColor(scaled, cv2.COLOR_BGR2Lab, dst=scaled)


def _from_lab(lab: np.ndarray) -> np.ndarray:
    bgr = cv2.cvtColor(lab, cv2.COLOR_Lab2BGR)
    bgr *= np.float32(255)
    return np.clip(bgr, 0, 255, out=bgr)


def _quantile_map(values: np.ndarray, source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Monotone piecewise-linear map taking the quantiles of `source` onto those of `reference`, applied to values.

    Slopes are clipped to HISTOGRAM_SLOPE_RANGE (a narrow ring distribution must not stretch the mouth's colours) and
    the map continues with slope 1 beyond the quantiles (teeth and the mouth's inside keep their distance from the
    ring's extremes).
    """
    q = np.linspace(0.02, 0.98, 25)
    xs = np.quantile(source, q).astype(np.float64)
    ys = np.quantile(reference, q).astype(np.float64)
    dx = np.diff(xs)
    slope = np.where(dx > 1e-6, np.diff(ys) / np.maximum(dx, 1e-6), 1.0)
    slope = np.clip(slope, *HISTOGRAM_SLOPE_RANGE)
    ys_fit = np.concatenate([[0.0], np.cumsum(slope * dx)])
    ys_fit += np.median(ys - ys_fit)  # place the clipped curve where the reference's quantiles are
    xs = xs + np.arange(len(xs)) * 1e-6  # strictly increasing for np.interp
    v = values.astype(np.float64)
    mapped = np.interp(v, xs, ys_fit)
    mapped = np.where(v < xs[0], ys_fit[0] + (v - xs[0]), mapped)
    mapped = np.where(v > xs[-1], ys_fit[-1] + (v - xs[-1]), mapped)
    return mapped.astype(np.float32)


def match_colors(texture: np.ndarray, reference: np.ndarray, region: np.ndarray, mode: str) -> np.ndarray:
    """Match the texture's colour statistics to the reference's inside `region`.

    Args:
        texture: uint8 [h, w, 3] BGR texture (in frame geometry).
        reference: uint8 [h, w, 3] BGR target pixels at the same places.
        region: bool [h, w] pixels whose statistics are compared (a ring inside the mask edge).
        mode: "none" (the texture as float), "mean_std" (per-channel mean in CIE Lab, and the standard deviation
            half-way: gain sqrt(std_ref / std_tex) clipped to COLOR_GAIN_RANGE) or "histogram" (per-channel
            quantile matching in Lab, `_quantile_map`).

    Returns:
        float32 [h, w, 3] BGR in [0, 255].
    """
    if mode == "none" or region.sum() < 16:
        return texture.astype(np.float32)
    if mode == "mean_std":
        lab_t = _to_lab(texture)
        # The reference only matters in the ring: its pixels alone are converted, as one row.
        sel_r = _to_lab(reference[region][None])
        mean_t, std_t = (v.ravel().astype(np.float32) for v in cv2.meanStdDev(lab_t[region][None]))
        mean_r, std_r = (v.ravel().astype(np.float32) for v in cv2.meanStdDev(sel_r))
        # Half the log-ratio of the spreads, clipped: the ring is a small sample whose content (shading, folds)
        # differs between frames, and a full gain carries that noise to the lips and teeth.
        gain = np.clip(np.sqrt(std_r / np.maximum(std_t, 1e-3)), *COLOR_GAIN_RANGE).astype(np.float32)
        lab_t -= mean_t
        lab_t *= gain
        lab_t += mean_r
        return _from_lab(lab_t)
    if mode == "histogram":
        lab_t = _to_lab(texture)
        lab_r = _to_lab(reference)
        out = np.empty_like(lab_t)
        for c in range(3):
            out[..., c] = _quantile_map(lab_t[..., c], lab_t[..., c][region], lab_r[..., c][region])
        return _from_lab(out)
    raise InvalidInput(f"color_match must be one of {COLOR_MATCH_MODES}, got {mode!r}")


# ---------------------------------------------------------------------- blending
def pyramid_blend(base: np.ndarray, overlay: np.ndarray, mask: np.ndarray, levels: int) -> np.ndarray:
    """Laplacian-pyramid blend of `overlay` over `base` with a soft mask.

    Uses the linearity of the Laplacian pyramid: the blend equals base + collapse(G_l(mask) * L_l(overlay - base)),
    so one pyramid of the difference replaces the two of the images. Where the mask and its Gaussian pyramid are 0
    the result is `base`.

    Args:
        base: float32 [h, w, 3].
        overlay: float32 [h, w, 3].
        mask: float32 [h, w] in [0, 1].
        levels: pyrDown steps (clipped so the coarsest level keeps at least 2 pixels per side).

    Returns:
        float32 [h, w, 3] (not clipped).
    """
    h, w = mask.shape
    levels = max(0, min(int(levels), int(math.floor(math.log2(max(min(h, w), 2)))) - 1))
    diff = cv2.subtract(overlay, base)
    gauss_d = [diff]
    gauss_m = [mask]
    for _ in range(levels):
        gauss_d.append(cv2.pyrDown(gauss_d[-1]))
        gauss_m.append(cv2.pyrDown(gauss_m[-1]))
    out = gauss_d[-1] * gauss_m[-1][..., None]
    for level in range(levels - 1, -1, -1):
        size = (gauss_d[level].shape[1], gauss_d[level].shape[0])
        # The same float32 operations as band = d - up(d'), out = up(out) + band * m, in place (OpenCV's multiply
        # on three channels is faster than numpy's broadcast).
        band = cv2.pyrUp(gauss_d[level + 1], dstsize=size)
        cv2.subtract(gauss_d[level], band, dst=band)
        m = gauss_m[level]
        cv2.multiply(band, cv2.merge((m, m, m)), dst=band)
        out = cv2.pyrUp(out, dstsize=size)
        out += band
    out += base
    return out


# ---------------------------------------------------------------------- one frame
def composite_frame(
    frame: np.ndarray,
    landmarks: np.ndarray,
    texture: np.ndarray,
    *,
    geometry: CanonicalGeometry,
    synth_mouth: np.ndarray | None = None,
    mean_jaw: np.ndarray | None = None,
    texture_mask: np.ndarray | None = None,
    settings: BlendSettings = BlendSettings(),
    strength: float = 1.0,
    measure: bool = False,
) -> CompositeResult:
    """Blend a synthesized canonical texture into one target frame.

    Steps: jaw correction of the frame (when enabled and the mouths differ), inverse warp of the texture into the
    frame's geometry (`LowerFaceWarp.to_frame`, bilinear), a lower-face mask (nose base to the corrected jaw line,
    inside the face's own silhouette (`face_outline`) and the texture's valid extent) feathered by `feather_px`,
    colour matching of the texture to the frame in a ring inside the mask edge, and a Laplacian-pyramid blend
    inside the mask's bounding box. Nothing outside the silhouette changes by more than the pyramid's one-pixel
    roll-off: neither the texture nor the blend brings anything past the jaw line or the cheeks.

    Args:
        frame: uint8 [H, W, 3] BGR target frame.
        landmarks: float [68, 2] its (smoothed) landmarks, frame pixels, finite.
        texture: uint8 [h, w, 3] BGR canonical texture (h, w = geometry.crop_shape).
        geometry: Canonical template and crop geometry of the texture.
        synth_mouth: float [20, 2] synthesized mouth shape (canonical units), for jaw correction.
        mean_jaw: float [17, 2] candidates' mean jaw line (canonical units), for jaw correction; wins over
            synth_mouth.
        texture_mask: uint8 [h, w] valid texture pixels (1) or None (all valid).
        settings: Knobs.
        strength: In [0, 1]: the blend mask and the jaw displacement are scaled by it (a cross-fade to the frame's own
            mouth); 0 returns the frame as it is.
        measure: Also measure what the blend brought that the frame's own face does not have nearby (foreign colour
            and edges over the blended skin, mouths left out): `CompositeResult.foreign_colour` / `foreign_edges`.

    Returns:
        The CompositeResult; `composited` is False (and `image` is `frame` itself) when the texture does not reach
        the frame.

    Raises:
        InvalidInput: bad shapes or degenerate landmarks.
    """
    if not 0.0 <= strength <= 1.0:
        raise InvalidInput(f"strength must be in [0, 1], got {strength}")
    warp = LowerFaceWarp(landmarks, geometry)
    if strength == 0.0:
        return CompositeResult(frame, False)
    pts = np.asarray(landmarks, dtype=np.float64)
    delta = np.zeros((len(JAW_MOVING), 2))
    if settings.jaw_correction:
        delta = strength * jaw_displacement(
            warp.canonical, geometry.template, synth_mouth=synth_mouth, mean_jaw=mean_jaw, gain=settings.jaw_gain
        )
    base, jaw_points, shift = correct_jaw(frame, pts, warp, delta)
    patch: FramePatch = warp.to_frame(texture, frame.shape, crop_mask=texture_mask, interpolation=cv2.INTER_LINEAR)
    ph, pw = patch.mask.shape
    if ph == 0 or pw == 0:
        return CompositeResult(frame, False)  # no texture to show: no jaw to move either
    feather = settings.feather_px or FEATHER_FRACTION * float(interocular_distance(pts))
    feather = max(feather, 1.0)
    levels = settings.pyramid_levels

    hard, face = _lower_face_mask(patch, warp, pts, jaw_points)
    if not hard.any():
        return CompositeResult(frame, False)
    bx0, by0, bx1, by1 = _work_box(hard, levels)
    hard_b = hard[by0:by1, bx0:bx1]
    face_b = face[by0:by1, bx0:bx1]
    valid_b = patch.mask[by0:by1, bx0:bx1].astype(bool)
    tex_b = patch.image[by0:by1, bx0:bx1]
    fx0, fy0 = patch.x0 + bx0, patch.y0 + by0
    fx1, fy1 = patch.x0 + bx1, patch.y0 + by1
    target_b = base[fy0:fy1, fx0:fx1]

    soft = feather_mask(hard_b, feather) * np.float32(strength)
    mouths = [pts[48:60]]
    if synth_mouth is not None and np.isfinite(synth_mouth).all():
        a, t = warp.similarity
        mouths.append(apply_similarity(1 / a, -t / a, np.asarray(synth_mouth, dtype=np.float64)[:12]))
    offset = np.array([fx0, fy0])
    ring = _skin_ring(hard_b, feather, [mouth - offset for mouth in mouths])

    # The overlay is the texture only near the mask (low pyramid levels would otherwise pull in texture content
    # from far outside it) and never outside the face; elsewhere it equals the target so the difference pyramid is
    # zero there. The colours are matched (a per-pixel map after the ring's statistics) only in the box where it is
    # used (the ring lies inside the hard mask, which `use` holds).
    margin = int(max(feather, 2 ** (levels - 1)))
    near = dilate_ellipse(hard_b, margin)
    use = (near > 0) & valid_b & (face_b > 0)
    target_f = target_b.astype(np.float32)
    overlay = target_f.copy()
    ux0, uy0, ux1, uy1 = _box(use)
    if ux1 > ux0:
        box = (slice(uy0, uy1), slice(ux0, ux1))
        matched = match_colors(tex_b[box], target_b[box], ring[box], settings.color_match)
        np.copyto(overlay[box], matched, where=use[box][..., None])
    blended = pyramid_blend(target_f, overlay, soft, levels)
    # The coarse pyramid levels spread the difference a few pixels past the mask; past the silhouette it is cut
    # within about a pixel (the face edge hides that step), so the background around the face stays the target's.
    keep = cv2.GaussianBlur(cv2.dilate(face_b, np.ones((3, 3), np.uint8)).astype(np.float32), (0, 0), 0.8)
    # target + (blended - target) * keep, the same float32 operations in place.
    cv2.subtract(blended, target_f, dst=blended)
    cv2.multiply(blended, cv2.merge((keep, keep, keep)), dst=blended)
    blended += target_f
    blended += np.float32(0.5)
    out = base.copy() if base is frame else base
    result_b = np.clip(blended, 0, 255, out=blended).astype(np.uint8)
    colour = edges = math.nan
    if measure:
        colour, edges = _measure_blend(result_b, target_b, soft, face_b, mouths, offset, pts)
    out[fy0:fy1, fx0:fx1] = result_b
    return CompositeResult(out, True, shift, (int(fx0), int(fy0), int(fx1), int(fy1)), soft, colour, edges)


def _lower_face_mask(
    patch: FramePatch, warp: LowerFaceWarp, pts: np.ndarray, jaw_points: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The blend's hard mask and the face's silhouette, uint8 [ph, pw] (0 / 1) in patch coordinates.

    The mask is the lower-face polygon inside the silhouette (kept JAW_EDGE_MARGIN inside it) and inside the valid
    (eroded) texture footprint.
    """
    ph, pw = patch.mask.shape
    origin = np.array([patch.x0, patch.y0])
    polygon = lower_face_polygon(warp, jaw_points) - origin
    hard = np.zeros((ph, pw), np.uint8)
    cv2.fillPoly(hard, [np.round(polygon * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    face = np.zeros((ph, pw), np.uint8)
    cv2.fillPoly(face, [np.round((face_outline(pts, jaw_points) - origin) * 16).astype(np.int32)], 1, shift=4)
    margin_px = int(round(JAW_EDGE_MARGIN / abs(warp.similarity[0])))
    inside = face
    if margin_px > 0:
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin_px + 1, 2 * margin_px + 1))
        inside = cv2.erode(face, disk, borderType=cv2.BORDER_REPLICATE)
    hard &= inside
    hard &= cv2.erode(patch.mask, np.ones((3, 3), np.uint8), borderValue=0)
    return hard, face


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) bounding box of a mask's nonzero pixels; (0, 0, 0, 0) when it has none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return 0, 0, 0, 0
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _work_box(hard: np.ndarray, levels: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the mask's bounding box plus the pyramid's reach, inside the patch."""
    ph, pw = hard.shape
    rows = np.flatnonzero(hard.any(axis=1))
    cols = np.flatnonzero(hard.any(axis=0))
    pad = int(2 ** (levels + 1)) + 2
    return max(cols[0] - pad, 0), max(rows[0] - pad, 0), min(cols[-1] + pad + 1, pw), min(rows[-1] + pad + 1, ph)


def _skin_ring(hard: np.ndarray, feather: float, mouths: list[np.ndarray]) -> np.ndarray:
    """Where the colour statistics come from, bool like `hard`: a ring inside the mask edge.

    Skin near the seam, without the lips of either mouth (the target's and the texture's, polygons in the same
    coordinates as `hard`), whose colours must not be pulled towards skin; wider when the ring is too small.
    """
    ring_width = max(2.0 * feather, 4.0)
    dist = cv2.distanceTransform(hard, cv2.DIST_L2, 3)
    skin = np.ones_like(hard)
    lip_margin = int(round(feather / 2))
    for mouth in mouths:
        cv2.fillPoly(skin, [np.round(mouth * 16).astype(np.int32)], 0, lineType=cv2.LINE_8, shift=4)
    if lip_margin > 0:
        skin = cv2.erode(skin, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * lip_margin + 1,) * 2))
    ring = (hard > 0) & (dist <= ring_width) & (skin > 0)
    if ring.sum() < 64:
        ring = (hard > 0) & (skin > 0)
    if ring.sum() < 64:
        ring = hard > 0
    return ring


def _measure_blend(
    result: np.ndarray,
    target: np.ndarray,
    soft: np.ndarray,
    face: np.ndarray,
    mouths: list[np.ndarray],
    offset: np.ndarray,
    landmarks: np.ndarray,
) -> tuple[float, float]:
    """(foreign colour, foreign edges) of a blended box against the frame it was blended into: over the blended skin
    (soft mask > 0.1, inside the face, the mouths grown by MEASURE_MOUTH_MARGIN left out); colours are explained only
    by the frame's own face within MEASURE_RADIUS."""
    iod = float(interocular_distance(landmarks))
    region = (soft > 0.1) & (face > 0)
    mouth = np.zeros(face.shape, np.uint8)
    for points in mouths:
        hull = cv2.convexHull((np.asarray(points) - offset).astype(np.float32)).reshape(-1, 2)
        cv2.fillPoly(mouth, [np.round(hull * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    r = max(int(round(MEASURE_MOUTH_MARGIN * iod)), 1)
    # The dilation reaches r around the mouths: it is done in their box grown by r (the same pixels).
    mx0, my0, mx1, my1 = _box(mouth)
    if mx1 > mx0:
        h, w = mouth.shape
        mx0, my0, mx1, my1 = max(mx0 - r, 0), max(my0 - r, 0), min(mx1 + r, w), min(my1 + r, h)
        region[my0:my1, mx0:mx1] &= dilate_ellipse(mouth[my0:my1, mx0:mx1], r) == 0
    if region.sum() < 16:
        return math.nan, math.nan
    support = face > 0
    # A big face is measured scaled down: the same numbers (the radii scale with it), a fraction of the work.
    scale = min(1.0, MEASURE_IOD_PX / max(iod, 1.0))
    if scale < 1.0:
        size = (max(1, round(result.shape[1] * scale)), max(1, round(result.shape[0] * scale)))
        result = cv2.resize(result, size, interpolation=cv2.INTER_AREA)
        target = cv2.resize(target, size, interpolation=cv2.INTER_AREA)
        region = cv2.resize(region.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        support = cv2.resize(support.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        iod *= scale
    radius = max(2.0, MEASURE_RADIUS * iod)
    edge_radius = max(1.0, MEASURE_EDGE_RADIUS * iod)
    # Only the region is scored, and its maps read the images within the radii (and a Sobel pixel) of it: the maps
    # are computed in the region's box grown by that reach (as `artifacts.artifact_score` does), the same numbers.
    x0, y0, x1, y1 = _box(region)
    if x1 <= x0:
        return math.nan, math.nan
    pad = int(math.ceil(max(radius, edge_radius))) + 2
    h, w = region.shape
    box = (slice(max(y0 - pad, 0), min(y1 + pad, h)), slice(max(x0 - pad, 0), min(x1 + pad, w)))
    colour, edges = artifact_maps(
        result[box], target[box], radius_px=radius, edge_radius_px=edge_radius, support=support[box]
    )
    score = score_maps(colour, edges, region[box])
    return score.colour, score.edges


__all__ = [
    "COLOR_MATCH_MODES",
    "BlendSettings",
    "CompositeResult",
    "composite_frame",
    "correct_jaw",
    "face_outline",
    "feather_mask",
    "inner_opening",
    "jaw_displacement",
    "jaw_taper",
    "lower_face_polygon",
    "match_colors",
    "pyramid_blend",
]
