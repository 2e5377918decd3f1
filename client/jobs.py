"""The client of the orchestrator's job API: connection, upload, submit, watch (with progress), job outcome.

The `a2v` command, `deploy` (demo, bench) and the evaluation tools drive jobs through this module; it imports
the generated stubs and the shared runtime only.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import grpc
import urllib3

from audio2video.common.v1 import common_pb2
from audio2video.lipsync.v1 import lipsync_pb2
from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from audio2video.orchestrator.v1 import orchestrator_pb2_grpc
from client.environment import stack_environment
from services.runtime.blobstore import BlobStore
from services.runtime.clients import create_channel, retry_delay, rpc_failure
from services.runtime.config import Config, ConfigError, Env, service_address
from services.runtime.keys import sha256_bytes, sha256_file
from services.runtime.protos import object_ref
from services.runtime.security import ClientSecurity

CONTENT_TYPES = {".wav": "audio/wav", ".mp3": "audio/mpeg", ".m4a": "audio/mp4", ".mp4": "video/mp4"}
SERVICE = "audio2video.orchestrator.v1.OrchestratorService"
WATCH_METHOD = f"{SERVICE}/WatchJob"
UPLOADS_PREFIX = "uploads"
TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
JOB_STATES = ("queued", "pending", "running", "succeeded", "failed", "cancelled")
DEFAULT_RECONNECT_SECONDS = 600.0
DEFAULT_UPLOAD_MAX_BYTES = 2 * 1024**3
TRANSFER_CHUNK_BYTES = 1 << 20
DEFAULT_RPC_TIMEOUT_SECONDS = 60.0
RECONNECT_CODES = {
    grpc.StatusCode.UNAVAILABLE,  # the orchestrator restarted or a connection broke
    grpc.StatusCode.CANCELLED,  # a server draining at shutdown cancels the streams it holds
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a proxy's own limit on stream length
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # the orchestrator is at its bound of concurrent calls
}
"""Why a WatchJob stream may end before the job: the CLI opens it again."""
INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1 (2 for usage and configuration)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def upload_limit(environ: Mapping[str, str]) -> int:
    """The largest local file `upload` sends: A2V_UPLOAD_MAX_BYTES, default 2 GiB."""
    env = Env(environ)
    limit = env.get_int("A2V_UPLOAD_MAX_BYTES", DEFAULT_UPLOAD_MAX_BYTES, minimum=1)
    env.check()
    return limit


def upload(
    store: BlobStore | PresignedStore,
    path: Path,
    *,
    max_bytes: int = DEFAULT_UPLOAD_MAX_BYTES,
    prefix: str = UPLOADS_PREFIX,
) -> common_pb2.ObjectRef:
    """A local input into the object store, under its content hash (re-running stores nothing twice).

    Only a regular file (a link to one is followed) of at most `max_bytes`; it is hashed and sent in chunks,
    never read whole into memory. With a `PresignedStore` (no store credentials) it goes up with a plain HTTP PUT
    to a URL the orchestrator signed, under the caller's own uploads prefix; with a `BlobStore`, under `prefix`.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CommandError(f"no such file: {path}", status=2) from None
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}", status=2) from exc
    if not stat.S_ISREG(info.st_mode):
        raise CommandError(f"not a regular file: {path}", status=2)
    if info.st_size > max_bytes:
        raise CommandError(
            f"{path} is {info.st_size} bytes, over the upload limit of {max_bytes} bytes (A2V_UPLOAD_MAX_BYTES)",
            status=2,
        )
    content_type = CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
    if isinstance(store, PresignedStore):
        return store.put_file(path, info.st_size, suffix=path.suffix.lower(), content_type=content_type)
    blob = store.put_file_content_addressed(
        prefix,
        path,
        suffix=path.suffix.lower(),
        content_type=content_type,
        metadata={"filename": path.name},
    )
    return object_ref(blob)


class PresignedStore:
    """Uploads and downloads through URLs the orchestrator signs (PresignObject): no store credentials here.

    A PUT carries exactly the size and hash it was signed for (the store refuses any other); a GET is checked
    against the object's recorded sha256 before the file appears.
    """

    def __init__(self, orchestrator: orchestrator_pb2_grpc.OrchestratorServiceStub, environ: Mapping[str, str]):
        self.orchestrator = orchestrator
        env = Env(environ)
        timeout = env.get_float("A2V_TRANSFER_TIMEOUT_SECONDS", 600.0, minimum=1.0, maximum=86400.0)
        env.check()
        self.http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10.0, read=timeout), retries=urllib3.Retry(total=0)
        )

    def put_file(self, path: Path, size: int, *, suffix: str, content_type: str) -> common_pb2.ObjectRef:
        """Upload `path` (`size` bytes) under its content hash; nothing is sent when the store holds it already."""
        sha = sha256_file(path)
        target = pb.UploadTarget(sha256=sha, size_bytes=size, suffix=suffix, content_type=content_type)
        signed = self.orchestrator.PresignObject(pb.PresignObjectRequest(upload=target))
        if signed.exists:
            return signed.object
        sent = hashlib.sha256()

        def body() -> Iterator[bytes]:
            left = size
            with open(path, "rb") as handle:
                while left > 0:
                    chunk = handle.read(min(TRANSFER_CHUNK_BYTES, left))
                    if not chunk:
                        break
                    left -= len(chunk)
                    sent.update(chunk)
                    yield chunk

        response = self._request(signed.method or "PUT", signed.url, body=body(), headers=dict(signed.headers))
        try:
            if response.status >= 300:
                raise CommandError(f"the store refused the upload of {path}: {_s3_error(response)}")
        finally:
            response.release_conn()
        if sent.hexdigest() != sha:
            raise CommandError(f"{path} changed while it was uploaded: upload it again")
        return signed.object

    def get_file(self, job: pb.Job, path: Path, *, key: str = "") -> Path:
        """Download the job's result (or `key` inside its folder) to `path`, atomically and checked."""
        target = pb.DownloadTarget(job_id=job.id, key=key)
        signed = self.orchestrator.PresignObject(pb.PresignObjectRequest(download=target))
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            digest = hashlib.sha256()
            response = self._request(signed.method or "GET", signed.url, preload_content=False)
            try:
                if response.status >= 300:
                    raise CommandError(
                        f"the store refused the download of job {job.id}'s result: {_s3_error(response)}"
                    )
                with os.fdopen(handle, "wb") as out:
                    handle = -1
                    for chunk in response.stream(TRANSFER_CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
            finally:
                response.release_conn()
            if signed.object.sha256 and digest.hexdigest() != signed.object.sha256:
                raise CommandError(f"the download of {signed.object.key} is corrupt (sha256 differs): try again")
            os.replace(temp_name, path)
        finally:
            if handle >= 0:
                os.close(handle)
            if os.path.exists(temp_name):
                os.unlink(temp_name)
        return path

    def _request(self, method: str, url: str, **kwargs) -> urllib3.BaseHTTPResponse:
        try:
            return self.http.request(method, url, **kwargs)
        except urllib3.exceptions.HTTPError as exc:
            raise CommandError(f"the object store at {url.split('?', 1)[0]} is unreachable: {exc}") from exc


def _s3_error(response: urllib3.BaseHTTPResponse) -> str:
    """The S3 error code and message of a refused request, on one line."""
    text = response.data.decode(errors="replace") if response.data else ""
    code = text.partition("<Code>")[2].partition("</Code>")[0]
    message = text.partition("<Message>")[2].partition("</Message>")[0]
    return f"HTTP {response.status} {code} {message}".strip()


def store_credentials(environ: Mapping[str, str]) -> bool:
    """Whether the environment names store credentials."""
    return bool(environ.get("A2V_S3_ACCESS_KEY", "").strip() and environ.get("A2V_S3_SECRET_KEY", "").strip())


def presigned(environ: Mapping[str, str]) -> bool:
    """Whether uploads and downloads go through the orchestrator's presigned URLs.

    A2V_PRESIGNED; by default whenever the environment has no store credentials (an outside caller).
    """
    env = Env(environ)
    value = env.get_bool("A2V_PRESIGNED", not store_credentials(environ))
    env.check()
    return value


class Connection:
    """The object store and the orchestrator as the environment (default: the local stack) names them.

    Unary calls have the deadline A2V_RPC_TIMEOUT_SECONDS (default 60 s); WatchJob has none, since a job takes as
    long as it takes, and a dropped watch is opened again for up to A2V_WATCH_RECONNECT_SECONDS (default 600 s).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = dict(stack_environment() if environ is None else environ)
        try:
            self.presigned = presigned(self.environ)
            # The store itself only with credentials (the evaluation tools read it).
            self.store = None
            if store_credentials(self.environ):
                config = Config.from_env("a2v", self.environ)
                self.store = BlobStore.from_config(config.store)
                self.timeout_seconds = config.rpc_timeout_seconds
            address = service_address("orchestrator", self.environ)
            env = Env(self.environ)
            if self.store is None:
                self.timeout_seconds = env.get_float(
                    "A2V_RPC_TIMEOUT_SECONDS", DEFAULT_RPC_TIMEOUT_SECONDS, minimum=0.1, maximum=86400.0
                )
            self.reconnect_seconds = env.get_float(
                "A2V_WATCH_RECONNECT_SECONDS", DEFAULT_RECONNECT_SECONDS, minimum=0.0, maximum=7 * 86400.0
            )
            env.check()
            self.upload_max_bytes = upload_limit(self.environ)
            self.security = ClientSecurity.from_env(self.environ)
        except ConfigError as exc:
            raise CommandError(str(exc), status=2) from exc
        self.orchestrator = orchestrator_pb2_grpc.OrchestratorServiceStub(
            create_channel(
                address,
                [SERVICE],
                timeout_seconds=self.timeout_seconds,
                open_ended_methods=[WATCH_METHOD],
                security=self.security,
            )
        )
        try:
            self.transfers = PresignedStore(self.orchestrator, self.environ) if self.presigned else None
        except ConfigError as exc:
            raise CommandError(str(exc), status=2) from exc
        self._upload_prefix: str | None = None

    @property
    def uploads(self) -> BlobStore | PresignedStore:
        """Where `upload` puts inputs: the orchestrator's presigned URLs, or the store with credentials."""
        if self.transfers is not None:
            return self.transfers
        if self.store is None:
            raise CommandError("no store credentials (A2V_S3_ACCESS_KEY) and A2V_PRESIGNED is off", status=2)
        return self.store

    @property
    def upload_prefix(self) -> str:
        """Where inputs go up with store credentials: `uploads/`, or the caller's own `uploads/<caller>/`.

        The latter with a credential of the caller's own (a token, a client certificate), as the orchestrator names
        it: an orchestrator that knows its callers takes only a caller's own uploads as a job's inputs (the `admin`
        scope aside), so the prefix is asked once: the folder of the presigned upload of the empty content (nothing
        is sent). An orchestrator that signs no URLs (FAILED_PRECONDITION) has no prefixes per caller: `uploads/`.
        """
        if self._upload_prefix is None:
            prefix = UPLOADS_PREFIX
            tls = self.security.tls
            if self.security.token or (tls.enabled and tls.cert_file):
                target = pb.UploadTarget(sha256=sha256_bytes(b""), size_bytes=0)
                try:
                    signed = self.orchestrator.PresignObject(pb.PresignObjectRequest(upload=target))
                    prefix = signed.object.key.rsplit("/", 1)[0]
                except grpc.RpcError as exc:
                    if rpc_failure(exc)[0] != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
            self._upload_prefix = prefix
        return self._upload_prefix

    def upload(self, path: Path) -> common_pb2.ObjectRef:
        """A job's input into the store: through presigned URLs, or with store credentials under `upload_prefix`."""
        uploads = self.uploads
        prefix = self.upload_prefix if isinstance(uploads, BlobStore) else UPLOADS_PREFIX
        return upload(uploads, path, max_bytes=self.upload_max_bytes, prefix=prefix)

    def train(self, speaker: str, videos: Sequence[Path], options: pb.TrainOptions | None = None) -> pb.Job:
        """Upload the speaker's videos and start a TrainSpeaker job."""
        spec = pb.TrainJobSpec(
            speaker=speaker,
            videos=[pb.TrainingVideo(clip_id=v.stem, video=self.upload(v)) for v in videos],
            options=options,
        )
        return self.orchestrator.TrainSpeaker(pb.TrainSpeakerRequest(spec=spec)).job

    def render(self, speaker: str, audio: Path, video: Path, options: pb.JobOptions | None = None) -> pb.Job:
        """Upload the audio and the target video and start a render job."""
        spec = pb.RenderJobSpec(
            audio=self.upload(audio),
            target_video=self.upload(video),
            model=lipsync_pb2.ModelSpec(speaker=speaker),
            options=options,
        )
        return self.orchestrator.SubmitJob(pb.SubmitJobRequest(spec=spec)).job

    def job(self, job_id: str) -> pb.Job:
        """The job as the orchestrator has it now."""
        return self.orchestrator.GetJob(pb.GetJobRequest(job_id=job_id)).job

    def cancel(self, job_id: str) -> pb.Job:
        """Ask the orchestrator to cancel the job; the job as it is then."""
        return self.orchestrator.CancelJob(pb.CancelJobRequest(job_id=job_id, reason="cancelled from a2v")).job

    def retry(self, job_id: str) -> pb.Job:
        """Run a failed or cancelled job again, reusing what it had finished."""
        return self.orchestrator.RetryJob(pb.RetryJobRequest(job_id=job_id)).job

    def follow(self, job_id: str, *, out=sys.stdout) -> pb.Job:
        """Show the job's progress (one line per stage) until it ends, across dropped streams; the final job."""
        follow(self.orchestrator, job_id, out=out, reconnect_seconds=self.reconnect_seconds)
        return self.job(job_id)

    def download(self, job: pb.Job, path: Path) -> Path:
        """Download a finished render job's video to `path`."""
        uploads = self.uploads
        if isinstance(uploads, PresignedStore):
            return uploads.get_file(job, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        uploads.get_file(job.result.key, path, bucket=job.result.bucket or None)
        return path

    def speakers(self) -> list[lipsync_pb2.DescribeModelResponse]:
        """Every speaker with a stored model, its versions and their serving state, by name.

        The orchestrator lists them (ListSpeakers) and the lipsync stage asks TF Serving for the serving state: no
        store credentials or stage address here.
        """
        return list(self.orchestrator.ListSpeakers(pb.ListSpeakersRequest()).speakers)


def eta_text(seconds: float) -> str:
    """An ETA for a progress line ("" when unknown)."""
    if seconds < 0:
        return ""
    return f"ETA {seconds:.0f} s" if seconds < 120 else f"ETA {seconds / 60:.1f} min"


def watch_events(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub,
    job_id: str,
    *,
    reconnect_seconds: float = DEFAULT_RECONNECT_SECONDS,
    on_reconnect: Callable[[str, float], None] | None = None,
) -> Iterator[pb.JobEvent]:
    """The job's events until it ends: a snapshot at each (re)connection, then every event once.

    A stream that drops (UNAVAILABLE: the orchestrator restarted, a proxy closed it) is opened again with
    backoff from the last sequence seen; the server replays what was missed, and whatever it sends twice is
    skipped here. After `reconnect_seconds` without a single event, CommandError says how to watch again.
    """
    last = 0
    attempt = 0
    failing_since: float | None = None
    while True:
        call = stub.WatchJob(pb.WatchJobRequest(job_id=job_id, after_sequence=last))
        try:
            for event in call:
                if event.HasField("snapshot"):
                    # A snapshot numbered below what was seen comes from a restarted orchestrator: its events
                    # start again from there.
                    last = min(last, event.sequence) if last else event.sequence
                    yield event
                    if event.snapshot.state in TERMINAL:
                        return
                    continue
                attempt, failing_since = 0, None
                if event.sequence <= last:
                    continue
                last = event.sequence
                yield event
                if event.HasField("state_changed") and event.state_changed.current in TERMINAL:
                    return
            reason = "the stream ended before the job"
        except grpc.RpcError as exc:
            code, detail = rpc_failure(exc)
            if code not in RECONNECT_CODES:
                raise
            reason = f"{code.name}: {detail}"
        finally:
            call.cancel()
        failing_since = failing_since or time.monotonic()
        if time.monotonic() - failing_since > reconnect_seconds:
            raise CommandError(
                f"lost the job's progress ({reason}); it may still be running: a2v watch {job_id} follows it again"
            )
        attempt += 1
        delay = retry_delay(attempt)
        if on_reconnect is not None:
            on_reconnect(reason, delay)
        time.sleep(delay)


class ProgressPrinter:
    """Each stage's progress on its own updating line (bar, counts, ETA).

    A log file (not a terminal) gets each stage's start and end, not every update.
    """

    def __init__(self, out=sys.stdout) -> None:
        self.out = out
        self.interactive = out.isatty()
        self.last_stage = ""

    def show(self, event: pb.JobEvent) -> None:
        """Show one event of the job's stream."""
        kind = event.WhichOneof("event")
        if kind == "snapshot" and event.snapshot.state == pb.JOB_STATE_QUEUED:
            print(queue_text(event.snapshot), file=self.out, flush=True)
        elif kind == "snapshot":
            running = [s for s in event.snapshot.stages if s.state == pb.STAGE_STATE_RUNNING]
            for status in running[-1:]:  # where a job being watched again stands
                progress = common_pb2.Progress(
                    stage=pb.Stage.Name(status.stage), done=status.done, total=status.total, unit=status.unit
                )
                self.line(progress, event.job_fraction_done, event.snapshot.eta_seconds)
        elif kind == "progress":
            self.line(event.progress, event.job_fraction_done, event.job_eta_seconds)
        elif kind == "state_changed" and event.state_changed.current in TERMINAL:
            self.end_line()

    def line(self, progress: common_pb2.Progress, fraction: float, eta_seconds: float) -> None:
        """Update the stage's progress line (a new line when the stage changes)."""
        stage = progress.stage.removeprefix("STAGE_").lower()
        if stage != self.last_stage and self.last_stage:
            print(file=self.out)
        elif stage == self.last_stage and not self.interactive and progress.total and progress.done < progress.total:
            return
        self.last_stage = stage
        share = progress.done / progress.total if progress.total else 0.0
        bar = "#" * int(20 * share) + "." * (20 - int(20 * share)) if progress.total else " " * 20
        amount = f"{progress.done}/{progress.total}" if progress.total else str(progress.done)
        line = f"  {stage:<10} [{bar}] {amount} {progress.unit}  job {fraction:4.0%} {eta_text(eta_seconds)}"
        print(f"\r{line:<90}", end="", flush=True, file=self.out)

    def end_line(self) -> None:
        """End the current progress line."""
        if self.last_stage:
            print(file=self.out, flush=True)
            self.last_stage = ""


def follow(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub,
    job_id: str,
    *,
    out=sys.stdout,
    reconnect_seconds: float = DEFAULT_RECONNECT_SECONDS,
) -> None:
    """Print the job's progress until it ends, watching again (and saying so on stderr) when the stream drops."""
    printer = ProgressPrinter(out)

    def reconnecting(reason: str, delay: float) -> None:
        printer.end_line()
        print(f"  lost the job's progress ({reason}); watching again in {delay:.1f} s", file=sys.stderr, flush=True)

    try:
        for event in watch_events(stub, job_id, reconnect_seconds=reconnect_seconds, on_reconnect=reconnecting):
            printer.show(event)
    finally:
        printer.end_line()


def queue_text(job: pb.Job) -> str:
    """Where a queued job stands."""
    if job.waiting_for_job:
        return f"  queued: waits for the identical job {job.waiting_for_job}, then reuses its work"
    ahead = max(0, job.queue_position - 1)
    return f"  queued: {ahead} job{'s' if ahead != 1 else ''} ahead" if job.queue_position else "  queued"


def job_outcome(job: pb.Job) -> str:
    """'' for a finished job, else the one-line reason it did not finish."""
    if job.state == pb.JOB_STATE_SUCCEEDED:
        return ""
    state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
    if job.state not in TERMINAL:
        return f"job {job.id} is {state} ({job.fraction_done:.0%} done): a2v watch {job.id} follows it"
    return f"job {job.id} {state}: {job.failure_reason or 'cancelled'}"


def interrupted(connection: Connection, job_id: str, *, stdin=None, out=None) -> int:
    """Ctrl-C while following a job: at a terminal, ask whether to cancel it; otherwise say how to get back to it.

    The job runs in the orchestrator, not here, so leaving the command leaves it running unless asked.
    """
    stdin, out = stdin or sys.stdin, out or sys.stderr
    print(file=out)
    if stdin.isatty():
        print(f"cancel job {job_id}? [y/N] ", end="", flush=True, file=out)
        try:
            answer = stdin.readline().strip().lower()
        except KeyboardInterrupt:
            answer = ""
        if answer in ("y", "yes"):
            connection.cancel(job_id)
            print(f"cancelling job {job_id} (a2v watch {job_id} shows it stop)", file=out)
            return INTERRUPTED
    print(
        f"job {job_id} goes on: a2v watch {job_id} follows it, a2v cancel {job_id} cancels it",
        file=out,
    )
    return INTERRUPTED
