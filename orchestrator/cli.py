"""The `a2v` command: the local stack, and jobs through the orchestrator's gRPC API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

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


def upload(store: BlobStore, path: Path) -> common_pb2.ObjectRef:
    """A local input into the object store, under its content hash (re-running stores nothing twice)."""
    if not path.is_file():
        raise SystemExit(f"a2v: error: no such file: {path}")
    content_type = CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
    blob = store.put_content_addressed(
        "uploads",
        path.read_bytes(),
        suffix=path.suffix.lower(),
        content_type=content_type,
        metadata={"filename": path.name},
    )
    return object_ref(blob)


def follow(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, job_id: str) -> pb.Job:
    """Print the job's progress on one line per stage until it ends; return the final job."""
    last_stage = ""
    for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=24 * 3600):
        kind = event.WhichOneof("event")
        if kind == "progress":
            progress = event.progress
            stage = progress.stage.removeprefix("STAGE_").lower()
            if stage != last_stage and last_stage:
                print()
            last_stage = stage
            amount = f"{progress.done}/{progress.total}" if progress.total else str(progress.done)
            print(f"\r  {stage:<10} {amount} {progress.unit}   {event.job_fraction_done:5.0%}", end="", flush=True)
        elif kind == "state_changed" and event.state_changed.current in (
            pb.JOB_STATE_SUCCEEDED,
            pb.JOB_STATE_FAILED,
            pb.JOB_STATE_CANCELLED,
        ):
            print()
            break
    return stub.GetJob(pb.GetJobRequest(job_id=job_id)).job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="a2v", description="audio2video: audio-driven lip sync")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start the local stack (object store and every service)")
    commands.add_parser("down", help="stop the local stack")
    commands.add_parser("status", help="show each component of the local stack and its health")
    train = commands.add_parser("train", help="train a speaker's model from videos of the speaker")
    train.add_argument("--speaker", required=True)
    train.add_argument("videos", type=Path, nargs="+")
    run = commands.add_parser("run", help="lip-sync AUDIO onto VIDEO with a trained speaker model")
    run.add_argument("--speaker", required=True)
    run.add_argument("--audio", type=Path, required=True)
    run.add_argument("--video", type=Path, required=True)
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--no-retiming", action="store_true", help="play the target as it is")
    args = parser.parse_args(argv)
    if args.command in ("up", "down", "status"):
        return local.main([args.command])

    environ = local.stack_environment()
    try:
        store = BlobStore.from_config(Config.from_env("a2v", environ).store)
        address = service_address("orchestrator", environ)
    except ConfigError as exc:
        print(f"a2v: error: {exc}", file=sys.stderr)
        return 2
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(create_channel(address, [SERVICE], timeout_seconds=120))
    try:
        if args.command == "train":
            videos = [pb.TrainingVideo(clip_id=v.stem, video=upload(store, v)) for v in args.videos]
            job = stub.TrainSpeaker(
                pb.TrainSpeakerRequest(spec=pb.TrainJobSpec(speaker=args.speaker, videos=videos))
            ).job
        else:
            spec = pb.RenderJobSpec(
                audio=upload(store, args.audio),
                target_video=upload(store, args.video),
                model=lipsync_pb2.ModelSpec(speaker=args.speaker),
                options=pb.JobOptions(retiming=not args.no_retiming),
            )
            job = stub.SubmitJob(pb.SubmitJobRequest(spec=spec)).job
        print(f"job {job.id}")
        job = follow(stub, job.id)
    except grpc.RpcError as exc:
        print(f"a2v: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if job.state != pb.JOB_STATE_SUCCEEDED:
        print(
            f"a2v: error: job {job.id} {pb.JobState.Name(job.state).removeprefix('JOB_STATE_').lower()}: "
            f"{job.failure_reason or 'cancelled'}",
            file=sys.stderr,
        )
        return 1
    if args.command == "train":
        print(f"trained {job.train_result.model.prefix}")
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(job.result.key, args.out, bucket=job.result.bucket or None)
        result = job.render_result
        print(
            f"wrote {args.out} ({result.frame_count} frames, {result.duration_seconds:.1f} s, "
            f"{result.width}x{result.height})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
