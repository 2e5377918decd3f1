"""The `a2v` command: the local stack, jobs through the orchestrator's gRPC API, and single stage calls."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format

from audio2video.common.v1 import common_pb2
from audio2video.lipsync.v1 import lipsync_pb2
from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from audio2video.orchestrator.v1 import orchestrator_pb2_grpc
from deploy import local
from services.runtime.blobstore import BlobStore
from services.runtime.clients import create_channel
from services.runtime.config import Config, ConfigError, service_address
from services.runtime.protos import object_ref

CONTENT_TYPES = {".wav": "audio/wav", ".mp3": "audio/mpeg", ".m4a": "audio/mp4", ".mp4": "video/mp4"}
SERVICE = "audio2video.orchestrator.v1.OrchestratorService"
TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
STAGE_SERVICES = {
    "audio": "AudioService",
    "face": "FaceService",
    "lipsync": "LipsyncService",
    "retiming": "RetimingService",
    "texture": "TextureService",
    "teeth": "TeethService",
    "composite": "CompositeService",
}
"""Stages another system may call on its own: `a2v stage NAME METHOD --request JSON`."""


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1 (2 for usage and configuration)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def upload(store: BlobStore, path: Path) -> common_pb2.ObjectRef:
    """A local input into the object store, under its content hash (re-running stores nothing twice)."""
    if not path.is_file():
        raise CommandError(f"no such file: {path}", status=2)
    content_type = CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
    blob = store.put_content_addressed(
        "uploads",
        path.read_bytes(),
        suffix=path.suffix.lower(),
        content_type=content_type,
        metadata={"filename": path.name},
    )
    return object_ref(blob)


class Connection:
    """The object store and the orchestrator as the environment (default: the local stack) names them."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = dict(local.stack_environment() if environ is None else environ)
        try:
            self.store = BlobStore.from_config(Config.from_env("a2v", self.environ).store)
            address = service_address("orchestrator", self.environ)
        except ConfigError as exc:
            raise CommandError(str(exc), status=2) from exc
        self.orchestrator = orchestrator_pb2_grpc.OrchestratorServiceStub(
            create_channel(address, [SERVICE], timeout_seconds=120)
        )

    def train(self, speaker: str, videos: Sequence[Path], options: pb.TrainOptions | None = None) -> pb.Job:
        """Upload the speaker's videos and start a TrainSpeaker job."""
        spec = pb.TrainJobSpec(
            speaker=speaker,
            videos=[pb.TrainingVideo(clip_id=v.stem, video=upload(self.store, v)) for v in videos],
            options=options,
        )
        return self.orchestrator.TrainSpeaker(pb.TrainSpeakerRequest(spec=spec)).job

    def render(self, speaker: str, audio: Path, video: Path, options: pb.JobOptions | None = None) -> pb.Job:
        """Upload the audio and the target video and start a render job."""
        spec = pb.RenderJobSpec(
            audio=upload(self.store, audio),
            target_video=upload(self.store, video),
            model=lipsync_pb2.ModelSpec(speaker=speaker),
            options=options,
        )
        return self.orchestrator.SubmitJob(pb.SubmitJobRequest(spec=spec)).job

    def follow(self, job_id: str, *, out=sys.stdout) -> pb.Job:
        """Show the job's progress (one line per stage) until it ends; return the final job."""
        follow(self.orchestrator, job_id, out=out)
        return self.orchestrator.GetJob(pb.GetJobRequest(job_id=job_id)).job

    def download(self, job: pb.Job, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.store.get_file(job.result.key, path, bucket=job.result.bucket or None)
        return path


def eta_text(seconds: float) -> str:
    if seconds < 0:
        return ""
    return f"ETA {seconds:.0f} s" if seconds < 120 else f"ETA {seconds / 60:.1f} min"


def follow(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, job_id: str, *, out=sys.stdout) -> None:
    """Print each stage's progress on its own updating line (bar, counts, ETA) until the job ends."""
    last_stage = ""
    interactive = out.isatty()
    for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=24 * 3600):
        kind = event.WhichOneof("event")
        if kind == "progress":
            progress = event.progress
            stage = progress.stage.removeprefix("STAGE_").lower()
            if stage != last_stage and last_stage:
                print(file=out)
            elif stage == last_stage and not interactive and progress.total and progress.done < progress.total:
                continue  # a log file gets each stage's start and end, not every update
            last_stage = stage
            share = progress.done / progress.total if progress.total else 0.0
            bar = "#" * int(20 * share) + "." * (20 - int(20 * share)) if progress.total else " " * 20
            amount = f"{progress.done}/{progress.total}" if progress.total else str(progress.done)
            line = (
                f"  {stage:<10} [{bar}] {amount} {progress.unit}  job {event.job_fraction_done:4.0%} "
                f"{eta_text(event.job_eta_seconds)}"
            )
            print(f"\r{line:<90}", end="", flush=True, file=out)
        elif kind == "state_changed" and event.state_changed.current in TERMINAL:
            print(file=out)
            return


def job_outcome(job: pb.Job) -> str:
    """'' for a finished job, else the one-line reason it did not finish."""
    if job.state == pb.JOB_STATE_SUCCEEDED:
        return ""
    state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
    return f"job {job.id} {state}: {job.failure_reason or 'cancelled'}"


# -- a2v stage ---------------------------------------------------------------------------------


def stage_method(stage: str, method: str):
    """(stub class, method descriptor) of `<Stage>Service.<method>`; CommandError names what exists."""
    if stage not in STAGE_SERVICES:
        raise CommandError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_SERVICES)}", status=2)
    service = STAGE_SERVICES[stage]
    messages = importlib.import_module(f"audio2video.{stage}.v1.{stage}_pb2")
    stubs = importlib.import_module(f"audio2video.{stage}.v1.{stage}_pb2_grpc")
    descriptor = messages.DESCRIPTOR.services_by_name[service]
    methods = {m.name: m for m in descriptor.methods}
    if method not in methods:
        raise CommandError(f"{service} has no method {method!r}; methods: {', '.join(methods)}", status=2)
    return getattr(stubs, f"{service}Stub"), methods[method]


def describe_stages() -> str:
    lines = []
    for stage in STAGE_SERVICES:
        messages = importlib.import_module(f"audio2video.{stage}.v1.{stage}_pb2")
        service = messages.DESCRIPTOR.services_by_name[STAGE_SERVICES[stage]]
        names = ", ".join(m.name for m in service.methods)
        lines.append(f"  {stage:<10} {names}")
    return "\n".join(lines)


def upload_references(value, store: BlobStore):
    """Replace every {"key": "@PATH"} in a request's JSON by the uploaded file's key and bucket."""
    if isinstance(value, dict):
        key = value.get("key")
        if isinstance(key, str) and key.startswith("@"):
            ref = upload(store, Path(key[1:]).expanduser())
            return {**value, "key": ref.key, "bucket": ref.bucket}
        return {name: upload_references(item, store) for name, item in value.items()}
    if isinstance(value, list):
        return [upload_references(item, store) for item in value]
    return value


def call_stage(
    stage: str,
    method: str,
    request_json: str,
    *,
    environ: Mapping[str, str] | None = None,
    timeout_seconds: float = 3600.0,
    on_progress: Callable[[common_pb2.Progress], None] | None = None,
) -> dict:
    """Call one stage method with a proto3-JSON request (local files as {"key": "@PATH"}); its result as JSON."""
    stub_class, descriptor = stage_method(stage, method)
    environ = dict(local.stack_environment() if environ is None else environ)
    try:
        request_value = json.loads(request_json or "{}")
    except json.JSONDecodeError as exc:
        raise CommandError(f"the request is not JSON: {exc}", status=2) from exc
    if any(isinstance(v, str) and v.startswith("@") for v in _strings(request_value)):
        try:
            store = BlobStore.from_config(Config.from_env("a2v", environ).store)
        except ConfigError as exc:
            raise CommandError(str(exc), status=2) from exc
        request_value = upload_references(request_value, store)
    request_class = _message_class(descriptor.input_type)
    try:
        request = json_format.ParseDict(request_value, request_class())
    except json_format.ParseError as exc:
        raise CommandError(f"the request does not fit {descriptor.input_type.full_name}: {exc}", status=2) from exc
    try:
        address = service_address(stage, environ)
    except ConfigError as exc:
        raise CommandError(str(exc), status=2) from exc
    service_name = descriptor.containing_service.full_name
    stub = stub_class(create_channel(address, [service_name], timeout_seconds=timeout_seconds))
    call = getattr(stub, method)
    if descriptor.server_streaming:
        result = None
        for event in call(request):
            if event.HasField("progress"):
                if on_progress:
                    on_progress(event.progress)
            else:
                result = event.result
        if result is None:
            raise CommandError(f"{service_name}.{method} ended without a result")
    else:
        result = call(request)
    return json_format.MessageToDict(result)


def _strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def _message_class(descriptor):
    module = importlib.import_module(descriptor.file.name.removesuffix(".proto").replace("/", ".") + "_pb2")
    return getattr(module, descriptor.name)


def print_stage_progress(progress: common_pb2.Progress) -> None:
    amount = f"{progress.done}/{progress.total}" if progress.total else str(progress.done)
    print(f"\r  {progress.stage or 'progress'} {amount} {progress.unit}", end="", flush=True, file=sys.stderr)


# -- the command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="a2v", description="audio2video: audio-driven lip sync")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start the local stack (object store and every service)")
    commands.add_parser("down", help="stop the local stack")
    commands.add_parser("status", help="show each component of the local stack and its health")
    train = commands.add_parser("train", help="train a speaker's model from videos of the speaker")
    train.add_argument("--speaker", required=True)
    train.add_argument("--epochs", type=int, help="maximum training epochs (default: the trainer's)")
    train.add_argument("videos", type=Path, nargs="+")
    run = commands.add_parser("run", help="lip-sync AUDIO onto VIDEO with a trained speaker model")
    run.add_argument("--speaker", required=True)
    run.add_argument("--audio", type=Path, required=True)
    run.add_argument("--video", type=Path, required=True)
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--no-retiming", action="store_true", help="play the target as it is")
    run.add_argument("--chunk-frames", type=int, default=0, help="frames per texture/composite chunk")
    stage = commands.add_parser(
        "stage",
        help="call one stage on its own and print its result (output keys) as JSON",
        description="Call one stage service directly, as another system would. The request is the method's "
        'request message in proto3 JSON; {"key": "@PATH"} uploads a local file first. Example: a2v stage audio '
        'Extract --request \'{"audio": {"key": "@speech.wav"}, "outputFrameRate": {"numerator": 30, '
        '"denominator": 1}}\'. Without NAME, lists the stages and their methods.',
    )
    stage.add_argument("name", nargs="?", help="stage: " + ", ".join(STAGE_SERVICES))
    stage.add_argument("method", nargs="?", help="method of the stage's service, e.g. Extract")
    source = stage.add_mutually_exclusive_group()
    source.add_argument("--request", default="{}", help="request message as proto3 JSON")
    source.add_argument("--request-file", type=Path, help="file holding the request as proto3 JSON")
    stage.add_argument("--timeout", type=float, default=3600.0, help="deadline of the call in seconds")
    for name, help_text in (
        ("eval", "quality metrics of a video, an output or a speaker model (see a2v eval -h)"),
        ("bench", "speed benchmarks: real-time factors per stage, replicas, memory (see a2v bench -h)"),
    ):
        extra = commands.add_parser(name, help=help_text, add_help=False)
        extra.add_argument("arguments", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # eval and bench have their own parsers (their tools are importable on their own too).
    if argv and argv[0] == "eval":
        from services.evaluation.cli import main as evaluation_main

        return evaluation_main(argv[1:], prog="a2v eval")
    if argv and argv[0] == "bench":
        from deploy.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command in ("up", "down", "status"):
        return local.main([args.command])
    try:
        return run_command(args)
    except CommandError as exc:
        print(f"a2v: error: {exc}", file=sys.stderr)
        return exc.status
    except grpc.RpcError as exc:
        print(f"a2v: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def run_command(args: argparse.Namespace) -> int:
    if args.command == "stage":
        if not args.name:
            print("stages and their methods:\n" + describe_stages())
            return 0
        if not args.method:
            raise CommandError(f"name a method of {args.name}:\n{describe_stages()}", status=2)
        request = args.request_file.read_text() if args.request_file else args.request
        result = call_stage(
            args.name, args.method, request, timeout_seconds=args.timeout, on_progress=print_stage_progress
        )
        print(file=sys.stderr)
        print(json.dumps(result, indent=2))
        return 0

    connection = Connection()
    started = time.monotonic()
    if args.command == "train":
        options = pb.TrainOptions()
        if args.epochs:
            options.training.max_epochs = args.epochs
        job = connection.train(args.speaker, args.videos, options)
    else:
        options = pb.JobOptions(retiming=not args.no_retiming, chunk_frames=args.chunk_frames)
        job = connection.render(args.speaker, args.audio, args.video, options)
    print(f"job {job.id}")
    job = connection.follow(job.id)
    if reason := job_outcome(job):
        raise CommandError(reason)
    if args.command == "train":
        print(f"trained {job.train_result.model.prefix} in {time.monotonic() - started:.0f} s")
    else:
        connection.download(job, args.out)
        result = job.render_result
        print(
            f"wrote {args.out} ({result.frame_count} frames, {result.duration_seconds:.1f} s, "
            f"{result.width}x{result.height}) in {time.monotonic() - started:.0f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
