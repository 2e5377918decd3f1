"""Foreign colour and foreign edges of an image against a reference (pure): what a blend brought that was not there.

For every pixel of a region, the reference's local colour range (per CIE Lab channel, the minimum and maximum over
a square of half-side `radius_px`, taken only over the reference pixels that `support` allows) says which colours
belong there; an output colour outside that range by more than `COLOUR_TOLERANCE` is foreign (e.g. background on
a chin, whose neighbourhood in the target is skin). An output edge (Lab lightness gradient) stronger than the
strongest reference edge within the radius by more than `EDGE_TOLERANCE` is foreign too (a second jaw contour, a
pasted patch's border). Content that moved by less than the radius (a corrected chin, compression noise) scores
nothing.

The compositor uses it on each blended frame against the frame it blended into (a confidence factor); the
evaluation uses it on an output against its target footage (`a2v eval output`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from services.runtime.errors import InvalidInput

COLOUR_TOLERANCE = 6.0  # Lab units (delta E 1976) outside the local range that compression and resampling reach
EDGE_TOLERANCE = 0.75  # Lab lightness per pixel above the strongest nearby reference edge
COLOUR_CAP = 40.0  # per-pixel excess counted at most (one garish pixel is not worth a whole region)
EDGE_CAP = 40.0
_BIG = np.float32(1e6)


@dataclass(frozen=True)
class ArtifactScore:
    """Mean foreign colour and foreign edges over a region.

    Attributes:
        colour: mean over the region of the colour excess beyond COLOUR_TOLERANCE, clipped at COLOUR_CAP (delta E).
        edges: mean over the region of the edge excess beyond EDGE_TOLERANCE, clipped at EDGE_CAP (Lab L / px).
        pixels: pixels in the region (0: nothing measured, the scores are NaN).
    """

    colour: float
    edges: float
    pixels: int

    @property
    def total(self) -> float:
        """colour + edges: one number per frame (NaN when nothing was measured)."""
        return self.colour + self.edges


def _lab(image: np.ndarray) -> np.ndarray:
    """float32 CIE Lab (L 0-100) of a BGR uint8 or float [0, 255] image."""
    return cv2.cvtColor(np.asarray(image, np.float32) * np.float32(1 / 255), cv2.COLOR_BGR2Lab)


def _gradient(lightness: np.ndarray) -> np.ndarray:
    gx = cv2.Sobel(lightness, cv2.CV_32F, 1, 0, ksize=3, scale=0.125)
    gy = cv2.Sobel(lightness, cv2.CV_32F, 0, 1, ksize=3, scale=0.125)
    return np.sqrt(gx * gx + gy * gy)


def artifact_maps(
    output: np.ndarray,
    reference: np.ndarray,
    *,
    radius_px: float,
    edge_radius_px: float | None = None,
    support: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel colour and edge excess of `output` over `reference` (same-size BGR images).

    Args:
        output: uint8 or float [h, w, 3] BGR (0-255).
        reference: the same shape, the image whose local content is expected.
        radius_px: radius of the neighbourhood in pixels, >= 1.
        edge_radius_px: radius for the edges (None = radius_px), >= 1: how far an output edge may lie from the
            reference's and still be the same edge.
        support: bool/uint8 [h, w] reference pixels that count for the local colour range (None = all); output
            pixels with no supported reference pixel within the radius get no colour excess.

    Returns:
        (colour float32 [h, w] delta E beyond the local range, edges float32 [h, w] Lab L per pixel beyond the
        strongest reference edge nearby); neither tolerance is subtracted yet.

    Raises:
        InvalidInput: mismatched shapes or a radius below 1.
    """
    out = np.asarray(output)
    ref = np.asarray(reference)
    if out.ndim != 3 or out.shape[2] != 3 or out.shape != ref.shape:
        raise InvalidInput(f"output and reference must be the same [h, w, 3], got {out.shape} and {ref.shape}")
    edge_radius = radius_px if edge_radius_px is None else edge_radius_px
    if not (math.isfinite(radius_px) and radius_px >= 1.0 and math.isfinite(edge_radius) and edge_radius >= 1.0):
        raise InvalidInput(f"radius_px and edge_radius_px must be >= 1, got {radius_px}, {edge_radius_px}")

    def disk_of(radius: float) -> np.ndarray:
        # A square: OpenCV's rectangular erosion is separable (a disk of this radius costs ~10x more), and the
        # corners it adds matter little to a neighbourhood's colour range.
        r = int(math.ceil(radius))
        return cv2.getStructuringElement(cv2.MORPH_RECT, (2 * r + 1, 2 * r + 1))

    disk = disk_of(radius_px)
    lab_out, lab_ref = _lab(out), _lab(ref)
    allowed = None if support is None else np.asarray(support).astype(bool)
    if allowed is not None and allowed.shape != out.shape[:2]:
        raise InvalidInput(f"support must be [{out.shape[0]}, {out.shape[1]}], got {allowed.shape}")
    excess = np.zeros(out.shape[:2], np.float32)
    for c in range(3):
        channel = lab_ref[..., c]
        low = channel if allowed is None else np.where(allowed, channel, _BIG)
        high = channel if allowed is None else np.where(allowed, channel, -_BIG)
        lo = cv2.erode(low, disk, borderType=cv2.BORDER_REPLICATE)
        hi = cv2.dilate(high, disk, borderType=cv2.BORDER_REPLICATE)
        value = lab_out[..., c]
        below, above = lo - value, value - hi
        part = np.maximum(np.maximum(below, above), 0.0)
        excess += np.where(lo > hi, 0.0, part) ** 2  # no supported pixel nearby: nothing to compare with
    colour = np.sqrt(excess)
    strongest = cv2.dilate(_gradient(lab_ref[..., 0]), disk_of(edge_radius), borderType=cv2.BORDER_REPLICATE)
    edges = np.maximum(_gradient(lab_out[..., 0]) - strongest, 0.0)
    return colour.astype(np.float32), edges.astype(np.float32)


def artifact_score(
    output: np.ndarray,
    reference: np.ndarray,
    region: np.ndarray,
    *,
    radius_px: float,
    edge_radius_px: float | None = None,
    support: np.ndarray | None = None,
) -> ArtifactScore:
    """`artifact_maps` averaged over a region, after the tolerances and caps; work is limited to the region's box.

    Args:
        output, reference, radius_px, edge_radius_px, support: as `artifact_maps`.
        region: bool/uint8/float [h, w]; pixels > 0 are scored (a float region weights them).

    Returns:
        The ArtifactScore (NaN scores with pixels 0 when the region is empty).
    """
    weights = np.asarray(region, dtype=np.float32)
    if weights.shape != np.shape(output)[:2]:
        raise InvalidInput(f"region must be [{np.shape(output)[0]}, {np.shape(output)[1]}], got {weights.shape}")
    rows, cols = np.flatnonzero((weights > 0).any(axis=1)), np.flatnonzero((weights > 0).any(axis=0))
    if rows.size == 0:
        return ArtifactScore(math.nan, math.nan, 0)
    pad = int(math.ceil(radius_px)) + 2
    y0, y1 = max(rows[0] - pad, 0), min(rows[-1] + pad + 1, weights.shape[0])
    x0, x1 = max(cols[0] - pad, 0), min(cols[-1] + pad + 1, weights.shape[1])
    box = (slice(y0, y1), slice(x0, x1))
    colour, edges = artifact_maps(
        np.asarray(output)[box],
        np.asarray(reference)[box],
        radius_px=radius_px,
        edge_radius_px=edge_radius_px,
        support=None if support is None else np.asarray(support)[box],
    )
    return score_maps(colour, edges, weights[box])


def score_maps(colour: np.ndarray, edges: np.ndarray, region: np.ndarray) -> ArtifactScore:
    """Mean excess over a region (float weights) after the tolerances and caps: the ArtifactScore of two maps."""
    w = np.asarray(region, dtype=np.float32)
    total = float(w.sum())
    if total <= 0:
        return ArtifactScore(math.nan, math.nan, 0)
    colour_mean = float((np.clip(colour - COLOUR_TOLERANCE, 0.0, COLOUR_CAP) * w).sum() / total)
    edge_mean = float((np.clip(edges - EDGE_TOLERANCE, 0.0, EDGE_CAP) * w).sum() / total)
    return ArtifactScore(colour_mean, edge_mean, int((w > 0).sum()))


__all__ = ["COLOUR_TOLERANCE", "EDGE_TOLERANCE", "ArtifactScore", "artifact_maps", "artifact_score", "score_maps"]
