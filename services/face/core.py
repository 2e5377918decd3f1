"""Pure core of the `face` stage: analyse a video into landmarks, canonical mouth shapes and lower-face crops.

Pipeline of `analyze_video` (one sequential decode, bounded memory):
decode (video.py) -> detect / track 68 landmarks (landmarks.py) -> zero-phase smoothing per run of face
frames, streamed with a delay of K frames -> similarity alignment into the canonical template and a
piecewise-affine warp of the lower face into the canonical crop (services/runtime/canonical.py) -> per-frame measures.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import cv2
import numpy as np

from services.face.landmarks import (
    JAW,
    MOUTH,
    FaceObservation,
    LandmarkDetector,
    shape_predictor_path,
    smooth_landmarks,
    smooth_run,
    smoothing_kernel,
)
from services.runtime.canonical import (
    CANONICAL_TEMPLATE,
    DEFAULT_CROP_REGION,
    DEFAULT_CROP_SIZE,
    TEMPLATE_ID,
    CanonicalGeometry,
    FramePatch,
    LowerFaceWarp,
    canonical_template,
    eye_openness,
    head_motion,
    head_pose,
    landmark_jitter,
    template_id,
    to_canonical,
)
from services.runtime.errors import Cancelled, InvalidInput, NoFace, TooLarge
from services.runtime.media import VideoInfo, VideoSource, iter_frames, probe_video

__all__ = [
    "CANONICAL_TEMPLATE",
    "TEMPLATE_ID",
    "CanonicalGeometry",
    "FaceObservation",
    "FramePatch",
    "LandmarkDetector",
    "LowerFaceWarp",
    "VideoAnalysis",
    "VideoInfo",
    "analyze_video",
    "canonical_template",
    "iter_frames",
    "probe_video",
    "shape_predictor_path",
    "smooth_landmarks",
    "template_id",
]


@dataclass(frozen=True)
class VideoAnalysis:
    """Everything `analyze_video` measured on one video. F = info.frame_count (every decoded frame).

    Frames without a face have face_valid False, NaN in landmarks, raw_landmarks, canonical_landmarks,
    canonical_mouth, jaw, head_pose, landmark_jitter and detection_scores, all-zero crops and crop masks;
    head_motion and eye_openness are interpolated from neighbouring face frames there. Arrays are read-only.

    Attributes:
        info: Stream facts; frame_count is the exact decoded count, variable_frame_rate is decided from
            the decoded timestamps.
        geometry: Canonical template (global, `TEMPLATE_ID`) and crop geometry.
        timestamps: float64 [F] presentation time of each frame, seconds from the container start.
        landmarks: float32 [F, 68, 2] (x, y) frame pixels, temporally smoothed (zero phase).
        raw_landmarks: float32 [F, 68, 2] the tracker's landmarks before smoothing.
        face_valid: bool [F] True where a face was found.
        detection_scores: float32 [F] dlib score of the face (tracked frames carry their last detection's).
        detected: bool [F] True where the HOG detector ran and found the face (else tracked or no face).
        canonical_landmarks: float32 [F, 68, 2] smoothed landmarks similarity-aligned to the template on the
            rigid points, canonical template units.
        canonical_mouth: float32 [F, 20, 2] points 48-67 of canonical_landmarks; where they appear in the crop.
        jaw: float32 [F, 17, 2] points 0-16 of canonical_landmarks.
        head_pose: float32 [F, 6] yaw, pitch, roll (rad; a generic 3-D face fitted with cv2.solvePnP), face centre
            x, y (px), inter-ocular distance (px); see `canonical.head_pose`.
        landmark_jitter: float32 [F] how far the tracker's rigid points (nose, eyes) lie from their smoothed track,
            median over the points, inter-ocular units (`canonical.landmark_jitter`; a steady track is ~0.01, an
            unsure one above ~0.05); NaN where no face.
        head_motion: float32 [F] head speed, inter-ocular units per frame (for re-timing).
        eye_openness: float32 [F] mean eye polygon area / inter-ocular distance^2 (blinks < ~0.025).
        crops: uint8 [F, h, w, 3] BGR canonical lower-face crops (h, w = geometry.crop_shape); None when they
            went to `analyze_video`'s crop_sink instead.
        crop_masks: uint8 [F, h, w] 1 where the crop pixel was rendered from inside the frame; None likewise.
        mean_shape: float32 [68, 2] this video's mean face shape in canonical units (`canonical_template`).
        smoothing_cutoff_hz: Cut-off of the landmark smoothing used (0 = none).
    """

    info: VideoInfo
    geometry: CanonicalGeometry
    timestamps: np.ndarray
    landmarks: np.ndarray
    raw_landmarks: np.ndarray
    face_valid: np.ndarray
    detection_scores: np.ndarray
    detected: np.ndarray
    canonical_landmarks: np.ndarray
    canonical_mouth: np.ndarray
    jaw: np.ndarray
    head_pose: np.ndarray
    landmark_jitter: np.ndarray
    head_motion: np.ndarray
    eye_openness: np.ndarray
    crops: np.ndarray | None
    crop_masks: np.ndarray | None
    mean_shape: np.ndarray
    smoothing_cutoff_hz: float

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.ndarray):
                value.flags.writeable = False

    @property
    def frame_count(self) -> int:
        """F, the number of decoded frames."""
        return len(self.timestamps)

    @property
    def valid_frame_count(self) -> int:
        """Number of frames with a face."""
        return int(self.face_valid.sum())

    @property
    def template(self) -> np.ndarray:
        """float32 [68, 2] the canonical template (geometry.template)."""
        return self.geometry.template

    @property
    def template_id(self) -> str:
        """Identifier of the canonical template; shapes with equal ids are comparable."""
        return self.geometry.template_id

    def warp(self, index: int) -> LowerFaceWarp:
        """The lower-face warp of frame `index` (for warping crops or textures back into that frame).

        Raises:
            InvalidInput: index out of range or the frame has no face.
        """
        if not 0 <= index < self.frame_count:
            raise InvalidInput(f"frame index {index} outside [0, {self.frame_count})")
        if not self.face_valid[index]:
            raise InvalidInput(f"frame {index} has no face")
        return LowerFaceWarp(self.landmarks[index], self.geometry)


def _decide_vfr(timestamps: np.ndarray, fps: float) -> bool:
    if len(timestamps) < 3:
        return False
    dt = np.diff(timestamps)
    nominal = 1.0 / fps
    # Container time bases round each pts (1 ms in Matroska): allow 2 ms plus 5 % of a period.
    return bool(np.abs(dt - nominal).max() > 0.002 + 0.05 * nominal)


class _Pipeline:
    """Streaming state of one analysis: tracks, smooths with a K-frame delay, warps finished frames."""

    def __init__(
        self,
        geometry: CanonicalGeometry,
        kernel: np.ndarray,
        interpolation: int,
        sink: Callable[[np.ndarray, np.ndarray], None] | None = None,
    ) -> None:
        self.geometry = geometry
        self.sink = sink
        self.kernel = kernel
        self.half = (len(kernel) - 1) // 2
        self.interpolation = interpolation
        self.raw: list[np.ndarray] = []
        self.valid: list[bool] = []
        self.smoothed: list[np.ndarray] = []
        self.crops: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.frames: deque[tuple[int, np.ndarray]] = deque()
        h, w = geometry.crop_shape
        self._empty_crop = np.zeros((h, w, 3), np.uint8)
        self._empty_mask = np.zeros((h, w), np.uint8)
        self._nan = np.full((68, 2), np.nan)

    def push(self, frame: np.ndarray, obs: FaceObservation) -> None:
        self.raw.append(self._nan if obs.landmarks is None else obs.landmarks.astype(np.float64))
        self.valid.append(obs.landmarks is not None)
        self.frames.append((len(self.raw) - 1, frame))
        while self.frames and self.frames[0][0] + self.half < len(self.raw):
            self._finish(*self.frames.popleft())

    def flush(self) -> None:
        while self.frames:
            self._finish(*self.frames.popleft())

    def _smoothed_at(self, i: int) -> np.ndarray:
        """Same value as smooth_landmarks over the whole track (smooth_run reaches K + 1 frames each side)."""
        n = len(self.raw)
        lo = i
        while lo > max(i - self.half - 1, 0) and self.valid[lo - 1]:
            lo -= 1
        hi = i + 1
        while hi < min(i + self.half + 1, n) and self.valid[hi]:
            hi += 1
        # A copy: a view would keep the whole smoothed window alive per frame (about 20 kB a frame, 30 MiB a
        # minute of 25 fps video).
        return smooth_run(np.stack(self.raw[lo:hi]), self.kernel)[i - lo].copy()

    def _finish(self, i: int, frame: np.ndarray) -> None:
        if not self.valid[i]:
            self.smoothed.append(self._nan)
            crop, mask = self._empty_crop, self._empty_mask
        else:
            landmarks = self._smoothed_at(i)
            self.smoothed.append(landmarks)
            warp = LowerFaceWarp(landmarks.astype(np.float32), self.geometry)
            crop, mask = warp.to_crop(frame, interpolation=self.interpolation)
        if self.sink is not None:
            self.sink(crop, mask)
        else:
            self.crops.append(crop)
            self.masks.append(mask)


def analyze_video(
    source: VideoSource,
    *,
    detector: LandmarkDetector,
    crop_region: tuple[float, float, float, float] = DEFAULT_CROP_REGION,
    crop_size: tuple[int, int] = DEFAULT_CROP_SIZE,
    smoothing_cutoff_hz: float = 8.0,
    max_frames: int = 54_000,
    max_duration_seconds: float = 1800.0,
    max_pixels: int = 4096 * 2304,
    interpolation: int = cv2.INTER_CUBIC,
    decode_threads: int = 0,
    progress: Callable[[int, int], None] | None = None,
    progress_every: int = 25,
    should_stop: Callable[[], bool] | None = None,
    crop_sink: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> VideoAnalysis:
    """Analyse every frame of a video: landmarks, canonical shapes, lower-face crops, pose, motion, blinks.

    Frames are decoded once, in order; landmarks are tracked (`LandmarkDetector.tracker`), smoothed with a
    zero-phase FIR per run of face frames (identical to `smooth_landmarks` on the whole track) and each
    frame is warped into the canonical crop as soon as the K frames after it are known, so only K + 1
    frames are held in memory.

    Args:
        source: Encoded video bytes or a path.
        detector: Loaded detector (its knobs set detection and tracking).
        crop_region: (left, top, right, bottom) of the crop in canonical template units. Default the seed's
            (0.25, 0.5, 0.75, 1.1).
        crop_size: (width, height) of the crop in pixels. Default (150, 180).
        smoothing_cutoff_hz: Landmark low-pass cut-off in Hz, >= 0; 0 = no smoothing. Default 8.0.
        max_frames: Most frames accepted (header count or decoded count); more raises TooLarge.
        max_duration_seconds: Longest accepted duration (header); longer raises TooLarge.
        max_pixels: Largest accepted frame area; larger raises TooLarge.
        interpolation: cv2 interpolation of the crop warp (default bicubic).
        decode_threads: FFmpeg decoder threads (0 = FFmpeg's choice).
        progress: Called as progress(done_frames, total_frames) every `progress_every` frames and at the end;
            total is the header's estimate (0 = unknown) until decoding finishes.
        progress_every: Frames between progress calls, >= 1.
        should_stop: Polled before each frame; when it returns True the analysis raises Cancelled.
        crop_sink: Called as crop_sink(crop, mask) for each frame in order instead of keeping the crops (the
            result's crops and crop_masks are then None): a long video's crops can go to disk as they are made
            (minutes of crops are gigabytes).

    Returns:
        The VideoAnalysis.

    Raises:
        InvalidInput: undecodable or empty video, bad options.
        TooLarge: over max_frames, max_duration_seconds or max_pixels.
        NoFace: no frame has a face.
        Cancelled: should_stop returned True.
    """
    if smoothing_cutoff_hz < 0:
        raise InvalidInput(f"smoothing_cutoff_hz must be >= 0, got {smoothing_cutoff_hz}")
    if max_frames < 1 or progress_every < 1:
        raise InvalidInput(f"max_frames and progress_every must be >= 1, got {max_frames}, {progress_every}")
    geometry = CanonicalGeometry.create(template=CANONICAL_TEMPLATE, crop_region=crop_region, crop_size=crop_size)
    info = probe_video(source, max_pixels=max_pixels)
    if info.frame_count > max_frames:
        raise TooLarge(f"video has {info.frame_count} frames, above the limit of {max_frames}")
    if info.duration_seconds > max_duration_seconds:
        raise TooLarge(f"video lasts {info.duration_seconds:.1f} s, above the limit of {max_duration_seconds:.0f} s")
    kernel = smoothing_kernel(info.fps, smoothing_cutoff_hz)
    pipeline = _Pipeline(geometry, kernel, interpolation, crop_sink)
    tracker = detector.tracker()
    timestamps: list[float] = []
    scores: list[float] = []
    detected: list[bool] = []
    total = info.frame_count
    for index, t, frame in iter_frames(source, decode_threads=decode_threads):
        if should_stop is not None and should_stop():
            raise Cancelled(f"face analysis cancelled after {index} frames")
        if index >= max_frames:
            raise TooLarge(f"video has more than {max_frames} frames")
        obs = tracker.update(frame)
        timestamps.append(t)
        scores.append(obs.score)
        detected.append(obs.detected)
        pipeline.push(frame, obs)
        if progress is not None and (index + 1) % progress_every == 0:
            progress(index + 1, max(total, index + 1))
    pipeline.flush()
    count = len(timestamps)
    if count == 0:
        raise InvalidInput("video has no decodable frame")
    if progress is not None:
        progress(count, count)
    valid = np.array(pipeline.valid, dtype=bool)
    if not valid.any():
        raise NoFace(f"no face found in any of the {count} frames of the video")

    times = np.array(timestamps, dtype=np.float64)
    smoothed = np.stack(pipeline.smoothed)
    canonical = to_canonical(smoothed, template=geometry.template)
    info = replace(info, frame_count=count, variable_frame_rate=_decide_vfr(times, info.fps))
    return VideoAnalysis(
        info=info,
        geometry=geometry,
        timestamps=times,
        landmarks=smoothed.astype(np.float32),
        raw_landmarks=np.stack(pipeline.raw).astype(np.float32),
        face_valid=valid,
        detection_scores=np.array(scores, dtype=np.float32),
        detected=np.array(detected, dtype=bool),
        canonical_landmarks=canonical.astype(np.float32),
        canonical_mouth=canonical[:, MOUTH].astype(np.float32),
        jaw=canonical[:, JAW].astype(np.float32),
        head_pose=head_pose(smoothed, template=geometry.template, frame_size=(info.width, info.height)),
        landmark_jitter=landmark_jitter(np.stack(pipeline.raw), smoothed),
        head_motion=head_motion(smoothed, valid),
        eye_openness=eye_openness(smoothed, valid),
        crops=None if crop_sink is not None else np.stack(pipeline.crops),
        crop_masks=None if crop_sink is not None else np.stack(pipeline.masks),
        mean_shape=canonical_template(smoothed, valid, reference=geometry.template),
        smoothing_cutoff_hz=float(smoothing_cutoff_hz),
    )


# ---------------------------------------------------------------------- crop storage
