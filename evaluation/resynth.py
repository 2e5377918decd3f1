"""Resynthesis: how accurate are the lips? Render a held-out clip's own speech and compare with its real mouth.

For a speaker, a held-out clip of that speaker (real video of the speech, never trained on) and a target
video, the clip's audio is rendered onto the target through the real stack (the orchestrator's job API, as
`a2v run` does, without re-timing by default), or an existing render is given. The rendered mouth is then
measured with the lip meter (`lips`) against the clip's real mouth at the same audio times:

- rows: "render" (landmarks measured on the output video) and, when the job is known, "model" (the lipsync
  stage's predicted mouth shapes, `mouth_shapes`, before texture and compositing): where the two differ, the
  image stages lose (or add) accuracy;
- the audio-to-mouth lag of both videos (`sync`), the loudness floor and the mean-shape baselines (`lips`):
  the held-out clip's own mean mouth and, when the job is known, the speaker model's training mean mouth.

Frames are compared on the held-out clip's frame times (the render is linearly resampled onto them when the
target's frame rate differs), over the frames the render covers. This is the I/O layer: files and the stack
in, a frozen `ResynthEvaluation` out (its `as_dict()` is the JSON report, `report_content()` the HTML's).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evaluation import lips, report
from evaluation.evaluate import STRIP_FRAMES, VideoMeasures, _existing, _frame_pass, measure_video, say
from evaluation.sync import DEFAULT_MAX_LAG
from services.audio.core import decode_audio, encode_wav
from services.face.core import LandmarkDetector
from services.runtime.errors import CallFailed, InvalidInput, NotFound, Unavailable

MIN_SECONDS = 2.0  # shorter audio leaves too few frames for the +-15 frame lag search and the sync estimate


# ---------------------------------------------------------------------------------------------------------
# rendering through the stack


@dataclass(frozen=True, eq=False)
class RenderJob:
    """A finished render job and what the report takes from it.

    Attributes:
        job_id, speaker, model_version, retimed: the job.
        stage_seconds: busy seconds per stage (compute time).
        mouth_shapes: float32 [N, 20, 2] the lipsync stage's predicted shapes (canonical units), or None.
        shape_times: float64 [N] time of each shape (output frame start), seconds.
        train_clip_ids: the model's training clips (from its model card; empty when unknown).
        mean_mouth: float32 [20, 2] the model's training mean mouth (its PCA mean, canonical units), or None.
    """

    job_id: str
    speaker: str
    model_version: int
    retimed: bool
    stage_seconds: dict[str, float]
    mouth_shapes: np.ndarray | None
    shape_times: np.ndarray | None
    train_clip_ids: tuple[str, ...] = ()
    mean_mouth: np.ndarray | None = None

    def as_dict(self) -> dict:
        return {
            "job_id": self.job_id,
            "speaker": self.speaker,
            "model_version": self.model_version,
            "retimed": self.retimed,
            "stage_seconds": self.stage_seconds,
            "mouth_shapes_frames": None if self.mouth_shapes is None else len(self.mouth_shapes),
            "train_clip_ids": list(self.train_clip_ids),
        }


def _rpc_error(exc) -> Exception:
    from services.runtime.clients import rpc_failure

    code, detail = rpc_failure(exc)
    if code.name == "UNAVAILABLE":
        return Unavailable(f"the orchestrator is unavailable ({detail}); is the stack up (`a2v up`)?")
    return CallFailed(code.name, f"orchestrator: {code.name}: {detail}")


def _connection(environ):
    from client.jobs import CommandError, Connection

    try:
        return Connection(environ)
    except CommandError as exc:
        raise InvalidInput(f"cannot reach the stack: {exc}") from exc


def job_details(connection, job) -> RenderJob:
    """The report's view of a finished render job: stage times, the predicted shapes, the model's clips."""
    from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
    from services.lipsync.versions import extra_key

    stage_seconds = {pb.Stage.Name(s.stage).removeprefix("STAGE_").lower(): s.busy_seconds for s in job.stages}
    shapes = times = None
    lipsync = [s for s in job.stages if s.stage == pb.STAGE_LIPSYNC]
    if lipsync and "mouth_shapes" in lipsync[0].outputs:
        ref = lipsync[0].outputs["mouth_shapes"]
        shapes, info = connection.store.get_array(ref.key, bucket=ref.bucket or None, expected_sha256=ref.sha256)
        if shapes.ndim != 3 or shapes.shape[1:] != (lips.MOUTH_POINTS, 2) or not info.fps > 0:
            raise InvalidInput(f"job {job.id}: mouth shapes {shapes.shape} at {info.fps} fps are not [N, 20, 2]")
        times = info.start_seconds + np.arange(len(shapes)) / info.fps
    speaker, version = job.render.model.speaker, int(job.render_result.model_version)
    clips: tuple[str, ...] = ()
    try:
        card = json.loads(connection.store.get_bytes(extra_key(speaker, version, "model_card.json")))
        clips = tuple(card.get("dataset", {}).get("train_clip_ids", []))
    except (NotFound, ValueError):
        pass
    mean_mouth = None
    try:
        with np.load(io.BytesIO(connection.store.get_bytes(extra_key(speaker, version, "pca.npz")))) as pca:
            mean_mouth = np.asarray(pca["mean"], np.float32).reshape(lips.MOUTH_POINTS, 2)
    except (NotFound, ValueError, KeyError, OSError):
        pass
    return RenderJob(
        job_id=job.id,
        speaker=speaker,
        model_version=version,
        retimed=bool(job.render_result.retimed),
        stage_seconds=stage_seconds,
        mouth_shapes=shapes,
        shape_times=times,
        train_clip_ids=clips,
        mean_mouth=mean_mouth,
    )


def render_through_stack(
    speaker: str,
    audio: Path,
    target: Path,
    out: Path,
    *,
    retiming: bool = False,
    environ: dict[str, str] | None = None,
    progress: bool = True,
) -> RenderJob:
    """Render `audio` onto `target` with the speaker's model through the orchestrator; download it to `out`.

    Raises:
        Unavailable: the orchestrator cannot be reached. CallFailed: it refused the job, or the job failed
            (status = the job's failure code). InvalidInput: the stack's configuration is incomplete.
    """
    import grpc

    from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
    from client.jobs import job_outcome

    connection = _connection(environ)
    stream = sys.stderr if progress else open(os.devnull, "w")  # noqa: SIM115 - closed below
    try:
        job = connection.render(speaker, audio, target, pb.JobOptions(retiming=retiming))
        if progress:
            say(f"render job {job.id}: {audio.name} onto {target.name} with {speaker}")
        job = connection.follow(job.id, out=stream)
        if reason := job_outcome(job):
            code = next((c.name for c in grpc.StatusCode if c.value[0] == job.failure_code), "INTERNAL")
            raise CallFailed(code if job.failure_code else "ABORTED", reason)
        connection.download(job, out)
        return job_details(connection, job)
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from exc
    finally:
        if stream is not sys.stderr:
            stream.close()


def existing_job(job_id: str, *, environ: dict[str, str] | None = None, download_to: Path | None = None) -> RenderJob:
    """A finished render job's details (and its output, when `download_to` is given)."""
    import grpc

    from audio2video.orchestrator.v1 import orchestrator_pb2 as pb

    connection = _connection(environ)
    try:
        job = connection.orchestrator.GetJob(pb.GetJobRequest(job_id=job_id)).job
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from exc
    if job.kind != pb.JOB_KIND_RENDER or job.state != pb.JOB_STATE_SUCCEEDED:
        raise InvalidInput(f"job {job_id} is not a finished render job ({pb.JobState.Name(job.state)})")
    if download_to is not None:
        connection.download(job, download_to)
    return job_details(connection, job)


# ---------------------------------------------------------------------------------------------------------
# the comparison


@dataclass(frozen=True, eq=False)
class ResynthEvaluation:
    """`resynth` command: a render of a held-out clip's speech against the clip's real mouth.

    Attributes:
        clip: the held-out clip, measured (its own audio; sync = its audio-to-mouth lag).
        rendered: the render, measured with its own audio track.
        target: the target video rendered onto (None when unknown).
        render_job: the job (None for a given render without --job).
        times: float64 [G] the held-out clip's frame times compared (those the render covers).
        real_opening: float64 [G]; openings: row name -> float64 [G] (resampled onto `times`).
        rows: row name ("render", "model") -> the meter's comparison with the real mouth.
        baselines: loudness floor and mean shape on the compared frames.
        strip: (real, rendered) thumbnails at the same times.
        audio_seconds: the held-out audio rendered (None = all of it).
        notes: caveats.
        seconds: wall time.
    """

    clip: VideoMeasures
    rendered: VideoMeasures
    target: Path | None
    render_job: RenderJob | None
    times: np.ndarray
    real_opening: np.ndarray
    openings: dict[str, np.ndarray]
    rows: dict[str, lips.MouthComparison]
    baselines: lips.Baselines
    strip: tuple[list, list] = field(default_factory=lambda: ([], []))
    audio_seconds: float | None = None
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    max_lag: int = DEFAULT_MAX_LAG

    def av_lags(self) -> dict:
        real, rendered = self.clip.sync, self.rendered.sync
        return {
            "real_frames": None if real is None else real.lag_frames,
            "rendered_frames": None if rendered is None else rendered.lag_frames,
            "rendered_minus_real_frames": None
            if real is None or rendered is None
            else (rendered.lag_frames - real.lag_frames),
            "convention": "positive = mouth behind audio (sync)",
        }

    def as_dict(self) -> dict:
        return {
            "kind": "resynth",
            "clip": self.clip.as_dict(image_metrics=False),
            "rendered": self.rendered.as_dict(image_metrics=False),
            "target": None if self.target is None else str(self.target),
            "job": None if self.render_job is None else self.render_job.as_dict(),
            "audio_seconds": self.audio_seconds,
            "compared_frames": int(self.times.size),
            "fps": self.clip.fps,
            "max_lag_frames": self.max_lag,
            "rows": {name: row.as_dict() for name, row in self.rows.items()},
            "baselines": self.baselines.as_dict(),
            "audio_to_mouth_lag": self.av_lags(),
            "opening_definition": "mean inner-lip gap (61-67, 62-66, 63-65) / mouth width (48-54)",
            "landmark_definition": "points 48-67 per frame centred, corner line horizontal, scaled to mouth width 1",
            "notes": list(self.notes),
            "wall_seconds": self.seconds,
        }

    def summary(self) -> str:
        """One line: the render row beside the baselines and the model row."""
        render = self.rows["render"]
        o, lm = render.opening, render.landmarks
        base = self.baselines
        parts = [
            f"{self.clip.path.name} resynthesised: opening r {_num(o.r_lag0)} at lag 0, best {_num(o.best_r)} at "
            f"{_lag(o.best_lag_frames)} frames, amplitude x{_num(o.amplitude_ratio, 2)}",
            f"lips inner {_num(lm.inner)} / outer {_num(lm.outer)} mouth widths "
            f"(clip's mean shape {_num(base.mean_shape.inner)} / {_num(base.mean_shape.outer)}"
            + (
                f", speaker's {_num(base.speaker_mean_shape.inner)} / {_num(base.speaker_mean_shape.outer)})"
                if base.speaker_mean_shape is not None
                else ")"
            ),
            f"loudness floor r {_num(base.loudness.r_lag0) if base.loudness else 'n/a'}",
        ]
        if "model" in self.rows:
            m = self.rows["model"].opening
            parts.append(f"model r {_num(m.r_lag0)} best {_lag(m.best_lag_frames)}, x{_num(m.amplitude_ratio, 2)}")
        av = self.av_lags()
        parts.append(f"audio-to-mouth lag real {_lag(av['real_frames'])}, rendered {_lag(av['rendered_frames'])}")
        return "; ".join(parts)

    def report_content(self) -> tuple[str, dict, list[report.Figure], list[tuple[str, object]]]:
        """(title, JSON data, figures, headline numbers) for `evaluate.write_reports`."""
        data = self.as_dict()
        title = f"Resynthesis: {self.clip.path.name}" + (f" on {self.target.name}" if self.target else "")
        highlights: list[tuple[str, object]] = []
        for name, row in self.rows.items():
            o = row.opening
            highlights += [
                (f"{name}: opening r at lag 0", o.r_lag0),
                (
                    f"{name}: best lag (frames, > 0 = behind the real mouth) / its r",
                    f"{_lag(o.best_lag_frames)} / {_num(o.best_r)}",
                ),
                (f"{name}: opening amplitude / mean, x real", f"{_num(o.amplitude_ratio)} / {_num(o.mean_ratio)}"),
            ]
            if row.landmarks is not None:
                highlights.append(
                    (
                        f"{name}: lip error inner / outer (mouth widths)",
                        f"{_num(row.landmarks.inner)} / {_num(row.landmarks.outer)}",
                    )
                )
        b = self.baselines
        highlights += [
            ("loudness floor: r at lag 0 (audio loudness vs real opening)", b.loudness.r_lag0 if b.loudness else None),
            (
                "mean shape (the clip's own): lip error inner / outer",
                f"{_num(b.mean_shape.inner)} / {_num(b.mean_shape.outer)}",
            ),
        ]
        if b.speaker_mean_shape is not None:
            highlights.append(
                (
                    "mean shape (the speaker model's training mean): lip error inner / outer",
                    f"{_num(b.speaker_mean_shape.inner)} / {_num(b.speaker_mean_shape.outer)}",
                )
            )
        av = self.av_lags()
        highlights += [
            ("audio-to-mouth lag, real clip (frames, > 0 = mouth behind)", av["real_frames"]),
            ("audio-to-mouth lag, render (frames)", av["rendered_frames"]),
        ]
        figures: list[report.Figure] = []
        series = {"real": self.real_opening, **self.openings}
        figures.append(
            (
                "mouth opening over time: real clip, render (and the model's predicted shapes)",
                report.plot_series(
                    self.times - self.times[0] if self.times.size else self.times,
                    series,
                    ylabel="inner-lip gap / mouth width",
                    title=f"{self.clip.path.name}: mouth opening, real vs resynthesised",
                ),
            )
        )
        curves = {name: (row.opening.lags, row.opening.correlation) for name, row in self.rows.items()}
        if b.loudness is not None:
            curves["loudness (floor)"] = (b.loudness.lags, b.loudness.correlation)
        figures.append(
            (
                "correlation with the real opening against lag",
                report.plot_lag_curves(
                    curves, xlabel="lag (frames; > 0 = behind the real mouth)", title="opening vs the real opening"
                ),
            )
        )
        real_strip, rendered_strip = self.strip
        if real_strip or rendered_strip:
            figures.append(
                (
                    "frames at the same times: real clip (top) and render (bottom)",
                    report.strip_image({"real": real_strip, "render": rendered_strip}),
                )
            )
        if self.render_job is not None and self.render_job.stage_seconds:
            data["stage_seconds"] = dict(self.render_job.stage_seconds)
            figures.append(("render job: busy seconds per stage", report.plot_stage_times(data["stage_seconds"])))
        return title, data, figures, highlights


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _lag(value) -> str:
    return "n/a" if value is None else f"{value:+d}"


def _mouths(measures: VideoMeasures) -> np.ndarray:
    """float64 [F, 20, 2] normalised mouths of a measured video (NaN where no face)."""
    mouths = lips.mouth_points(measures.analysis.landmarks).copy()
    mouths[~np.asarray(measures.analysis.face_valid, bool)] = np.nan
    return lips.normalise_mouths(mouths)


def _strip(
    clip: VideoMeasures, rendered: VideoMeasures, times: np.ndarray, both: np.ndarray, count: int
) -> tuple[list, list]:
    candidates = np.flatnonzero(both)
    if count <= 0 or candidates.size == 0:
        return [], []
    picks = np.linspace(0, candidates.size - 1, min(count, candidates.size) + 2)[1:-1]
    real_index = sorted({int(candidates[int(round(p))]) for p in picks})
    rendered_times = rendered.analysis.timestamps
    rendered_index = [int(np.argmin(np.abs(rendered_times - times[i]))) for i in real_index]
    _, _, real_thumbs = _frame_pass(clip.path, clip.analysis, image_metrics=False, strip=real_index, progress=None)
    _, _, rendered_thumbs = _frame_pass(
        rendered.path, rendered.analysis, image_metrics=False, strip=rendered_index, progress=None
    )
    return real_thumbs, rendered_thumbs


def compare_resynthesis(
    clip: VideoMeasures,
    rendered: VideoMeasures,
    *,
    render_job: RenderJob | None = None,
    max_lag: int = DEFAULT_MAX_LAG,
    strip_frames: int = STRIP_FRAMES,
) -> dict:
    """The rows, baselines and curves of a measured render against the measured held-out clip.

    Returns:
        keyword arguments of `ResynthEvaluation` (all but clip, rendered, target, job and timing).

    Raises:
        InvalidInput: too few frames in common (the render must cover at least 2 L + 1 face frames of the clip).
    """
    fps = clip.fps
    clip_times = np.asarray(clip.analysis.timestamps, np.float64)
    rendered_times = np.asarray(rendered.analysis.timestamps, np.float64)
    end = rendered_times[-1] + 0.5 / rendered.fps
    covered = clip_times <= end
    times = clip_times[covered]
    real = _mouths(clip)[covered]
    render = lips.resample(_mouths(rendered), rendered_times, times, tolerance=0.25 / max(fps, rendered.fps))
    rows = {"render": lips.compare_mouths(render, real, fps=fps, max_lag=max_lag)}
    openings = {"render": lips.opening(render)}
    if render_job is not None and render_job.mouth_shapes is not None:
        predicted = lips.resample(
            lips.normalise_mouths(render_job.mouth_shapes),
            render_job.shape_times,
            times,
            tolerance=0.25 / max(fps, rendered.fps),
        )
        rows["model"] = lips.compare_mouths(predicted, real, fps=fps, max_lag=max_lag)
        openings["model"] = lips.opening(predicted)
    samples = clip.audio.samples if clip.audio is not None else None
    speaker_mean = None if render_job is None else render_job.mean_mouth
    base = lips.baselines(real, samples, times, fps=fps, max_lag=max_lag, speaker_mean=speaker_mean)
    both = np.isfinite(real).all(axis=(1, 2)) & np.isfinite(render).all(axis=(1, 2))
    return {
        "times": times,
        "real_opening": lips.opening(real),
        "openings": openings,
        "rows": rows,
        "baselines": base,
        "strip": _strip(clip, rendered, times, both, strip_frames),
        "max_lag": max_lag,
    }


def held_out_audio(clip: Path, folder: Path, seconds: float | None) -> Path:
    """The held-out clip's audio (its first `seconds`, or all) as a WAV in `folder`, for the render job.

    Raises:
        InvalidInput: the clip has no audio stream.
    """
    audio = decode_audio(clip)
    if seconds is not None:
        count = min(len(audio.samples), round(seconds * audio.sample_rate))
        audio = dataclasses.replace(audio, samples=audio.samples[:count], duration_seconds=count / audio.sample_rate)
    path = folder / f"{clip.stem}-speech.wav"
    path.write_bytes(encode_wav(audio))
    return path


def evaluate_resynth(
    clip: str | os.PathLike,
    *,
    speaker: str | None = None,
    target: str | os.PathLike | None = None,
    rendered: str | os.PathLike | None = None,
    out_video: str | os.PathLike | None = None,
    job_id: str | None = None,
    retiming: bool = False,
    seconds: float | None = None,
    environ: dict[str, str] | None = None,
    detector: LandmarkDetector | None = None,
    max_lag: int = DEFAULT_MAX_LAG,
    strip_frames: int = STRIP_FRAMES,
    progress: bool = True,
) -> ResynthEvaluation:
    """Render (or take) a resynthesis of a held-out clip's speech and measure its lips against the clip's.

    Args:
        clip: held-out video of the speaker, with its own speech.
        speaker: the speaker model (needed to render).
        target: the video to render onto (needed to render).
        rendered: an existing render of the clip's audio (from time 0): measured as it is, no stack needed.
        out_video: where the new render is written (needed to render).
        job_id: a finished render job to take the model row (and, without `rendered`, the video) from.
        retiming: render with head-motion re-timing (off by default: frames then follow the target's).
        seconds: render only the clip's first `seconds` of audio (>= 2); None = all of it.
        environ: the stack's environment (default: the local stack, as `a2v`).
        detector: a loaded landmark detector.
        max_lag: lag search range, frames.
        strip_frames: frame pairs in the report's strip.
        progress: progress on stderr.

    Raises:
        NotFound: a missing file. InvalidInput: missing arguments, no audio, too short. NoFace: no face.
        Unavailable / CallFailed: the stack is down, or the render job failed.
    """
    started = time.monotonic()
    clip = _existing(clip, "held-out clip")
    if seconds is not None and not (math.isfinite(seconds) and seconds >= MIN_SECONDS):
        raise InvalidInput(f"seconds must be >= {MIN_SECONDS:g}, got {seconds}")
    if max_lag < 1:
        raise InvalidInput(f"max_lag must be >= 1, got {max_lag}")
    if rendered is None and job_id is None:
        missing = [
            name for name, value in (("speaker", speaker), ("target", target), ("out_video", out_video)) if not value
        ]
        if missing:
            raise InvalidInput(f"rendering needs {', '.join(missing)} (or give an existing render)")
    if rendered is None and job_id is not None and out_video is None:
        raise InvalidInput("out_video is needed to download the job's render")
    target = _existing(target, "target video") if target is not None else None
    rendered = _existing(rendered, "rendered video") if rendered is not None else None
    job = None  # render first: a stack that is down fails here, before minutes of analysis
    if rendered is None:
        rendered = Path(out_video)
        if job_id is not None:
            job = existing_job(job_id, environ=environ, download_to=rendered)
        else:
            with tempfile.TemporaryDirectory(prefix="a2v-resynth-") as folder:
                speech = held_out_audio(clip, Path(folder), seconds)
                job = render_through_stack(
                    speaker, speech, target, rendered, retiming=retiming, environ=environ, progress=progress
                )
    elif job_id is not None:
        job = existing_job(job_id, environ=environ)
    detector = detector or LandmarkDetector()
    real = measure_video(
        clip, detector=detector, image_metrics=False, strip_frames=0, max_lag=max_lag, progress=progress
    )
    measured = measure_video(
        rendered, detector=detector, image_metrics=False, strip_frames=0, max_lag=max_lag, progress=progress
    )
    notes = []
    if job is not None and clip.stem in job.train_clip_ids:
        notes.append(f"{clip.stem} is among {job.speaker} v{job.model_version}'s training clips: not held out")
    if job is not None and job.retimed:
        notes.append("rendered with re-timing: the target's frames were re-timed (the mouth still follows the audio)")
    if abs(measured.fps - real.fps) > 1e-3:
        notes.append(f"the render ({measured.fps:g} fps) was resampled onto the clip's {real.fps:g} fps frames")
    parts = compare_resynthesis(real, measured, render_job=job, max_lag=max_lag, strip_frames=strip_frames)
    return ResynthEvaluation(
        clip=real,
        rendered=measured,
        target=target,
        render_job=job,
        audio_seconds=seconds,
        notes=tuple(notes),
        seconds=time.monotonic() - started,
        **parts,
    )
