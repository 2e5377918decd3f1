"""Canonical frontal template, per-frame similarity alignment, lower-face warp, and per-frame face measures.

Canonical template units (shared by every `canonical` shape in audio2video): x to the right, y down,
normalised so that the template's face box (where dlib's detector puts its box) spans [0, 1] x [0, 1];
mouth x ~ 0.33..0.67, y ~ 0.69..0.86, chin at y ~ 1.09. One fixed template defines the frame for every
video, so canonical shapes from different videos (training clips and targets) are comparable; its id is
TEMPLATE_ID.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np
from scipy.spatial import Delaunay

from services.runtime.errors import InvalidInput

# dlib 68-point indices. Rigid points do not move with speech or expression (jaw near the ears, nose,
# eye corners): they place the tracking box and fit each frame's similarity transform.
RIGID_POINTS = np.array([0, 1, 15, 16, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 39, 42, 45])
LEFT_EYE = np.arange(36, 42)
RIGHT_EYE = np.arange(42, 48)
MOUTH = np.arange(48, 68)
JAW = np.arange(0, 17)


def valid_runs(valid: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [start, stop) index ranges of the runs of True in a bool [F] array."""
    v = np.asarray(valid, dtype=bool).astype(np.int8)
    edges = np.diff(np.concatenate([[0], v, [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


# Mean frontal 68-point shape (iBUG order) in canonical template units. Computed once from the clips of
# ../shared/data (12 videos, 7 people, every 5th of the first 300 frames): generalised Procrustes
# alignment on RIGID_POINTS with equal weight per video, made exactly left-right symmetric, eye line
# horizontal, then placed so that the mean dlib detector box is [0, 1] x [0, 1].
# `canonical_template` reproduces the procedure for any set of tracks.
# fmt: off
CANONICAL_TEMPLATE = np.array([
    [0.0164, 0.3269], [0.0223, 0.4518], [0.0381, 0.5759], [0.0642, 0.6984], [0.1079, 0.8137],
    [0.1765, 0.9165], [0.2686, 1.0016], [0.3767, 1.0661], [0.5, 1.087], [0.6233, 1.0661],
    [0.7314, 1.0016], [0.8235, 0.9165], [0.8921, 0.8137], [0.9358, 0.6984], [0.9619, 0.5759],
    [0.9777, 0.4518], [0.9836, 0.3269], [0.1154, 0.2045], [0.1716, 0.1467], [0.2524, 0.1232],
    [0.3377, 0.1314], [0.4169, 0.1635], [0.5831, 0.1635], [0.6623, 0.1314], [0.7476, 0.1232],
    [0.8284, 0.1467], [0.8846, 0.2045], [0.5, 0.2653], [0.5, 0.3405], [0.5, 0.4155],
    [0.5, 0.4934], [0.4116, 0.5689], [0.4545, 0.5812], [0.5, 0.5919], [0.5455, 0.5812],
    [0.5884, 0.5689], [0.211, 0.291], [0.2605, 0.2569], [0.321, 0.2565], [0.3731, 0.2968],
    [0.3181, 0.309], [0.2584, 0.3101], [0.6269, 0.2968], [0.679, 0.2565], [0.7395, 0.2569],
    [0.789, 0.291], [0.7416, 0.3101], [0.6819, 0.309], [0.3281, 0.7599], [0.3894, 0.7135],
    [0.4548, 0.6891], [0.5, 0.7003], [0.5452, 0.6891], [0.6106, 0.7135], [0.6719, 0.7599],
    [0.6135, 0.8224], [0.5499, 0.8514], [0.5, 0.8568], [0.4501, 0.8514], [0.3865, 0.8224],
    [0.359, 0.7597], [0.4543, 0.7347], [0.5, 0.7375], [0.5457, 0.7347], [0.641, 0.7597],
    [0.5468, 0.781], [0.5, 0.7862], [0.4532, 0.781],
], dtype=np.float32)
# fmt: on
CANONICAL_TEMPLATE.flags.writeable = False


def template_id(template: np.ndarray) -> str:
    """Content hash identifying a template: "tpl-" + first 16 hex digits of sha256 of its float32 bytes."""
    data = np.ascontiguousarray(np.asarray(template, dtype=np.float32)).tobytes()
    return "tpl-" + hashlib.sha256(data).hexdigest()[:16]


TEMPLATE_ID = template_id(CANONICAL_TEMPLATE)

# Left-right mirror permutation of the 68 iBUG points.
MIRROR = np.array(
    [*range(16, -1, -1), *range(26, 16, -1), 27, 28, 29, 30, 35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65]
)

# Default crop: the seed's Square(0.25, 0.75, 0.5, 1.1) (mouth, chin, lower cheeks), 150 x 180 pixels.
DEFAULT_CROP_REGION = (0.25, 0.5, 0.75, 1.1)
DEFAULT_CROP_SIZE = (150, 180)

# Lower-face warp vertices: landmarks that stay where the template has them (jaw near the ears, nose,
# eye corners) and landmarks that keep the frame's own (similarity-aligned) position because they move
# with speech (chin and the outer lip contour); the inner lip lies inside outer-lip triangles.
WARP_ANCHORS = np.array([0, 1, 2, 3, 13, 14, 15, 16, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 39, 42, 45])
WARP_MOVING = np.array([4, 5, 6, 7, 8, 9, 10, 11, 12, *range(48, 60)])
# A ring of points around the face (canonical units) mapped by the frame's similarity transform, so the
# warp covers any crop region inside it (outside the face the warp is a similarity).
WARP_RING = np.array(
    [[-0.5, -0.1], [0.5, -0.1], [1.5, -0.1], [-0.5, 0.75], [1.5, 0.75], [-0.5, 1.6], [0.5, 1.6], [1.5, 1.6]]
)
WARP_DOMAIN = (-0.5, -0.1, 1.5, 1.6)

# Generic face depth for head pose (`head_pose`): how far each of the 68 points lies in front of the outer eye
# corners, millimetres (anthropometric averages, symmetric; nose tip ~38 mm, ears ~45 mm behind). With the
# template's x, y this makes a generic 3-D face: the outer eye corners are ~95 mm apart, 0.578 template units,
# so one template unit is MM_PER_UNIT millimetres.
# fmt: off
FACE_DEPTH_MM = np.array([
    -45, -44, -40, -34, -25, -14, -3, 6, 9, 6, -3, -14, -25, -34, -40, -44, -45,  # jaw 0-16
    -2, 6, 11, 14, 15, 15, 14, 11, 6, -2,  # brows 17-26
    14, 20, 28, 38, 14, 20, 24, 20, 14,  # nose 27-35
    0, 5, 7, 8, 7, 5, 8, 7, 5, 0, 5, 7,  # eyes 36-47
    8, 17, 22, 24, 22, 17, 8, 16, 20, 21, 20, 16,  # outer lips 48-59
    10, 17, 19, 17, 10, 16, 18, 16,  # inner lips 60-67
], dtype=np.float64)
# fmt: on
MM_PER_UNIT = 164.0
# Points that fix the pose: nose and eyes (rigid; the jaw outline slides along the cheek as the head turns, the
# brows and lips move with expression and speech).
POSE_POINTS = np.arange(27, 48)


# ---------------------------------------------------------------------- similarity alignment
def fit_similarity(
    source: np.ndarray,
    target: np.ndarray,
    *,
    points: np.ndarray = RIGID_POINTS,
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity transforms (scale, rotation, translation) taking shapes onto a target.

    Uses complex numbers: a point z = x + iy maps to a z + t.

    Args:
        source: float [..., 68, 2] shapes (e.g. frame pixels); NaN shapes give NaN transforms.
        target: float [68, 2] target shape.
        points: Indices fitted (default the rigid points).

    Returns:
        (a complex128 [...], t complex128 [...]).
    """
    src = np.asarray(source, dtype=np.float64)
    dst = np.asarray(target, dtype=np.float64)
    z = src[..., points, 0] + 1j * src[..., points, 1]
    w = dst[points, 0] + 1j * dst[points, 1]
    zm = z.mean(axis=-1, keepdims=True)
    wm = w.mean()
    zc = z - zm
    with np.errstate(invalid="ignore", divide="ignore"):
        a = ((w - wm) * np.conj(zc)).sum(axis=-1) / (np.abs(zc) ** 2).sum(axis=-1)
    t = wm - a * zm[..., 0]
    return a, t


def apply_similarity(a: np.ndarray | complex, t: np.ndarray | complex, shapes: np.ndarray) -> np.ndarray:
    """Apply z -> a z + t to float [..., N, 2] shapes (a, t broadcast over the leading axes); float64 out."""
    p = np.asarray(shapes, dtype=np.float64)
    z = p[..., 0] + 1j * p[..., 1]
    out = np.asarray(a)[..., None] * z + np.asarray(t)[..., None]
    return np.stack([out.real, out.imag], axis=-1)


def to_canonical(landmarks: np.ndarray, *, template: np.ndarray = CANONICAL_TEMPLATE) -> np.ndarray:
    """Similarity-align frame landmarks to the template on the rigid points.

    Args:
        landmarks: float [..., 68, 2] frame pixels (NaN rows stay NaN).
        template: float [68, 2] canonical template.

    Returns:
        float64 [..., 68, 2] in canonical template units.
    """
    a, t = fit_similarity(landmarks, template)
    return apply_similarity(a, t, landmarks)


def canonical_template(
    landmarks: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    reference: np.ndarray = CANONICAL_TEMPLATE,
    iterations: int = 3,
    symmetric: bool = False,
) -> np.ndarray:
    """Mean shape of landmark tracks after similarity (Procrustes) alignment, in canonical template units.

    Generalised Procrustes analysis on the rigid points: align every valid shape to the current mean,
    average, and re-place the mean in the canonical frame by aligning it to `reference`; repeated
    `iterations` times.

    Args:
        landmarks: float [F, 68, 2] shapes (frame pixels or any units).
        valid: bool [F] (None = all frames); invalid frames are ignored.
        reference: float [68, 2] shape that fixes the canonical frame (default the global template).
        iterations: GPA iterations, >= 1.
        symmetric: Average the mean with its mirror image (left-right symmetric template).

    Returns:
        float32 [68, 2], canonical template units.

    Raises:
        InvalidInput: wrong shapes, or no valid frame.
    """
    shapes = np.asarray(landmarks, dtype=np.float64)
    if shapes.ndim != 3 or shapes.shape[1:] != (68, 2):
        raise InvalidInput(f"landmarks must be [F, 68, 2], got {shapes.shape}")
    v = np.ones(len(shapes), bool) if valid is None else np.asarray(valid, dtype=bool)
    if v.shape != (len(shapes),):
        raise InvalidInput(f"valid must be [{len(shapes)}], got {v.shape}")
    shapes = shapes[v & np.isfinite(shapes).all(axis=(1, 2))]
    if len(shapes) == 0:
        raise InvalidInput("no valid frame to build a template from")
    mean = np.asarray(reference, dtype=np.float64)
    for _ in range(max(int(iterations), 1)):
        aligned = apply_similarity(*fit_similarity(shapes, mean), shapes)
        mean = aligned.mean(axis=0)
        if symmetric:
            mirrored = mean.copy()
            mirrored[:, 0] *= -1
            mirrored = mirrored[MIRROR]
            mirrored = apply_similarity(*fit_similarity(mirrored, mean), mirrored)
            mean = (mean + mirrored) / 2
        mean = apply_similarity(*fit_similarity(mean, reference), mean)
    return mean.astype(np.float32)


# ---------------------------------------------------------------------- crop geometry
@dataclass(frozen=True)
class CanonicalGeometry:
    """How canonical template units map to crop pixels.

    Crop pixel (u, v) = (column, row) has its centre at template point
    (left + ((u + 0.5) / width_px) * (right - left), top + ((v + 0.5) / height_px) * (bottom - top)).

    Attributes:
        template: float32 [68, 2] canonical template (template units).
        template_id: Content hash of `template`.
        crop_region: (left, top, right, bottom) in template units; right > left, bottom > top.
        crop_width_px: Crop width, pixels.
        crop_height_px: Crop height, pixels.
    """

    template: np.ndarray
    template_id: str
    crop_region: tuple[float, float, float, float]
    crop_width_px: int
    crop_height_px: int

    @classmethod
    def create(
        cls,
        *,
        template: np.ndarray = CANONICAL_TEMPLATE,
        crop_region: tuple[float, float, float, float] = DEFAULT_CROP_REGION,
        crop_size: tuple[int, int] = DEFAULT_CROP_SIZE,
    ) -> CanonicalGeometry:
        """Validated geometry; `crop_size` is (width, height) in pixels, each in [8, 2048]."""
        tpl = np.asarray(template, dtype=np.float32)
        if tpl.shape != (68, 2) or not np.isfinite(tpl).all():
            raise InvalidInput(f"template must be finite [68, 2], got {tpl.shape}")
        left, top, right, bottom = (float(v) for v in crop_region)
        lo_x, lo_y, hi_x, hi_y = WARP_DOMAIN
        if not (lo_x <= left < right <= hi_x and lo_y <= top < bottom <= hi_y):
            raise InvalidInput(
                f"crop region {crop_region} must satisfy left < right, top < bottom and lie inside {WARP_DOMAIN}"
            )
        width, height = (int(v) for v in crop_size)
        if not (8 <= width <= 2048 and 8 <= height <= 2048):
            raise InvalidInput(f"crop size must be in [8, 2048] pixels, got {crop_size}")
        tpl = tpl.copy()
        tpl.flags.writeable = False
        return cls(tpl, template_id(tpl), (left, top, right, bottom), width, height)

    @property
    def crop_shape(self) -> tuple[int, int]:
        """(height, width) of a crop."""
        return self.crop_height_px, self.crop_width_px

    def canonical_to_crop(self, points: np.ndarray) -> np.ndarray:
        """Template units float [..., 2] -> crop pixel coordinates (x = column, y = row; centres at integers)."""
        left, top, right, bottom = self.crop_region
        p = np.asarray(points, dtype=np.float64)
        u = (p[..., 0] - left) / (right - left) * self.crop_width_px - 0.5
        v = (p[..., 1] - top) / (bottom - top) * self.crop_height_px - 0.5
        return np.stack([u, v], axis=-1)

    def crop_to_canonical(self, points: np.ndarray) -> np.ndarray:
        """Crop pixel coordinates float [..., 2] -> template units (inverse of `canonical_to_crop`)."""
        left, top, right, bottom = self.crop_region
        p = np.asarray(points, dtype=np.float64)
        x = left + (p[..., 0] + 0.5) / self.crop_width_px * (right - left)
        y = top + (p[..., 1] + 0.5) / self.crop_height_px * (bottom - top)
        return np.stack([x, y], axis=-1)


DEFAULT_GEOMETRY = CanonicalGeometry.create()


# ---------------------------------------------------------------------- piecewise-affine warp
@cache
def _triangulation(template_bytes: bytes) -> np.ndarray:
    """Delaunay triangles int32 [T, 3] over the warp vertices (anchors, moving, ring) placed on the template."""
    template = np.frombuffer(template_bytes, dtype=np.float32).reshape(68, 2)
    vertices = np.vstack([template[WARP_ANCHORS], template[WARP_MOVING], WARP_RING])
    return Delaunay(vertices).simplices.astype(np.int32)


def _triangle_affines(src_tri: np.ndarray, dst_tri: np.ndarray) -> np.ndarray:
    """Affine maps float64 [T, 2, 3] taking each dst triangle [T, 3, 2] onto its src triangle."""
    ones = np.ones(dst_tri.shape[:2] + (1,))
    d = np.concatenate([dst_tri, ones], axis=2)  # [T, 3, 3]
    # Degenerate (zero-area) triangles cover no pixel centre; pinv keeps them finite.
    return np.transpose(np.linalg.pinv(d) @ src_tri, (0, 2, 1))


def _rasterise(triangles: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Label image int32 [H, W]: index of the triangle covering each pixel centre, -1 where none."""
    labels = np.full(shape, -1, dtype=np.int32)
    pts = np.round(triangles * 16.0).astype(np.int32)  # 4 fractional bits
    for index, tri in enumerate(pts):
        cv2.fillConvexPoly(labels, tri, int(index), lineType=cv2.LINE_8, shift=4)
    return labels


def _apply_affines(affines: np.ndarray, labels: np.ndarray, offset: tuple[float, float] = (0.0, 0.0)):
    """Per-pixel maps (float32 [H, W] x, y) from the affine of each pixel's triangle; -1 where unlabelled."""
    h, w = labels.shape
    flat = affines.reshape(len(affines), 6)[np.maximum(labels, 0)]  # [H, W, 6]
    xs = np.arange(w, dtype=np.float64)[None, :] + offset[0]
    ys = np.arange(h, dtype=np.float64)[:, None] + offset[1]
    map_x = flat[..., 0] * xs + flat[..., 1] * ys + flat[..., 2]
    map_y = flat[..., 3] * xs + flat[..., 4] * ys + flat[..., 5]
    outside = labels < 0
    map_x[outside] = -1e6
    map_y[outside] = -1e6
    return map_x.astype(np.float32), map_y.astype(np.float32)


@dataclass(frozen=True)
class FramePatch:
    """A canonical crop warped back into frame geometry, covering the rows/columns it touches.

    Attributes:
        x0: Column of the patch's left edge in the frame.
        y0: Row of the patch's top edge in the frame.
        image: uint8 [h, w, C] (or [h, w]) pixels in frame geometry.
        mask: uint8 [h, w]: 1 where the pixel came from the crop (inside the crop region, and valid in
            the crop mask when one was given), else 0.
    """

    x0: int
    y0: int
    image: np.ndarray
    mask: np.ndarray

    def paste(self, frame: np.ndarray) -> np.ndarray:
        """A copy of `frame` with the masked patch pixels replaced (hard paste, no blending)."""
        out = frame.copy()
        h, w = self.mask.shape
        view = out[self.y0 : self.y0 + h, self.x0 : self.x0 + w]
        sel = self.mask.astype(bool)
        view[sel] = self.image[sel]
        return out


class LowerFaceWarp:
    """Piecewise-affine warp between one frame's lower face and the canonical crop.

    Vertices are 21 rigid landmarks (jaw near the ears, nose, eye corners), which go to their template
    positions; 21 landmarks that move with speech (chin 4-12, outer lip 48-59), which keep the frame's
    own similarity-aligned position (so the crop shows the real mouth shape, at the frame's canonical
    mouth coordinates); and a ring of 8 points around the face mapped by the frame's similarity transform.
    The triangulation is the Delaunay triangulation of these vertices on the template (fixed, so it is
    the same for every frame). Both directions are computed by inverse mapping with `cv2.remap`, each
    pixel's source found through the affine map of the triangle that covers it.

    Args:
        landmarks: float [68, 2] frame pixels of this frame (smoothed).
        geometry: Template and crop geometry.
    """

    def __init__(self, landmarks: np.ndarray, geometry: CanonicalGeometry = DEFAULT_GEOMETRY) -> None:
        pts = np.asarray(landmarks, dtype=np.float64)
        if pts.shape != (68, 2) or not np.isfinite(pts).all():
            raise InvalidInput(f"landmarks must be finite [68, 2], got shape {pts.shape}")
        self.geometry = geometry
        template = geometry.template.astype(np.float64)
        a, t = fit_similarity(pts, template)
        if not np.isfinite(a) or abs(a) < 1e-9:
            raise InvalidInput("landmarks are degenerate (all rigid points coincide)")
        self.similarity = (complex(a), complex(t))
        canonical = apply_similarity(a, t, pts)
        ring_src = apply_similarity(1 / a, -t / a, WARP_RING)
        self.src = np.vstack([pts[WARP_ANCHORS], pts[WARP_MOVING], ring_src])  # frame pixels
        dst = np.vstack([template[WARP_ANCHORS], canonical[WARP_MOVING], WARP_RING])  # template units
        self.dst = geometry.canonical_to_crop(dst)  # crop pixels
        self.triangles = _triangulation(geometry.template.tobytes())
        self.canonical = canonical  # float64 [68, 2] template units
        self._to_frame = _triangle_affines(self.src[self.triangles], self.dst[self.triangles])
        self._to_crop = _triangle_affines(self.dst[self.triangles], self.src[self.triangles])

    @property
    def frame_pixels_per_crop_pixel(self) -> float:
        """Scale of the similarity part: frame pixels spanned by one crop pixel."""
        left, _, right, _ = self.geometry.crop_region
        units_per_crop_px = (right - left) / self.geometry.crop_width_px
        return units_per_crop_px / abs(self.similarity[0])

    def crop_maps(self) -> tuple[np.ndarray, np.ndarray]:
        """Frame coordinates of each crop pixel centre: (map_x, map_y) float32 [h, w] for cv2.remap."""
        labels = _rasterise(self.dst[self.triangles], self.geometry.crop_shape)
        return _apply_affines(self._to_frame, labels)

    def to_crop(
        self,
        frame: np.ndarray,
        *,
        interpolation: int = cv2.INTER_CUBIC,
        antialias: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Warp the frame's lower face into the canonical crop.

        Args:
            frame: uint8 [H, W, 3] BGR (or [H, W]).
            interpolation: cv2 interpolation for the inverse mapping (default bicubic).
            antialias: Gaussian-prefilter the source region when the crop is smaller than the face in the
                frame (more than 1.3 frame pixels per crop pixel), so textures do not alias.

        Returns:
            (crop uint8 [h, w, 3] (or [h, w]), mask uint8 [h, w]: 1 where the source pixel lies inside the
            frame, 0 elsewhere (crop pixel set to 0)).
        """
        map_x, map_y = self.crop_maps()
        fh, fw = frame.shape[:2]
        inside = (map_x >= -0.5) & (map_x <= fw - 0.5) & (map_y >= -0.5) & (map_y <= fh - 0.5)
        source = frame
        if inside.any():
            x0 = int(max(math.floor(map_x[inside].min()) - 4, 0))
            y0 = int(max(math.floor(map_y[inside].min()) - 4, 0))
            x1 = int(min(math.ceil(map_x[inside].max()) + 5, fw))
            y1 = int(min(math.ceil(map_y[inside].max()) + 5, fh))
            source = frame[y0:y1, x0:x1]
            map_x, map_y = map_x - x0, map_y - y0
            ratio = self.frame_pixels_per_crop_pixel
            if antialias and ratio > 1.3:
                sigma = 0.45 * math.sqrt(ratio * ratio - 1.0)
                source = cv2.GaussianBlur(source, (0, 0), sigmaX=sigma, sigmaY=sigma)
        crop = cv2.remap(source, map_x, map_y, interpolation, borderMode=cv2.BORDER_REPLICATE)
        crop[~inside] = 0
        return crop, inside.astype(np.uint8)

    def crop_points_to_frame(self, points: np.ndarray) -> np.ndarray:
        """Map crop pixel coordinates float [N, 2] to frame pixels (NaN outside the warp's domain)."""
        return self._map_points(np.asarray(points, dtype=np.float64), self.dst, self._to_frame)

    def frame_points_to_crop(self, points: np.ndarray) -> np.ndarray:
        """Map frame pixel coordinates float [N, 2] to crop pixels (NaN outside the warp's domain)."""
        return self._map_points(np.asarray(points, dtype=np.float64), self.src, self._to_crop)

    def _map_points(self, points: np.ndarray, vertices: np.ndarray, affines: np.ndarray) -> np.ndarray:
        tri = vertices[self.triangles]  # [T, 3, 2]
        # Barycentric coordinates of every point in every triangle: [N, T, 3].
        v0, v1, v2 = tri[:, 0], tri[:, 1], tri[:, 2]
        e1, e2 = v1 - v0, v2 - v0
        det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
        rel = points[:, None, :] - v0[None]
        with np.errstate(divide="ignore", invalid="ignore"):
            b1 = (rel[..., 0] * e2[:, 1] - rel[..., 1] * e2[:, 0]) / det
            b2 = (e1[:, 0] * rel[..., 1] - e1[:, 1] * rel[..., 0]) / det
        inside = (b1 >= -1e-9) & (b2 >= -1e-9) & (b1 + b2 <= 1 + 1e-9) & (np.abs(det) > 1e-12)
        has = inside.any(axis=1)
        index = np.argmax(inside, axis=1)
        a = affines[index]  # [N, 2, 3]
        out = np.einsum("nij,nj->ni", a[:, :, :2], points) + a[:, :, 2]
        out[~has] = np.nan
        return out

    def to_frame(
        self,
        crop: np.ndarray,
        frame_shape: tuple[int, ...],
        *,
        crop_mask: np.ndarray | None = None,
        interpolation: int = cv2.INTER_LINEAR,
    ) -> FramePatch:
        """Warp a canonical crop back into this frame's geometry (the inverse of `to_crop`).

        Args:
            crop: uint8 [h, w, C] or [h, w] canonical crop (h, w = the geometry's crop shape).
            frame_shape: (H, W, ...) of the target frame; the patch is clipped to it.
            crop_mask: Optional uint8/bool [h, w]; frame pixels whose interpolation would touch a crop pixel
                where it is 0 get mask 0.
            interpolation: cv2 interpolation (default bilinear).

        Returns:
            The FramePatch covering the warped crop region (empty when it lies outside the frame).

        Raises:
            InvalidInput: crop or mask of the wrong shape.
        """
        h, w = self.geometry.crop_shape
        if crop.shape[:2] != (h, w):
            raise InvalidInput(f"crop must be [{h}, {w}, ...], got {crop.shape}")
        if crop_mask is not None and crop_mask.shape != (h, w):
            raise InvalidInput(f"crop_mask must be [{h}, {w}], got {crop_mask.shape}")
        fh, fw = int(frame_shape[0]), int(frame_shape[1])
        # The crop rectangle's boundary, mapped to the frame, bounds the patch.
        edge = np.linspace(0.0, 1.0, 33)
        border = (
            np.concatenate(
                [
                    np.stack([edge * w, np.zeros_like(edge)], 1),
                    np.stack([edge * w, np.full_like(edge, h)], 1),
                    np.stack([np.zeros_like(edge), edge * h], 1),
                    np.stack([np.full_like(edge, w), edge * h], 1),
                ]
            )
            - 0.5
        )
        corners = self.crop_points_to_frame(border)
        corners = corners[np.isfinite(corners).all(axis=1)]
        empty = FramePatch(0, 0, np.zeros((0, 0) + crop.shape[2:], np.uint8), np.zeros((0, 0), np.uint8))
        if len(corners) == 0:
            return empty
        x0 = int(max(math.floor(corners[:, 0].min()) - 1, 0))
        y0 = int(max(math.floor(corners[:, 1].min()) - 1, 0))
        x1 = int(min(math.ceil(corners[:, 0].max()) + 2, fw))
        y1 = int(min(math.ceil(corners[:, 1].max()) + 2, fh))
        if x1 <= x0 or y1 <= y0:
            return empty
        labels = _rasterise(self.src[self.triangles] - np.array([x0, y0]), (y1 - y0, x1 - x0))
        map_x, map_y = _apply_affines(self._to_crop, labels, offset=(x0, y0))
        inside = (map_x >= -0.5) & (map_x <= w - 0.5) & (map_y >= -0.5) & (map_y <= h - 0.5)
        image = cv2.remap(crop, map_x, map_y, interpolation, borderMode=cv2.BORDER_REPLICATE)
        if crop_mask is not None:
            # Keep only pixels whose whole interpolation footprint is valid in the crop.
            valid = (np.asarray(crop_mask) > 0).astype(np.float32)
            if interpolation != cv2.INTER_NEAREST:
                size = 5 if interpolation in (cv2.INTER_CUBIC, cv2.INTER_LANCZOS4) else 3
                valid = cv2.erode(valid, np.ones((size, size), np.uint8), borderType=cv2.BORDER_REPLICATE)
            valid = cv2.remap(valid, map_x, map_y, cv2.INTER_NEAREST, borderValue=0)
            inside &= valid > 0.5
        image[~inside] = 0
        return FramePatch(x0, y0, image, inside.astype(np.uint8))


# ---------------------------------------------------------------------- per-frame measures
def eye_centres(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the left (36-41) and right (42-47) eyes, float64 [..., 2] each."""
    p = np.asarray(landmarks, dtype=np.float64)
    return p[..., LEFT_EYE, :].mean(axis=-2), p[..., RIGHT_EYE, :].mean(axis=-2)


def interocular_distance(landmarks: np.ndarray) -> np.ndarray:
    """Distance between the eye centres, float64 [...] (same units as the landmarks)."""
    left, right = eye_centres(landmarks)
    return np.linalg.norm(right - left, axis=-1)


def _interpolate_gaps(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Fill invalid entries of a float [F] series by linear interpolation (constant beyond the ends)."""
    out = np.asarray(values, dtype=np.float64).copy()
    good = np.asarray(valid, bool) & np.isfinite(out)
    if not good.any():
        return np.zeros_like(out)
    idx = np.arange(len(out))
    out[~good] = np.interp(idx[~good], idx[good], out[good])
    return out


def eye_openness(landmarks: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Mean area of the two eye polygons in inter-ocular distance squared units (blink when below ~0.025).

    Args:
        landmarks: float [F, 68, 2].
        valid: bool [F]; invalid frames are interpolated from their neighbours.

    Returns:
        float32 [F].
    """
    p = np.asarray(landmarks, dtype=np.float64)

    def area(idx: np.ndarray) -> np.ndarray:
        x, y = p[:, idx, 0], p[:, idx, 1]
        return 0.5 * np.abs((x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y).sum(axis=1))

    with np.errstate(invalid="ignore", divide="ignore"):
        value = (area(LEFT_EYE) + area(RIGHT_EYE)) / 2 / interocular_distance(p) ** 2
    return _interpolate_gaps(value, valid).astype(np.float32)


def head_motion(landmarks: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Head motion speed per frame: norm of the mean central-difference velocity of points 0-35.

    In inter-ocular units per frame (the seed's V_j). Differences are taken inside runs of valid frames
    (one-sided at a run's ends, 0 for a single-frame run); invalid frames are interpolated.

    Args:
        landmarks: float [F, 68, 2].
        valid: bool [F].

    Returns:
        float32 [F].
    """
    p = np.asarray(landmarks, dtype=np.float64)[:, :36]
    v = np.asarray(valid, dtype=bool)
    speed = np.full(len(p), np.nan)
    iod = interocular_distance(np.asarray(landmarks, dtype=np.float64))
    for start, stop in valid_runs(v):
        if stop - start < 2:
            speed[start:stop] = 0.0
            continue
        velocity = np.gradient(p[start:stop].mean(axis=1), axis=0)  # [L, 2] pixels/frame
        speed[start:stop] = np.linalg.norm(velocity, axis=1) / iod[start:stop]
    return _interpolate_gaps(speed, v).astype(np.float32)


def face_model(template: np.ndarray = CANONICAL_TEMPLATE) -> np.ndarray:
    """The generic 3-D face, float64 [68, 3] template units: x, y of the template, z = depth away from the camera."""
    tpl = np.asarray(template, dtype=np.float64)
    return np.column_stack([tpl, -FACE_DEPTH_MM / MM_PER_UNIT])


def euler_angles(rotation: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) radians of a face rotation R = Rz(roll) Ry(-yaw) Rx(pitch) (model -> camera axes).

    Axes as OpenCV's camera: x right, y down, z away from the camera. Yaw > 0 turns the face towards +x (image
    right), pitch > 0 tilts it down, roll > 0 turns it clockwise on screen.
    """
    r = np.asarray(rotation, dtype=np.float64)
    yaw = float(np.arcsin(np.clip(r[2, 0], -1.0, 1.0)))
    pitch = float(np.arctan2(r[2, 1], r[2, 2]))
    roll = float(np.arctan2(r[1, 0], r[0, 0]))
    return yaw, pitch, roll


def rotation_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """float64 [3, 3] R = Rz(roll) Ry(-yaw) Rx(pitch), the inverse of `euler_angles`."""
    cy, sy = math.cos(-yaw), math.sin(-yaw)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cr, sr = math.cos(roll), math.sin(roll)
    rz = np.array([[cr, -sr, 0.0], [sr, cr, 0.0], [0.0, 0.0, 1.0]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
    return rz @ ry @ rx


def camera_matrix(frame_size: tuple[int, int]) -> np.ndarray:
    """Pinhole camera float64 [3, 3] for a frame (width, height).

    Focal length = the longer side (a ~53 degree field of view, typical of phones and webcams), principal point
    at the centre.
    """
    w, h = (float(v) for v in frame_size)
    f = max(w, h)
    return np.array([[f, 0.0, w / 2], [0.0, f, h / 2], [0.0, 0.0, 1.0]])


def _solve_pose(points: np.ndarray, model: np.ndarray, camera: np.ndarray, a: complex, t: complex) -> np.ndarray:
    """rvec, tvec float64 [6] of one frame by Levenberg-Marquardt from the similarity's frontal pose."""
    f = camera[0, 0]
    scale = 1.0 / abs(a)  # frame pixels per template unit
    origin = (0.5 + 0.5j - t) / a  # frame position of the template point (0.5, 0.5)
    z = f / scale
    rvec = np.array([[0.0], [0.0], [-np.angle(a)]])
    tvec = np.array([[(origin.real - camera[0, 2]) * z / f - 0.5], [(origin.imag - camera[1, 2]) * z / f - 0.5], [z]])
    ok, rvec, tvec = cv2.solvePnP(
        model, points, camera, None, rvec=rvec, tvec=tvec, useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE
    )
    if not ok:
        return np.full(6, np.nan)
    return np.concatenate([rvec.ravel(), tvec.ravel()])


def head_pose(
    landmarks: np.ndarray,
    *,
    template: np.ndarray = CANONICAL_TEMPLATE,
    frame_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Head pose per frame from 2-D landmarks: a generic 3-D face (`face_model`) fitted with cv2.solvePnP.

    The rotation is fitted on the nose and eyes (POSE_POINTS) by Levenberg-Marquardt from the frontal pose of
    the frame's similarity transform, so each frame is solved on its own (no tracking state). The generic face
    makes the angles approximate (a few degrees for a given person), but consistent within a video, which is what
    comparing poses needs.

    Args:
        landmarks: float [F, 68, 2] frame pixels (NaN rows give NaN).
        template: float [68, 2] canonical template (x, y of the 3-D face; also the similarity fit).
        frame_size: (width, height) of the frames: the camera (`camera_matrix`). None = a nearly orthographic
            camera on each face (focal length 50 face widths), for landmarks without a frame.

    Returns:
        float32 [F, 6]: yaw (rad, > 0 when the face turns towards +x / image right), pitch (rad, > 0 when it
        tilts down), roll (rad, > 0 clockwise on screen), face centre x, y (pixels: the frame position of the
        template's face-box centre (0.5, 0.5)), scale (inter-ocular distance, pixels).
    """
    p = np.asarray(landmarks, dtype=np.float64)
    flat = p.reshape(-1, 68, 2)
    a, t = fit_similarity(flat, template)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = (0.5 + 0.5j - t) / a
    model = face_model(template)[POSE_POINTS]
    angles = np.full((len(flat), 3), np.nan)
    for i in range(len(flat)):
        if not (np.isfinite(flat[i]).all() and np.isfinite(a[i]) and abs(a[i]) > 1e-12):
            continue
        if frame_size is not None:
            camera = camera_matrix(frame_size)
        else:
            f = 50.0 / abs(a[i])
            camera = np.array([[f, 0.0, centre[i].real], [0.0, f, centre[i].imag], [0.0, 0.0, 1.0]])
        solved = _solve_pose(flat[i, POSE_POINTS].copy(), model, camera, complex(a[i]), complex(t[i]))
        if np.isfinite(solved).all():
            angles[i] = euler_angles(cv2.Rodrigues(solved[:3])[0])
    pose = np.concatenate([angles, np.stack([centre.real, centre.imag, interocular_distance(flat)], axis=-1)], axis=-1)
    return pose.reshape(p.shape[:-2] + (6,)).astype(np.float32)


def landmark_jitter(raw: np.ndarray, smoothed: np.ndarray) -> np.ndarray:
    """How unsure the landmark tracker is per frame.

    The distance of the raw rigid points (nose, eyes) from their smoothed track, median over the points, in
    inter-ocular units.

    Args:
        raw: float [F, 68, 2] the tracker's landmarks, frame pixels.
        smoothed: float [F, 68, 2] the same track after temporal smoothing.

    Returns:
        float32 [F] (NaN where a frame has no face).
    """
    r = np.asarray(raw, dtype=np.float64)
    s = np.asarray(smoothed, dtype=np.float64)
    if r.shape != s.shape or r.ndim != 3 or r.shape[1:] != (68, 2):
        raise InvalidInput(f"raw and smoothed landmarks must both be [F, 68, 2], got {r.shape} and {s.shape}")
    distance = np.linalg.norm(r[:, POSE_POINTS] - s[:, POSE_POINTS], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.median(distance, axis=1) / interocular_distance(s)).astype(np.float32)


def project_face(
    rotation: np.ndarray,
    translation: np.ndarray,
    camera: np.ndarray,
    *,
    template: np.ndarray = CANONICAL_TEMPLATE,
) -> np.ndarray:
    """The generic 3-D face seen by a camera: frame points float64 [68, 2] (for tests and synthetic targets).

    Args:
        rotation: float [3, 3] model -> camera rotation (`rotation_matrix`).
        translation: float [3] the model origin in camera coordinates (template units).
        camera: float [3, 3] pinhole camera matrix.
        template: canonical template (x, y of the face).
    """
    rvec = cv2.Rodrigues(np.asarray(rotation, dtype=np.float64))[0]
    tvec = np.asarray(translation, dtype=np.float64).reshape(3, 1)
    points, _ = cv2.projectPoints(face_model(template), rvec, tvec, np.asarray(camera, dtype=np.float64), None)
    return points.reshape(68, 2)


__all__ = [
    "CANONICAL_TEMPLATE",
    "DEFAULT_CROP_REGION",
    "DEFAULT_CROP_SIZE",
    "DEFAULT_GEOMETRY",
    "JAW",
    "MIRROR",
    "MOUTH",
    "TEMPLATE_ID",
    "CanonicalGeometry",
    "FramePatch",
    "LowerFaceWarp",
    "apply_similarity",
    "canonical_template",
    "eye_openness",
    "fit_similarity",
    "head_motion",
    "camera_matrix",
    "euler_angles",
    "face_model",
    "head_pose",
    "interocular_distance",
    "landmark_jitter",
    "project_face",
    "rotation_matrix",
    "template_id",
    "to_canonical",
]


# Mouth points 48-67 as indices 0-19 of a [.., 20, 2] mouth shape: the inner-lip pairs (61-67, 62-66,
# 63-65) and the corners (48, 54). Their ratio is scale-free, so it compares mouths of any video.
INNER_LIP_PAIRS = ((13, 19), (14, 18), (15, 17))
MOUTH_CORNERS = (0, 6)


def _mouths(mouth_shapes: np.ndarray) -> np.ndarray:
    m = np.asarray(mouth_shapes, dtype=np.float64)
    if m.ndim != 3 or m.shape[1:] != (20, 2):
        raise InvalidInput(f"mouth shapes must be [N, 20, 2], got {m.shape}")
    return m


def inner_lip_gap(mouth_shapes: np.ndarray) -> np.ndarray:
    """Mean distance of the inner-lip pairs 61-67, 62-66, 63-65 of float [N, 20, 2] mouth shapes, float64 [N]."""
    m = _mouths(mouth_shapes)
    upper = [u for u, _ in INNER_LIP_PAIRS]
    lower = [lo for _, lo in INNER_LIP_PAIRS]
    return np.linalg.norm(m[:, upper] - m[:, lower], axis=-1).mean(axis=1)


def mouth_opening_ratio(mouth_shapes: np.ndarray) -> np.ndarray:
    """Inner-lip gap over mouth width of float [N, 20, 2] mouth shapes, float64 [N] (NaN where not finite)."""
    m = _mouths(mouth_shapes)
    gap = inner_lip_gap(m)
    width = np.linalg.norm(m[:, MOUTH_CORNERS[0]] - m[:, MOUTH_CORNERS[1]], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(width > 0, gap / width, np.nan)
