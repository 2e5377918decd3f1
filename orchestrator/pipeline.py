"""The job itself: the stages of docs/DESIGN.md called in order over gRPC, independent work concurrently.

Both the orchestrator service and the command line drive jobs through `Pipeline`. Every stage output has a
deterministic key, so running a job again (or resuming one) reuses whatever the stages already finished.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from audio2video.audio.v1 import audio_pb2, audio_pb2_grpc
from audio2video.common.v1 import common_pb2
from audio2video.composite.v1 import composite_pb2, composite_pb2_grpc
from audio2video.face.v1 import face_pb2, face_pb2_grpc
from audio2video.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc
from audio2video.orchestrator.v1 import orchestrator_pb2
from audio2video.retiming.v1 import retiming_pb2, retiming_pb2_grpc
from audio2video.teeth.v1 import teeth_pb2, teeth_pb2_grpc
from audio2video.texture.v1 import texture_pb2, texture_pb2_grpc
from orchestrator import metrics
from orchestrator.trainers import LocalTrainer, Trainer, TrainSpec
from services.runtime.clients import create_channel, is_busy, retry_delay, rpc_failure
from services.runtime.config import Env, service_address
from services.runtime.errors import A2VError, CallFailed, Cancelled, FailedPrecondition, InvalidInput
from services.runtime.security import ClientSecurity
from services.runtime.telemetry import JOB_ID_ATTRIBUTE, current_job_id, submit_in_context

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)
Stage = orchestrator_pb2.Stage
Progress = Callable[[int, int, int, str], None]
"""progress(stage, done, total, unit)."""
T = TypeVar("T")
DEFAULT_CHUNK_FRAMES = 150
DEFAULT_PARALLEL_CHUNKS = 2
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_OUTAGE_SECONDS = 120.0
DEFAULT_BUSY_SECONDS = 600.0
DEFAULT_SERVE_WAIT_SECONDS = 120.0

# Without named validation clips, no whole clip is held out: with the 2-4 clips a user has, that would take a
# third or half of the speech away from training. The trainer then holds back the end of every clip instead
# (services/lipsync/trainer.py hold_back_tails), for early stopping and the output calibration.
DEFAULT_VALIDATION = face_pb2.ValidationSelection(validation_fraction=0.0)


@dataclass
class StageClients:
    """One stub per stage; channels come from the runtime's factory (deadlines, retries, round-robin)."""

    audio: audio_pb2_grpc.AudioServiceStub
    face: face_pb2_grpc.FaceServiceStub
    lipsync: lipsync_pb2_grpc.LipsyncServiceStub
    retiming: retiming_pb2_grpc.RetimingServiceStub
    texture: texture_pb2_grpc.TextureServiceStub
    teeth: teeth_pb2_grpc.TeethServiceStub
    composite: composite_pb2_grpc.CompositeServiceStub

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, timeout_seconds: float | None = None
    ) -> StageClients:
        """Stubs for the stages the environment names; a stage call's deadline is `timeout_seconds`, else
        A2V_STAGE_TIMEOUT_SECONDS (default an hour: one call, such as analysing 30 minutes of footage; a job has
        no deadline of its own)."""
        if timeout_seconds is None:
            env = Env(environ)
            timeout_seconds = env.get_float("A2V_STAGE_TIMEOUT_SECONDS", 3600.0, minimum=1.0, maximum=7 * 86400.0)
            env.check()
        security = ClientSecurity.from_env(environ)  # TLS and the orchestrator's token, when configured

        def stub(name: str, module, service: str):
            address = service_address(name, environ)
            channel = create_channel(
                address, [f"audio2video.{name}.v1.{service}"], timeout_seconds=timeout_seconds, security=security
            )
            # Connect to every replica now: the first chunks of the first job then spread over all of them
            # instead of all going to whichever replica answered the lazy first connection.
            grpc.channel_ready_future(channel)
            return getattr(module, f"{service}Stub")(channel)

        return cls(
            audio=stub("audio", audio_pb2_grpc, "AudioService"),
            face=stub("face", face_pb2_grpc, "FaceService"),
            lipsync=stub("lipsync", lipsync_pb2_grpc, "LipsyncService"),
            retiming=stub("retiming", retiming_pb2_grpc, "RetimingService"),
            texture=stub("texture", texture_pb2_grpc, "TextureService"),
            teeth=stub("teeth", teeth_pb2_grpc, "TeethService"),
            composite=stub("composite", composite_pb2_grpc, "CompositeService"),
        )


class Reporter:
    """What a running job tells its owner (the job manager, a progress line); the base ignores it all."""

    def progress(self, stage: int, done: int, total: int, unit: str) -> None:
        """Units of `stage` done out of `total` (0 = unknown)."""

    def call_finished(self, stage: int, seconds: float, *, cached: bool | None) -> None:
        """One call of `stage` returned after `seconds` (cached: answered from earlier work; None: a call
        with nothing to reuse, such as a probe)."""

    def retrying(self, stage: int, attempt: int, error: str) -> None:
        """Call `attempt` of `stage` failed with a retryable error; another follows."""

    def output(self, stage: int, name: str, ref: common_pb2.ObjectRef) -> None:
        """`stage` stored `ref` (deterministic keys: a re-run finds it again)."""

    def stage_finished(self, stage: int) -> None:
        """Every call of `stage` for this job is done."""


class ProgressReporter(Reporter):
    """A reporter that only forwards progress to a callback progress(stage, done, total, unit)."""

    def __init__(self, callback: Progress) -> None:
        self.callback = callback

    def progress(self, stage: int, done: int, total: int, unit: str) -> None:
        self.callback(stage, done, total, unit)


class SequentialProgress:
    """One stage's progress over inputs handled one after another, counted as one total (all videos' frames).

    A training job's face analysis reports every batch of frames of every video this way, instead of once per
    video: with 10 minutes of footage, one event per video left the job's watchers without news for minutes.
    """

    def __init__(self, reporter: Reporter, stage: int, totals: Iterable[int], unit: str) -> None:
        self.reporter, self.stage, self.unit = reporter, stage, unit
        self.totals = [max(1, int(total)) for total in totals]
        self.total = sum(self.totals)

    def part(self, index: int) -> Progress:
        """The progress callback of input `index`'s stream (its own done/total become shares of the whole)."""
        before = sum(self.totals[:index])

        def forward(_stage: int, done: int, total: int, _unit: str) -> None:
            share = min(1.0, done / total) if total > 0 else 0.0
            self.reporter.progress(self.stage, before + int(share * self.totals[index]), self.total, self.unit)

        return forward

    def finished(self, index: int) -> None:
        self.reporter.progress(self.stage, sum(self.totals[: index + 1]), self.total, self.unit)


@dataclass(frozen=True)
class RetryPolicy:
    """How long a stage call keeps being made again.

    UNAVAILABLE (a replica died, the object store is restarting) is retried for at least `max_attempts` calls
    and for `outage_seconds` after the first failure, so a store or stage that is back within that time costs a
    delay, not the job. RESOURCE_EXHAUSTED from a server at its bound of calls (`clients.is_busy`) is retried
    for `busy_seconds`; one for a request over a limit is final, as is every other error.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    outage_seconds: float = DEFAULT_OUTAGE_SECONDS
    busy_seconds: float = DEFAULT_BUSY_SECONDS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RetryPolicy:
        """A2V_OUTAGE_SECONDS (default 120) and A2V_BUSY_SECONDS (default 600)."""
        env = Env(environ)
        policy = cls(
            outage_seconds=env.get_float("A2V_OUTAGE_SECONDS", DEFAULT_OUTAGE_SECONDS, minimum=0.0, maximum=86400.0),
            busy_seconds=env.get_float("A2V_BUSY_SECONDS", DEFAULT_BUSY_SECONDS, minimum=0.0, maximum=86400.0),
        )
        env.check()
        return policy

    def with_attempts(self, max_attempts: int) -> RetryPolicy:
        """This policy with a job's own `max_attempts` (0 keeps the default)."""
        return dataclasses.replace(self, max_attempts=max_attempts or self.max_attempts)


class StageFailed(CallFailed):
    """A stage call failed for good (not retryable, or out of attempts); names the stage and the cause."""

    def __init__(self, stage: int, status: str, message: str) -> None:
        super().__init__(status, message)
        self.stage = stage


WORST_FRAMES = 10


def confidence_report(renders: Iterable[composite_pb2.RenderResult]) -> dict:
    """RenderJobResult fields from the chunks' renders: how many frames were synthesized, faded and passed through
    (and of those, kept for low confidence), and the job's frames of lowest confidence."""
    renders = list(renders)
    worst = sorted(
        (frame for render in renders for frame in render.lowest_confidence), key=lambda f: (f.confidence, f.frame)
    )
    return {
        "frames_synthesized": sum(r.frames_synthesized for r in renders),
        "frames_faded": sum(r.frames_faded for r in renders),
        "frames_passthrough": sum(r.frames_passthrough for r in renders),
        "frames_low_confidence": sum(r.frames_low_confidence for r in renders),
        "worst_frames": worst[:WORST_FRAMES],
    }


class ChunkSlots:
    """At most `count` chunk stage calls of a job at once (JobOptions.max_parallel_chunks); a composite waiting for a
    slot goes before waiting textures, so finished textures become video first."""

    def __init__(self, count: int) -> None:
        self._ready = threading.Condition()
        self._free = max(1, int(count))
        self._urgent = 0

    @contextmanager
    def hold(self, *, urgent: bool = False) -> Iterator[None]:
        """A slot for the duration of the block."""
        with self._ready:
            self._urgent += urgent
            try:
                self._ready.wait_for(lambda: self._free > 0 and (urgent or self._urgent == 0))
            finally:
                self._urgent -= urgent
            self._free -= 1
        try:
            yield
        finally:
            with self._ready:
                self._free += 1
                self._ready.notify_all()


def final_result(events: Iterable, stage: int, progress: Progress | None, stop: threading.Event | None = None):
    """Follow a stage's progress stream; return its result message."""
    for event in events:
        if stop is not None and stop.is_set():
            events.cancel()
            raise Cancelled("the job was cancelled")
        if event.HasField("progress"):
            if progress:
                progress(stage, event.progress.done, event.progress.total, event.progress.unit)
        else:
            return event.result
    raise FailedPrecondition(f"stage {stage_name(stage)} ended its stream without a result")


def stage_name(stage: int) -> str:
    return Stage.Name(stage).removeprefix("STAGE_").lower()


def request_id(stage: int, part: str = "") -> str:
    """The request id a job's call to `stage` carries ("<job id>/<stage>[/<part>]"; logs of every service join on
    it); empty outside a job."""
    job_id = current_job_id()
    if not job_id:
        return ""
    return f"{job_id}/{stage_name(stage)}" + (f"/{part}" if part else "")


@contextmanager
def job_span(name: str, **attributes) -> Iterator[trace.Span]:
    """A span of the running job (its trace), with the job's id and `attributes` ("a2v." + name)."""
    attributes = {f"a2v.{key}": value for key, value in attributes.items()}
    if job_id := current_job_id():
        attributes[JOB_ID_ATTRIBUTE] = job_id
    with tracer.start_as_current_span(name, attributes=attributes) as span:
        yield span


class StageCaller:
    """Makes a job's stage calls: progress, timing, and retries (`RetryPolicy`) on another replica.

    The channel's own retry policy only covers calls that have not received anything yet; a replica that
    dies halfway through a progress stream needs the call made again. Round-robin channels route the new
    attempt to a replica that is still up; backoff gives Kubernetes (or `a2v up`) time to replace one, and
    the object store time to come back.
    """

    def __init__(
        self,
        reporter: Reporter,
        stop: threading.Event | None,
        max_attempts: int,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.reporter = reporter
        self.stop = stop
        self.policy = (policy or RetryPolicy(outage_seconds=0.0, busy_seconds=0.0)).with_attempts(max_attempts)
        self.max_attempts = self.policy.max_attempts

    def _retryable(self, code: grpc.StatusCode, detail: str, attempt: int, first_failure: float) -> bool:
        failing_for = time.monotonic() - first_failure
        if code == grpc.StatusCode.UNAVAILABLE:
            return attempt < self.max_attempts or failing_for < self.policy.outage_seconds
        return is_busy(code, detail) and failing_for < self.policy.busy_seconds

    def __call__(self, stage: int, invoke: Callable[[], object], *, streaming: bool, progress: bool | Progress = True):
        """Run `invoke()` (a unary call, or a stream followed to its result) until it succeeds or gives up.

        A stream's progress goes to the reporter as it is (`progress=True`), to a callable given instead
        (which re-counts it, e.g. frames of one video among several), or nowhere (`False`).
        """
        attempt, first_failure = 0, None
        while True:
            attempt += 1
            if self.stop is not None and self.stop.is_set():
                raise Cancelled("the job was cancelled")
            started = time.monotonic()
            try:
                with job_span(f"stage {stage_name(stage)}", stage=stage_name(stage), attempt=attempt) as span:
                    try:
                        if streaming:
                            forward = self.reporter.progress if progress is True else progress or None
                            result = final_result(invoke(), stage, forward, self.stop)
                        else:
                            result = invoke()
                    except grpc.RpcError as exc:
                        span.set_status(Status(StatusCode.ERROR, f"{rpc_failure(exc)[0].name}"))
                        raise
            except grpc.RpcError as exc:
                code, detail = rpc_failure(exc)
                if code == grpc.StatusCode.CANCELLED and self.stop is not None and self.stop.is_set():
                    raise Cancelled("the job was cancelled") from exc
                error = f"{code.name}: {detail}"
                first_failure = first_failure or time.monotonic()
                if not self._retryable(code, detail, attempt, first_failure):
                    metrics.STAGE_FAILURES.labels(stage_name(stage), code.name).inc()
                    tries = f" after {attempt} attempts" if attempt > 1 else ""
                    raise StageFailed(stage, code.name, f"stage {stage_name(stage)} failed{tries}: {error}") from exc
                metrics.STAGE_RETRIES.labels(stage_name(stage)).inc()
                self.reporter.retrying(stage, attempt, error)
                log.warning("stage %s attempt %d failed (%s); retrying", stage_name(stage), attempt, error)
                if self.stop is not None:
                    if self.stop.wait(retry_delay(attempt)):
                        raise Cancelled("the job was cancelled") from exc
                else:
                    time.sleep(retry_delay(attempt))
                continue
            cacheable = "cached" in result.DESCRIPTOR.fields_by_name  # Probe-like reads have nothing to reuse
            cached = bool(result.cached) if cacheable else None
            seconds = time.monotonic() - started
            metrics.STAGE_CALL_SECONDS.labels(stage_name(stage), "" if cached is None else str(cached).lower()).observe(
                seconds
            )
            self.reporter.call_finished(stage, seconds, cached=cached)
            return result


class RenderRun:
    """One render job: its steps in order, each keeping what the later ones need.

    analyse (probe; audio and face analysis at once) -> predict (lipsync) -> retime -> select_proxies (teeth)
    -> render_chunks (texture, teeth and composite per chunk of frames) -> finalize (join and mux).
    """

    def __init__(
        self,
        clients: StageClients,
        spec: orchestrator_pb2.RenderJobSpec,
        report: Reporter,
        stop: threading.Event | None,
        retry: RetryPolicy,
    ) -> None:
        options = spec.options
        self.clients, self.spec, self.options, self.report = clients, spec, options, report
        self.retime_enabled = options.retiming if options.HasField("retiming") else True
        self.use_teeth = options.teeth if options.HasField("teeth") else True
        self.chunk = options.chunk_frames or DEFAULT_CHUNK_FRAMES
        self.parallel = options.max_parallel_chunks or DEFAULT_PARALLEL_CHUNKS
        if self.chunk < 1 or self.parallel < 1 or options.max_attempts < 0:
            raise InvalidInput("chunk_frames, max_parallel_chunks and max_attempts must be >= 1 (0 = default)")
        self.call = StageCaller(report, stop, options.max_attempts, retry)
        self.proxies: teeth_pb2.TeethProxies | None = None

    def run(self) -> orchestrator_pb2.RenderJobResult:
        """Run every step; returns the job's result."""
        self.analyse()
        self.predict()
        self.retime()
        self.select_proxies()
        renders = self.render_chunks()
        finalized = self.finalize(renders)
        return self.result(finalized, renders)

    def _finished(self, stage: int, outputs: dict[str, common_pb2.ObjectRef]) -> None:
        """A stage's bookkeeping once its work is done: its outputs, then its end."""
        for name, ref in outputs.items():
            self.report.output(stage, name, ref)
        self.report.stage_finished(stage)

    def _single_call(self, stage: int, invoke: Callable[[], T], output: Callable[[T], dict]) -> T:
        """A stage that is one unary call: progress counted in calls, then its outputs and its end."""
        self.report.progress(stage, 0, 1, "calls")
        result = self.call(stage, invoke, streaming=False)
        self.report.progress(stage, 1, 1, "calls")
        self._finished(stage, output(result))
        return result

    def analyse(self) -> None:
        """Probe the target for its frame rate, then extract the audio and analyse the target's faces at once."""
        c, spec, options, call = self.clients, self.spec, self.options, self.call
        info = call(
            Stage.STAGE_FACE,
            lambda: c.face.Probe(
                face_pb2.ProbeRequest(video=spec.target_video, request_id=request_id(Stage.STAGE_FACE, "probe"))
            ),
            streaming=False,
        ).info
        self.rate = rate = info.frame_rate
        with ThreadPoolExecutor(max_workers=2) as pool:  # audio and face analysis are independent
            audio_future = submit_in_context(
                pool,
                call,
                Stage.STAGE_AUDIO,
                lambda: c.audio.Extract(
                    audio_pb2.ExtractRequest(
                        audio=spec.audio,
                        output_frame_rate=rate,
                        options=options.audio,
                        request_id=request_id(Stage.STAGE_AUDIO),
                    )
                ),
                streaming=True,
            )
            face_future = submit_in_context(
                pool,
                call,
                Stage.STAGE_FACE,
                lambda: c.face.Analyze(
                    face_pb2.AnalyzeRequest(
                        video=spec.target_video, options=options.face, request_id=request_id(Stage.STAGE_FACE)
                    )
                ),
                streaming=True,
            )
            self.audio, self.analysis = audio_future.result(), face_future.result()
        self._finished(Stage.STAGE_AUDIO, {"features": self.audio.features.object})
        self._finished(Stage.STAGE_FACE, {"manifest": self.analysis.manifest})
        self.frames = self.audio.output_frame_count
        if self.frames <= 0:
            raise InvalidInput("the audio gives no output frame")

    def predict(self) -> None:
        """The speaker model's mouth shape for every output frame."""
        request = lipsync_pb2.PredictRequest(
            model=self.spec.model,
            features=self.audio.features,
            output_frame_rate=self.rate,
            output_frame_count=self.frames,
            speech_activity=self.audio.speech_activity,
            options=self.options.lipsync,
            request_id=request_id(Stage.STAGE_LIPSYNC),
        )
        self.predicted = self._single_call(
            Stage.STAGE_LIPSYNC,
            lambda: self.clients.lipsync.Predict(request),
            lambda r: {"mouth_shapes": r.mouth_shapes.object},
        )

    def retime(self) -> None:
        """Which target frame each output frame shows."""
        request = retiming_pb2.RetimeRequest(
            speech_activity=self.audio.speech_activity,
            target_analysis=self.analysis.manifest,
            output_frame_count=self.frames,
            enabled=self.retime_enabled,
            options=self.options.retiming_options,
            request_id=request_id(Stage.STAGE_RETIMING),
        )
        self.retimed = self._single_call(
            Stage.STAGE_RETIMING,
            lambda: self.clients.retiming.Retime(request),
            lambda r: {"retiming_map": r.retiming_map.object},
        )

    def select_proxies(self) -> None:
        """The teeth proxies of the target (none when teeth enhancement is off)."""
        if not self.use_teeth:
            return
        options = self.options
        selection = teeth_pb2.SelectProxiesRequest(
            target_analysis=self.analysis.manifest,
            options=options.teeth_selection,
            request_id=request_id(Stage.STAGE_TEETH, "proxies"),
        )
        if options.HasField("teeth_upper_frame"):
            selection.upper_frame_override = options.teeth_upper_frame
        if options.HasField("teeth_lower_frame"):
            selection.lower_frame_override = options.teeth_lower_frame
        self.proxies = self.call(
            Stage.STAGE_TEETH, lambda: self.clients.teeth.SelectProxies(selection), streaming=False
        ).proxies

    def render_chunks(self) -> list[composite_pb2.RenderResult]:
        """Texture, teeth and composite of every chunk of frames, `max_parallel_chunks` at once."""
        frames, parallel = self.frames, self.parallel
        self.ranges = [(a, min(a + self.chunk, frames)) for a in range(0, frames, self.chunk)]
        self.chunk_stages = (
            Stage.STAGE_TEXTURE,
            *((Stage.STAGE_TEETH,) if self.use_teeth else ()),
            Stage.STAGE_COMPOSITE,
        )
        self.done = dict.fromkeys(self.chunk_stages, 0)
        self.lock = threading.Lock()
        for stage in self.chunk_stages:
            self.report.progress(stage, 0, frames, "frames")
        self.slots = ChunkSlots(parallel)
        # Textures (and teeth) of the chunks in one pool, their composites in another: a composite waits for its
        # own and its neighbours' textures, which the other pool makes, so neither pool can block the other; the
        # slots keep the stage calls in flight to max_parallel_chunks.
        with ThreadPoolExecutor(max_workers=parallel) as texture_pool, ThreadPoolExecutor(max_workers=parallel) as pool:
            self.texture_futures = [
                submit_in_context(texture_pool, self.texture_chunk, bounds) for bounds in self.ranges
            ]
            futures = [submit_in_context(pool, self.composite_chunk, index) for index in range(len(self.ranges))]
            try:
                renders = [future.result() for future in futures]
            except BaseException:
                for future in self.texture_futures + futures:  # one chunk failed for good: the rest are not started
                    future.cancel()
                raise
        for stage in self.chunk_stages:
            self.report.stage_finished(stage)
        return renders

    def chunk_done(self, stage: int, bounds: tuple[int, int]) -> None:
        """Count a chunk's frames as done in a per-chunk stage."""
        with self.lock:
            self.done[stage] += bounds[1] - bounds[0]
            self.report.progress(stage, self.done[stage], self.frames, "frames")

    def texture_chunk(self, bounds: tuple[int, int]) -> composite_pb2.TextureChunk:
        """A chunk's textures, teeth enhanced, within one of the chunk slots."""
        with (
            self.slots.hold(),
            job_span(f"chunk {bounds[0]}-{bounds[1]} texture", frames_start=bounds[0], frames_stop=bounds[1]),
        ):
            return self.texture_and_teeth(bounds)

    def texture_and_teeth(self, bounds: tuple[int, int]) -> composite_pb2.TextureChunk:
        """Synthesize a chunk's mouth textures, then enhance their teeth (when enabled)."""
        c, options, proxies = self.clients, self.options, self.proxies
        frame_range = common_pb2.FrameRange(start=bounds[0], stop=bounds[1])
        part = f"{bounds[0]:06d}-{bounds[1]:06d}"
        synthesized = self.call(
            Stage.STAGE_TEXTURE,
            lambda: c.texture.Synthesize(
                texture_pb2.SynthesizeRequest(
                    frames=frame_range,
                    mouth_shapes=self.predicted.mouth_shapes,
                    target_analysis=self.analysis.manifest,
                    retiming_map=self.retimed.retiming_map,
                    options=options.texture,
                    job_id=current_job_id(),
                    request_id=request_id(Stage.STAGE_TEXTURE, part),
                )
            ),
            streaming=True,
            progress=False,
        )
        self.chunk_done(Stage.STAGE_TEXTURE, bounds)
        textures = synthesized.textures
        if proxies is not None:
            enhanced = self.call(
                Stage.STAGE_TEETH,
                lambda: c.teeth.Enhance(
                    teeth_pb2.EnhanceRequest(
                        textures=textures,
                        frames=frame_range,
                        proxies=proxies,
                        mouth_shapes=synthesized.mean_shapes,
                        texture_valid=synthesized.texture_valid,
                        options=options.teeth_enhance,
                        request_id=request_id(Stage.STAGE_TEETH, part),
                    )
                ),
                streaming=True,
                progress=False,
            )
            self.chunk_done(Stage.STAGE_TEETH, bounds)
            textures = enhanced.textures
        return composite_pb2.TextureChunk(
            frames=frame_range,
            textures=textures,
            mean_jaw_lines=synthesized.mean_jaw_lines,
            texture_masks=synthesized.texture_masks,
            pose_differences=synthesized.pose_differences,
        )

    def composite_chunk(self, index: int) -> composite_pb2.RenderResult:
        """Render chunk `index` into a segment once its own and its neighbours' textures are there."""
        # The neighbours' textures too: a chunk's fades to and from the target's own mouth look a few frames
        # past its ends (composite.v1.RenderOptions.fade_frames), so they run across the seams.
        neighbours = [j for j in (index - 1, index + 1) if 0 <= j < len(self.ranges)]
        chunks = [self.texture_futures[index].result(), *(self.texture_futures[j].result() for j in neighbours)]
        bounds = self.ranges[index]
        request = composite_pb2.RenderRequest(
            frames=common_pb2.FrameRange(start=bounds[0], stop=bounds[1]),
            target_video=self.spec.target_video,
            target_analysis=self.analysis.manifest,
            textures=chunks,
            retiming_map=self.retimed.retiming_map,
            mouth_shapes=self.predicted.mouth_shapes,
            options=self.options.composite,
            request_id=request_id(Stage.STAGE_COMPOSITE, f"{bounds[0]:06d}-{bounds[1]:06d}"),
        )
        with (
            self.slots.hold(urgent=True),
            job_span(f"chunk {bounds[0]}-{bounds[1]} composite", frames_start=bounds[0], frames_stop=bounds[1]),
        ):
            rendered = self.call(
                Stage.STAGE_COMPOSITE, lambda: self.clients.composite.Render(request), streaming=True, progress=False
            )
        self.report.output(Stage.STAGE_COMPOSITE, f"segment/{bounds[0]:06d}", rendered.segment)
        self.chunk_done(Stage.STAGE_COMPOSITE, bounds)
        return rendered

    def finalize(self, renders: list[composite_pb2.RenderResult]) -> composite_pb2.FinalizeResult:
        """Join the segments and mux the normalised audio into the output video."""
        request = composite_pb2.FinalizeRequest(
            segments=[composite_pb2.Segment(frames=r.frames, segment=r.segment) for r in renders],
            audio=self.audio.normalized_audio,
            output_key=self.options.output_key,
            options=self.options.finalize,
            frame_rate=self.rate,
            request_id=request_id(Stage.STAGE_FINALIZE),
        )
        finalized = self.call(Stage.STAGE_FINALIZE, lambda: self.clients.composite.Finalize(request), streaming=True)
        self._finished(Stage.STAGE_FINALIZE, {"video": finalized.video})
        return finalized

    def result(
        self, finalized: composite_pb2.FinalizeResult, renders: list[composite_pb2.RenderResult]
    ) -> orchestrator_pb2.RenderJobResult:
        """The job's result: the video's facts, what was applied, and the composite's confidence."""
        proxies = self.proxies
        return orchestrator_pb2.RenderJobResult(
            video=finalized.video,
            duration_seconds=finalized.duration_seconds,
            frame_count=finalized.frame_count,
            width=finalized.width,
            height=finalized.height,
            frame_rate=finalized.frame_rate,
            model_version=self.predicted.model.version,
            retimed=self.retimed.enabled,
            teeth_enhanced=bool(proxies is not None and proxies.has_visible_teeth),
            **confidence_report(renders),
        )


class Pipeline:
    """Runs render and training jobs against the stage services."""

    def __init__(
        self,
        clients: StageClients,
        *,
        models_dir: str | None = None,
        trainer: Trainer | None = None,
        retry: RetryPolicy | None = None,
        serve_wait_seconds: float = DEFAULT_SERVE_WAIT_SECONDS,
    ) -> None:
        self.clients = clients
        self.models_dir = models_dir
        self.trainer = trainer or LocalTrainer()
        self.retry = retry or RetryPolicy()
        self.serve_wait_seconds = serve_wait_seconds

    # -- render ----------------------------------------------------------------------------------

    def render(
        self,
        spec: orchestrator_pb2.RenderJobSpec,
        *,
        reporter: Reporter | None = None,
        stop: threading.Event | None = None,
    ) -> orchestrator_pb2.RenderJobResult:
        """Audio + target video + speaker model -> the lip-synced mp4 (the steps of `RenderRun`)."""
        return RenderRun(self.clients, spec, reporter or Reporter(), stop, self.retry).run()

    # -- training --------------------------------------------------------------------------------

    def train(
        self,
        spec: orchestrator_pb2.TrainJobSpec,
        *,
        reporter: Reporter | None = None,
        stop: threading.Event | None = None,
    ) -> dict:
        """Analyse the speaker's videos, build the dataset, train and export the LSTM; returns the model card."""
        c, options = self.clients, spec.options
        report = reporter or Reporter()
        if not spec.videos:
            raise InvalidInput("training needs at least one video")
        if options.max_attempts < 0:
            raise InvalidInput("max_attempts must be >= 1 (0 = default)")
        call = StageCaller(report, stop, options.max_attempts, self.retry)

        # The videos' lengths first, so audio and face report seconds and frames of all videos from the start.
        infos = [
            call(
                Stage.STAGE_FACE,
                lambda v=video: c.face.Probe(
                    face_pb2.ProbeRequest(video=v.video, request_id=request_id(Stage.STAGE_FACE, "probe"))
                ),
                streaming=False,
            ).info
            for video in spec.videos
        ]
        audio_progress = SequentialProgress(report, Stage.STAGE_AUDIO, [i.duration_seconds for i in infos], "seconds")
        face_progress = SequentialProgress(report, Stage.STAGE_FACE, [i.frame_count for i in infos], "frames")
        report.progress(Stage.STAGE_FACE, 0, face_progress.total, "frames")

        def analyse(index: int, video: orchestrator_pb2.TrainingVideo) -> face_pb2.SpeakerClip:
            extracted = call(
                Stage.STAGE_AUDIO,
                lambda: c.audio.Extract(
                    audio_pb2.ExtractRequest(
                        audio=video.video,
                        options=options.audio,
                        request_id=request_id(Stage.STAGE_AUDIO, video.clip_id),
                    )
                ),
                streaming=True,
                progress=audio_progress.part(index),
            )
            audio_progress.finished(index)
            analysed = call(
                Stage.STAGE_FACE,
                lambda: c.face.Analyze(
                    face_pb2.AnalyzeRequest(
                        video=video.video, options=options.face, request_id=request_id(Stage.STAGE_FACE, video.clip_id)
                    )
                ),
                streaming=True,
                progress=face_progress.part(index),
            )
            face_progress.finished(index)
            return face_pb2.SpeakerClip(
                clip_id=video.clip_id, analysis_manifest=analysed.manifest, features=extracted.features
            )

        clips = [analyse(index, video) for index, video in enumerate(spec.videos)]
        report.stage_finished(Stage.STAGE_AUDIO)
        report.stage_finished(Stage.STAGE_FACE)
        dataset = call(
            Stage.STAGE_DATASET,
            lambda: c.face.BuildSpeakerDataset(
                face_pb2.BuildSpeakerDatasetRequest(
                    speaker=spec.speaker,
                    clips=clips,
                    validation=spec.validation if spec.HasField("validation") else DEFAULT_VALIDATION,
                    options=options.dataset,
                    request_id=request_id(Stage.STAGE_DATASET),
                )
            ),
            streaming=True,
        )
        report.output(Stage.STAGE_DATASET, "dataset", dataset.dataset)
        report.stage_finished(Stage.STAGE_DATASET)
        started = time.monotonic()
        card = self._run_trainer(spec.speaker, dataset, options.training, report=report, stop=stop)
        report.call_finished(Stage.STAGE_TRAIN, time.monotonic() - started, cached=False)
        report.stage_finished(Stage.STAGE_TRAIN)
        version = int(card["prefix"].rstrip("/").rsplit("/", 1)[1])
        card["serving"] = self._await_served(spec.speaker, version, report=report, stop=stop)
        return card

    def _await_served(
        self, speaker: str, version: int, *, report: Reporter, stop: threading.Event | None
    ) -> lipsync_pb2.ModelVersion:
        """The export stage: wait until TF Serving serves the new version (the model sync copies it from the store
        and sends TF Serving the new model list), for up to `serve_wait_seconds`. Returns the version as the
        lipsync stage describes it: AVAILABLE, or not yet with the reason in its `serving_note` (the job still
        succeeds: the model is stored, and TF Serving may take it later)."""
        report.progress(Stage.STAGE_EXPORT, 0, 1, "versions")
        started = time.monotonic()
        request = lipsync_pb2.DescribeModelRequest(
            speaker=speaker, version=version, request_id=request_id(Stage.STAGE_EXPORT)
        )
        while True:
            try:
                described = self.clients.lipsync.DescribeModel(request, timeout=30).versions[0]
            except grpc.RpcError as exc:
                code, detail = rpc_failure(exc)
                described = lipsync_pb2.ModelVersion(
                    speaker=speaker, version=version, serving_note=f"{code.name}: {detail}"
                )
            if (
                described.state == lipsync_pb2.MODEL_STATE_AVAILABLE
                or time.monotonic() - started >= self.serve_wait_seconds
            ):
                break
            if stop is not None and stop.wait(1.0):
                raise Cancelled("the job was cancelled")
            if stop is None:
                time.sleep(1.0)
        report.call_finished(Stage.STAGE_EXPORT, time.monotonic() - started, cached=None)
        report.progress(Stage.STAGE_EXPORT, 1, 1, "versions")
        report.stage_finished(Stage.STAGE_EXPORT)
        if described.state != lipsync_pb2.MODEL_STATE_AVAILABLE:
            log.warning("model %s version %d is not served: %s", speaker, version, described.serving_note)
        return described

    def _run_trainer(
        self,
        speaker: str,
        dataset: face_pb2.BuildSpeakerDatasetResult,
        training,
        *,
        report: Reporter,
        stop: threading.Event | None,
    ) -> dict:
        """The trainer apart from the orchestrator (which has no TensorFlow): a child process locally, a Job on a GPU
        node in Kubernetes, the trainer service under docker compose (orchestrator/trainers.py).

        Only the job's own options go to the trainer; the rest it chooses by the amount of training speech.
        """
        spec = TrainSpec(speaker, dataset.dataset, dataset.pca, training, self.models_dir)
        report.progress(Stage.STAGE_TRAIN, 0, 0, "epochs")
        try:
            run = self.trainer.run(
                spec,
                on_epoch=lambda done, total: report.progress(Stage.STAGE_TRAIN, done, total, "epochs"),
                stop=stop,
            )
        except Cancelled:
            raise
        except A2VError as exc:  # like a stage's failure: the job names the stage and keeps the trainer's status
            reason = f"stage {stage_name(Stage.STAGE_TRAIN)} failed: {str(exc).removeprefix('training failed: ')}"
            raise StageFailed(Stage.STAGE_TRAIN, exc.status, reason) from exc
        return {"prefix": run.prefix, "summary": run.summary}
