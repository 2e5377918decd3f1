"""Jobs of the orchestrator: a bounded queue, a fixed set of runners that run `Pipeline`, manifests in the store.

The manifest (the Job message) is written before the job exists anywhere else and rewritten at every state or
stage change, so `GetJob` answers after a restart too, and a job found QUEUED, PENDING or RUNNING at start-up is
run again: its stages' outputs have deterministic keys, so what was finished is reused rather than recomputed.
Submissions beyond the queue's bound are refused (RESOURCE_EXHAUSTED); a render identical to one running now
waits for it in the queue and then reuses its work instead of doing it a second time alongside.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace

from audio2video.lipsync.v1 import lipsync_pb2
from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator import metrics
from orchestrator.leases import Leases
from orchestrator.pipeline import Pipeline, Reporter, StageFailed, job_span, retry_delay, stage_name
from services.runtime.blobstore import BlobStore
from services.runtime.config import Env
from services.runtime.errors import (
    A2VError,
    Cancelled,
    FailedPrecondition,
    IntegrityError,
    InvalidInput,
    NotFound,
    TooLarge,
    Unavailable,
)
from services.runtime.keys import validate_key
from services.runtime.protos import load_result, store_result
from services.runtime.telemetry import correlation

log = logging.getLogger(__name__)
TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}
STATUS_CODES = {code.name: code.value[0] for code in grpc.StatusCode}
RESERVED_NAMES = {"job.json", "lease.json", "cancel.json"}
"""Objects of a job's folder that its output may not replace."""


@dataclass(frozen=True)
class JobLimits:
    """How much the orchestrator takes on.

    `max_running` jobs run at once (each with its chunks in flight) and up to `max_queued` more wait, in order;
    a submission beyond that is refused with RESOURCE_EXHAUSTED, so memory and threads stay bounded whatever
    clients send. `keep_finished` ended jobs stay in memory for their watchers (older ones are read from the
    store). The store may be down for `outage_seconds` before a manifest write fails the job.
    """

    max_running: int = 4
    max_queued: int = 100
    keep_finished: int = 200
    outage_seconds: float = 120.0
    lease_seconds: float = 30.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> JobLimits:
        """A2V_MAX_RUNNING_JOBS (4), A2V_MAX_QUEUED_JOBS (100), A2V_OUTAGE_SECONDS (120), A2V_JOB_LEASE_SECONDS (30:
        how long a replica's hold on a job lasts unless renewed; a replica that died loses its jobs after it)."""
        env = Env(environ)
        limits = cls(
            max_running=env.get_int("A2V_MAX_RUNNING_JOBS", cls.max_running, minimum=1, maximum=256),
            max_queued=env.get_int("A2V_MAX_QUEUED_JOBS", cls.max_queued, minimum=0, maximum=100_000),
            outage_seconds=env.get_float("A2V_OUTAGE_SECONDS", cls.outage_seconds, minimum=0.0, maximum=86400.0),
            lease_seconds=env.get_float("A2V_JOB_LEASE_SECONDS", cls.lease_seconds, minimum=1.0, maximum=3600.0),
        )
        env.check()
        return limits


def now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def manifest_key(job_id: str) -> str:
    return f"jobs/{job_id}/job.json"


def cancel_key(job_id: str) -> str:
    """A cancellation asked of a replica that does not run the job: the one that does sees it and stops."""
    return f"jobs/{job_id}/cancel.json"


def output_key(job_id: str, requested: str) -> str:
    """Where a render job may write its video: `requested` inside the job's own folder (empty stays empty: the
    finalize stage derives a key from the inputs). A job can thus never replace another job's objects, its own
    manifest, or anything outside `jobs/<id>/`."""
    if not requested:
        return ""
    folder = f"jobs/{job_id}/"
    key = validate_key(requested if requested.startswith(folder) else folder + requested)
    if key.removeprefix(folder) in RESERVED_NAMES:
        raise InvalidInput(f"output key {requested!r} would replace the job's own {key.removeprefix(folder)}")
    return key


def fingerprint(job: pb.Job) -> str:
    """What makes two renders the same work (inputs, model, options but the output key); '' for training jobs,
    which each make a new model version."""
    if job.kind != pb.JOB_KIND_RENDER:
        return ""
    spec = pb.RenderJobSpec()
    spec.CopyFrom(job.render)
    spec.options.output_key = ""
    for ref in (spec.audio, spec.target_video):
        ref.ClearField("size_bytes")
        ref.ClearField("content_type")
    return hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()


class JobRun:
    """One job in this process: its Job message, the events watchers read, and its stop switch."""

    def __init__(self, job: pb.Job) -> None:
        self.job = job
        self.events: list[pb.JobEvent] = []
        self.changed = threading.Condition()
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.fingerprint = fingerprint(job)
        self.lost = False  # another replica took the job over: nothing more is recorded from here

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
TRAIN_WEIGHTS = {
    pb.STAGE_AUDIO: 0.05,
    pb.STAGE_FACE: 0.25,
    pb.STAGE_DATASET: 0.05,
    pb.STAGE_TRAIN: 0.63,
    pb.STAGE_EXPORT: 0.02,
}
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
    """Submits, queues, runs, watches and cancels jobs over one pipeline and one object store."""

    def __init__(
        self, store: BlobStore, pipeline: Pipeline, limits: JobLimits | None = None, leases: Leases | None = None
    ) -> None:
        self.store = store
        self.pipeline = pipeline
        self.limits = limits or JobLimits()
        self.leases = leases  # None: the only replica (no lease objects)
        self.keeper: threading.Thread | None = None
        self.ended: set[str] = set()  # ids of jobs found terminal in the store: never taken up again
        self.runs: dict[str, JobRun] = {}
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        self.queue: deque[JobRun] = deque()
        self.running: dict[str, JobRun] = {}
        self.admitting = 0  # submissions between the queue check and their manifest write
        self.runners: list[threading.Thread] = []
        self.finished: OrderedDict[str, None] = OrderedDict()  # ended runs still in memory, oldest first
        self.succeeded: OrderedDict[str, None] = OrderedDict()  # fingerprints of renders that succeeded lately

    # -- submitting ----------------------------------------------------------------------------

    def submit(
        self,
        *,
        render: pb.RenderJobSpec | None = None,
        train: pb.TrainJobSpec | None = None,
        client_token: str = "",
        owner: str = "",
    ) -> pb.Job:
        """Queue a job (or return the one an earlier call with the same client_token made).

        `owner` is the submitting caller's name, recorded in the job (empty without a callers file). A client token
        is the owner's own: the same token from two callers makes two jobs. The manifest is written first: a job
        the store did not take (UNAVAILABLE) is not registered at all, so an outage cannot leave a job behind that
        exists only in this process. A full queue refuses the job with RESOURCE_EXHAUSTED.
        """
        self._check(render, train)
        job_id = uuid.uuid4().hex[:20]
        if client_token:  # without an owner, the id of before (jobs submitted with a token are found again)
            idempotency = f"{owner}\n{client_token}" if owner else client_token
            job_id = hashlib.sha256(idempotency.encode()).hexdigest()[:20]
        with self.lock:
            if job_id in self.runs:
                return self.runs[job_id].job
        if client_token:
            stored = self._load(job_id)
            if stored is not None:
                return stored
        job = pb.Job(id=job_id, state=pb.JOB_STATE_QUEUED, created=now(), client_token=client_token, owner=owner)
        if render is not None:
            job.kind = pb.JOB_KIND_RENDER
            job.render.CopyFrom(render)
            job.render.options.output_key = output_key(job_id, render.options.output_key)
        else:
            job.kind = pb.JOB_KIND_TRAIN_SPEAKER
            job.train.CopyFrom(train)
        self._admit(job, lambda: self._write(job))
        return job

    def retry(self, job_id: str) -> pb.Job:
        """Queue a FAILED or CANCELLED job again under its id; its finished stages come back from the store."""
        job = self.get(job_id)
        if job.state not in (pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
            state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
            raise FailedPrecondition(f"job {job_id} is {state}: only failed or cancelled jobs are run again")
        again = pb.Job()
        again.CopyFrom(job)
        for name in ("failure_reason", "failure_code", "failed_stage", "cancel_requested", "finished", "result"):
            again.ClearField(name)
        again.ClearField("outcome")
        again.state, again.retries = pb.JOB_STATE_QUEUED, job.retries + 1
        again.updated.CopyFrom(now())
        if self.store.exists(cancel_key(job_id)):
            self.store.delete(cancel_key(job_id))
        self._admit(again, lambda: self._write(again), previous=job.state)
        return again

    def _admit(self, job: pb.Job, write, previous: int = 0) -> None:
        """Reserve a place in the queue, write the manifest, then queue the job (its run)."""
        with self.lock:
            if len(self.queue) + self.admitting >= self.limits.max_queued:
                raise TooLarge(
                    f"the orchestrator's queue is full ({self.limits.max_queued} jobs waiting): try again later"
                )
            if job.id in self.running or any(run.job.id == job.id for run in self.queue):
                raise FailedPrecondition(f"job {job.id} is queued or running already")
            self.admitting += 1
        try:
            write()
            if self.leases is not None and not self.leases.acquire(job.id):
                raise FailedPrecondition(f"job {job.id} is run by another orchestrator replica")
        finally:
            with self.lock:
                self.admitting -= 1
        with self.lock:
            run = self.runs.get(job.id)
            if run is None:
                run = self.runs[job.id] = JobRun(job)
            else:  # run again (RetryJob): same events, a new stop switch
                run.job, run.stop, run.started = job, threading.Event(), time.monotonic()
            self.finished.pop(job.id, None)
            self._enqueue(run)
        if previous:
            run.emit(state_changed=pb.JobStateChange(previous=previous, current=job.state, reason="retried"))

    def _enqueue(self, run: JobRun) -> None:
        """Put `run` at the end of the queue and make sure runners are there to take it (lock held)."""
        self.queue.append(run)
        self._renumber()
        self._keep()
        while len(self.runners) < self.limits.max_running:
            runner = threading.Thread(target=self._runner, name=f"job-runner-{len(self.runners) + 1}", daemon=True)
            self.runners.append(runner)
            runner.start()
        self.wakeup.notify_all()

    def _renumber(self) -> None:
        for position, queued in enumerate(self.queue, start=1):
            queued.job.queue_position = position

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
        """Queue again every unfinished job that no replica holds (this orchestrator restarted, or another replica
        died: its leases expired), oldest first; with leases, only those whose lease this replica took.

        A manifest that cannot be read is skipped with an error in the log: one bad record must not keep the
        orchestrator from starting (a crash loop) or the other jobs from running.
        """
        found = []
        for key in list(self.store.list_keys("jobs/")):
            if not key.endswith("/job.json") or key.split("/")[1] in self.runs or key.split("/")[1] in self.ended:
                continue
            try:
                job = load_result(self.store, key, pb.Job)
            except (IntegrityError, InvalidInput) as exc:
                log.error("skipping the job record %s: %s", key, exc)
                self.ended.add(key.split("/")[1])
                continue
            if job is not None and job.state in TERMINAL:
                self.ended.add(job.id)
            if job is None or job.state in TERMINAL or job.id in self.runs:
                continue
            if self.leases is not None:
                holder = self.leases.holder(job.id)
                if holder is not None and holder.owner != self.leases.owner and not holder.expired():
                    continue
                if not self.leases.acquire(job.id):
                    continue
                job = self._load(job.id) or job  # as its last owner left it
            found.append(job)
        found.sort(key=lambda j: j.created.ToNanoseconds())
        with self.lock:
            self._keep()  # from the start: a replica with no job of its own still takes over a dead one's
            for job in found:
                job.state = pb.JOB_STATE_QUEUED
                run = self.runs[job.id] = JobRun(job)
                if self.store.exists(cancel_key(job.id)):  # asked while nobody ran it
                    job.cancel_requested = True
                    run.stop.set()
                self._enqueue(run)  # past the bound if need be: accepted jobs are never dropped
        if found:
            log.info("took up %d unfinished jobs", len(found))
        return len(found)

    def _keep(self) -> None:
        """Start the thread that keeps this replica's leases (once; lock held or at start)."""
        if self.leases is not None and self.keeper is None:
            self.keeper = threading.Thread(target=self._keep_leases, name="job-leases", daemon=True)
            self.keeper.start()

    def _keep_leases(self) -> None:
        """Renew the leases of this replica's jobs, stop those another replica took, act on cancellations asked of
        other replicas, and take up jobs whose owner died; every third of the lease time."""
        while True:
            time.sleep(self.limits.lease_seconds / 3)
            with self.lock:
                mine = [run for run in self.runs.values() if run.job.state not in TERMINAL and not run.lost]
            for run in mine:
                try:
                    if not self.leases.renew(run.job.id):
                        self._lose(run)
                    elif not run.stop.is_set() and self.store.exists(cancel_key(run.job.id)):
                        log.info("job %s: cancellation asked through another replica", run.job.id)
                        self.cancel(run.job.id)
                except A2VError as exc:  # the store is down: the lease lasts a while yet
                    log.warning("job %s: lease not renewed (%s)", run.job.id, exc)
            try:
                self.resume()
            except A2VError as exc:
                log.warning("looking for jobs to take up failed: %s", exc)

    def _lose(self, run: JobRun) -> None:
        """Another replica holds the job now: stop it here and record nothing more of it."""
        run.lost = True
        run.stop.set()
        with self.lock:
            if run in self.queue:
                self.queue.remove(run)
                self._renumber()
            self.runs.pop(run.job.id, None)

    # -- running -------------------------------------------------------------------------------

    def _runner(self) -> None:
        """One of `max_running` threads: take the next job that may start, run it, repeat."""
        while True:
            with self.lock:
                run = self._next()
                while run is None:
                    self.wakeup.wait()
                    run = self._next()
                self.queue.remove(run)
                self._renumber()
                self.running[run.job.id] = run
                run.job.queue_position, run.job.waiting_for_job = 0, ""
            try:
                self._run(run)
            except Exception:  # a runner must outlive any one job
                log.exception("job %s ended unexpectedly", run.job.id)
            finally:
                with self.lock:
                    self.running.pop(run.job.id, None)
                    if run.fingerprint and run.job.state == pb.JOB_STATE_SUCCEEDED:
                        self.succeeded[run.fingerprint] = None
                        while len(self.succeeded) > self.limits.keep_finished:
                            self.succeeded.popitem(last=False)
                    self._forget(run)
                    self.wakeup.notify_all()
                if self.leases is not None and run.job.state in TERMINAL and not run.lost:
                    try:
                        self.leases.release(run.job.id)
                    except A2VError as exc:
                        log.warning("job %s: lease not released (%s); it expires by itself", run.job.id, exc)

    def _next(self) -> JobRun | None:
        """The first queued job that may start (lock held): one identical to a running render waits for it, unless
        such a render succeeded before (then every stage is in the store and copies may run side by side)."""
        busy = {run.fingerprint: run.job.id for run in self.running.values() if run.fingerprint}
        for run in self.queue:
            twin = busy.get(run.fingerprint)
            if twin is None or run.fingerprint in self.succeeded:
                return run
            if run.job.waiting_for_job != twin:
                run.job.waiting_for_job = twin
                log.info("job %s waits for the identical job %s and will reuse its work", run.job.id, twin)
        return None

    def _forget(self, run: JobRun) -> None:
        """Keep the last `keep_finished` ended runs in memory (lock held); older ones are read from the store."""
        if run.job.state not in TERMINAL:
            return
        self.finished[run.job.id] = None
        while len(self.finished) > self.limits.keep_finished:
            old, _ = self.finished.popitem(last=False)
            self.runs.pop(old, None)

    def _run(self, run: JobRun) -> None:
        """Run a job as one trace ("job render" / "job train", its stage calls and chunks inside), with its id in
        every log line and call; then count it (jobs ended, wall time, a render's real-time factor)."""
        job = run.job
        kind = "render" if job.kind == pb.JOB_KIND_RENDER else "train"
        speaker = job.render.model.speaker if job.kind == pb.JOB_KIND_RENDER else job.train.speaker
        started = time.monotonic()
        with (
            correlation(job.id, job.id),
            job_span(f"job {kind}", kind=kind, speaker=speaker, retries=job.retries) as span,
        ):
            log.info("job %s (%s) started", job.id, kind)
            self._run_job(run)
            state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
            log.info("job %s (%s) %s", job.id, kind, state)
            span.set_attribute("a2v.state", state)
            if job.state == pb.JOB_STATE_FAILED:
                span.set_status(trace.Status(trace.StatusCode.ERROR, job.failure_reason))
        seconds = time.monotonic() - started
        metrics.JOBS_FINISHED.labels(kind, state).inc()
        metrics.JOB_SECONDS.labels(kind, state).observe(seconds)
        if (
            job.state == pb.JOB_STATE_SUCCEEDED
            and job.kind == pb.JOB_KIND_RENDER
            and job.render_result.duration_seconds
        ):
            metrics.REAL_TIME_FACTOR.observe(seconds / job.render_result.duration_seconds)

    def _run_job(self, run: JobRun) -> None:
        job = run.job
        if run.stop.is_set():  # cancelled while queued
            self._set_state(run, pb.JOB_STATE_CANCELLED, "cancelled before it started")
            return
        reporter = JobReporter(self, run)
        job.started.CopyFrom(now())
        self._set_state(run, pb.JOB_STATE_RUNNING)
        try:
            if job.kind == pb.JOB_KIND_RENDER:
                result = self.pipeline.render(job.render, reporter=reporter, stop=run.stop)
                job.render_result.CopyFrom(result)
                job.result.CopyFrom(result.video)
            else:
                card = self.pipeline.train(job.train, reporter=reporter, stop=run.stop)
                version = int(card["prefix"].rstrip("/").rsplit("/", 1)[1])
                model = lipsync_pb2.ModelVersion(speaker=job.train.speaker, version=version, prefix=card["prefix"])
                if "serving" in card:  # how TF Serving has it: AVAILABLE, or why not (serving_note)
                    model.state, model.serving_note = card["serving"].state, card["serving"].serving_note
                    reporter.status(pb.STAGE_EXPORT).error = model.serving_note
                job.train_result.model.CopyFrom(model)
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
        """Record a change of state: the manifest first (riding out a store outage), then the event."""
        job = run.job
        previous, job.state = job.state, state
        job.updated.CopyFrom(now())
        if state in TERMINAL:
            job.finished.CopyFrom(now())
        self._save(run, patient=True)
        run.emit(state_changed=pb.JobStateChange(previous=previous, current=state, reason=reason, result=job.result))

    def _save(self, run: JobRun, *, patient: bool = False) -> None:
        """Rewrite the job's manifest. A store that is down does not fail the job: a progress save is skipped (the
        next one writes the whole job), a change of state is tried again with backoff for `outage_seconds`."""
        if run.lost:
            return
        deadline = time.monotonic() + (self.limits.outage_seconds if patient else 0.0)
        attempt = 0
        while True:
            attempt += 1
            try:
                self._write(run.job)
                return
            except Unavailable as exc:
                if time.monotonic() >= deadline:
                    log.error("job %s: manifest not saved (%s)", run.job.id, exc)
                    return
                log.warning("job %s: object store unavailable, saving again shortly (%s)", run.job.id, exc)
                time.sleep(min(retry_delay(attempt), max(0.0, deadline - time.monotonic())))

    def _write(self, job: pb.Job) -> None:
        blob = store_result(self.store, manifest_key(job.id), job)
        job.manifest.bucket, job.manifest.key = blob.bucket, blob.key

    def _load(self, job_id: str) -> pb.Job | None:
        try:
            return load_result(self.store, manifest_key(job_id), pb.Job)
        except (IntegrityError, InvalidInput) as exc:
            log.error("the job record of %s cannot be read: %s", job_id, exc)
            return None

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
            if job.state not in TERMINAL:  # another replica runs it: follow its manifest
                yield from self._watch_stored(job, is_active)
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

    def _watch_stored(self, job: pb.Job, is_active, poll_seconds: float = 1.0) -> Iterator[pb.JobEvent]:
        """Events of a job another replica runs, from its manifest as that replica saves it: each stage's progress
        and state, and the job's changes of state, numbered from 1 on this stream; until it ends."""
        sequence = 0

        def event(**fields) -> pb.JobEvent:
            nonlocal sequence
            sequence += 1
            return pb.JobEvent(
                job_id=job.id,
                sequence=sequence,
                time=now(),
                job_fraction_done=current.fraction_done,
                job_eta_seconds=current.eta_seconds,
                **fields,
            )

        last = job
        while is_active() and last.state not in TERMINAL:
            time.sleep(poll_seconds)
            current = self._load(job.id)
            if current is None:
                continue
            before = {status.stage: status for status in last.stages}
            for status in current.stages:
                old = before.get(status.stage)
                if old is None or (old.state, old.done, old.total) != (status.state, status.done, status.total):
                    name = stage_name(status.stage)
                    yield event(
                        progress={"stage": name, "done": status.done, "total": status.total, "unit": status.unit}
                    )
            if current.state != last.state:
                yield event(
                    state_changed=pb.JobStateChange(
                        previous=last.state, current=current.state, reason=current.failure_reason, result=current.result
                    )
                )
            last = current

    def cancel(self, job_id: str) -> pb.Job:
        """Ask a job to stop: a queued one leaves the queue at once, a running one stops within seconds. A job
        another replica runs is asked through the store; that replica stops it within a third of a lease."""
        job = self.get(job_id)
        run = self.runs.get(job_id)
        if run is None and job.state not in TERMINAL and self.leases is not None:
            self.store.put_bytes(cancel_key(job_id), b"{}", content_type="application/json")
            job.cancel_requested = True
            return job
        if run is None or job.state in TERMINAL:
            return job
        job.cancel_requested = True
        run.stop.set()
        with self.lock:
            queued = run in self.queue
            if queued:
                self.queue.remove(run)
                self._renumber()
                job.queue_position, job.waiting_for_job = 0, ""
        if queued:
            self._set_state(run, pb.JOB_STATE_CANCELLED, "cancelled before it started")
            with self.lock:
                self._forget(run)
            if self.leases is not None:
                self.leases.release(job_id)
        else:
            self._save(run)
        return job

    def list(
        self, *, state: int = 0, kind: int = 0, speaker: str = "", page_size: int = 50, owner: str | None = None
    ) -> list[pb.Job]:
        """The newest jobs first, at most `page_size`; only `owner`'s when it is given (None: everyone's)."""
        jobs = []
        for key in self.store.list_keys("jobs/"):
            if key.endswith("/job.json"):
                job_id = key.split("/")[1]
                job = self.runs[job_id].job if job_id in self.runs else self._load(job_id)
                if job is None or (state and job.state != state) or (kind and job.kind != kind):
                    continue
                if owner is not None and job.owner != owner:
                    continue
                if speaker and speaker not in (job.render.model.speaker, job.train.speaker):
                    continue
                jobs.append(job)
        jobs.sort(key=lambda j: j.created.ToNanoseconds(), reverse=True)
        return jobs[: max(1, min(page_size or 50, 500))]
