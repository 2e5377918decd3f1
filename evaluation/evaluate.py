"""Evaluations on video files: sync of any video, a rendered output against its target, a speaker model's shapes.

This is the I/O layer over the pure metric modules (`sync`, `image`, `shape`): it decodes videos and audio with
the face and audio cores, reports progress, and returns frozen results whose `as_dict()` is the JSON report.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from evaluation import image, report
from evaluation.quality import analyse_clip
from evaluation.shape import ShapeEvaluation, SpeakerModel, evaluate_mouth_shapes
from evaluation.sync import DEFAULT_MAX_LAG, SyncResult, audio_visual_sync
from services.audio.core import DecodedAudio, decode_audio, detect_speech
from services.face.core import LandmarkDetector, VideoAnalysis, analyze_video
from services.runtime.canonical import inner_lip_gap, mouth_opening_ratio
from services.runtime.errors import InvalidInput, NotFound
from services.runtime.media import iter_frames, probe_video

Progress = Callable[[int, int], None]
STRIP_FRAMES = 6
STRIP_HEIGHT = 160


class StderrProgress:
    """`progress(done, total)` that prints "label: done/total frames (p %)" to stderr every 10 % or 5 s."""

    def __init__(self, label: str, *, stream=None, unit: str = "frames") -> None:
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.last_step = -1
        self.last_time = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        step = int(10 * done / total) if total > 0 else -1
        if step > self.last_step or now - self.last_time >= 5.0 or (total and done >= total):
            share = f" ({100 * done / total:.0f} %)" if total > 0 else ""
            print(f"{self.label}: {done}/{total or '?'} {self.unit}{share}", file=self.stream, flush=True)
            self.last_step, self.last_time = step, now


def say(message: str) -> None:
    """A progress line on stderr."""
    print(message, file=sys.stderr, flush=True)


def _existing(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{what} not found: {path}")
    return path


def mouth_opening(analysis: VideoAnalysis) -> np.ndarray:
    """float64 [F] inner-lip opening per frame in canonical template units (NaN where no face)."""
    return inner_lip_gap(analysis.canonical_mouth)


def sync_of_analysis(
    analysis: VideoAnalysis, samples: np.ndarray, *, max_lag: int = DEFAULT_MAX_LAG
) -> tuple[SyncResult, np.ndarray]:
    """`sync.audio_visual_sync` of an analysed video with 16 kHz audio on the video's time line."""
    return audio_visual_sync(
        mouth_opening(analysis),
        analysis.face_valid,
        samples,
        analysis.timestamps,
        fps=analysis.info.fps,
        max_lag=max_lag,
    )


def silent_frames(samples: np.ndarray, frame_count: int, fps: float) -> np.ndarray:
    """bool [F]: frames whose whole interval is free of speech (`audio.core.detect_speech`)."""
    activity = detect_speech(samples, output_fps=fps, n_output_frames=frame_count)
    return np.asarray(activity.per_output_frame) == 0


# ---------------------------------------------------------------------------------------------------------
# one video


@dataclass(frozen=True, eq=False)
class VideoMeasures:
    """Everything measured on one video: face analysis, audio, sync and per-frame image measures.

    Attributes:
        path, audio_path: the video and where its audio came from.
        analysis: the face analysis.
        audio: the decoded audio (16 kHz mono); None when the video has none and it was optional.
        sync: the audio-visual sync result (None when it could not be measured; see `sync_error`).
        envelope: float64 [F] speech-band energy per frame, dB (None without sync).
        opening: float64 [F] inner-lip opening (NaN where no face).
        silent: bool [F] frames without speech.
        sharpness: float64 [F] variance of the Laplacian in the mouth box (NaN where no face / not measured).
        seam: float64 [F] seam energy at the blend boundary (NaN where no face / not measured).
        flicker: mouth-region flicker over silent frame pairs (canonical crops).
        strip: (frame index, BGR uint8 image) of a few frames, cut to the face.
        seconds: wall time of the measurement.
    """

    path: Path
    audio_path: Path
    analysis: VideoAnalysis
    audio: DecodedAudio | None
    sync: SyncResult | None
    sync_error: str | None
    envelope: np.ndarray | None
    opening: np.ndarray
    silent: np.ndarray
    sharpness: np.ndarray
    seam: np.ndarray
    flicker: image.Flicker
    strip: list[tuple[int, np.ndarray]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fps(self) -> float:
        return self.analysis.info.fps

    def opening_spread(self) -> dict:
        """Mean and standard deviation of the inner-lip gap over the mouth width (a scale-free opening) over face
        frames: how much the mouth moves, to hold a render's against real footage of the speaker."""
        ratio = mouth_opening_ratio(self.analysis.canonical_mouth)
        ratio = ratio[np.isfinite(ratio)]
        if len(ratio) < 2:
            return {"mean": math.nan, "std": math.nan, "frames": int(len(ratio))}
        return {"mean": float(ratio.mean()), "std": float(ratio.std()), "frames": int(len(ratio))}

    def as_dict(self, *, image_metrics: bool = True) -> dict:
        info = self.analysis.info
        out = {
            "path": str(self.path),
            "audio": str(self.audio_path),
            "frames": self.analysis.frame_count,
            "face_frames": self.analysis.valid_frame_count,
            "fps": info.fps,
            "width": info.width,
            "height": info.height,
            "duration_seconds": self.analysis.frame_count / info.fps,
            "audio_seconds": self.audio.duration_seconds if self.audio is not None else None,
            "silent_frames": int(self.silent.sum()),
            "mouth_opening": self.opening_spread(),
            "sync": self.sync.as_dict() if self.sync is not None else None,
            "sync_error": self.sync_error,
            "wall_seconds": self.seconds,
        }
        if image_metrics:
            out.update(
                {
                    "mouth_sharpness": _nanmean(self.sharpness),
                    "seam_energy": _nanmean(self.seam),
                    "flicker_silent": {"mean_abs_diff": self.flicker.mean_abs_diff, "pairs": self.flicker.pairs},
                }
            )
        return out


def _nanmean(values: np.ndarray) -> float:
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if finite.size else math.nan


def _strip_indices(valid: np.ndarray, count: int) -> list[int]:
    candidates = np.flatnonzero(valid)
    if candidates.size == 0 or count <= 0:
        return []
    picks = np.linspace(0, candidates.size - 1, min(count, candidates.size) + 2)[1:-1]
    return sorted({int(candidates[int(round(p))]) for p in picks})


def face_thumbnail(frame: np.ndarray, landmarks: np.ndarray | None, *, height: int = STRIP_HEIGHT) -> np.ndarray:
    """The frame cut to the face (landmark box widened by 30 %, square) and resized to `height` rows."""
    h, w = frame.shape[:2]
    if landmarks is not None and np.isfinite(landmarks).all():
        lo, hi = landmarks.min(axis=0), landmarks.max(axis=0)
        centre, side = (lo + hi) / 2, 1.3 * float((hi - lo).max())
        x0, y0 = (centre - side / 2).astype(int)
        x1, y1 = (centre + side / 2).astype(int)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 - x0 >= 8 and y1 - y0 >= 8:
            frame = frame[y0:y1, x0:x1]
    scale = height / frame.shape[0]
    return cv2.resize(frame, (max(1, round(frame.shape[1] * scale)), height), interpolation=cv2.INTER_AREA)


def _frame_pass(
    path: Path,
    analysis: VideoAnalysis,
    *,
    image_metrics: bool,
    strip: Sequence[int],
    progress: Progress | None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]]:
    """Second decode of the video: per-frame mouth sharpness and seam energy, and the strip thumbnails."""
    count = analysis.frame_count
    sharpness = np.full(count, np.nan)
    seam = np.full(count, np.nan)
    wanted = set(strip)
    thumbs: list[tuple[int, np.ndarray]] = []
    if not image_metrics and not wanted:
        return sharpness, seam, thumbs
    stop = None if image_metrics else max(wanted) + 1
    for index, _, frame in iter_frames(path, stop=stop):
        if index >= count:
            break
        landmarks = analysis.landmarks[index] if analysis.face_valid[index] else None
        if image_metrics and landmarks is not None:
            try:
                sharpness[index] = image.mouth_sharpness(frame, landmarks)
                seam[index] = image.frame_seam_energy(frame, landmarks)
            except InvalidInput:  # a face at the frame edge: its mouth box or blend region is cut off
                pass
        if index in wanted:
            thumbs.append((index, face_thumbnail(frame, landmarks)))
        if progress is not None and (index + 1) % 50 == 0:
            progress(index + 1, count)
    if progress is not None:
        progress(count, count)
    return sharpness, seam, thumbs


def measure_video(
    video: str | os.PathLike,
    *,
    audio: str | os.PathLike | None = None,
    detector: LandmarkDetector | None = None,
    image_metrics: bool = True,
    strip_frames: int = STRIP_FRAMES,
    max_lag: int = DEFAULT_MAX_LAG,
    progress: bool = True,
    audio_optional: bool = False,
) -> VideoMeasures:
    """Analyse a video's face, decode its audio (or `audio`, on the video's time line) and measure it.

    Args:
        video: any video FFmpeg reads (one of our outputs or real footage).
        audio: a separate audio file whose time 0 is the video's time 0; None = the video's own track.
        detector: a loaded landmark detector (one is loaded when None).
        image_metrics: also decode the frames again for mouth sharpness and seam energy.
        strip_frames: thumbnails to keep for the report.
        max_lag: cross-correlation range, frames.
        progress: print progress to stderr.
        audio_optional: a video without an audio stream is measured without sync and silence (no flicker).

    Raises:
        NotFound: a missing file.
        InvalidInput: undecodable input, no audio stream (unless optional).
        NoFace: no frame has a face.
    """
    started = time.monotonic()
    video = _existing(video, "video")
    audio_path = _existing(audio, "audio") if audio is not None else video
    detector = detector or LandmarkDetector()
    label = video.name
    analysis = analyze_video(video, detector=detector, progress=StderrProgress(f"{label} face") if progress else None)
    opening = mouth_opening(analysis)
    sync, envelope, sync_error = None, None, None
    silent = np.zeros(analysis.frame_count, bool)
    try:
        decoded = decode_audio(audio_path)
    except InvalidInput as exc:
        if not audio_optional:
            raise
        decoded, sync_error = None, f"no audio: {exc}"
    if decoded is not None:
        try:
            sync, envelope = sync_of_analysis(analysis, decoded.samples, max_lag=max_lag)
        except InvalidInput as exc:  # too short, too few face frames: report it, keep the other measures
            sync_error = str(exc)
        silent = silent_frames(decoded.samples, analysis.frame_count, analysis.info.fps)
    geometry = analysis.geometry
    flicker = image.flicker(analysis.crops, silent & analysis.face_valid, box=image.canonical_mouth_box(geometry))
    sharpness, seam, thumbs = _frame_pass(
        video,
        analysis,
        image_metrics=image_metrics,
        strip=_strip_indices(analysis.face_valid, strip_frames),
        progress=StderrProgress(f"{label} image") if progress and image_metrics else None,
    )
    return VideoMeasures(
        path=video,
        audio_path=audio_path,
        analysis=analysis,
        audio=decoded,
        sync=sync,
        sync_error=sync_error,
        envelope=envelope,
        opening=opening,
        silent=silent,
        sharpness=sharpness,
        seam=seam,
        flicker=flicker,
        strip=thumbs,
        seconds=time.monotonic() - started,
    )


# ---------------------------------------------------------------------------------------------------------
# the three evaluations


@dataclass(frozen=True, eq=False)
class SyncEvaluation:
    """`sync` command: the audio-visual lag of one video."""

    video: VideoMeasures

    def as_dict(self) -> dict:
        return {"kind": "sync", "video": self.video.as_dict(image_metrics=False)}


def evaluate_sync(
    video: str | os.PathLike,
    *,
    audio: str | os.PathLike | None = None,
    detector: LandmarkDetector | None = None,
    max_lag: int = DEFAULT_MAX_LAG,
    progress: bool = True,
) -> SyncEvaluation:
    """Sync of any video (ours or real footage) with its own audio or a separate audio file.

    Raises:
        NotFound, InvalidInput, NoFace: see `measure_video`; InvalidInput also when the lag cannot be measured.
    """
    measures = measure_video(
        video, audio=audio, detector=detector, image_metrics=False, max_lag=max_lag, progress=progress
    )
    if measures.sync is None:
        raise InvalidInput(f"cannot measure the sync of {measures.path.name}: {measures.sync_error}")
    return SyncEvaluation(measures)


ARTIFACT_FLAG = 0.5
"""A frame whose artifact score (foreign colour + edges, `image.frame_artifacts`) exceeds this is flagged: a clean
render of the shared targets stays below 0.1; a patch of background a tenth of the face wide on a chin scores ~2."""
WORST_ARTIFACT_FRAMES = 6


@dataclass(frozen=True, eq=False)
class ArtifactReport:
    """Foreign colour and edges of every output frame against the target frame it shows (`image.frame_artifacts`).

    Attributes:
        colour: float64 [N] foreign colour per output frame (NaN where either has no face or it was not measured).
        edges: float64 [N] foreign edges per output frame.
        target_frames: int64 [N] the target frame compared with each output frame.
        correspondence: how output and target frames were paired ("frame i = target frame i (a render without
            re-timing)" or "the job's retiming map").
        worst: (output frame, BGR crop: target | output | foreign pixels marked) of the worst frames, worst first.
        flag: the score above which a frame is flagged (ARTIFACT_FLAG).
    """

    colour: np.ndarray
    edges: np.ndarray
    target_frames: np.ndarray
    correspondence: str
    worst: list[tuple[int, np.ndarray]] = field(default_factory=list)
    flag: float = ARTIFACT_FLAG

    @property
    def total(self) -> np.ndarray:
        """float64 [N] colour + edges."""
        return self.colour + self.edges

    @property
    def flagged(self) -> list[int]:
        """Output frames whose score exceeds the flag."""
        total = self.total
        return [int(i) for i in np.flatnonzero(np.isfinite(total) & (total > self.flag))]

    def as_dict(self) -> dict:
        total = self.total
        measured = np.isfinite(total)
        values = total[measured]
        order = np.argsort(-np.where(measured, total, -np.inf), kind="stable")[: 2 * WORST_ARTIFACT_FRAMES]
        return {
            "correspondence": self.correspondence,
            "frames_measured": int(measured.sum()),
            "p50": float(np.percentile(values, 50)) if values.size else math.nan,
            "p95": float(np.percentile(values, 95)) if values.size else math.nan,
            "max": float(values.max()) if values.size else math.nan,
            "colour_p95": float(np.percentile(self.colour[measured], 95)) if values.size else math.nan,
            "edges_p95": float(np.percentile(self.edges[measured], 95)) if values.size else math.nan,
            "flag": self.flag,
            "flagged_frames": self.flagged,
            "worst_frames": [
                {
                    "frame": int(i),
                    "target_frame": int(self.target_frames[i]),
                    "score": float(total[i]),
                    "colour": float(self.colour[i]),
                    "edges": float(self.edges[i]),
                }
                for i in order
                if measured[i]
            ],
            "per_frame": [None if not np.isfinite(v) else round(float(v), 4) for v in total],
        }


def measure_artifacts(
    output: str | os.PathLike,
    target: str | os.PathLike,
    output_analysis: VideoAnalysis,
    target_analysis: VideoAnalysis,
    *,
    frame_map: np.ndarray | None = None,
    progress: Progress | None = None,
) -> ArtifactReport:
    """Per output frame, `image.frame_artifacts` against the target frame it shows, and crops of the worst.

    Args:
        output, target: the videos.
        output_analysis, target_analysis: their face analyses (landmarks).
        frame_map: int [N] target frame of each output frame (a job's retiming map); None = output frame i shows
            target frame i (a render without re-timing; frames beyond the target's end are not measured).
        progress: progress(done, total) now and then.

    Raises:
        InvalidInput: a frame map that does not fit the videos.
    """
    from services.composite.core import TargetFrames

    n, m = output_analysis.frame_count, target_analysis.frame_count
    if frame_map is None:
        fmap = np.arange(min(n, m), dtype=np.int64)
        correspondence = "frame i = target frame i (a render without re-timing)"
    else:
        fmap = np.asarray(frame_map, dtype=np.int64)[:n]
        correspondence = "the job's retiming map"
        if fmap.ndim != 1 or (len(fmap) and (fmap.min() < 0 or fmap.max() >= m)):
            raise InvalidInput(f"the frame map does not fit the target's {m} frames")
    colour = np.full(n, np.nan)
    edges = np.full(n, np.nan)
    worst: list[tuple[float, int, np.ndarray]] = []
    out_valid, tgt_valid = output_analysis.face_valid, target_analysis.face_valid
    with TargetFrames(target, fmap, timestamps=target_analysis.timestamps) as targets:
        for (i, _, frame), (k, target_frame) in zip(iter_frames(output, stop=len(fmap)), targets, strict=False):
            if not tgt_valid[k] or frame.shape != target_frame.shape:
                continue
            try:
                maps = image.frame_artifact_maps(
                    frame,
                    target_frame,
                    target_analysis.landmarks[k],
                    output_landmarks=output_analysis.landmarks[i] if out_valid[i] else None,
                )
            except InvalidInput:  # a face at the frame edge: nothing to measure
                continue
            if maps is not None:
                colour[i], edges[i] = maps.score.colour, maps.score.edges
                score = maps.score.total
                if len(worst) < WORST_ARTIFACT_FRAMES or score > worst[-1][0]:
                    worst.append((score, i, image.artifact_crop(frame, target_frame, maps)))
                    worst.sort(key=lambda w: (-w[0], w[1]))
                    del worst[WORST_ARTIFACT_FRAMES:]
            if progress is not None and (i + 1) % 50 == 0:
                progress(i + 1, len(fmap))
    if progress is not None:
        progress(len(fmap), len(fmap))
    return ArtifactReport(colour, edges, fmap, correspondence, [(i, crop) for _, i, crop in worst])


@dataclass(frozen=True, eq=False)
class OutputEvaluation:
    """`output` command: a rendered output's sync and image quality against the real target footage.

    Attributes:
        output, target: the two videos, measured.
        artifacts: foreign colour and edges per frame (None when not measured).
        job: the render job's own report (`job_confidence`), when the job was given.
    """

    output: VideoMeasures
    target: VideoMeasures
    artifacts: ArtifactReport | None = None
    job: dict | None = None
    artifacts_skipped: str | None = None  # why the artifact measure did not run, when it was asked for

    def relative(self) -> dict:
        out, tgt = self.output, self.target
        lag = None
        if out.sync is not None and tgt.sync is not None:
            lag = out.sync.lag_frames - tgt.sync.lag_frames
        return {
            "mouth_sharpness_ratio": image.ratio(_nanmean(out.sharpness), _nanmean(tgt.sharpness)),
            "seam_energy_ratio": image.ratio(_nanmean(out.seam), _nanmean(tgt.seam)),
            "flicker_silent_ratio": image.ratio(out.flicker.mean_abs_diff, tgt.flicker.mean_abs_diff),
            "mouth_opening_spread_ratio": image.ratio(out.opening_spread()["std"], tgt.opening_spread()["std"]),
            "lag_minus_target_lag_frames": lag,
        }

    def as_dict(self) -> dict:
        out = {
            "kind": "output",
            "output": self.output.as_dict(),
            "target": self.target.as_dict(),
            "relative": self.relative(),
        }
        if self.artifacts is not None:
            out["artifacts"] = self.artifacts.as_dict()
        if self.artifacts_skipped is not None:
            out["artifacts_skipped"] = self.artifacts_skipped
        if self.job is not None:
            out["job"] = self.job
        return out


def render_job_report(job_id: str, *, environ: dict[str, str] | None = None) -> tuple[dict, np.ndarray | None]:
    """A finished render job's `job_confidence` and its retiming map (None when the job did not re-time: output
    frame i then shows target frame i), from the stack the environment names.

    Raises:
        InvalidInput: not a finished render job, or the stack cannot be reached. Unavailable / CallFailed: the
            orchestrator is down or refused.
    """
    import grpc

    from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
    from evaluation.resynth import _connection, _rpc_error

    connection = _connection(environ)
    try:
        job = connection.orchestrator.GetJob(pb.GetJobRequest(job_id=job_id)).job
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from exc
    if job.kind != pb.JOB_KIND_RENDER or job.state != pb.JOB_STATE_SUCCEEDED:
        raise InvalidInput(f"job {job_id} is not a finished render job ({pb.JobState.Name(job.state)})")
    frame_map = None
    retiming = [s for s in job.stages if s.stage == pb.STAGE_RETIMING]
    if job.render_result.retimed and retiming and "retiming_map" in retiming[0].outputs:
        ref = retiming[0].outputs["retiming_map"]
        frame_map, _ = connection.store.get_array(ref.key, bucket=ref.bucket or None, expected_sha256=ref.sha256)
    return job_confidence(job), frame_map


def job_confidence(job) -> dict:
    """What a render job (orchestrator.v1.Job) says about its mouth: the shares of frames synthesized, faded and
    showing the target's own mouth, the frames kept for low confidence, and its worst frames."""
    result = job.render_result
    total = result.frames_synthesized + result.frames_faded + result.frames_passthrough
    share = (lambda count: count / total) if total else (lambda count: math.nan)
    return {
        "job_id": job.id,
        "frames": total,
        "synthesized_share": share(result.frames_synthesized),
        "faded_share": share(result.frames_faded),
        "passthrough_share": share(result.frames_passthrough),
        "low_confidence_frames": result.frames_low_confidence,
        "worst_frames": [
            {"frame": w.frame, "confidence": w.confidence, "blend": w.blend, "reason": w.reason, "value": w.value}
            for w in result.worst_frames
        ],
    }


def evaluate_output(
    output: str | os.PathLike,
    target: str | os.PathLike,
    *,
    audio: str | os.PathLike | None = None,
    detector: LandmarkDetector | None = None,
    max_lag: int = DEFAULT_MAX_LAG,
    strip_frames: int = STRIP_FRAMES,
    progress: bool = True,
    artifacts: bool = True,
    frame_map: np.ndarray | None = None,
    job: dict | None = None,
) -> OutputEvaluation:
    """Sync and image metrics of a rendered output and of the real target footage it was rendered on.

    The target is measured the same way with its own audio: its lag is the reference for the output's, its
    mouth sharpness, seam energy and silent flicker the denominators of the ratios (a target without audio
    gives no reference lag and no flicker reference). With `artifacts`, every output frame is compared with the
    target frame it shows (`measure_artifacts`: frame i with frame i, or by `frame_map`); `job` (`job_confidence`)
    is reported as it is.

    Raises:
        InvalidInput: the two videos differ in resolution; see `measure_video` for the rest.
    """
    output, target = _existing(output, "output video"), _existing(target, "target video")
    a, b = probe_video(output), probe_video(target)  # refuse mismatched geometry before minutes of analysis
    if (a.width, a.height) != (b.width, b.height):
        raise InvalidInput(f"output is {a.width}x{a.height} but the target is {b.width}x{b.height}")
    detector = detector or LandmarkDetector()
    out = measure_video(
        output, audio=audio, detector=detector, max_lag=max_lag, strip_frames=strip_frames, progress=progress
    )
    tgt = measure_video(
        target, detector=detector, max_lag=max_lag, strip_frames=strip_frames, progress=progress, audio_optional=True
    )
    report_artifacts, skipped = None, None
    n, m = out.analysis.frame_count, tgt.analysis.frame_count
    if artifacts and frame_map is None and abs(n - m) > 1:
        skipped = (
            f"the output has {n} frames and the target {m}: output frame i does not show target frame i (a re-timed "
            "render, or audio longer than the target); give the render job (--job) to compare the frames it shows"
        )
    elif artifacts:
        report_artifacts = measure_artifacts(
            output,
            target,
            out.analysis,
            tgt.analysis,
            frame_map=frame_map,
            progress=StderrProgress(f"{output.name} artifacts") if progress else None,
        )
    return OutputEvaluation(out, tgt, report_artifacts, job, skipped)


@dataclass(frozen=True, eq=False)
class ShapeReport:
    """`shape` command: mouth-shape accuracy of a speaker model and the baselines on a held-out clip."""

    evaluation: ShapeEvaluation
    clip: Path
    train_videos: tuple[Path, ...]
    model: dict | None
    seconds: float

    def as_dict(self) -> dict:
        return {
            "kind": "shape",
            "clip": str(self.clip),
            "train_videos": [str(p) for p in self.train_videos],
            "model": self.model,
            **self.evaluation.as_dict(),
            "wall_seconds": self.seconds,
        }


def evaluate_shape(
    clip: str | os.PathLike,
    *,
    model: SpeakerModel | None,
    train_videos: Sequence[str | os.PathLike] = (),
    detector: LandmarkDetector | None = None,
    window_rows: int = 20,
    progress: bool = True,
) -> ShapeReport:
    """Analyse the held-out clip and the training videos, then `shape.evaluate_mouth_shapes`.

    Raises:
        NotFound: a missing file; InvalidInput / NoFace: see `evaluate_mouth_shapes`.
    """
    started = time.monotonic()
    clip = _existing(clip, "held-out clip")
    trains = tuple(_existing(p, "training video") for p in train_videos)
    if clip.resolve() in {p.resolve() for p in trains}:
        raise InvalidInput(f"the held-out clip {clip.name} is also a training video")
    detector = detector or LandmarkDetector()

    def analyse(path: Path):
        return analyse_clip(path, detector, progress=StderrProgress(f"{path.name} face") if progress else None)

    held_out = analyse(clip)
    train_clips = [analyse(p) for p in trains]
    evaluation = evaluate_mouth_shapes(
        held_out,
        model=model,
        train_clips=train_clips,
        window_rows=window_rows,
        progress=say if progress else None,
    )
    card = None
    if model is not None:
        card = {"speaker": model.speaker, "version": model.version, "delay_steps": model.delay}
        card["card_metrics"] = model.card.get("metrics")
        card["train_clip_ids"] = model.card.get("dataset", {}).get("train_clip_ids")
    return ShapeReport(evaluation, clip, trains, card, time.monotonic() - started)


# ---------------------------------------------------------------------------------------------------------
# reports

Evaluation = SyncEvaluation | OutputEvaluation | ShapeReport


def _sync_highlights(name: str, measures: VideoMeasures) -> list[tuple[str, object]]:
    if measures.sync is None:
        return [(f"{name} sync", measures.sync_error)]
    s = measures.sync
    return [
        (f"{name} lag (frames, > 0 = video behind audio)", s.lag_frames),
        (f"{name} lag (ms)", s.lag_ms),
        (f"{name} peak correlation", s.peak_correlation),
        (f"{name} confidence (peak - median)", s.confidence),
    ]


def _opening_figure(measures: VideoMeasures, title: str) -> report.Figure:
    times = measures.analysis.timestamps
    secondary = {"speech energy (dB)": measures.envelope} if measures.envelope is not None else None
    png = report.plot_series(
        times, {"mouth opening": measures.opening}, ylabel="inner-lip opening", title=title, secondary=secondary
    )
    return title, png


def report_content(
    evaluation: Evaluation, *, timings: dict[str, float] | None = None
) -> tuple[str, dict, list[report.Figure], list[tuple[str, object]]]:
    """(title, JSON data, figures, headline numbers) of an evaluation's report."""
    own = getattr(evaluation, "report_content", None)  # evaluations in their own modules (resynth)
    if own is not None:
        title, data, figures, highlights = own()
        if timings:
            data["stage_seconds"] = dict(timings)
            figures.append(("time per stage", report.plot_stage_times(timings)))
        return title, data, figures, highlights
    data = evaluation.as_dict()
    figures: list[report.Figure] = []
    highlights: list[tuple[str, object]] = []
    if isinstance(evaluation, SyncEvaluation):
        v = evaluation.video
        title = f"Audio-visual sync: {v.path.name}"
        highlights += _sync_highlights("video", v)
        figures.append(_opening_figure(v, f"{v.path.name}: mouth opening and speech energy"))
        figures.append(("cross-correlation", report.plot_cross_correlation({v.path.name: v.sync})))
        if v.strip:
            figures.append(("frames", report.strip_image({"video": v.strip})))
    elif isinstance(evaluation, OutputEvaluation):
        out, tgt = evaluation.output, evaluation.target
        title = f"Output evaluation: {out.path.name} on {tgt.path.name}"
        relative = evaluation.relative()
        highlights += _sync_highlights("output", out) + _sync_highlights("target (own audio)", tgt)
        highlights += [
            ("output lag - target lag (frames)", relative["lag_minus_target_lag_frames"]),
            ("mouth sharpness, output / target", relative["mouth_sharpness_ratio"]),
            ("seam energy, output / target", relative["seam_energy_ratio"]),
            ("flicker in silence, output / target", relative["flicker_silent_ratio"]),
            ("mouth-opening spread, output / target", relative["mouth_opening_spread_ratio"]),
        ]
        if evaluation.artifacts is not None:
            data_artifacts = evaluation.artifacts.as_dict()
            highlights += [
                ("artifacts p95 (foreign colour + edges)", data_artifacts["p95"]),
                ("artifacts max", data_artifacts["max"]),
                (f"frames flagged (> {evaluation.artifacts.flag:g})", len(data_artifacts["flagged_frames"])),
            ]
        if evaluation.artifacts_skipped is not None:
            highlights += [("artifacts", f"not measured: {evaluation.artifacts_skipped}")]
        if evaluation.job is not None:
            j = evaluation.job
            highlights += [
                (
                    "job: share synthesized / faded / target's own mouth",
                    [j["synthesized_share"], j["faded_share"], j["passthrough_share"]],
                ),
                ("job: frames kept for low confidence", j["low_confidence_frames"]),
            ]
            highlights += [
                (f"job: worst frame #{w['frame']}", f"{w['reason']} {w['value']:.3g}, confidence {w['confidence']:.2f}")
                for w in j["worst_frames"][:5]
            ]
        figures.append(_opening_figure(out, f"output {out.path.name}: mouth opening and speech energy"))
        figures.append(_opening_figure(tgt, f"target {tgt.path.name}: mouth opening and its own speech energy"))
        curves = {f"output {out.path.name}": out.sync, f"target {tgt.path.name}": tgt.sync}
        curves = {k: c for k, c in curves.items() if c is not None}
        if curves:
            figures.append(
                ("cross-correlation (output, and the target with its own audio)", report.plot_cross_correlation(curves))
            )
        if out.strip or tgt.strip:
            figures.append(
                (
                    "frames: target (top) and output (bottom)",
                    report.strip_image({"target": tgt.strip, "output": out.strip}),
                )
            )
        if evaluation.artifacts is not None:
            a = evaluation.artifacts
            times = np.arange(len(a.total)) / out.fps
            figures.append(
                (
                    f"artifact score per frame (foreign colour + edges against the target frame; {a.correspondence})",
                    report.plot_series(
                        times,
                        {"foreign colour": a.colour, "foreign edges": a.edges, "flag": np.full(len(times), a.flag)},
                        ylabel="score",
                        title="artifacts",
                    ),
                )
            )
            if a.worst:
                figures.append(
                    (
                        "worst frames: target | output | foreign colour (red) and edges (yellow)",
                        report.strip_image({"frame": a.worst}, columns=1),
                    )
                )
    else:
        e = evaluation.evaluation
        title = f"Mouth-shape accuracy on {evaluation.clip.name}"
        for name, scores in e.scores.items():
            highlights += [
                (f"{name}: landmark error / mouth width", scores.landmark_error),
                (f"{name}: mouth-opening correlation", scores.opening_correlation),
            ]
        series = {"real": e.truth_opening, **{name: o for name, o in e.openings.items()}}
        png = report.plot_series(
            e.times, series, ylabel="inner-lip opening (canonical units)", title="mouth opening: predicted vs real"
        )
        figures.append(("mouth opening over time, predicted vs real (100 Hz rows with a face)", png))
    if timings:
        data["stage_seconds"] = dict(timings)
        figures.append(("time per stage", report.plot_stage_times(timings)))
    return title, data, figures, highlights


def write_reports(
    evaluation: Evaluation,
    *,
    json_path: str | os.PathLike | None = None,
    html_path: str | os.PathLike | None = None,
    timings: dict[str, float] | None = None,
) -> dict:
    """Write the JSON and / or HTML report of an evaluation; returns the JSON data (cleaned)."""
    title, data, figures, highlights = report_content(evaluation, timings=timings)
    if json_path is not None:
        report.write_json(data, json_path)
    if html_path is not None:
        report.write_html(report.render_html(title, data, figures, highlights=highlights), html_path)
    return report.clean(data)
