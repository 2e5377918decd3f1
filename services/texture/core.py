"""Pure core of the `texture` stage: candidate target frames by mouth shape and a per-pixel weighted median.

Per output frame (the paper's texture synthesis, with our departures from the seed: docs/DESIGN.md, "texture"):

1. Shape track: the predicted mouth shapes are smoothed over time (Gaussian, `shape_smoothing_sigma_frames`).
2. Distance: squared Euclidean distance between the 20 mouth points of the output frame and of every valid
   target frame after removing each shape's centroid (translation), one matrix product for the whole chunk.
   Translation is removed because the mouth's position in the canonical frame carries head-pitch and
   alignment noise of the target video (and an offset between the speaker model's clips and the target),
   while the texture we want is chosen by the mouth's form (opening, width, rounding); where the chosen
   candidates' mouths actually lie is reported as the weighted-mean shape. (Measured on obama_clip2, target =
   its first 450 frames driven by the shapes of the rest: keeping absolute positions gives ~3-7 % lower pixel
   error inside one session, but a constant 0.02-unit offset between model and target raises it by ~40 %.)
3. Temporal coherence: candidates of the previous output frame get their distance multiplied by
   (1 - `temporal_coherence_weight`), a hysteresis that keeps neighbouring frames on one candidate set
   unless a clearly better one appears. This recursion runs frame by frame (O(M) per frame); a chunk starts
   `warmup_frames` earlier so it carries across chunk seams (measured with 8: neighbours across a seam share
   88 of 100 candidates, neighbours inside a chunk 92).
4. Candidates: the n nearest (after step 3), best first. Gaussian weights exp(-d^2 / (2 sigma^2)) with sigma
   solved per frame by bisection so that the n best hold `mass_share` of the weight of all valid target
   frames (vectorised over the chunk); then renormalised over the candidates.
5. Texture: per pixel, the weighted median of the candidates' luminance, and the colour of the best-ranked
   candidate at that luminance is copied (no colour mixing); candidate pixels outside their crop mask do
   not vote. Teeth are kept (nothing is inpainted). By default every crop pixel is a median (the compositor
   blends the whole lower face, so cheeks and chin must be as stable as the mouth, and it is fast enough);
   `median_region="mouth"` restricts the median to the feathered mouth region (`mouth_region_mask`) and
   takes the rest from the best candidate.

The weighted median (`weighted_median`) is exact on integer weights: the smallest value whose cumulative
weight reaches half of the voting weight. The fast form finds it bit by bit (8 steps for uint8): at each
step one comparison [K, P] and one matrix-vector product with the weights give every pixel's weight at or
below its trial value. With integer weights summing to at most 2**24 every float32 partial sum is exact, so
the result is independent of the summation order and equals the sort-based reference bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d

from services.runtime.canonical import CanonicalGeometry
from services.runtime.errors import Cancelled, InvalidInput, NoFace
from services.runtime.morphology import dilate_ellipse
from services.texture.spill import DEFAULT_RESIDENT_ROWS, RowCache, SpilledFrames, SpillWriter

MOUTH_POINTS = 20
JAW_POINTS = 17
# Outer lip contour (dlib 48-59) as indices into the 20 mouth points.
OUTER_LIP = np.arange(12)
MEDIAN_MODES = ("luminance", "per_channel")
MEDIAN_REGIONS = ("crop", "mouth")
# Integer weight total used by `quantize_weights`; float32 sums of such integers are exact (<= 2**24).
WEIGHT_TOTAL = 1 << 20
MAX_WEIGHT_SUM = 1 << 24
# Bisection on log(beta) for the Gaussian width: half-range around 1 / median distance, and steps.
_LOG_BETA_RANGE = 30.0
_BISECTION_STEPS = 48
# Most elements of a [K, P] float32 indicator (median) or an [L, V] distance matrix held at once.
_BLOCK_ELEMENTS = 4 << 20

__all__ = [
    "MEDIAN_MODES",
    "MIN_CANDIDATES",
    "MEDIAN_REGIONS",
    "Candidates",
    "TargetBank",
    "TextureChunk",
    "TextureOptions",
    "face_masks",
    "flicker",
    "mouth_region_mask",
    "pose_distances",
    "pose_penalty",
    "prepare_spilled_target",
    "prepare_target",
    "quantize_weights",
    "select_candidates",
    "shape_distances",
    "smooth_track",
    "solve_widths",
    "synthesize",
    "weighted_median",
    "weighted_median_reference",
]


# ---------------------------------------------------------------------- options and data
MIN_CANDIDATES = 5  # a short target's candidates (`TextureOptions.max_candidate_share`) never drop below this


@dataclass(frozen=True)
class TextureOptions:
    """Knobs of `synthesize` (texture.v1.SynthesizeOptions with defaults filled in).

    Attributes:
        n_candidates: Candidates per output frame (n), >= 1; clamped to the number of valid target frames.
            Default 20. The paper's 100 suit hours of target footage; from a target of seconds or minutes,
            100 candidates span most mouth shapes and their median is a half-open mouth whatever the
            prediction: held-out Obama speech rendered with 100 kept r 0.20 of the predicted shapes' 0.41
            with the real mouth, at 0.64x its amplitude; 20 keep r 0.37 at 0.97x (`a2v eval resynth`).
        mass_share: Share of the total Gaussian weight the n best candidates hold, in (0, 1). Default 0.9.
        temporal_coherence_weight: Previous frame's candidates get their distance multiplied by
            (1 - this), in [0, 1); 0 = off. Default 0: the favoured candidates hold the mouth back (with 0.3,
            r with the real mouth fell from 0.37 to 0.25 in the measurement above).
        shape_smoothing_sigma_frames: Gaussian sigma of the predicted shape track, output frames, >= 0;
            0 = off. Default 1.0.
        warmup_frames: Output frames before the chunk processed (not returned) so smoothing and coherence
            carry across chunk seams, >= 0. Default 8.
        median_mode: "luminance" (median of luminance, the chosen candidate's colour copied) or
            "per_channel" (independent median per B, G, R: the seed). Default "luminance".
        median_region: "crop" (every crop pixel is a median) or "mouth" (median only inside the feathered
            mouth region of the weighted-mean shape; elsewhere the best candidate's pixels, cross-faded
            through the feather; faster, for when the compositor only uses the mouth). Default "crop".
        region_margin: Dilation of the mouth region beyond the outer lip, canonical template units (>= 0).
        region_feather: Feather (Gaussian sigma) of the mouth region's edge, canonical units (>= 0).
        detail_amount: Unsharp-mask amount over the mouth region after the median, in [0, 5]; 0 = off.
            The median of imperfectly aligned candidates averages away lip and skin detail. With 100
            candidates the demo's mouth had 0.54x the target footage's sharpness and 1.2 restored it; the
            median of 20 is sharper: on the demo (obama, commentary_60s onto obama_clip2) 0 gives 0.89x,
            0.5 gives 1.18x and 1.2 gives 1.72x the footage's sharpness (`a2v eval output`). Default 0.3.
        detail_sigma_px: Gaussian sigma of that unsharp mask, crop pixels, in (0, 10]; wide enough that the
            restored detail survives the warp into the frame and H.264. Default 2.5.
        pose_tolerance_degrees: Candidates whose head pose (yaw, pitch) differs from the displayed target frame's
            by more than this get a penalty added to their shape distance: (excess / tolerance)^2 times the
            target's mouth-shape spread (`TargetBank.spread`), so a frontal mouth is not mixed into a turned face
            while near-equal poses compete on mouth shape alone. In [0, 90]; 0 = pose ignored (the seed). Needs
            the target's head poses and a retiming map. Default 6.
        max_candidate_share: At most this share of the target's usable frames are candidates (but never fewer
            than `MIN_CANDIDATES`, nor more than n), in (0, 1]; 1 = n alone. Default 0.05: on an 8 s target
            (200 frames) 20 candidates are a tenth of all its mouths, and their median drifts to a half-open one
            whatever the prediction. Rendered openings against the predicted ones (r, political_address_8s with
            `obama`): edmarkey 0.45 with 20 -> 0.69 with 10, katiehill 0.57 -> 0.67, bobmenendez 0.95 -> 0.94,
            kristinoem 0.94 -> 0.95; a 5-minute GRID target keeps 20 (held-out r 0.808, with 10 0.798).
    """

    n_candidates: int = 20
    mass_share: float = 0.9
    temporal_coherence_weight: float = 0.0
    shape_smoothing_sigma_frames: float = 1.0
    warmup_frames: int = 8
    median_mode: str = "luminance"
    median_region: str = "crop"
    region_margin: float = 0.04
    region_feather: float = 0.015
    detail_amount: float = 0.3
    detail_sigma_px: float = 2.5
    pose_tolerance_degrees: float = 6.0
    max_candidate_share: float = 0.05

    def __post_init__(self) -> None:
        if int(self.n_candidates) != self.n_candidates or self.n_candidates < 1:
            raise InvalidInput(f"n_candidates must be an integer >= 1, got {self.n_candidates}")
        if not 0.0 < self.mass_share < 1.0:
            raise InvalidInput(f"mass_share must be in (0, 1), got {self.mass_share}")
        if not 0.0 <= self.temporal_coherence_weight < 1.0:
            raise InvalidInput(f"temporal_coherence_weight must be in [0, 1), got {self.temporal_coherence_weight}")
        if not self.shape_smoothing_sigma_frames >= 0.0:
            raise InvalidInput(f"shape_smoothing_sigma_frames must be >= 0, got {self.shape_smoothing_sigma_frames}")
        if int(self.warmup_frames) != self.warmup_frames or self.warmup_frames < 0:
            raise InvalidInput(f"warmup_frames must be an integer >= 0, got {self.warmup_frames}")
        if self.median_mode not in MEDIAN_MODES:
            raise InvalidInput(f"median_mode must be one of {MEDIAN_MODES}, got {self.median_mode!r}")
        if self.median_region not in MEDIAN_REGIONS:
            raise InvalidInput(f"median_region must be one of {MEDIAN_REGIONS}, got {self.median_region!r}")
        if not 0.0 <= self.detail_amount <= 5.0:
            raise InvalidInput(f"detail_amount must be in [0, 5], got {self.detail_amount}")
        if not 0.0 < self.detail_sigma_px <= 10.0:
            raise InvalidInput(f"detail_sigma_px must be in (0, 10], got {self.detail_sigma_px}")
        if not (self.region_margin >= 0.0 and self.region_feather >= 0.0):
            raise InvalidInput(
                f"region_margin and region_feather must be >= 0, got {self.region_margin}, {self.region_feather}"
            )
        if not 0.0 <= self.pose_tolerance_degrees <= 90.0:
            raise InvalidInput(f"pose_tolerance_degrees must be in [0, 90], got {self.pose_tolerance_degrees}")
        if not 0.0 < self.max_candidate_share <= 1.0:
            raise InvalidInput(f"max_candidate_share must be in (0, 1], got {self.max_candidate_share}")

    def candidates_for(self, usable_frames: int) -> int:
        """The candidate count n for a target of `usable_frames` frames (`max_candidate_share`, MIN_CANDIDATES)."""
        share = int(self.max_candidate_share * usable_frames)
        return min(self.n_candidates, max(MIN_CANDIDATES, share))


@dataclass(frozen=True, eq=False)
class TargetBank:
    """A target's candidates, prepared once (`prepare_target`) and reusable by every chunk of a job.

    M = target frames, V = usable frames (face_valid and finite shape), H, W = crop shape, P = H * W.

    Attributes:
        geometry: Canonical crop geometry of the analysis.
        shapes: float32 [M, 20, 2] canonical mouth shapes (NaN where no face).
        jaw_lines: float32 [M, 17, 2] canonical jaw lines, or None when not given.
        face_valid: bool [M] usable frames (face and finite mouth shape).
        index: int64 [V] target frame index of each usable frame.
        centred: float64 [V, 40] usable shapes minus their centroid (x0, y0, x1, ...).
        centred_sq: float64 [V] squared norms of `centred`.
        crops: uint8 [M, P, 3] BGR crops, flattened view of the analysis' crops.
        luma: uint8 [M, P] luminance (BT.601, OpenCV's BGR2GRAY); 255 where the crop mask is 0.
        masks: uint8 [M, P] 1 where the crop pixel may vote: rendered from inside the frame and, when jaw lines
            are given, inside that frame's own face outline (`face_masks`), so no candidate brings neck or
            background into the texture.
        full_mask: bool [M] the mask is 1 everywhere (the median skips mask handling for these).
        holes: int32 [sum of holes] flat pixel indices where `masks` is 0, frame after frame (frame m's are
            holes[hole_starts[m]:hole_starts[m + 1]]): the median's voting weight per pixel comes from these few
            pixels instead of a pass over the candidates' whole masks.
        hole_starts: int64 [M + 1] where each frame's holes start in `holes`.
        poses: float64 [M, 2] head yaw and pitch (radians) of each target frame, or None when not given (NaN
            where unknown).
        spread: Mean squared distance of the usable translation-free mouth shapes from their mean (canonical
            units^2): the scale of the pose penalty.
        spill: The crops and voting masks on disk (`prepare_spilled_target`), or None when they are in memory. A
            spilled bank's `crops`, `luma`, `masks` and `holes` are empty: `synthesize` reads the candidates' rows
            into a bounded `RowCache`, so its memory does not grow with the target's length.
    """

    geometry: CanonicalGeometry
    shapes: np.ndarray
    jaw_lines: np.ndarray | None
    face_valid: np.ndarray
    index: np.ndarray
    centred: np.ndarray
    centred_sq: np.ndarray
    crops: np.ndarray
    luma: np.ndarray
    masks: np.ndarray
    full_mask: np.ndarray
    holes: np.ndarray
    hole_starts: np.ndarray
    poses: np.ndarray | None = None
    spread: float = 0.0
    spill: SpilledFrames | None = None

    @property
    def frame_count(self) -> int:
        """M, the number of target frames."""
        return len(self.shapes)

    @property
    def usable_count(self) -> int:
        """V, the number of target frames that can be candidates."""
        return len(self.index)

    @property
    def crop_shape(self) -> tuple[int, int]:
        """(H, W) of a crop."""
        return self.geometry.crop_shape

    @property
    def spilled(self) -> bool:
        """Whether the crops are on disk (`spill`) rather than in the bank's arrays."""
        return self.spill is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the bank's arrays (for a bounded cache)."""
        return sum(getattr(self, f.name).nbytes for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray))


@dataclass(frozen=True)
class Candidates:
    """Candidate sets of a run of output frames (the frames [first, first + L)).

    Attributes:
        first: Output frame of row 0.
        shapes: float64 [L, 20, 2] the (smoothed) shape track the candidates were searched for.
        index: int64 [L, k] candidate target frame indices, best first (k = min(n, V)).
        weights: float64 [L, k] normalised Gaussian weights (rows sum to 1), non-increasing along a row.
        beta: float64 [L] solved 1 / (2 sigma^2) (0 = equal weights: even equal weights give the n best the
            requested share; the limit of the bisection when the share cannot be reached).
        share: float64 [L] share of the total weight of all usable target frames held by the frames the
            width was solved for (the n best, see `solve_widths`).
    """

    first: int
    shapes: np.ndarray
    index: np.ndarray
    weights: np.ndarray
    beta: np.ndarray
    share: np.ndarray


@dataclass(frozen=True)
class TextureChunk:
    """Result of `synthesize` for output frames [start, stop); n = stop - start, row i = frame start + i.

    Attributes:
        start: First output frame.
        stop: One past the last output frame.
        textures: uint8 [n, H, W, 3] BGR canonical lower-face textures; zeros where not valid.
        valid: bool [n] texture present (False where the displayed target frame has no face).
        texture_masks: uint8 [n, H, W] 1 where the texture pixel is valid: at least one candidate rendered it
            (0 where none did, or the frame is not valid; the texture is 0 there). Not in the proto result; the
            composite core accepts it as `texture_masks`.
        mean_shapes: float32 [n, 20, 2] weighted mean of the candidates' canonical mouth shapes.
        mean_jaw_lines: float32 [n, 17, 2] weighted mean of the candidates' jaw lines, or None when the bank
            has no jaw lines.
        candidates: int32 [n, k] candidate target frame indices, best first.
        candidate_weights: float32 [n, k] normalised weights (rows sum to 1).
        pose_differences: float32 [n] weighted mean of the candidates' head-pose distance (yaw, pitch) from the
            displayed target frame's, degrees; NaN where unknown (no poses, no retiming map, frame skipped).
    """

    start: int
    stop: int
    textures: np.ndarray
    valid: np.ndarray
    texture_masks: np.ndarray
    mean_shapes: np.ndarray
    mean_jaw_lines: np.ndarray | None
    candidates: np.ndarray
    candidate_weights: np.ndarray
    pose_differences: np.ndarray | None = None

    @property
    def frames_written(self) -> int:
        """Frames with a synthesized texture."""
        return int(self.valid.sum())

    @property
    def frames_skipped(self) -> int:
        """Frames skipped (no face in the displayed target frame)."""
        return int((~self.valid).sum())


# ---------------------------------------------------------------------- target preparation
def _check_shapes(name: str, shapes: np.ndarray, points: int) -> np.ndarray:
    arr = np.asarray(shapes)
    if arr.ndim != 3 or arr.shape[1:] != (points, 2) or not np.issubdtype(arr.dtype, np.floating):
        raise InvalidInput(f"{name} must be float [F, {points}, 2], got {arr.dtype} {arr.shape}")
    return arr


def prepare_target(
    shapes: np.ndarray,
    face_valid: np.ndarray,
    crops: np.ndarray,
    crop_masks: np.ndarray,
    geometry: CanonicalGeometry,
    *,
    jaw_lines: np.ndarray | None = None,
    head_pose: np.ndarray | None = None,
) -> TargetBank:
    """Check a target analysis and precompute what every chunk needs (centred shapes, luminance, voting masks).

    Args:
        shapes: float32 [M, 20, 2] canonical mouth shapes (dlib 48-67), template units; NaN where no face.
        face_valid: bool/uint8 [M] face found.
        crops: uint8 [M, H, W, 3] BGR canonical lower-face crops, (H, W) = geometry.crop_shape.
        crop_masks: uint8/bool [M, H, W] 1 where the crop pixel was rendered.
        geometry: The analysis' canonical geometry.
        jaw_lines: Optional float32 [M, 17, 2] canonical jaw lines (for `TextureChunk.mean_jaw_lines`); they also
            limit each crop's votes to its own face (`face_masks`).
        head_pose: Optional float [M, >= 2] head yaw and pitch (radians) first (face.v1 head_pose [M, 6]), for
            pose-aware candidates.

    Returns:
        The TargetBank (holds views of `crops` and `crop_masks`, not copies).

    Raises:
        InvalidInput: wrong shapes or dtypes.
        NoFace: no frame has a face and a finite mouth shape.
    """
    s, v, jaw, poses = _check_target(shapes, face_valid, geometry, jaw_lines, head_pose)
    m = len(s)
    h, w = geometry.crop_shape
    c = np.asarray(crops)
    if c.dtype != np.uint8 or c.shape != (m, h, w, 3):
        raise InvalidInput(f"crops must be uint8 [{m}, {h}, {w}, 3], got {c.dtype} {c.shape}")
    k = np.asarray(crop_masks)
    if k.dtype == np.bool_:
        k = k.view(np.uint8)
    if k.dtype != np.uint8 or k.shape != (m, h, w):
        raise InvalidInput(f"crop_masks must be uint8 [{m}, {h}, {w}], got {k.dtype} {k.shape}")
    shape_fields = _shape_fields(s, v, jaw, poses, geometry)
    usable = shape_fields["face_valid"]
    p = h * w
    c = np.ascontiguousarray(c)
    # One cvtColor over the stack seen as a single tall image.
    luma = cv2.cvtColor(c.reshape(m * h, w, 3), cv2.COLOR_BGR2GRAY).reshape(m, p)
    masks = np.ascontiguousarray(k).reshape(m, p)
    if jaw is not None:
        masks = masks & face_masks(jaw, usable, geometry).reshape(m, p)
    full = (masks != 0).all(axis=1)
    hole_starts = np.zeros(m + 1, np.int64)
    holes = np.zeros(0, np.int32)
    if not full.all():
        # Sentinel 255 where the mask is 0: such entries never count below 255 in the median's search.
        partial = np.flatnonzero(~full)
        luma[partial] = np.where(masks[partial] != 0, luma[partial], np.uint8(255))
        rows, cols = np.nonzero(masks == 0)  # row-major: frame after frame
        holes = cols.astype(np.int32)
        hole_starts[1:] = np.cumsum(np.bincount(rows, minlength=m))
    return TargetBank(
        **shape_fields,
        crops=c.reshape(m, p, 3),
        luma=luma,
        masks=masks,
        full_mask=full,
        holes=holes,
        hole_starts=hole_starts,
    )


def _check_target(
    shapes: np.ndarray,
    face_valid: np.ndarray,
    geometry: CanonicalGeometry,
    jaw_lines: np.ndarray | None,
    head_pose: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Checked float32 shapes [M, 20, 2], validity [M], float32 jaw lines or None, float64 poses [M, 2] or None."""
    s = _check_shapes("target mouth shapes", shapes, MOUTH_POINTS)
    m = len(s)
    if m == 0:
        raise InvalidInput("the target has no frame (mouth shapes [0, 20, 2])")
    v = np.asarray(face_valid)
    if v.shape != (m,):
        raise InvalidInput(f"face_valid must be [{m}] like the mouth shapes, got {v.shape}")
    jaw = None
    if jaw_lines is not None:
        jaw = _check_shapes("target jaw lines", jaw_lines, JAW_POINTS)
        if len(jaw) != m:
            raise InvalidInput(f"jaw lines must be [{m}, 17, 2] like the mouth shapes, got {jaw.shape}")
        jaw = jaw.astype(np.float32, copy=False)
    poses = None
    if head_pose is not None:
        hp = np.asarray(head_pose, dtype=np.float64)
        if hp.ndim != 2 or hp.shape[0] != m or hp.shape[1] < 2:
            raise InvalidInput(f"head pose must be float [{m}, >= 2] (yaw, pitch first), got {hp.shape}")
        poses = np.ascontiguousarray(hp[:, :2])
    return s.astype(np.float32, copy=False), v, jaw, poses


def _shape_fields(
    s: np.ndarray, v: np.ndarray, jaw: np.ndarray | None, poses: np.ndarray | None, geometry: CanonicalGeometry
) -> dict:
    """The TargetBank fields both preparations share (the shapes' side), from `_check_target`'s values.

    Usable frames (`face_valid`: a face and a finite mouth) with their indices and centred shapes float64 [V, 40];
    NoFace when none.
    """
    usable = v.astype(bool) & np.isfinite(s).all(axis=(1, 2))
    if not usable.any():
        raise NoFace(f"the target has no frame with a face and a finite mouth shape (of {len(s)} frames)")
    index = np.flatnonzero(usable)
    sv = s[index].astype(np.float64)
    centred = (sv - sv.mean(axis=1, keepdims=True)).reshape(len(index), 2 * MOUTH_POINTS)
    return {
        "geometry": geometry,
        "shapes": s,
        "jaw_lines": jaw,
        "face_valid": usable,
        "index": index,
        "centred": centred,
        "centred_sq": (centred**2).sum(axis=1),
        "poses": poses,
        "spread": float(((centred - centred.mean(axis=0)) ** 2).sum(axis=1).mean()),
    }


def prepare_spilled_target(
    shapes: np.ndarray,
    face_valid: np.ndarray,
    crops: Iterable[np.ndarray],
    crop_masks: Iterable[np.ndarray],
    geometry: CanonicalGeometry,
    folder: str,
    *,
    jaw_lines: np.ndarray | None = None,
    head_pose: np.ndarray | None = None,
) -> TargetBank:
    """`prepare_target` for a target too long to hold in memory: its crops go to a spill file in `folder`.

    The crops and masks are consumed one frame at a time (e.g. `runtime.frames.FramesReader` over the analysis'
    archives on disk) and written to `folder/crops.spill` (`spill.SpilledFrames`, 3.125 bytes per crop pixel);
    the bank keeps the shapes, poses and one flag per frame. `synthesize` then gives the same textures as with
    `prepare_target`'s bank, bit for bit, holding a bounded number of rows (`RowCache`).

    Args:
        shapes: float32 [M, 20, 2] canonical mouth shapes, as `prepare_target`.
        face_valid: bool/uint8 [M] face found.
        crops: M uint8 [H, W, 3] BGR crops, in frame order.
        crop_masks: M uint8/bool [H, W] masks, in frame order.
        geometry: The analysis' canonical geometry.
        folder: Scratch folder for the spill file, removed (with the file) when the bank's spill is closed or
            garbage collected.
        jaw_lines: Optional float32 [M, 17, 2] canonical jaw lines, as `prepare_target`.
        head_pose: Optional float [M, >= 2] head yaw and pitch (radians) first, as `prepare_target`.

    Returns:
        The TargetBank with `spill` set and empty `crops`, `luma`, `masks` and `holes`.

    Raises:
        InvalidInput: wrong shapes or dtypes, or not M crops and masks.
        NoFace: no frame has a face and a finite mouth shape.
    """
    s, v, jaw, poses = _check_target(shapes, face_valid, geometry, jaw_lines, head_pose)
    m = len(s)
    h, w = geometry.crop_shape
    shape_fields = _shape_fields(s, v, jaw, poses, geometry)
    usable = shape_fields["face_valid"]
    outline = _FaceOutline(geometry)
    full = np.zeros(m, bool)
    writer = SpillWriter(os.path.join(folder, "crops.spill"), (h, w))
    try:
        count = 0
        for crop, mask in zip(crops, crop_masks, strict=False):
            if count >= m:
                raise InvalidInput(f"more crops than the {m} frames of the mouth shapes")
            c, k = np.asarray(crop), np.asarray(mask)
            if k.dtype == np.bool_:
                k = k.view(np.uint8)
            if c.dtype != np.uint8 or c.shape != (h, w, 3):
                raise InvalidInput(f"crop {count} must be uint8 [{h}, {w}, 3], got {c.dtype} {c.shape}")
            if k.dtype != np.uint8 or k.shape != (h, w):
                raise InvalidInput(f"crop mask {count} must be uint8 [{h}, {w}], got {k.dtype} {k.shape}")
            if jaw is not None:
                k = k & outline.mask(jaw[count]) if usable[count] else k
            full[count] = bool((k != 0).all())
            writer.add(c, k)
            count += 1
        if count != m:
            raise InvalidInput(f"{count} crops and masks for the {m} frames of the mouth shapes")
    except BaseException:
        writer.abort()
        raise
    spill = writer.finish(folder=folder)
    p = h * w
    return TargetBank(
        **shape_fields,
        crops=np.zeros((0, p, 3), np.uint8),
        luma=np.zeros((0, p), np.uint8),
        masks=np.zeros((0, p), np.uint8),
        full_mask=full,
        holes=np.zeros(0, np.int32),
        hole_starts=np.zeros(1, np.int64),
        spill=spill,
    )


FACE_MASK_MARGIN = 0.012
"""Canonical units a crop's voting mask stays inside its face outline (~4 crop pixels): the outline's pixels
mix face and background, and dlib's jaw points wander by about this much."""


def face_masks(
    jaw_lines: np.ndarray, valid: np.ndarray, geometry: CanonicalGeometry, *, margin: float = FACE_MASK_MARGIN
) -> np.ndarray:
    """Crop pixels inside each frame's own face outline, uint8 [M, H, W] (1 = face).

    The outline is the frame's canonical jaw line 0..16 closed across the top (above the crop), shrunk by
    `margin` canonical units. Frames that are not `valid` (or whose jaw line is not finite) get all ones (their
    crop masks decide).

    Args:
        jaw_lines: float [M, 17, 2] canonical jaw lines.
        valid: bool [M].
        geometry: Crop geometry.
        margin: Shrinkage, canonical units, >= 0.
    """
    jaw = np.asarray(jaw_lines, dtype=np.float64)
    h, w = geometry.crop_shape
    outline = _FaceOutline(geometry, margin=margin)
    out = np.ones((len(jaw), h, w), np.uint8)
    for i in np.flatnonzero(np.asarray(valid, bool) & np.isfinite(jaw).all(axis=(1, 2))):
        out[i] = outline.mask(jaw[i])
    return out


class _FaceOutline:
    """One frame's face mask at a time (`face_masks`' per-frame work)."""

    def __init__(self, geometry: CanonicalGeometry, *, margin: float = FACE_MASK_MARGIN) -> None:
        self.geometry = geometry
        h, w = geometry.crop_shape
        left, top, right, bottom = geometry.crop_region
        px_per_unit = 0.5 * (w / (right - left) + h / (bottom - top))
        r = int(round(margin * px_per_unit))
        self.kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)) if r > 0 else None

    def mask(self, jaw: np.ndarray) -> np.ndarray:
        """uint8 [H, W] face mask of one canonical jaw line [17, 2]; all ones when it is not finite."""
        h, w = self.geometry.crop_shape
        jaw = np.asarray(jaw, dtype=np.float64)
        if not np.isfinite(jaw).all():
            return np.ones((h, w), np.uint8)
        outline = self.geometry.canonical_to_crop(jaw)
        mask = np.zeros((h + 2, w + 2), np.uint8)  # one pixel of border: the erosion sees the crop's edge as face
        cv2.fillPoly(mask, [np.round((outline + 1.0) * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
        if self.kernel is not None:
            mask = cv2.erode(mask, self.kernel, borderType=cv2.BORDER_REPLICATE)
        return mask[1:-1, 1:-1]


# ---------------------------------------------------------------------- candidate selection
def smooth_track(shapes: np.ndarray, sigma_frames: float, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the Gaussian-smoothed shape track (edges: nearest), float64 [stop - start, ...].

    Reads only the rows within 4 sigma of the range, and equals smoothing the whole track then slicing.
    """
    track = np.asarray(shapes)
    if sigma_frames <= 0:
        return track[start:stop].astype(np.float64)
    radius = int(4.0 * sigma_frames + 0.5)
    rows = np.clip(np.arange(start - radius, stop + radius), 0, len(track) - 1)
    window = gaussian_filter1d(track[rows].astype(np.float64), sigma_frames, axis=0, mode="nearest", truncate=4.0)
    return window[radius : radius + stop - start]


def shape_distances(shapes: np.ndarray, bank: TargetBank) -> np.ndarray:
    """Squared distances between translation-free mouth shapes, float64 [L, V] (L output shapes, V usable).

    Args:
        shapes: float [L, 20, 2] canonical mouth shapes.
        bank: The target's candidates.
    """
    p = np.asarray(shapes, dtype=np.float64)
    pc = (p - p.mean(axis=1, keepdims=True)).reshape(len(p), 2 * MOUTH_POINTS)
    d2 = (pc**2).sum(axis=1)[:, None] + bank.centred_sq[None, :] - 2.0 * (pc @ bank.centred.T)
    return np.maximum(d2, 0.0, out=d2)


def solve_widths(d2: np.ndarray, order: np.ndarray, n_solve: int, share: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian width per row such that the `n_solve` nearest hold `share` of the total weight.

    Weights are exp(-beta (d2 - min d2)); the share held by the nearest frames grows with beta, so beta is
    found by bisection on log(beta) (vectorised over rows). Rows where equal weights (beta = 0) already
    give the nearest `n_solve` at least `share` get beta = 0; rows where no beta reaches it (ties at the
    boundary) get the upper end of the search range (nearly all weight on the nearest frames).

    Args:
        d2: float64 [L, V] squared distances (after any coherence term).
        order: int [L, >= n_solve] column indices of each row's nearest frames, nearest first.
        n_solve: How many nearest frames hold `share`, in [1, V].
        share: In (0, 1).

    Returns:
        (beta float64 [L], achieved share float64 [L]).
    """
    rows, count = d2.shape
    near = order[:, :n_solve]
    dmin = np.take_along_axis(d2, order[:, :1], axis=1)
    rel = d2 - dmin  # >= 0, 0 at the nearest frame: exp never underflows to an all-zero row

    def held(beta: np.ndarray) -> np.ndarray:
        e = np.exp(-beta[:, None] * rel)
        return np.take_along_axis(e, near, axis=1).sum(axis=1) / e.sum(axis=1)

    if n_solve >= count:
        return np.zeros(rows), np.ones(rows)
    scale = np.median(rel, axis=1)
    scale = np.where(scale > 0, scale, 1.0)
    lo = np.log(1.0 / scale) - _LOG_BETA_RANGE
    hi = np.log(1.0 / scale) + _LOG_BETA_RANGE
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        low = held(np.exp(mid)) < share
        lo = np.where(low, mid, lo)
        hi = np.where(low, hi, mid)
    beta = np.exp(hi)
    beta = np.where(n_solve / count >= share, 0.0, beta)
    return beta, held(beta)


def select_candidates(
    shapes: np.ndarray,
    bank: TargetBank,
    *,
    first: int = 0,
    n_candidates: int = 20,
    mass_share: float = 0.9,
    temporal_coherence_weight: float = 0.0,
    target_poses: np.ndarray | None = None,
    pose_tolerance: float = 0.0,
) -> Candidates:
    """Candidate target frames and their weights for a run of output shapes (already smoothed).

    k = min(n, V) candidates per frame. The width is solved so that the n best hold `mass_share` of the weight
    of all V usable frames; when V < 2n it is solved for the floor(V / 2) best instead (the n best of fewer
    than 2n frames would hold most of the weight even with equal weights, degenerating to a plain mean),
    and always for at least 1.

    Args:
        shapes: float [L, 20, 2] output mouth shapes, canonical units (the run starts at output frame `first`).
        bank: The target's candidates.
        first: Output frame index of row 0 (recorded in the result).
        n_candidates: n, >= 1.
        mass_share: In (0, 1).
        temporal_coherence_weight: Previous frame's candidates get their distance multiplied by (1 - this);
            in [0, 1).
        target_poses: Optional float [L, 2] yaw and pitch (radians) of the target frame shown at each row (NaN =
            unknown: no penalty); with the bank's poses, candidates further than `pose_tolerance` from it get
            `pose_penalty` added to their distance.
        pose_tolerance: Radians, >= 0; 0 = poses ignored.

    Returns:
        Candidates (index in target frame numbers).
    """
    track = np.asarray(shapes, dtype=np.float64)
    rows, count = len(track), bank.usable_count
    k = min(int(n_candidates), count)
    n_solve = max(1, min(int(n_candidates), count // 2))
    factor = (1.0 - float(temporal_coherence_weight)) ** 2
    order = np.empty((rows, k), dtype=np.int64)
    weights = np.empty((rows, k))
    beta = np.empty(rows)
    held = np.empty(rows)
    prev = None
    block = max(1, _BLOCK_ELEMENTS // count)  # rows of [rows, V] distances held at once
    for r0 in range(0, rows, block):
        r1 = min(r0 + block, rows)
        d2 = shape_distances(track[r0:r1], bank)
        if target_poses is not None and pose_tolerance > 0 and bank.poses is not None:
            d2 += pose_penalty(np.asarray(target_poses, dtype=np.float64)[r0:r1], bank, pose_tolerance)
        for t in range(r1 - r0):
            d = d2[t]
            if prev is not None and factor < 1.0:
                d[prev] *= factor  # in place: d2 holds the distances the weights are solved on
            part = np.argpartition(d, k - 1)[:k] if k < count else np.arange(count)
            sel = part[np.lexsort((part, d[part]))]  # nearest first, ties by frame order
            order[r0 + t] = sel
            prev = sel
        beta[r0:r1], held[r0:r1] = solve_widths(d2, order[r0:r1], n_solve, float(mass_share))
        dsel = np.take_along_axis(d2, order[r0:r1], axis=1)
        w = np.exp(-beta[r0:r1, None] * (dsel - dsel[:, :1]))
        weights[r0:r1] = w / w.sum(axis=1, keepdims=True)
    return Candidates(first, track, bank.index[order], weights, beta, held)


def pose_distances(poses: np.ndarray, candidate_poses: np.ndarray) -> np.ndarray:
    """Angle between head poses, radians: sqrt(d yaw^2 + d pitch^2), broadcast over [..., 2] pairs (NaN in, NaN out).

    Roll is left out: the similarity alignment into the canonical frame takes in-plane rotation away.
    """
    d = np.asarray(poses, dtype=np.float64) - np.asarray(candidate_poses, dtype=np.float64)
    return np.sqrt((d**2).sum(axis=-1))


def pose_penalty(target_poses: np.ndarray, bank: TargetBank, tolerance: float) -> np.ndarray:
    """Distance penalty float64 [L, V] of the usable frames for target frames with poses [L, 2] (radians).

    spread * (max(0, distance - tolerance) / tolerance)^2: nothing within the tolerance, one shape spread at twice
    it, four at three times. Rows with an unknown pose (NaN) and candidates without a pose get no penalty.
    """
    if bank.poses is None or tolerance <= 0:
        return np.zeros((len(target_poses), bank.usable_count))
    distance = pose_distances(np.asarray(target_poses, dtype=np.float64)[:, None, :], bank.poses[bank.index][None])
    excess = np.nan_to_num(np.maximum(distance - tolerance, 0.0), nan=0.0) / tolerance
    return max(bank.spread, 1e-12) * excess**2


# ---------------------------------------------------------------------- weighted median
def quantize_weights(weights: np.ndarray, total: int = WEIGHT_TOTAL) -> np.ndarray:
    """Non-negative float weights [..., K] -> int64 weights summing to about `total` per row (rounded)."""
    w = np.asarray(weights, dtype=np.float64)
    s = w.sum(axis=-1, keepdims=True)
    return np.floor(w / np.where(s > 0, s, 1.0) * total + 0.5).astype(np.int64)


def _check_median_inputs(values, weights, valid) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    v = np.asarray(values)
    if v.dtype != np.uint8 or v.ndim != 2 or v.shape[0] < 1:
        raise InvalidInput(f"values must be uint8 [K, P] with K >= 1, got {v.dtype} {v.shape}")
    w = np.asarray(weights)
    if not np.issubdtype(w.dtype, np.integer) or w.shape != (v.shape[0],):
        raise InvalidInput(f"weights must be integer [{v.shape[0]}], got {w.dtype} {w.shape}")
    w = w.astype(np.int64)
    if (w < 0).any() or w.sum() > MAX_WEIGHT_SUM:
        raise InvalidInput(f"weights must be >= 0 with a sum <= 2**24, got sum {int(w.sum())}, min {int(w.min())}")
    m = None
    if valid is not None:
        m = np.asarray(valid)
        if m.shape != v.shape:
            raise InvalidInput(f"valid must be [K, P] = {v.shape}, got {m.shape}")
        m = m.astype(bool, copy=False)
    return v, w, m


def weighted_median(
    values: np.ndarray, weights: np.ndarray, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-column weighted median of uint8 values and the best-ranked candidate holding it (fast form).

    For column p the voters are the rows k with valid[k, p] (all when `valid` is None) and weight w_k. With
    T = their total weight, the median is the smallest value m such that 2 * (weight of voters with value
    <= m) >= T; the chosen row is the smallest k among voters with value m and w_k > 0 (rows are in rank
    order, best first). Columns without voting weight (T = 0) give median 0 and row -1.

    Computed bit by bit from the most significant: 8 steps, each one comparison of the [K, P] values with
    every column's trial value and one float32 matrix-vector product with the weights. Integer weights
    with a sum <= 2**24 make every float32 partial sum exact, so the result does not depend on the
    summation order (it equals `weighted_median_reference` exactly).

    Args:
        values: uint8 [K, P] (K candidates, P pixels).
        weights: integer [K], >= 0, sum <= 2**24 (see `quantize_weights`).
        valid: Optional bool/uint8 [K, P]; False entries do not vote.

    Returns:
        (median uint8 [P], chosen int32 [P]).

    Raises:
        InvalidInput: wrong shapes or dtypes, negative weights or a sum above 2**24.
    """
    v, w, m = _check_median_inputs(values, weights, valid)
    v = np.ascontiguousarray(v)  # the [K, P] passes below are row-wise
    wf = w.astype(np.float32)
    if m is not None:
        total = wf @ m.astype(np.float32)
        v = np.where(m, v, np.uint8(255))  # sentinel: never at or below a trial value < 255
    else:
        total = np.full(v.shape[1], wf.sum(), dtype=np.float32)
    return _bitwise_median(v, w, wf, total, lambda cols: None if m is None else m[:, cols])


def _bitwise_median(
    v: np.ndarray,
    w: np.ndarray,
    wf: np.ndarray,
    total: np.ndarray,
    voters: Callable[[np.ndarray], np.ndarray | None],
) -> tuple[np.ndarray, np.ndarray]:
    """`weighted_median`'s search on checked inputs.

    v: uint8 [K, P] values holding 255 wherever a candidate does not vote; w: int64 [K] weights (wf: as float32);
    total: float32 [P] the voting weight per pixel; voters(cols): the bool [K, len(cols)] voting flags of those
    columns (None = all vote). Only columns whose median is 255 need them: a smaller median is never a sentinel.
    """
    k, p = v.shape
    median = np.zeros(p, dtype=np.uint8)
    block = max(1, _BLOCK_ELEMENTS // k)
    buffer = np.empty((k, min(block, p)), dtype=np.float32)
    for s in range(0, p, block):
        e = min(s + block, p)
        vb, tb, mb, buf = v[:, s:e], total[s:e], median[s:e], buffer[:, : e - s]
        for bit in (128, 64, 32, 16, 8, 4, 2, 1):
            # Weight at or below (answer so far | bit - 1): if under half, the median is above it.
            np.less_equal(vb, mb | np.uint8(bit - 1), out=buf, casting="unsafe")
            below = wf @ buf
            mb |= np.where(2.0 * below < tb, np.uint8(bit), np.uint8(0))
    hit = v == median
    top = np.flatnonzero(median == 255)
    if top.size:
        flags = voters(top)
        if flags is not None:
            hit[:, top] &= flags
    if (w == 0).any():
        hit &= (w > 0)[:, None]
    # First hit along the candidates: the largest (K - k) among hits (a row-wise max, much faster than
    # argmax along axis 0).
    rank_type = np.uint8 if k < 256 else np.uint16
    score = hit * np.arange(k, 0, -1, dtype=rank_type)[:, None]
    chosen = (k - score.max(axis=0).astype(np.int32)).astype(np.int32)
    empty = total <= 0
    if empty.any():
        median[empty] = 0
        chosen[empty] = -1
    return median, chosen


def weighted_median_reference(
    values: np.ndarray, weights: np.ndarray, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The same as `weighted_median`, in the naive vectorised form (stable sort along the candidates).

    Sort each column's values (stable: ties keep rank order), cumulative weight, first position where twice
    it reaches the total; the chosen row is the first in sorted order with that value and positive weight.
    """
    v, w, m = _check_median_inputs(values, weights, valid)
    k, p = v.shape
    vv = v.astype(np.int16)
    ww = np.broadcast_to(w[:, None], (k, p))
    if m is not None:
        vv = np.where(m, vv, 256)
        ww = np.where(m, ww, 0)
    order = np.argsort(vv, axis=0, kind="stable")
    sv = np.take_along_axis(vv, order, axis=0)
    sw = np.take_along_axis(ww, order, axis=0)
    cum = np.cumsum(sw, axis=0)
    total = cum[-1]
    pos = (2 * cum >= total).argmax(axis=0)
    cols = np.arange(p)
    median = sv[pos, cols]
    first = ((sv == median) & (sw > 0)).argmax(axis=0)
    chosen = order[first, cols].astype(np.int32)
    empty = total <= 0
    median = np.where(empty, 0, median).astype(np.uint8)
    chosen[empty] = -1
    return median, chosen


# ---------------------------------------------------------------------- regions and flicker
def mouth_region_mask(
    shape: np.ndarray,
    geometry: CanonicalGeometry,
    *,
    margin: float = 0.04,
    feather: float = 0.015,
) -> np.ndarray:
    """Feathered mouth region of one canonical shape in crop pixels.

    The convex hull of the outer lip (or of all given points), dilated by `margin` and blurred with a
    Gaussian of sigma `feather` (both canonical template units), then the inside of the dilated hull set to 1.

    Args:
        shape: float [20, 2] canonical mouth points (the outer lip is used), or [K, 2] any points (e.g.
            mouth and jaw) whose hull is the region.
        geometry: Crop geometry.
        margin: Dilation, canonical units, >= 0.
        feather: Edge softness (Gaussian sigma), canonical units, >= 0.

    Returns:
        float32 [H, W] in [0, 1]: 1 inside the dilated hull, falling to 0 over ~3 `feather` outside.
    """
    pts = np.asarray(shape, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3 or not np.isfinite(pts).all():
        raise InvalidInput(f"region points must be finite [K >= 3, 2], got {pts.shape}")
    if len(pts) == MOUTH_POINTS:
        pts = pts[OUTER_LIP]
    h, w = geometry.crop_shape
    left, top, right, bottom = geometry.crop_region
    px_per_unit = 0.5 * (w / (right - left) + h / (bottom - top))
    hull = cv2.convexHull(np.round(geometry.canonical_to_crop(pts) * 16).astype(np.int32))
    r = int(round(margin * px_per_unit))
    sigma = feather * px_per_unit
    # All the work happens in a window around the hull that holds the dilation and the blur's reach: outside it
    # the region is 0 (the blur's replicated border reads zeros there as it would in the whole crop), so the
    # result equals the whole crop's bit for bit at a fraction of the cost (a wide elliptic dilation is slow).
    x, y, bw, bh = cv2.boundingRect(hull)
    x, y, bw, bh = x >> 4, y >> 4, (bw >> 4) + 2, (bh >> 4) + 2  # fixed-point box, one pixel of slack
    reach = max(r, 0) + 1
    dx0, dy0, dx1, dy1 = max(x - reach, 0), max(y - reach, 0), min(x + bw + reach, w), min(y + bh + reach, h)
    blur = _gaussian_radius(sigma) + 1 if sigma > 0 else 0
    x0, y0, x1, y1 = max(dx0 - blur, 0), max(dy0 - blur, 0), min(dx1 + blur, w), min(dy1 + blur, h)
    region = np.zeros((h, w), np.float32)
    if dx1 <= dx0 or dy1 <= dy0:
        return region
    hard = np.zeros((y1 - y0, x1 - x0), np.uint8)
    dilated = hard[dy0 - y0 : dy1 - y0, dx0 - x0 : dx1 - x0]
    cv2.fillConvexPoly(dilated, hull - np.array([dx0, dy0], np.int32) * 16, 1, lineType=cv2.LINE_8, shift=4)
    if r > 0:
        dilated[:] = dilate_ellipse(dilated, r)
    window = hard.astype(np.float32)
    if sigma > 0:
        window = cv2.GaussianBlur(window, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
        window = np.maximum(window * 2.0, hard)  # the edge of the hull at 1, decaying outside it
        np.minimum(window, 1.0, out=window)
    region[y0:y1, x0:x1] = window
    return region


def _gaussian_radius(sigma: float) -> int:
    """Half the kernel size cv2.GaussianBlur picks for a float32 image and this sigma (ksize 0)."""
    return int(round(sigma * 4 * 2 + 1)) // 2


DETAIL_REGION_MARGIN = 0.08
DETAIL_REGION_FEATHER = 0.03


def restore_detail(texture: np.ndarray, region: np.ndarray, *, amount: float, sigma_px: float) -> np.ndarray:
    """Unsharp mask of a texture, weighted by a region: texture + amount * region * (texture - blur).

    Args:
        texture: uint8 [H, W, 3] BGR.
        region: float32 [H, W] weights in [0, 1] (e.g. `mouth_region_mask`); 0 leaves a pixel as it is.
        amount: Unsharp-mask amount, >= 0; 0 returns the texture unchanged.
        sigma_px: Gaussian sigma of the blur, pixels, > 0.

    Returns:
        uint8 [H, W, 3].
    """
    image = np.asarray(texture)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInput(f"texture must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    weights = np.asarray(region, dtype=np.float32)
    if weights.shape != image.shape[:2]:
        raise InvalidInput(f"region must be [H, W] = {image.shape[:2]}, got {weights.shape}")
    if not (amount >= 0.0 and sigma_px > 0.0):
        raise InvalidInput(f"amount must be >= 0 and sigma_px > 0, got {amount}, {sigma_px}")
    if amount == 0.0 or not weights.any():
        return image.copy()
    # Only pixels with a weight change, and the blur reads at most its kernel's radius around them: the work is done
    # in that box (the whole image's result there, bit for bit; outside it the texture is returned as it is).
    rows, cols = np.flatnonzero(weights.any(axis=1)), np.flatnonzero(weights.any(axis=0))
    h, w = weights.shape
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    pad = _gaussian_radius(sigma_px) + 1
    by0, by1, bx0, bx1 = max(y0 - pad, 0), min(y1 + pad, h), max(x0 - pad, 0), min(x1 + pad, w)
    base = image[by0:by1, bx0:bx1].astype(np.float32)
    blurred = cv2.GaussianBlur(base, (0, 0), sigma_px, borderType=cv2.BORDER_REPLICATE)
    iy, ix = slice(y0 - by0, y1 - by0), slice(x0 - bx0, x1 - bx0)
    inner = base[iy, ix]
    sharpened = inner + (amount * weights[y0:y1, x0:x1])[..., None] * (inner - blurred[iy, ix])
    out = image.copy()
    out[y0:y1, x0:x1] = np.clip(sharpened + 0.5, 0, 255).astype(np.uint8)
    return out


def flicker(frames: np.ndarray, region: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Mean absolute difference between consecutive frames inside a region (uint8 levels, all channels).

    Args:
        frames: uint8 [T, H, W, C] or [T, H, W].
        region: bool or float [H, W] region weights (e.g. `mouth_region_mask` of the mean shape).
        valid: Optional bool [T]; pairs with an invalid frame are left out.

    Returns:
        Weighted mean |f_t - f_{t-1}| over the region and the valid pairs; NaN when no pair.
    """
    f = np.asarray(frames)
    if f.ndim not in (3, 4) or len(f) < 1:
        raise InvalidInput(f"frames must be [T, H, W] or [T, H, W, C], got {f.shape}")
    r = np.asarray(region, dtype=np.float64)
    if r.shape != f.shape[1:3]:
        raise InvalidInput(f"region must be {f.shape[1:3]}, got {r.shape}")
    pairs = np.ones(max(len(f) - 1, 0), bool)
    if valid is not None:
        v = np.asarray(valid, bool)
        pairs &= v[1:] & v[:-1]
    if not pairs.any() or r.sum() <= 0:
        return float("nan")
    idx = np.flatnonzero(pairs)
    diff = np.abs(f[idx + 1].astype(np.int16) - f[idx].astype(np.int16)).astype(np.float64)
    if diff.ndim == 4:
        diff = diff.mean(axis=3)
    return float((diff * r).sum(axis=(1, 2)).mean() / r.sum())


# ---------------------------------------------------------------------- synthesis
Progress = Callable[[int, int], None]


class _Rows:
    """Where `_texture` reads the candidates' crops, luminance and masks.

    The bank's own arrays (slot = target frame) or a spilled bank's `RowCache` (slot = the cache's row holding
    the frame).
    """

    def __init__(self, bank: TargetBank, cache: RowCache | None = None) -> None:
        self.cache = cache
        source = cache if cache is not None else bank
        self.crops, self.luma, self.masks = source.crops, source.luma, source.masks
        self._holes, self._starts = bank.holes, bank.hole_starts

    def slots(self, frames: np.ndarray) -> np.ndarray:
        """The rows of target frames `frames` (read into the cache when spilled)."""
        return frames if self.cache is None else self.cache.load(frames)

    def holes(self, frame: int, slot: int) -> np.ndarray:
        """Pixels where target frame `frame` (in row `slot`) does not vote."""
        if self.cache is not None:
            return self.cache.holes(slot)
        return self._holes[self._starts[frame] : self._starts[frame + 1]]


def _texture(
    bank: TargetBank,
    rows: _Rows,
    cand: np.ndarray,
    weights: np.ndarray,
    mean_shape: np.ndarray,
    options: TextureOptions,
    median: Callable[..., tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """One frame's texture uint8 [P, 3] and texture mask uint8 [P] from candidates (target frame indices)."""
    q = quantize_weights(weights)
    keep = q > 0  # candidates whose weight rounds to 0 cannot vote
    cand, q = cand[keep], q[keep]
    slot = rows.slots(cand)
    pixels = None
    region = None
    if options.median_region == "mouth":
        region = mouth_region_mask(
            mean_shape, bank.geometry, margin=options.region_margin, feather=options.region_feather
        ).reshape(-1)
        pixels = np.flatnonzero(region > 0)
    full = bool(bank.full_mask[cand].all())

    def gather(row_array: np.ndarray) -> np.ndarray:
        # Rows, then np.take on the pixel axis: C-ordered (a[rows][:, cols] would come back Fortran-ordered).
        picked = row_array[slot]
        return picked if pixels is None else np.take(picked, pixels, axis=1)

    values = gather(rows.luma)
    cols = np.arange(len(values[0]))
    if options.median_mode == "luminance" and pixels is None and median is weighted_median and not full:
        # The bank's luminance holds 255 where a crop does not vote: the voting weight per pixel comes from its
        # holes, and the masks themselves are read only for the pixels whose median is 255.
        wf = q.astype(np.float32)
        total = np.full(len(cols), wf.sum(), dtype=np.float32)
        for row, (frame, at) in enumerate(zip(cand.tolist(), slot.tolist(), strict=True)):
            total[rows.holes(frame, at)] -= wf[row]
        _, chosen = _bitwise_median(values, q, wf, total, lambda c: rows.masks[slot][:, c] != 0)
        covered = chosen >= 0
        colour = rows.crops[slot[np.maximum(chosen, 0)], cols]
        colour[~covered] = 0
        return colour, covered.astype(np.uint8)
    valid = None if full else gather(rows.masks)
    if options.median_mode == "luminance":
        _, chosen = median(values, q, valid)
        covered = chosen >= 0
        colour = rows.crops[slot[np.maximum(chosen, 0)], cols if pixels is None else pixels]
    else:
        crops = gather(rows.crops)
        colour = np.empty((len(cols), 3), np.uint8)
        covered = None
        for ch in range(3):
            colour[:, ch], chosen = median(np.ascontiguousarray(crops[:, :, ch]), q, valid)
            covered = chosen >= 0
    colour[~covered] = 0
    if pixels is None:
        return colour, covered.astype(np.uint8)
    # Mouth region only: the best candidate's pixels elsewhere, cross-faded through the feather.
    best = slot[0]
    out = rows.crops[best].copy()
    cover = rows.masks[best].copy()
    a = region[pixels][:, None]
    base = out[pixels].astype(np.float32)
    mixed = np.where(covered[:, None], a * colour + (1.0 - a) * base, base)
    out[pixels] = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
    cover[pixels] |= covered.astype(np.uint8)
    return out, cover


def synthesize(
    bank: TargetBank,
    mouth_shapes: np.ndarray,
    start: int,
    stop: int,
    *,
    options: TextureOptions | None = None,
    retiming_map: np.ndarray | None = None,
    reference: bool = False,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    resident_rows: int = DEFAULT_RESIDENT_ROWS,
) -> TextureChunk:
    """Synthesize the canonical lower-face textures of output frames [start, stop).

    Candidate selection runs from max(0, start - warmup_frames) so smoothing and coherence carry across
    chunk seams (a chunk then agrees with a run over the whole job up to the fading of the coherence
    memory); textures are made only for [start, stop).

    Args:
        bank: The target's candidates (`prepare_target`).
        mouth_shapes: float32 [N, 20, 2] predicted mouth shapes of the whole job, canonical template units.
        start: First output frame, 0 <= start < stop.
        stop: One past the last output frame, <= N.
        options: Knobs (default `TextureOptions()`).
        retiming_map: Optional int [N] target frame shown at each output frame; frames whose target frame
            has no face are skipped (zero texture, not valid).
        reference: Use the naive sort-based median (`weighted_median_reference`); slow, for benchmarks.
        progress: Called as progress(done, n) after each frame.
        should_stop: Polled before each frame; True raises Cancelled.
        resident_rows: For a spilled bank (`prepare_spilled_target`), target frames whose rows this call holds
            in memory at once (at least one frame's candidates); the memory of a call does not depend on the
            target's length. Ignored for a bank in memory.

    Returns:
        The TextureChunk.

    Raises:
        InvalidInput: wrong shapes, non-finite shapes, empty or out-of-range chunk, bad retiming map.
        Cancelled: should_stop returned True.
    """
    opts = options if options is not None else TextureOptions()
    shapes = _check_shapes("mouth shapes", mouth_shapes, MOUTH_POINTS)
    n_total = len(shapes)
    if not (isinstance(start, int | np.integer) and isinstance(stop, int | np.integer)):
        raise InvalidInput(f"frame range must be integers, got [{start!r}, {stop!r})")
    start, stop = int(start), int(stop)
    if not 0 <= start < stop <= n_total:
        raise InvalidInput(f"frame range [{start}, {stop}) is empty or outside [0, {n_total})")
    first = max(0, start - int(opts.warmup_frames))
    radius = int(4.0 * opts.shape_smoothing_sigma_frames + 0.5) if opts.shape_smoothing_sigma_frames > 0 else 0
    lo, hi = max(0, first - radius), min(n_total, stop + radius)
    if not np.isfinite(shapes[lo:hi]).all():
        raise InvalidInput(f"mouth shapes of frames [{lo}, {hi}) are not all finite")
    shown = None
    target_poses = None
    if retiming_map is not None:
        rmap = np.asarray(retiming_map)
        if rmap.shape != (n_total,) or not np.issubdtype(rmap.dtype, np.integer):
            raise InvalidInput(f"retiming map must be integer [{n_total}], got {rmap.dtype} {rmap.shape}")
        shown_all = rmap[first:stop].astype(np.int64)
        if (shown_all < 0).any() or (shown_all >= bank.frame_count).any():
            raise InvalidInput(f"retiming map values must be in [0, {bank.frame_count}) for frames [{first}, {stop})")
        shown = shown_all[start - first :]
        if bank.poses is not None:
            target_poses = bank.poses[shown_all]
    n = stop - start
    h, w = bank.crop_shape
    track = smooth_track(shapes, opts.shape_smoothing_sigma_frames, first, stop)
    cands = select_candidates(
        track,
        bank,
        first=first,
        n_candidates=opts.candidates_for(bank.usable_count),
        mass_share=opts.mass_share,
        temporal_coherence_weight=opts.temporal_coherence_weight,
        target_poses=target_poses,
        pose_tolerance=float(np.radians(opts.pose_tolerance_degrees)),
    )
    index = cands.index[start - first :]
    weights = cands.weights[start - first :]
    mean_shapes = np.einsum("tk,tkpc->tpc", weights, bank.shapes[index].astype(np.float64)).astype(np.float32)
    mean_jaw = None
    if bank.jaw_lines is not None:
        mean_jaw = np.einsum("tk,tkpc->tpc", weights, bank.jaw_lines[index].astype(np.float64)).astype(np.float32)
    valid = np.ones(n, bool) if shown is None else bank.face_valid[shown]
    pose_differences = np.full(n, np.nan, np.float32)
    if target_poses is not None:
        apart = pose_distances(target_poses[start - first :, None, :], bank.poses[index])  # [n, k]
        known = np.isfinite(apart)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (np.where(known, apart, 0.0) * weights).sum(axis=1) / (weights * known).sum(axis=1)
        pose_differences = np.where(valid, np.degrees(mean), np.nan).astype(np.float32)
    textures = np.zeros((n, h * w, 3), np.uint8)
    masks = np.zeros((n, h * w), np.uint8)
    median = weighted_median_reference if reference else weighted_median
    rows = _Rows(bank, RowCache(bank.spill, bank.full_mask, resident_rows) if bank.spill is not None else None)
    for i in range(n):
        if should_stop is not None and should_stop():
            raise Cancelled(f"texture synthesis cancelled at frame {start + i} of [{start}, {stop})")
        if valid[i]:
            textures[i], masks[i] = _texture(bank, rows, index[i], weights[i], mean_shapes[i], opts, median)
            if opts.detail_amount > 0:
                region = mouth_region_mask(
                    mean_shapes[i], bank.geometry, margin=DETAIL_REGION_MARGIN, feather=DETAIL_REGION_FEATHER
                ) * masks[i].reshape(h, w)
                textures[i] = restore_detail(
                    textures[i].reshape(h, w, 3), region, amount=opts.detail_amount, sigma_px=opts.detail_sigma_px
                ).reshape(h * w, 3)
        if progress is not None:
            progress(i + 1, n)
    return TextureChunk(
        start=start,
        stop=stop,
        textures=textures.reshape(n, h, w, 3),
        valid=valid,
        texture_masks=masks.reshape(n, h, w),
        mean_shapes=mean_shapes,
        mean_jaw_lines=mean_jaw,
        candidates=index.astype(np.int32),
        candidate_weights=weights.astype(np.float32),
        pose_differences=pose_differences,
    )
