"""`make demo`: start the local stack, train the speaker if needed, render the audio onto the target video.

Defaults use the real sample data beside the repository: the `obama` speaker trained on all the Obama footage
(obama_clip1, obama_clip2, obama_weekly_720p: 84 s; once, the model is kept), driven by commentary_60s.wav onto
obama_clip2.mp4, written to out/demo.mp4.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc

from audio2video.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc
from audio2video.orchestrator.v1 import orchestrator_pb2
from client.jobs import CommandError, Connection, interrupted, job_outcome
from deploy.local import REPO, LocalStack, stack_environment
from deploy.samples import SAMPLE_DATA
from services.runtime.clients import create_channel
from services.runtime.config import service_address
from services.runtime.security import ClientSecurity

DEFAULT_AUDIO = SAMPLE_DATA / "audio" / "commentary_60s.wav"
DEFAULT_VIDEO = SAMPLE_DATA / "speakers" / "obama" / "obama_clip2.mp4"
DEFAULT_TRAINING = [
    SAMPLE_DATA / "speakers" / "obama" / name
    for name in ("obama_clip1.mp4", "obama_clip2.mp4", "obama_weekly_720p.mp4")
]


def speaker_has_model(environ: dict[str, str], speaker: str) -> bool:
    """Whether TF Serving (through the lipsync stage) has a version of the speaker's model AVAILABLE."""
    secured = stack_environment(environ)  # with A2V_TLS on: the local caller's certificate and token
    channel = create_channel(
        service_address("lipsync", environ), timeout_seconds=30, security=ClientSecurity.from_env(secured)
    )
    stub = lipsync_pb2_grpc.LipsyncServiceStub(channel)
    try:
        return stub.DescribeModel(lipsync_pb2.DescribeModelRequest(speaker=speaker)).latest_available_version > 0
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise
    finally:
        channel.close()


def follow(connection: Connection, job: orchestrator_pb2.Job) -> orchestrator_pb2.Job:
    """The job once it ended; Ctrl-C offers to cancel it (or says how to find it again) instead of a traceback."""
    try:
        return connection.follow(job.id)
    except KeyboardInterrupt:
        raise SystemExit(interrupted(connection, job.id)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.splitlines()[0])
    parser.add_argument("--audio", type=Path, default=DEFAULT_AUDIO, help="speech to lip-sync (any audio file)")
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO, help="target video of the speaker")
    parser.add_argument("--speaker", default="obama", help="speaker model name")
    parser.add_argument(
        "--train",
        type=Path,
        nargs="*",
        default=None,
        help="videos to train the speaker on when it has no model (default: the three Obama clips)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "out" / "demo.mp4", help="where to write the video")
    parser.add_argument("--no-retiming", action="store_true", help="play the target as it is (no re-timing)")
    args = parser.parse_args(argv)

    env = stack_environment()
    stack = LocalStack(env)
    print("1. local stack")
    if stack.up() != 0:
        return 1
    client_env = {**env, **stack.client_environment()}
    try:
        connection = Connection(env)
        if not speaker_has_model(client_env, args.speaker):
            videos = args.train or DEFAULT_TRAINING
            print(f"2. training speaker {args.speaker!r} on {', '.join(v.name for v in videos)} (once)")
            job = connection.train(args.speaker, [v.resolve() for v in videos])
            job = follow(connection, job)
            if reason := job_outcome(job):
                raise CommandError(reason)
            print(f"   model {job.train_result.model.prefix}")
            deadline = time.monotonic() + 60
            while not speaker_has_model(client_env, args.speaker):  # TF Serving picks the new version up
                if time.monotonic() > deadline:
                    raise CommandError("the trained model did not become available in TF Serving")
                time.sleep(1)
        else:
            print(f"2. speaker {args.speaker!r} already has a model")
        print(f"3. rendering {args.audio.name} onto {args.video.name} (job through the orchestrator)")
        started = time.monotonic()
        options = orchestrator_pb2.JobOptions(retiming=not args.no_retiming)
        job = connection.render(args.speaker, args.audio.resolve(), args.video.resolve(), options)
        job = follow(connection, job)
        if reason := job_outcome(job):
            raise CommandError(reason)
        result = job.render_result
        print(
            f"   {result.frame_count} frames ({result.duration_seconds:.1f} s) at {result.width}x{result.height} "
            f"in {time.monotonic() - started:.0f} s"
        )
        connection.download(job, args.out)
    except CommandError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return exc.status
    except grpc.RpcError as exc:
        print(f"demo failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(f"4. wrote {args.out}  (the stack stays up: `make down` stops it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
