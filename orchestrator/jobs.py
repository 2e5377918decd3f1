"""Jobs of the orchestrator: each runs `Pipeline` in a thread; its manifest (the Job message) lives in the store.

The manifest is rewritten at every state or stage change, so `GetJob` answers after a restart too, and a job
found PENDING or RUNNING at start-up is run again: its stages' outputs have deterministic keys, so what was
finished is reused rather than recomputed.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from audio2video.lipsync.v1 import lipsync_pb2
from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.pipeline import Pipeline, Reporter, StageFailed, stage_name
from services.runtime.blobstore import BlobStore
from services.runtime.errors import A2VError, Cancelled, InvalidInput, NotFound
from services.runtime.protos import load_result, store_result

log = logging.getLogger(__name__)
TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}
STATUS_CODES = {code.name: code.value[0] for code in grpc.StatusCode}


def now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def manifest_key(job_id: str) -> str:
    return f"jobs/{job_id}/job.json"


class JobRun:
    """One job in this process: its Job message, the events watchers read, and its stop switch."""

    def __init__(self, job: pb.Job) -> None:
        self.job = job
        self.events: list[pb.JobEvent] = []
        self.changed = threading.Condition()
        self.stop = threading.Event()
        self.started = time.monotonic()

    def ended(self) -> bool:
        """Whether the change to a terminal state was emitted (the job's state is set a moment before: its
        manifest is saved in between, and a watcher must not stop there without that last event)."""
        last = self.events[-1] if self.events else None
        return last is not None and last.HasField("state_changed") and last.state_changed.current in TERMINAL

    def emit(self, **event) -> None:
        with self.changed:
            self.events.append(
                pb.JobEvent(
                    job_id=self.job.id,
                    sequence=len(self.events) + 1,
                    time=now(),
                    job_fraction_done=self.job.fraction_done,
                    job_eta_seconds=self.job.eta_seconds,
                    **event,
                )
            )
            self.changed.notify_all()


# Share of a job's work per stage (first-run costs on 2 cores; cached stages pass through quickly).
RENDER_WEIGHTS = {
    pb.STAGE_AUDIO: 0.02,
    pb.STAGE_FACE: 0.15,
    pb.STAGE_LIPSYNC: 0.02,
    pb.STAGE_RETIMING: 0.01,
    pb.STAGE_TEXTURE: 0.35,
    pb.STAGE_TEETH: 0.10,
    pb.STAGE_COMPOSITE: 0.30,
    pb.STAGE_FINALIZE: 0.05,
}
TRAIN_WEIGHTS = {pb.STAGE_AUDIO: 0.05, pb.STAGE_FACE: 0.25, pb.STAGE_DATASET: 0.05, pb.STAGE_TRAIN: 0.65}
MIN_FRACTION_FOR_ETA = 0.02


def expected_stages(job: pb.Job) -> dict[int, float]:
    """The job's stages in pipeline order with their weights (teeth skipped when off)."""
    if job.kind == pb.JOB_KIND_TRAIN_SPEAKER:
        return dict(TRAIN_WEIGHTS)
    options = job.render.options
    weights = dict(RENDER_WEIGHTS)
    if options.HasField("teeth") and not options.teeth:
        weights[pb.STAGE_TEETH] = 0.0
    return weights


class JobReporter(Reporter):
    """Turns the pipeline's reports into the job's stage statuses, fraction done, ETAs and events."""

    def __init__(self, manager: JobManager, run: JobRun) -> None:
        self.manager, self.run = manager, run
        self.lock = threading.RLock()
        self.clock: dict[int, float] = {}
        self.calls: dict[int, int] = {}
        job = run.job
        self.weights = expected_stages(job)
        del job.stages[:]  # a resumed job reports every stage afresh (finished ones come back cached)
        job.eta_seconds = -1.0
        for stage, weight in self.weights.items():
            state = pb.STAGE_STATE_PENDING if weight > 0 else pb.STAGE_STATE_SKIPPED
            job.stages.add(stage=stage, state=state, eta_seconds=-1.0)

    def status(self, stage: int) -> pb.StageStatus:
        """The stage's status, marked RUNNING (and announced) the first time the stage reports."""
        with self.lock:
            status = next((s for s in self.run.job.stages if s.stage == stage), None)
            if status is None:
                status = self.run.job.stages.add(stage=stage, state=pb.STAGE_STATE_PENDING, eta_seconds=-1.0)
            if status.state == pb.STAGE_STATE_PENDING:
                status.state = pb.STAGE_STATE_RUNNING
                status.started.CopyFrom(now())
                self.clock[stage] = time.monotonic()
                self.run.emit(stage_changed=status)
                self.manager._save(self.run)
            return status

    def progress(self, stage: int, done: int, total: int, unit: str) -> None:
        with self.lock:
            status = self.status(stage)
            status.done, status.total, status.unit = done, total, unit
            elapsed = time.monotonic() - self.clock.get(stage, time.monotonic())
            status.eta_seconds = elapsed * (total - done) / done if done and total else -1.0
            self._update_job()
            self.run.emit(
                progress={
                    "stage": stage_name(stage),
                    "done": done,
                    "total": total,
                    "unit": unit,
                    "eta_seconds": status.eta_seconds,
                    "time": now(),
                }
            )

    def call_finished(self, stage: int, seconds: float, *, cached: bool | None) -> None:
        with self.lock:
            status = self.status(stage)
            status.attempts += 1
            status.busy_seconds += seconds
            if cached is not None:
                status.cached_calls += int(cached)
                self.calls[stage] = self.calls.get(stage, 0) + 1

    def retrying(self, stage: int, attempt: int, error: str) -> None:
        with self.lock:
            status = self.status(stage)
            status.attempts += 1
            status.error = error
            self.run.emit(stage_changed=status)
            self.manager._save(self.run)

    def output(self, stage: int, name: str, ref) -> None:
        with self.lock:
            self.status(stage).outputs[name].CopyFrom(ref)

    def stage_finished(self, stage: int) -> None:
        with self.lock:
            status = self.status(stage)
            status.state = pb.STAGE_STATE_SUCCEEDED
            status.finished.CopyFrom(now())
            status.eta_seconds = 0.0
            calls = self.calls.get(stage, 0)
            status.cached = calls > 0 and status.cached_calls == calls
            self._update_job()
            self.run.emit(stage_changed=status)
            self.manager._save(self.run)

    def _update_job(self) -> None:
        job = self.run.job
        total = sum(self.weights.values()) or 1.0
        done = 0.0
        for status in job.stages:
            weight = self.weights.get(status.stage, 0.0)
            if status.state == pb.STAGE_STATE_SUCCEEDED:
                done += weight
            elif status.total:
                done += weight * min(1.0, status.done / status.total)
        job.fraction_done = min(0.99, done / total)
        elapsed = time.monotonic() - self.run.started
        fraction = job.fraction_done
        job.eta_seconds = elapsed * (1 - fraction) / fraction if fraction >= MIN_FRACTION_FOR_ETA else -1.0
        job.updated.CopyFrom(now())


class JobManager:
    """Submits, runs, watches and cancels jobs over one pipeline and one object store."""

    def __init__(self, store: BlobStore, pipeline: Pipeline) -> None:
        self.store = store
        self.pipeline = pipeline
        self.runs: dict[str, JobRun] = {}
        self.lock = threading.Lock()

    # -- submitting ----------------------------------------------------------------------------

    def submit(
        self, *, render: pb.RenderJobSpec | None = None, train: pb.TrainJobSpec | None = None, client_token: str = ""
    ) -> pb.Job:
        """Start a job (or return the one an earlier call with the same client_token started)."""
        self._check(render, train)
        job_id = hashlib.sha256(client_token.encode()).hexdigest()[:20] if client_token else uuid.uuid4().hex[:20]
        with self.lock:
            existing = self.runs.get(job_id) or load_result(self.store, manifest_key(job_id), pb.Job)
            if existing is not None:
                return existing.job if isinstance(existing, JobRun) else existing
            job = pb.Job(id=job_id, state=pb.JOB_STATE_PENDING, created=now(), client_token=client_token)
            if render is not None:
                job.kind = pb.JOB_KIND_RENDER
                job.render.CopyFrom(render)
            else:
                job.kind = pb.JOB_KIND_TRAIN_SPEAKER
                job.train.CopyFrom(train)
            run = self.runs[job_id] = JobRun(job)
        self._save(run)
        threading.Thread(target=self._run, args=(run,), name=f"job-{job_id}", daemon=True).start()
        return job

    def _check(self, render: pb.RenderJobSpec | None, train: pb.TrainJobSpec | None) -> None:
        """Refuse a job whose inputs are missing before anything starts (NOT_FOUND / INVALID_ARGUMENT)."""
        if render is not None:
            for name, ref in (("audio", render.audio), ("target video", render.target_video)):
                if not ref.key:
                    raise InvalidInput(f"the job's {name} reference has no key")
                self.store.stat(ref.key, bucket=ref.bucket or None)
            if not render.model.speaker:
                raise InvalidInput("the job names no speaker model")
        elif train is not None:
            if not train.speaker or not train.videos:
                raise InvalidInput("a training job needs a speaker name and at least one video")
            for video in train.videos:
                self.store.stat(video.video.key, bucket=video.video.bucket or None)
        else:
            raise InvalidInput("no job spec given")

    def resume(self) -> int:
        """Run again every job whose manifest says it had not finished (the orchestrator restarted)."""
        resumed = 0
        for key in list(self.store.list_keys("jobs/")):
            if not key.endswith("/job.json"):
                continue
            job = load_result(self.store, key, pb.Job)
            if job is None or job.state in TERMINAL or job.id in self.runs:
                continue
            run = self.runs[job.id] = JobRun(job)
            threading.Thread(target=self._run, args=(run,), name=f"job-{job.id}", daemon=True).start()
            resumed += 1
        if resumed:
            log.info("resumed %d unfinished jobs", resumed)
        return resumed

    # -- running -------------------------------------------------------------------------------

    def _run(self, run: JobRun) -> None:
        job = run.job
        reporter = JobReporter(self, run)
        self._set_state(run, pb.JOB_STATE_RUNNING)
        job.started.CopyFrom(now())
        try:
            if job.kind == pb.JOB_KIND_RENDER:
                result = self.pipeline.render(job.render, reporter=reporter, stop=run.stop)
                job.render_result.CopyFrom(result)
                job.result.CopyFrom(result.video)
            else:
                card = self.pipeline.train(job.train, reporter=reporter, stop=run.stop)
                version = int(card["prefix"].rstrip("/").rsplit("/", 1)[1])
                job.train_result.model.CopyFrom(
                    lipsync_pb2.ModelVersion(speaker=job.train.speaker, version=version, prefix=card["prefix"])
                )
            job.fraction_done, job.eta_seconds = 1.0, 0.0
            self._set_state(run, pb.JOB_STATE_SUCCEEDED)
        except Cancelled as exc:
            self._finish_stages(run, pb.STAGE_STATE_CANCELLED)
            self._set_state(run, pb.JOB_STATE_CANCELLED, str(exc))
        except Exception as exc:  # every failure ends the job with a reason; never a hang
            if run.stop.is_set():
                self._finish_stages(run, pb.STAGE_STATE_CANCELLED)
                self._set_state(run, pb.JOB_STATE_CANCELLED, "cancelled")
                return
            code, reason = self._describe(exc)
            job.failure_code = STATUS_CODES.get(code, 13)
            job.failure_reason = reason
            if isinstance(exc, StageFailed):
                job.failed_stage = exc.stage
                status = reporter.status(exc.stage)
                status.error = reason
            self._finish_stages(run, pb.STAGE_STATE_FAILED)
            self._set_state(run, pb.JOB_STATE_FAILED, reason)
            log.warning("job %s failed: %s", job.id, reason)

    @staticmethod
    def _describe(exc: Exception) -> tuple[str, str]:
        if isinstance(exc, A2VError):
            return exc.status, str(exc)
        if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
            return exc.code().name, f"{exc.code().name}: {exc.details()}"
        log.exception("job failed unexpectedly")
        return "INTERNAL", f"internal error: {type(exc).__name__}"

    def _finish_stages(self, run: JobRun, state: int) -> None:
        for status in run.job.stages:
            if status.state == pb.STAGE_STATE_RUNNING:
                status.state = state
                status.finished.CopyFrom(now())

    def _set_state(self, run: JobRun, state: int, reason: str = "") -> None:
        job = run.job
        previous, job.state = job.state, state
        job.updated.CopyFrom(now())
        if state in TERMINAL:
            job.finished.CopyFrom(now())
        self._save(run)
        run.emit(state_changed=pb.JobStateChange(previous=previous, current=state, reason=reason, result=job.result))

    def _save(self, run: JobRun) -> None:
        blob = store_result(self.store, manifest_key(run.job.id), run.job)
        run.job.manifest.bucket, run.job.manifest.key = blob.bucket, blob.key

    # -- reading -------------------------------------------------------------------------------

    def get(self, job_id: str) -> pb.Job:
        run = self.runs.get(job_id)
        if run is not None:
            return run.job
        if not job_id or not job_id.isalnum():
            raise InvalidInput(f"job id {job_id!r} is not valid")
        job = load_result(self.store, manifest_key(job_id), pb.Job)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    def watch(self, job_id: str, after_sequence: int, is_active) -> Iterator[pb.JobEvent]:
        """A snapshot, then the events after `after_sequence` (0: after the snapshot), until the job ends.

        A watcher whose stream dropped asks again with the last sequence it saw and misses nothing. Events are
        numbered by this process: a sequence above the job's last one was seen from an orchestrator that has
        restarted since, so that watcher goes on from the snapshot (whose sequence tells it so).
        """
        job = self.get(job_id)
        run = self.runs.get(job_id)
        sequence = len(run.events) if run else 0
        yield pb.JobEvent(
            job_id=job_id, sequence=sequence, time=now(), job_fraction_done=job.fraction_done, snapshot=job
        )
        if run is None:
            return
        position = after_sequence if 0 < after_sequence <= sequence else sequence
        while is_active():
            with run.changed:
                if len(run.events) <= position and not run.ended():
                    run.changed.wait(timeout=1.0)
                fresh = run.events[position:]
            yield from fresh
            position += len(fresh)
            if run.ended() and position >= len(run.events):
                return

    def cancel(self, job_id: str) -> pb.Job:
        job = self.get(job_id)
        run = self.runs.get(job_id)
        if run is not None and job.state not in TERMINAL:
            job.cancel_requested = True
            run.stop.set()
            self._save(run)
        return job

    def list(self, *, state: int = 0, kind: int = 0, speaker: str = "", page_size: int = 50) -> list[pb.Job]:
        jobs = []
        for key in self.store.list_keys("jobs/"):
            if key.endswith("/job.json"):
                job_id = key.split("/")[1]
                job = self.runs[job_id].job if job_id in self.runs else load_result(self.store, key, pb.Job)
                if job is None or (state and job.state != state) or (kind and job.kind != kind):
                    continue
                if speaker and speaker not in (job.render.model.speaker, job.train.speaker):
                    continue
                jobs.append(job)
        jobs.sort(key=lambda j: j.created.ToNanoseconds(), reverse=True)
        return jobs[: max(1, min(page_size or 50, 500))]
