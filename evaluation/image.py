"""Image metrics (pure): mouth sharpness, seam energy at the blend boundary, mouth flicker during silence.

Regions, from dlib 68-point landmarks in frame pixels:
- mouth box: the bounding box of points 48-67 widened by `margin` x the mouth width on every side.
- blend region: the region the composite stage blends the synthesized lower face into
  (`composite.render.lower_face_polygon`: 0.03 template units under the nose down to the jaw line 3..13),
  cut to the texture's extent, the canonical crop region (0.25..0.75 x 0.5..1.1 template units) mapped into
  the frame by the frame's similarity transform. On a rendered output the re-detected jaw line stands in for
  the corrected one the compositor used; the soft edge (feather, pyramid) straddles this boundary.
- seam band: pixels within `band` of the blend region's edge (inside or outside); its flanks are the pixels
  between 2 band and 5 band from the edge on either side. Seam energy = mean gradient magnitude (Sobel, grey)
  in the band / mean in the flanks: ~1 where nothing happens at the edge, > 1 for a visible seam. Real
  footage has natural edges there too (the jaw line), so outputs are reported relative to their target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from services.composite.artifacts import COLOUR_TOLERANCE, EDGE_TOLERANCE, ArtifactScore, artifact_maps, score_maps
from services.composite.render import JAW_MOVING, MAX_JAW_SHIFT, correct_jaw, face_outline, lower_face_polygon
from services.runtime.canonical import DEFAULT_CROP_REGION, LowerFaceWarp, apply_similarity, interocular_distance
from services.runtime.errors import InvalidInput

MOUTH = slice(48, 68)
DEFAULT_MOUTH_MARGIN = 0.25
SEAM_BAND_FRACTION = 0.05  # of the inter-ocular distance, at least 2 px
CANONICAL_MOUTH_BOX = (0.28, 0.62, 0.72, 0.93)  # template units: the mouth with some margin, inside the crop


def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)) or min(image.shape[:2]) < 3:
        raise InvalidInput(f"{name} must be [h, w] or [h, w, 3] with h, w >= 3, got shape {image.shape}")
    return image


def _gray(image: np.ndarray) -> np.ndarray:
    image = _check_image(image)
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image.astype(np.uint8) if image.dtype != np.uint8 else image, cv2.COLOR_BGR2GRAY)
    elif image.ndim == 3:
        image = image[..., 0]
    return image.astype(np.float32)


def _check_landmarks(landmarks: np.ndarray) -> np.ndarray:
    pts = np.asarray(landmarks, np.float64)
    if pts.shape != (68, 2) or not np.isfinite(pts).all():
        raise InvalidInput(f"landmarks must be finite [68, 2] frame pixels, got shape {pts.shape}")
    return pts


def laplacian_variance(image: np.ndarray) -> float:
    """Sharpness: variance of the Laplacian (3 x 3) of the grey image; larger = sharper (0 for a flat image)."""
    return float(cv2.Laplacian(_gray(image), cv2.CV_32F, ksize=3).astype(np.float64).var())


def mouth_box(
    landmarks: np.ndarray, frame_shape: tuple[int, ...], *, margin: float = DEFAULT_MOUTH_MARGIN
) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) half-open pixel box around the mouth (points 48-67), cut to the frame.

    Raises:
        InvalidInput: bad landmarks or a box with no pixel inside the frame.
    """
    pts = _check_landmarks(landmarks)[MOUTH]
    h, w = frame_shape[:2]
    width = float(np.linalg.norm(pts[0] - pts[6]))
    pad = margin * max(width, 1.0)
    x0, y0 = np.floor(pts.min(axis=0) - pad).astype(int)
    x1, y1 = np.ceil(pts.max(axis=0) + pad).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 - x0 < 3 or y1 - y0 < 3:
        raise InvalidInput(f"the mouth box ({x0}, {y0}, {x1}, {y1}) lies outside the {w}x{h} frame")
    return int(x0), int(y0), int(x1), int(y1)


def mouth_sharpness(frame: np.ndarray, landmarks: np.ndarray, *, margin: float = DEFAULT_MOUTH_MARGIN) -> float:
    """Variance of the Laplacian inside the mouth box of one frame (BGR uint8 [h, w, 3])."""
    frame = _check_image(frame, "frame")
    x0, y0, x1, y1 = mouth_box(landmarks, frame.shape, margin=margin)
    return laplacian_variance(frame[y0:y1, x0:x1])


def blend_region(landmarks: np.ndarray, frame_shape: tuple[int, ...]) -> np.ndarray:
    """uint8 [h, w], 1 inside the lower-face region the composite stage blends (see the module docstring)."""
    pts = _check_landmarks(landmarks)
    h, w = frame_shape[:2]
    warp = LowerFaceWarp(pts.astype(np.float32))
    polygon = lower_face_polygon(warp, pts[3:14])
    a, t = warp.similarity
    left, top, right, bottom = DEFAULT_CROP_REGION
    quad = apply_similarity(1 / a, -t / a, np.array([[left, top], [right, top], [right, bottom], [left, bottom]]))
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    crop = np.zeros((h, w), np.uint8)
    cv2.fillPoly(crop, [np.round(quad * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask & crop


def seam_band_px(landmarks: np.ndarray) -> float:
    """Half-width of the seam band: 5 % of the inter-ocular distance, at least 2 pixels."""
    return max(2.0, SEAM_BAND_FRACTION * float(interocular_distance(_check_landmarks(landmarks))))


def seam_energy(image: np.ndarray, mask: np.ndarray, *, band_px: float) -> float:
    """Mean gradient magnitude within `band_px` of the mask's edge over that in the flanks (2-5 band_px away).

    Args:
        image: BGR uint8 [h, w, 3] or grey [h, w].
        mask: uint8/bool [h, w], the blended region (1 inside).
        band_px: half-width of the seam band, pixels, > 0.

    Returns:
        The ratio (~1 for no seam; NaN when the flanks are flat or the mask has no edge in the image).

    Raises:
        InvalidInput: mismatched shapes, empty or full mask, band_px <= 0.
    """
    gray = _gray(image)
    region = np.asarray(mask).astype(bool)
    if region.shape != gray.shape:
        raise InvalidInput(f"mask must be [{gray.shape[0]}, {gray.shape[1]}], got shape {region.shape}")
    if not (math.isfinite(band_px) and band_px > 0):
        raise InvalidInput(f"band_px must be > 0, got {band_px}")
    if not region.any() or region.all():
        raise InvalidInput("the blend mask is empty or covers the whole image: it has no edge")
    # Work in the mask's bounding box plus the flank reach: the cost scales with the face, not the frame.
    reach = int(math.ceil(5 * band_px)) + 2
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    y0, y1 = max(rows[0] - reach, 0), min(rows[-1] + reach + 1, gray.shape[0])
    x0, x1 = max(cols[0] - reach, 0), min(cols[-1] + reach + 1, gray.shape[1])
    gray, inside = gray[y0:y1, x0:x1], region[y0:y1, x0:x1].astype(np.uint8)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    magnitude = np.sqrt(gx * gx + gy * gy)
    # Distance to the edge: in pixels from the nearest pixel of the other side (pixel centres), minus 0.5.
    d_in = cv2.distanceTransform(inside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    d_out = cv2.distanceTransform(1 - inside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    distance = np.where(inside > 0, d_in, d_out) - 0.5
    # The image border is not an edge: ignore pixels whose Sobel stencil leaves the image.
    interior = np.zeros(distance.shape, bool)
    interior[1:-1, 1:-1] = True
    band = interior & (distance <= band_px)
    flanks = interior & (distance >= 2 * band_px) & (distance <= 5 * band_px)
    if not band.any() or not flanks.any():
        return math.nan
    flank = float(magnitude[flanks].mean())
    return float(magnitude[band].mean()) / flank if flank > 1e-6 else math.nan


def frame_seam_energy(frame: np.ndarray, landmarks: np.ndarray) -> float:
    """`seam_energy` of one frame at its own blend region, band `seam_band_px`."""
    frame = _check_image(frame, "frame")
    mask = blend_region(landmarks, frame.shape)
    if not mask.any() or mask.all():
        return math.nan
    return seam_energy(frame, mask, band_px=seam_band_px(landmarks))


ARTIFACT_RADIUS_FRACTION = 0.12  # of the inter-ocular distance: colour that moved less than this is not foreign
ARTIFACT_EDGE_RADIUS_FRACTION = 0.04  # of the inter-ocular distance: an edge this close to the target's is its own
ARTIFACT_BAND_FRACTION = 0.15  # of the inter-ocular distance: the band outside the jaw line that is scored too
# Of the inter-ocular distance: edges count within this of the jaw line and cheek outline, where a second contour
# shows. Inside the face, the texture's own folds and creases sit where its candidates had them (an opened mouth
# moves them): not an artifact of the compositing, which colour still watches there.
ARTIFACT_EDGE_BAND_FRACTION = 0.25
ARTIFACT_MOUTH_MARGIN = 0.2  # of the inter-ocular distance: the mouth is left out this far (an opened mouth
# legitimately moves the fold between lip and chin and the lips' shadows about this far)


def _fill(shape: tuple[int, ...], polygon: np.ndarray) -> np.ndarray:
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(np.asarray(polygon) * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask


def _disk(radius: float) -> np.ndarray:
    r = max(int(round(radius)), 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def jaw_compensated(
    target: np.ndarray, target_landmarks: np.ndarray, output_landmarks: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The target frame with its jaw line moved where the output's is (the compositor's own jaw correction, both
    directions, from the landmarks of both), and the landmarks that go with it: (image, landmarks [68, 2])."""
    pts = _check_landmarks(target_landmarks)
    if output_landmarks is None or not np.isfinite(output_landmarks).all():
        return target, pts
    warp = LowerFaceWarp(pts.astype(np.float32))
    a, t = warp.similarity
    moved = apply_similarity(a, t, np.asarray(output_landmarks, np.float64)[JAW_MOVING])
    delta = moved - warp.canonical[JAW_MOVING]
    length = np.linalg.norm(delta, axis=1, keepdims=True)
    delta *= np.minimum(1.0, MAX_JAW_SHIFT / np.maximum(length, 1e-12))
    image, jaw, _ = correct_jaw(target, pts, warp, delta)
    landmarks = pts.copy()
    landmarks[JAW_MOVING] = jaw
    return image, landmarks


def artifact_regions(
    landmarks: np.ndarray, frame_shape: tuple[int, ...], output_landmarks: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Where `frame_artifacts` looks: (region uint8, face interior uint8, colour radius px) of one frame.

    The region is the blend region (`blend_region` of `landmarks`) grown by ARTIFACT_BAND_FRACTION x the inter-ocular
    distance (so a second contour or a halo just outside the jaw line counts), without the mouth: the outer-lip hulls
    of `landmarks` and `output_landmarks`, grown by ARTIFACT_MOUTH_MARGIN. The face interior is the face outline
    shrunk by the radius: there only face pixels may explain an output colour.
    """
    pts = _check_landmarks(landmarks)
    iod = float(interocular_distance(pts))
    radius = max(2.0, ARTIFACT_RADIUS_FRACTION * iod)
    region = cv2.dilate(blend_region(pts, frame_shape), _disk(ARTIFACT_BAND_FRACTION * iod))
    mouth = _fill(frame_shape, cv2.convexHull(pts[48:60].astype(np.float32)).reshape(-1, 2))
    if output_landmarks is not None and np.isfinite(output_landmarks).all():
        out_pts = np.asarray(output_landmarks, np.float64)
        mouth |= _fill(frame_shape, cv2.convexHull(out_pts[48:60].astype(np.float32)).reshape(-1, 2))
    mouth = cv2.dilate(mouth, _disk(ARTIFACT_MOUTH_MARGIN * iod))
    region &= 1 - mouth
    face = _fill(frame_shape, face_outline(pts, pts[3:14]))
    interior = cv2.erode(face, _disk(radius))
    return region, interior, radius


@dataclass(frozen=True)
class ArtifactMaps:
    """What `frame_artifact_maps` found in one frame, inside a box of it.

    Attributes:
        box: (x0, y0, x1, y1) of the maps in the frame.
        colour: float32 [h, w] colour excess (delta E beyond the local range).
        edges: float32 [h, w] edge excess (Lab L per pixel beyond the strongest nearby edge).
        region: uint8 [h, w] the scored pixels.
        score: the ArtifactScore over the region.
    """

    box: tuple[int, int, int, int]
    colour: np.ndarray
    edges: np.ndarray
    region: np.ndarray
    score: ArtifactScore


def frame_artifact_maps(
    output: np.ndarray,
    target: np.ndarray,
    target_landmarks: np.ndarray,
    *,
    output_landmarks: np.ndarray | None = None,
) -> ArtifactMaps | None:
    """`frame_artifacts` with its maps (None when the region is empty)."""
    output, target = _check_image(output, "output"), _check_image(target, "target")
    if output.shape != target.shape or output.ndim != 3:
        raise InvalidInput(f"output and target frames must be the same [h, w, 3], got {output.shape}, {target.shape}")
    reference, landmarks = jaw_compensated(target, target_landmarks, output_landmarks)
    region, interior, radius = artifact_regions(landmarks, target.shape, output_landmarks)
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if rows.size == 0:
        return None
    pad = int(math.ceil(radius)) + 2
    y0, y1 = max(rows[0] - pad, 0), min(rows[-1] + pad + 1, region.shape[0])
    x0, x1 = max(cols[0] - pad, 0), min(cols[-1] + pad + 1, region.shape[1])
    box = (slice(y0, y1), slice(x0, x1))
    out_b, ref_b, region_b, interior_b = output[box], reference[box], region[box], interior[box].astype(bool)
    iod = float(interocular_distance(landmarks))
    edge_radius = max(1.0, ARTIFACT_EDGE_RADIUS_FRACTION * iod)
    face_colour, edges = artifact_maps(out_b, ref_b, radius_px=radius, edge_radius_px=edge_radius, support=interior_b)
    any_colour, _ = artifact_maps(out_b, ref_b, radius_px=radius, edge_radius_px=edge_radius)
    colour = np.where(interior_b, face_colour, any_colour)
    outline = np.zeros(region.shape, np.uint8)
    thickness = max(2, int(round(2 * ARTIFACT_EDGE_BAND_FRACTION * iod)))
    cv2.polylines(outline, [np.round(landmarks[:17]).astype(np.int32)], False, 1, thickness=thickness)
    edges = edges * outline[box]
    return ArtifactMaps(
        (int(x0), int(y0), int(x1), int(y1)), colour, edges, region_b, score_maps(colour, edges, region_b)
    )


def frame_artifacts(
    output: np.ndarray,
    target: np.ndarray,
    target_landmarks: np.ndarray,
    *,
    output_landmarks: np.ndarray | None = None,
) -> ArtifactScore:
    """Foreign colour and edges of an output frame against the target frame it was rendered on, in the lower face
    and just around it, outside the mouth (frames must correspond: the same target frame, as without re-timing).

    The target is first given the output's jaw line (`jaw_compensated`: a corrected chin is not an artifact). Inside
    the face (its outline shrunk by the radius) only face pixels explain an output colour, so background on a chin
    or a cheek is foreign however close the background is; elsewhere any target pixel within the radius does. An
    output edge counts where the target has none as strong within ARTIFACT_EDGE_RADIUS_FRACTION, near the jaw line
    and the cheek outline (ARTIFACT_EDGE_BAND_FRACTION: a second contour).
    See `services.composite.artifacts`.

    Args:
        output: BGR uint8 [h, w, 3] output frame.
        target: BGR uint8 [h, w, 3] target frame.
        target_landmarks: float [68, 2] the target frame's landmarks.
        output_landmarks: optional float [68, 2] the output frame's landmarks (its jaw line and mouth).

    Returns:
        The ArtifactScore (total = colour + edges; 0 for a clean frame).
    """
    maps = frame_artifact_maps(output, target, target_landmarks, output_landmarks=output_landmarks)
    return ArtifactScore(math.nan, math.nan, 0) if maps is None else maps.score


def artifact_crop(output: np.ndarray, target: np.ndarray, maps: ArtifactMaps, *, height: int = 180) -> np.ndarray:
    """target | output | output with foreign colour (red) and foreign edges (yellow) marked, around the scored
    region, each `height` rows, side by side (BGR uint8)."""
    x0, y0, x1, y1 = maps.box
    marked = output[y0:y1, x0:x1].copy()
    colour = (maps.colour > COLOUR_TOLERANCE) & (maps.region > 0)
    edges = (maps.edges > EDGE_TOLERANCE) & (maps.region > 0)
    marked[colour] = (0.4 * marked[colour] + 0.6 * np.array([0, 0, 255])).astype(np.uint8)
    marked[edges] = (0, 255, 255)
    panels = [target[y0:y1, x0:x1], output[y0:y1, x0:x1], marked]
    scale = height / max(y1 - y0, 1)
    size = (max(1, round((x1 - x0) * scale)), height)
    return np.hstack([cv2.resize(p, size, interpolation=cv2.INTER_CUBIC) for p in panels])


def canonical_mouth_box(geometry) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of `CANONICAL_MOUTH_BOX` in the pixels of the canonical crop of `geometry`."""
    left, top, right, bottom = CANONICAL_MOUTH_BOX
    corners = geometry.canonical_to_crop(np.array([[left, top], [right, bottom]], np.float64))
    h, w = geometry.crop_shape
    x0, y0 = np.floor(corners[0]).astype(int)
    x1, y1 = np.ceil(corners[1]).astype(int)
    return max(int(x0), 0), max(int(y0), 0), min(int(x1), w), min(int(y1), h)


@dataclass(frozen=True)
class Flicker:
    """Mean absolute difference of a region between consecutive frames (grey levels 0-255).

    Attributes:
        mean_abs_diff: mean over the frame pairs used (NaN with none).
        pairs: how many consecutive pairs were used.
    """

    mean_abs_diff: float
    pairs: int


def flicker(images: np.ndarray, use: np.ndarray, *, box: tuple[int, int, int, int] | None = None) -> Flicker:
    """Mean |image_i - image_{i-1}| (grey, inside `box`) over consecutive pairs where `use` holds for both.

    Args:
        images: uint8 [F, h, w, 3] or [F, h, w] (e.g. the canonical lower-face crops of a face analysis: the
            head motion is already taken out).
        use: bool [F], frames that may be paired (e.g. silent frames with a face).
        box: (x0, y0, x1, y1) region; None = the whole image.

    Returns:
        Flicker.

    Raises:
        InvalidInput: wrong shapes or an empty box.
    """
    images = np.asarray(images)
    use = np.asarray(use, bool)
    if images.ndim not in (3, 4) or len(images) < 1:
        raise InvalidInput(f"images must be [F, h, w] or [F, h, w, 3], got shape {images.shape}")
    if use.shape != (len(images),):
        raise InvalidInput(f"use must be bool [{len(images)}], got shape {use.shape}")
    x0, y0, x1, y1 = box if box is not None else (0, 0, images.shape[2], images.shape[1])
    if not (0 <= x0 < x1 <= images.shape[2] and 0 <= y0 < y1 <= images.shape[1]):
        raise InvalidInput(f"box {box} is empty or outside the {images.shape[2]}x{images.shape[1]} images")
    pairs = np.flatnonzero(use[1:] & use[:-1]) + 1
    if pairs.size == 0:
        return Flicker(math.nan, 0)
    total = 0.0
    for i in pairs:
        a = _gray(images[i - 1][y0:y1, x0:x1])
        b = _gray(images[i][y0:y1, x0:x1])
        total += float(np.abs(b - a).mean())
    return Flicker(total / pairs.size, int(pairs.size))


def ratio(value: float, reference: float) -> float:
    """value / reference, NaN when either is NaN or the reference is 0."""
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return math.nan
    return value / reference
