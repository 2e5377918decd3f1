"""Face detection (dlib HOG), 68-point landmarks with tracking between detections, and lag-free smoothing."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import dlib
import numpy as np

from services.runtime.canonical import JAW, LEFT_EYE, MOUTH, RIGHT_EYE, RIGID_POINTS, valid_runs  # noqa: F401
from services.runtime.errors import InvalidInput, NotFound

LANDMARK_COUNT = 68
PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"


# Where dlib's HOG detector puts its box relative to the 68 landmarks, in units of the RMS radius
# `sigma` of the rigid points about their centroid: box centre = centroid + BOX_DOWN_OFFSET * sigma
# along the face's down axis, box side = BOX_SIDE * sigma. Measured on the detector's boxes over the
# clips of ../shared/data (1116 detections, 12 videos): offset 0.28 +- 0.12, side 3.50 +- 0.27.
BOX_DOWN_OFFSET = 0.28
BOX_SIDE = 3.5


def shape_predictor_path() -> Path:
    """Path of dlib's 68-point model shipped in the PyPI package `face-recognition-models`.

    The package is located without importing it (its `__init__` needs `pkg_resources`).

    Raises:
        NotFound: the package or the model file is not installed.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise NotFound("package face-recognition-models is not installed (it ships the 68-point landmark model)")
    for location in spec.submodule_search_locations:
        path = Path(location) / "models" / PREDICTOR_FILE
        if path.is_file():
            return path
    raise NotFound(f"{PREDICTOR_FILE} not found in face-recognition-models ({list(spec.submodule_search_locations)})")


@dataclass(frozen=True)
class FaceBox:
    """A square face box, possibly rotated (roll), in frame pixels.

    Attributes:
        cx: Centre x, pixels (pixel centres at integers).
        cy: Centre y, pixels.
        side: Side length, pixels (> 0).
        angle: Rotation of the box's x axis from the image x axis, radians (clockwise on screen, y down).
    """

    cx: float
    cy: float
    side: float
    angle: float = 0.0

    def iou(self, other: FaceBox) -> float:
        """Intersection over union of the axis-aligned versions of two boxes, in [0, 1]."""
        h1, h2 = self.side / 2, other.side / 2
        w = min(self.cx + h1, other.cx + h2) - max(self.cx - h1, other.cx - h2)
        h = min(self.cy + h1, other.cy + h2) - max(self.cy - h1, other.cy - h2)
        inter = max(w, 0.0) * max(h, 0.0)
        union = self.side**2 + other.side**2 - inter
        return inter / union if union > 0 else 0.0


def box_from_landmarks(landmarks: np.ndarray) -> FaceBox:
    """The box dlib's detector would give for a face with these landmarks (see BOX_SIDE), rotated with roll.

    Args:
        landmarks: float [68, 2] (x, y) pixels.

    Returns:
        A FaceBox whose angle is the roll of the eye line.
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    rigid = pts[RIGID_POINTS]
    centre = rigid.mean(axis=0)
    sigma = math.sqrt(float(((rigid - centre) ** 2).sum(axis=1).mean()))
    eye = pts[RIGHT_EYE].mean(axis=0) - pts[LEFT_EYE].mean(axis=0)
    angle = math.atan2(eye[1], eye[0])
    down = np.array([-math.sin(angle), math.cos(angle)])
    c = centre + BOX_DOWN_OFFSET * sigma * down
    return FaceBox(float(c[0]), float(c[1]), BOX_SIDE * sigma, angle)


@dataclass(frozen=True)
class FaceObservation:
    """What the tracker found on one frame.

    Attributes:
        landmarks: float32 [68, 2] (x, y) frame pixels, or None when no face was found.
        score: dlib detection score of the face (tracked frames carry the score of their last
            detection); NaN when no face.
        detected: True when the HOG detector ran on this frame and found the face (False when the
            landmarks were tracked from the previous frame, or no face).
    """

    landmarks: np.ndarray | None
    score: float
    detected: bool


def _check_frame(frame: np.ndarray) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        raise InvalidInput(f"frame must be a uint8 numpy array, got {getattr(frame, 'dtype', type(frame))}")
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] in (1, 3)):
        if min(frame.shape[:2]) < 2:
            raise InvalidInput(f"frame of shape {frame.shape} is too small")
        return frame
    raise InvalidInput(f"frame must be [H, W] gray or [H, W, 3] BGR, got shape {frame.shape}")


def _to_gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    if image.shape[2] == 1:
        return image[:, :, 0]
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def _box_patch(gray: np.ndarray, lo: int, hi: int, size: int) -> np.ndarray:
    """Zero-mean, unit-norm patch of gray[lo:hi, lo:hi] resized to size x size (NCC ready)."""
    patch = cv2.resize(gray[lo:hi, lo:hi], (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    patch -= patch.mean()
    norm = float(np.linalg.norm(patch))
    return patch / norm if norm > 1e-3 * size else np.zeros_like(patch)


def _region_transform(box: FaceBox, side_px: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """3x3 affine frame -> region (box centred, upright, side_px wide, size x size) and its inverse."""
    s = side_px / box.side
    c, si = math.cos(box.angle), math.sin(box.angle)
    centre = (size - 1) / 2
    # region = s * R(-angle) (p - box centre) + centre
    a = np.array([[s * c, s * si], [-s * si, s * c]])
    t = np.array([centre, centre]) - a @ np.array([box.cx, box.cy])
    matrix = np.eye(3)
    matrix[:2, :2], matrix[:2, 2] = a, t
    return matrix, np.linalg.inv(matrix)


def _warp_region(frame: np.ndarray, box: FaceBox, side_px: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Gray uint8 [size, size] region with `box` upright and side_px wide, and the 3x3 region -> frame map.

    When the region shrinks the face by more than 0.6x, the covered part of the frame is first reduced with
    area averaging (so the bilinear warp does not alias).
    """
    matrix, inverse = _region_transform(box, side_px, size)
    scale = side_px / box.side
    if scale < 0.6:
        h, w = frame.shape[:2]
        corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64)
        mapped = corners @ inverse.T
        x0 = int(np.clip(np.floor(mapped[:, 0].min()) - 2, 0, w - 1))
        y0 = int(np.clip(np.floor(mapped[:, 1].min()) - 2, 0, h - 1))
        x1 = int(np.clip(np.ceil(mapped[:, 0].max()) + 3, x0 + 1, w))
        y1 = int(np.clip(np.ceil(mapped[:, 1].max()) + 3, y0 + 1, h))
        sub = _to_gray(frame[y0:y1, x0:x1])
        f = scale * 1.5
        sw, sh = max(int(round((x1 - x0) * f)), 1), max(int(round((y1 - y0) * f)), 1)
        small = cv2.resize(sub, (sw, sh), interpolation=cv2.INTER_AREA)
        fx, fy = sw / (x1 - x0), sh / (y1 - y0)
        # frame p -> small q = (p - origin + 0.5) * f - 0.5
        to_small = np.array([[fx, 0, (0.5 - x0) * fx - 0.5], [0, fy, (0.5 - y0) * fy - 0.5], [0, 0, 1]])
        matrix = matrix @ np.linalg.inv(to_small)
        return cv2.warpAffine(small, matrix[:2], (size, size), flags=cv2.INTER_LINEAR), inverse
    return _to_gray(cv2.warpAffine(frame, matrix[:2], (size, size), flags=cv2.INTER_LINEAR)), inverse


class LandmarkDetector:
    """dlib HOG face detector plus the 68-point shape predictor, loaded once; tracks faces through videos.

    Landmarks are always predicted in a similarity-normalised region: the face box is warped (with its
    roll) to a fixed `predict_box_px` square, so dlib's integer outputs are sub-pixel in the frame and
    rolled faces look upright to the model. Detection runs on a copy of the frame downscaled so its longer
    side is at most `detect_max_side`; between detections the face is tracked: the next frame's box is
    derived from the previous landmarks (see `box_from_landmarks`), and the detector runs again every
    `redetect_interval` frames or as soon as tracking looks lost (the box region stops matching the
    previous frame, the box jumps, or the shape becomes implausible).

    One instance may be shared by sequential analyses; it is not safe to use from several threads at once.

    Args:
        predictor_path: dlib 68-point model file; None = the one in `face-recognition-models`.
        detect_max_side: Longer side of the detection image in pixels (frames are downscaled for detection
            only). >= 64; default 480.
        upsample: Maximum HOG up-sampling steps on the detection image for small faces; detection tries
            0, 1, ... up to this and stops at the first level that finds a face. >= 0; default 1.
        min_score: Minimum dlib detection score to accept a face; negative accepts weaker faces. Default 0.0.
        redetect_interval: Run the detector every this many frames while tracking; 1 = every frame.
            >= 1; default 10.
        predict_box_px: Side of the normalised face box the predictor sees, pixels. Default 256.
        min_patch_correlation: Tracking is lost when the normalised cross-correlation of the face region
            with the previous frame's drops below this, in [-1, 1]. Default 0.5.
        max_box_jump: Tracking is lost when the box moves by more than this share of its side in one
            frame. Default 0.35.
    """

    def __init__(
        self,
        *,
        predictor_path: str | Path | None = None,
        detect_max_side: int = 480,
        upsample: int = 1,
        min_score: float = 0.0,
        redetect_interval: int = 10,
        predict_box_px: int = 256,
        min_patch_correlation: float = 0.5,
        max_box_jump: float = 0.35,
    ) -> None:
        if detect_max_side < 64:
            raise InvalidInput(f"detect_max_side must be >= 64, got {detect_max_side}")
        if not 0 <= upsample <= 3:
            raise InvalidInput(f"upsample must be in [0, 3], got {upsample}")
        if redetect_interval < 1:
            raise InvalidInput(f"redetect_interval must be >= 1, got {redetect_interval}")
        if predict_box_px < 64:
            raise InvalidInput(f"predict_box_px must be >= 64, got {predict_box_px}")
        path = Path(predictor_path) if predictor_path is not None else shape_predictor_path()
        if not path.is_file():
            raise NotFound(f"landmark model {str(path)!r} does not exist")
        self.predictor_path = path
        self.detect_max_side = int(detect_max_side)
        self.upsample = int(upsample)
        self.min_score = float(min_score)
        self.redetect_interval = int(redetect_interval)
        self.predict_box_px = int(predict_box_px)
        self.min_patch_correlation = float(min_patch_correlation)
        self.max_box_jump = float(max_box_jump)
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(path))
        # The box occupies [margin, margin + side) of the predictor's square region.
        self._margin = self.predict_box_px // 4
        self._region = self.predict_box_px + 2 * self._margin

    # ------------------------------------------------------------------ detection
    def _run_detector(self, gray: np.ndarray, max_upsample: int) -> tuple[list[tuple[float, float, float]], list]:
        """HOG detections on `gray` as (cx, cy, side) in its pixels, and their scores."""
        adjust = min(self.min_score, 0.0)
        for level in range(max_upsample + 1):
            rects, scores, _ = self._detector.run(gray, level, adjust)
            keep = [(r, s) for r, s in zip(rects, scores, strict=True) if s >= self.min_score]
            if keep:
                boxes = [
                    ((r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2, (r.width() + r.height()) / 2)
                    for r, _ in keep
                ]
                return boxes, [s for _, s in keep]
        return [], []

    def _detect_full(self, frame: np.ndarray) -> tuple[FaceBox, float] | None:
        """Largest face on the whole (downscaled) frame."""
        gray = _to_gray(frame)
        h, w = gray.shape
        scale = min(1.0, self.detect_max_side / max(h, w))
        small = gray if scale >= 1.0 else cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        sx, sy = w / small.shape[1], h / small.shape[0]
        boxes, scores = self._run_detector(small, self.upsample)
        if not boxes:
            return None
        best = max(range(len(boxes)), key=lambda i: (boxes[i][2], scores[i]))
        cx, cy, side = boxes[best]
        # Pixel centres: small pixel i covers [i, i+1) * s in the frame, centre (i + 0.5) * s - 0.5.
        return FaceBox((cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5, side * (sx + sy) / 2), float(scores[best])

    def _detect_near(self, frame: np.ndarray, box: FaceBox) -> tuple[FaceBox, float] | None:
        """Face in a roll-normalised region twice the size of `box`, scaled so the face is ~100 px."""
        side_px = 100.0
        size = int(2.2 * side_px)
        gray, inverse = _warp_region(frame, box, side_px, size)
        boxes, scores = self._run_detector(gray, 0)
        if not boxes:
            return None
        centre = (size - 1) / 2
        ious = [FaceBox(b[0], b[1], b[2]).iou(FaceBox(centre, centre, side_px)) for b in boxes]
        best = int(np.argmax(ious))
        if ious[best] < 0.3:
            return None
        cx, cy, side = boxes[best]
        fx, fy, _ = inverse @ np.array([cx, cy, 1.0])
        return FaceBox(float(fx), float(fy), side * box.side / side_px, box.angle), float(scores[best])

    # ------------------------------------------------------------------ prediction
    def _predict(self, frame: np.ndarray, box: FaceBox) -> tuple[np.ndarray, np.ndarray]:
        """68 landmarks (float64 [68, 2] frame pixels) in `box`, and the box region's NCC patch."""
        size, side = self._region, self.predict_box_px
        region, inverse = _warp_region(frame, box, side, size)
        lo = (size - side) // 2
        rect = dlib.rectangle(lo, lo, lo + side - 1, lo + side - 1)
        shape = self._predictor(region, rect)
        pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        landmarks = pts @ inverse[:2, :2].T + inverse[:2, 2]
        return landmarks, _box_patch(region, lo, lo + side, 24)

    def _landmarks_from_detection(self, frame: np.ndarray, box: FaceBox) -> tuple[np.ndarray, np.ndarray]:
        """Predict in the detector's box, then once more in the box those landmarks imply (consistent framing)."""
        first, _ = self._predict(frame, box)
        return self._predict(frame, box_from_landmarks(first))

    def detect(self, frame: np.ndarray) -> tuple[np.ndarray | None, float]:
        """Detect the largest face on one frame and predict its landmarks (no tracking state).

        Args:
            frame: uint8 [H, W, 3] BGR or [H, W] gray.

        Returns:
            (landmarks float32 [68, 2] (x, y) pixels or None when no face scores >= min_score,
            detection score or NaN).

        Raises:
            InvalidInput: wrong dtype or shape.
        """
        frame = _check_frame(frame)
        found = self._detect_full(frame)
        if found is None:
            return None, math.nan
        box, score = found
        landmarks, _ = self._landmarks_from_detection(frame, box)
        return landmarks.astype(np.float32), score

    def tracker(self) -> FaceTracker:
        """A fresh tracking state for one video (see `FaceTracker.update`)."""
        return FaceTracker(self)

    def track(self, frames: Iterable[np.ndarray]) -> Iterator[FaceObservation]:
        """Landmarks of each frame of a sequence, detecting periodically and tracking in between.

        Args:
            frames: uint8 [H, W, 3] BGR (or [H, W] gray) frames of one video, in order.

        Yields:
            One FaceObservation per frame.
        """
        tracker = self.tracker()
        for frame in frames:
            yield tracker.update(frame)


class FaceTracker:
    """Per-video tracking state of a LandmarkDetector (create with `LandmarkDetector.tracker()`)."""

    def __init__(self, detector: LandmarkDetector) -> None:
        self.detector = detector
        self._landmarks: np.ndarray | None = None
        self._patch: np.ndarray | None = None
        self._score = math.nan
        self._since_detection = 0
        self.detections = 0
        self.frames = 0

    def reset(self) -> None:
        """Forget the tracked face (the next frame runs the full detector)."""
        self._landmarks = None
        self._patch = None
        self._score = math.nan

    def _accept(self, landmarks: np.ndarray, patch: np.ndarray, score: float, detected: bool) -> FaceObservation:
        self._landmarks, self._patch, self._score = landmarks, patch, score
        if detected:
            self._since_detection = 0
            self.detections += 1
        return FaceObservation(landmarks.astype(np.float32), score, detected)

    def _detect(self, frame: np.ndarray) -> FaceObservation:
        det = self.detector
        found = None
        if self._landmarks is not None:
            found = det._detect_near(frame, box_from_landmarks(self._landmarks))
        if found is None:
            found = det._detect_full(frame)
        if found is None:
            self.reset()
            return FaceObservation(None, math.nan, False)
        box, score = found
        landmarks, patch = det._landmarks_from_detection(frame, box)
        return self._accept(landmarks, patch, score, True)

    def _tracking_lost(self, box: FaceBox, landmarks: np.ndarray, patch: np.ndarray) -> bool:
        det = self.detector
        if self._patch is not None and float((patch * self._patch).sum()) < det.min_patch_correlation:
            return True
        new = box_from_landmarks(landmarks)
        jump = math.hypot(new.cx - box.cx, new.cy - box.cy) / box.side
        ratio = new.side / box.side
        return jump > det.max_box_jump or not 0.7 < ratio < 1.4 or abs(new.angle - box.angle) > 0.5

    def update(self, frame: np.ndarray) -> FaceObservation:
        """Landmarks of the next frame of the video.

        Args:
            frame: uint8 [H, W, 3] BGR or [H, W] gray.

        Returns:
            The frame's FaceObservation.
        """
        frame = _check_frame(frame)
        self.frames += 1
        self._since_detection += 1
        if self._landmarks is None or self._since_detection >= self.detector.redetect_interval:
            return self._detect(frame)
        box = box_from_landmarks(self._landmarks)
        landmarks, patch = self.detector._predict(frame, box)
        if self._tracking_lost(box, landmarks, patch):
            return self._detect(frame)
        return self._accept(landmarks, patch, self._score, False)


# ---------------------------------------------------------------------- temporal smoothing
def smoothing_kernel(fps: float, cutoff_hz: float, *, max_half_width: int = 30) -> np.ndarray:
    """Symmetric (zero-phase) low-pass FIR: a Hamming-windowed sinc with unit DC gain.

    Args:
        fps: Sample rate of the track, frames per second (> 0).
        cutoff_hz: Cut-off frequency (gain 0.5), Hz; 0 or >= fps / 2 gives the identity kernel [1.0].
        max_half_width: Upper bound on the half width K.

    Returns:
        float64 [2K + 1] taps, K = ceil(2 fps / cutoff_hz) clipped to [1, max_half_width].
    """
    if not fps > 0:
        raise InvalidInput(f"fps must be > 0, got {fps}")
    if cutoff_hz < 0:
        raise InvalidInput(f"cutoff_hz must be >= 0, got {cutoff_hz}")
    if cutoff_hz == 0 or cutoff_hz >= fps / 2:
        return np.ones(1)
    half = int(min(max(math.ceil(2 * fps / cutoff_hz), 1), max_half_width))
    n = np.arange(-half, half + 1)
    fc = cutoff_hz / fps
    taps = 2 * fc * np.sinc(2 * fc * n) * np.hamming(2 * half + 1)
    return taps / taps.sum()


def _edge_line(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value at index 0 and slope per index of the least-squares line through y[0], y[1], ... (float [m, ...])."""
    m = len(y)
    if m < 2:
        return y[0], np.zeros_like(y[0])
    j = np.arange(m, dtype=np.float64) - (m - 1) / 2
    slope = np.tensordot(j, y - y.mean(axis=0), axes=(0, 0)) / float((j * j).sum())
    return y.mean(axis=0) - slope * (m - 1) / 2, slope


def smooth_run(values: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Filter one gap-free run along axis 0 with a symmetric kernel.

    The run is extended at each end by point reflection about the end value of a straight line fitted to
    the K + 1 samples there (x[-k] = 2 p0 - x[k], continued along the line for runs shorter than K + 1):
    a linear trend passes unchanged up to the run's ends (no lag, no pull towards a constant), and the
    end samples' own noise is not doubled as it would be with plain odd reflection. Output i depends only
    on samples within K + 1 of i and on where the run ends, which is what lets `analyze_video` stream it.

    Args:
        values: float [L, ...], no NaN.
        kernel: float64 [2K + 1], symmetric.

    Returns:
        float64 [L, ...].
    """
    x = np.asarray(values, dtype=np.float64)
    half = (len(kernel) - 1) // 2
    length = len(x)
    if half == 0 or length < 2:
        return x.copy()
    m = min(half + 1, length)
    k = np.arange(1, half + 1)
    r = np.minimum(k, length - 1)
    # Runs shorter than K + 1 continue the fitted line beyond their last sample.
    beyond = (k - r).reshape((-1,) + (1,) * (x.ndim - 1))

    def extension(y: np.ndarray) -> np.ndarray:  # y[-1], y[-2], ..., y[-K]
        value, slope = _edge_line(y[:m])
        return 2 * value - y[r] - slope * beyond

    left = extension(x)[::-1]
    right = extension(x[::-1])
    padded = np.concatenate([left, x, right], axis=0)
    windows = np.lib.stride_tricks.sliding_window_view(padded, len(kernel), axis=0)
    return windows @ kernel


def smooth_landmarks(
    landmarks: np.ndarray,
    valid: np.ndarray,
    *,
    fps: float = 30.0,
    cutoff_hz: float = 8.0,
) -> np.ndarray:
    """Zero-phase temporal low-pass of landmark tracks, applied per run of valid frames.

    Each run of consecutive valid frames is filtered on its own (`smooth_run`), so nothing is smoothed
    across a no-face gap and there is no lag. The filter has a finite support (K = len(kernel) // 2
    frames each side), so `analyze_video` computes the same values while streaming.

    Args:
        landmarks: float [F, ...] (e.g. [F, 68, 2] pixels); values at invalid frames are ignored.
        valid: bool [F], True where the frame has a face.
        fps: Frame rate of the track (frames per second; for VFR video the mean rate).
        cutoff_hz: Low-pass cut-off in Hz (gain 0.5); 0 = no smoothing. Default 8.0.

    Returns:
        float32 [F, ...]: smoothed at valid frames, NaN at invalid frames.

    Raises:
        InvalidInput: shapes disagree, or NaN at a valid frame.
    """
    x = np.asarray(landmarks)
    v = np.asarray(valid, dtype=bool)
    if x.ndim < 1 or v.shape != x.shape[:1]:
        raise InvalidInput(f"valid must be [F] for landmarks of shape {x.shape}, got {v.shape}")
    if not np.isfinite(x[v]).all():
        raise InvalidInput("landmarks hold NaN or inf at frames marked valid")
    kernel = smoothing_kernel(fps, cutoff_hz)
    out = np.full(x.shape, np.nan, dtype=np.float32)
    for start, stop in valid_runs(v):
        out[start:stop] = smooth_run(x[start:stop], kernel)
    return out
