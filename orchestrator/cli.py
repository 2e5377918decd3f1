"""The `a2v` command: the local stack, jobs through the orchestrator's gRPC API (`client.jobs`), and single stage
calls. Nothing imports it: what other code needs lives in `client`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from audio2video.common.v1 import common_pb2
from audio2video.lipsync.v1 import lipsync_pb2
from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from client.jobs import (
    INTERRUPTED,
    JOB_STATES,
    TERMINAL,
    CommandError,
    Connection,
    interrupted,
    job_outcome,
    queue_text,
)
from client.stages import STAGE_SERVICES, call_stage, describe_stages
from deploy import local
from services.runtime.clients import rpc_failure


def job_table(jobs: Sequence[pb.Job]) -> str:
    """`a2v jobs`: one line per job, newest first."""
    rows = [("JOB", "KIND", "STATE", "SPEAKER", "CREATED", "DONE", "TOOK", "NOTE")]
    for job in jobs:
        kind = "train" if job.kind == pb.JOB_KIND_TRAIN_SPEAKER else "render"
        speaker = job.train.speaker if job.kind == pb.JOB_KIND_TRAIN_SPEAKER else job.render.model.speaker
        created = job.created.ToDatetime().astimezone() if job.HasField("created") else None
        end = job.finished.ToSeconds() if job.HasField("finished") else time.time()
        took = f"{end - job.started.ToSeconds():.0f} s" if job.HasField("started") else ""
        note = job.failure_reason if job.state in (pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED) else ""
        if job.state == pb.JOB_STATE_QUEUED:
            note = queue_text(job).strip()
        if job.cancel_requested and job.state not in TERMINAL:
            note = "cancelling"
        rows.append(
            (
                job.id,
                kind,
                pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower(),
                speaker,
                created.strftime("%Y-%m-%d %H:%M:%S") if created else "",
                f"{job.fraction_done:.0%}",
                took,
                note[:60],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def speaker_table(described: Sequence[lipsync_pb2.DescribeModelResponse]) -> str:
    """`a2v speakers`: one line per stored model version; SERVED says whether TF Serving has it loaded, and
    which version a job that names no version gets (latest); NOTE why a version is not served."""
    rows = [("SPEAKER", "VERSION", "STATE", "SERVED", "CREATED", "PCA", "NOTE")]
    for response in described:
        for version in response.versions:
            served = version.state == lipsync_pb2.MODEL_STATE_AVAILABLE
            created = version.created.ToDatetime().astimezone() if version.HasField("created") else None
            rows.append(
                (
                    response.speaker,
                    str(version.version),
                    lipsync_pb2.ModelState.Name(version.state).removeprefix("MODEL_STATE_").lower(),
                    ("yes (latest)" if version.version == response.latest_available_version else "yes")
                    if served
                    else "no",
                    created.strftime("%Y-%m-%d %H:%M:%S") if created else "",
                    str(version.pca_components or ""),
                    version.serving_note,
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


# -- a2v stage ---------------------------------------------------------------------------------


def print_stage_progress(progress: common_pb2.Progress) -> None:
    amount = f"{progress.done}/{progress.total}" if progress.total else str(progress.done)
    print(f"\r  {progress.stage or 'progress'} {amount} {progress.unit}", end="", flush=True, file=sys.stderr)


# -- the command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="a2v",
        description="audio2video: audio-driven lip sync. Jobs run in the orchestrator: leaving a command that "
        "follows one (Ctrl-C) leaves the job running; a2v watch / a2v cancel find it again.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("up", help="start the local stack (object store and every service)")
    commands.add_parser("down", help="stop the local stack")
    commands.add_parser("status", help="show each component of the local stack and its health")
    train = commands.add_parser("train", help="train a speaker's model from videos of the speaker")
    train.add_argument("--speaker", required=True, help="speaker name, [a-z0-9_-]{1,64}: the model's name")
    train.add_argument("--epochs", type=int, help="maximum training epochs (default: the trainer's)")
    train.add_argument("videos", type=Path, nargs="+", help="videos of the speaker talking, with their audio")
    run = commands.add_parser("run", help="lip-sync AUDIO onto VIDEO with a trained speaker model")
    run.add_argument("--speaker", required=True, help="trained speaker model to use (a2v speakers lists them)")
    run.add_argument("--audio", type=Path, required=True, help="speech to lip-sync (any audio or video file)")
    run.add_argument("--video", type=Path, required=True, help="target video of the speaker facing the camera")
    run.add_argument("--out", type=Path, required=True, help="where to write the lip-synced mp4")
    run.add_argument("--no-retiming", action="store_true", help="play the target as it is")
    run.add_argument("--chunk-frames", type=int, default=0, help="frames per texture/composite chunk")
    jobs = commands.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--state", choices=JOB_STATES, help="only jobs in this state (default: any)")
    jobs.add_argument("--kind", choices=("render", "train"), help="only render or only training jobs")
    jobs.add_argument("--speaker", default="", help="only jobs of this speaker")
    jobs.add_argument("--limit", type=int, default=20, help="at most this many jobs (default 20, at most 500)")
    watch = commands.add_parser("watch", help="follow a job's progress until it ends (exit status 0 if it succeeded)")
    watch.add_argument("job", help="job id (a2v jobs lists them)")
    cancel = commands.add_parser("cancel", help="cancel a job (it stops within seconds)")
    cancel.add_argument("job", help="job id (a2v jobs lists them)")
    retry = commands.add_parser(
        "retry", help="run a failed or cancelled job again, reusing what it finished, and follow it"
    )
    retry.add_argument("job", help="job id of a failed or cancelled job")
    retry.add_argument("--out", type=Path, help="where to write the video once a render job succeeds")
    get = commands.add_parser("get", help="download a finished render job's video")
    get.add_argument("job", help="job id of a render job that succeeded")
    get.add_argument("--out", type=Path, required=True, help="where to write the mp4")
    commands.add_parser("speakers", help="list the trained speakers, their model versions and whether each is served")
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
        extra.add_argument("arguments", nargs=argparse.REMAINDER, help=f"the arguments of a2v {name} (a2v {name} -h)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # eval and bench have their own parsers (their tools are importable on their own too).
    if argv and argv[0] == "eval":
        from evaluation.cli import main as evaluation_main

        return evaluation_main(argv[1:], prog="a2v eval")
    if argv and argv[0] == "bench":
        from deploy.bench.end_to_end import main as bench_main

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
        code, detail = rpc_failure(exc)
        print(f"a2v: error: {code.name}: {detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before a job exists (uploading) or while a short call waits: nothing to leave
        print("\na2v: interrupted", file=sys.stderr)
        return INTERRUPTED


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
    if args.command == "jobs":
        request = pb.ListJobsRequest(
            page_size=max(1, min(args.limit, 500)),
            state=pb.JobState.Value(f"JOB_STATE_{args.state.upper()}") if args.state else 0,
            kind={"render": pb.JOB_KIND_RENDER, "train": pb.JOB_KIND_TRAIN_SPEAKER}.get(args.kind or "", 0),
            speaker=args.speaker,
        )
        listed = connection.orchestrator.ListJobs(request).jobs
        print(job_table(listed) if listed else "no jobs")
        return 0
    if args.command == "speakers":
        described = connection.speakers()
        print(speaker_table(described) if described else "no trained speakers (a2v train --speaker NAME VIDEO...)")
        return 0
    if args.command == "cancel":
        job = connection.cancel(args.job)
        if job.state in TERMINAL:
            state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
            print(f"job {job.id} had already ended ({state})")
        else:
            print(f"cancelling job {job.id} (a2v watch {job.id} shows it stop)")
        return 0
    if args.command == "get":
        job = connection.job(args.job)
        if job.kind != pb.JOB_KIND_RENDER:
            raise CommandError(
                f"job {job.id} is a training job: its model is {job.train_result.model.prefix or 'not made'}"
            )
        if reason := job_outcome(job):
            raise CommandError(reason)
        connection.download(job, args.out)
        print(f"wrote {args.out}")
        return 0

    started = time.monotonic()
    if args.command == "watch":
        job = connection.job(args.job)
    elif args.command == "retry":
        job = connection.retry(args.job)
    elif args.command == "train":
        options = pb.TrainOptions()
        if args.epochs:
            options.training.max_epochs = args.epochs
        job = connection.train(args.speaker, args.videos, options)
    else:
        options = pb.JobOptions(retiming=not args.no_retiming, chunk_frames=args.chunk_frames)
        job = connection.render(args.speaker, args.audio, args.video, options)
    print(f"job {job.id}", flush=True)
    try:
        job = connection.follow(job.id)
    except KeyboardInterrupt:
        return interrupted(connection, job.id)
    if reason := job_outcome(job):
        raise CommandError(reason)
    if job.kind == pb.JOB_KIND_TRAIN_SPEAKER:
        took = f" in {time.monotonic() - started:.0f} s" if args.command == "train" else ""
        print(f"trained {job.train_result.model.prefix}{took}")
        if job.train_result.model.serving_note:
            print(f"a2v: warning: not served yet: {job.train_result.model.serving_note}", file=sys.stderr)
    elif args.command == "watch" or (args.command == "retry" and not args.out):
        print(f"job {job.id} succeeded: a2v get {job.id} --out FILE downloads the video")
    else:
        connection.download(job, args.out)
        result = job.render_result
        print(
            f"wrote {args.out} ({result.frame_count} frames, {result.duration_seconds:.1f} s, "
            f"{result.width}x{result.height}) in {time.monotonic() - started:.0f} s"
        )
        if line := confidence_line(result):
            print(line)
    return 0


def confidence_line(result: pb.RenderJobResult) -> str:
    """One line on the mouth: shares synthesized, faded and the target's own, and the worst frame ("" if unknown)."""
    total = result.frames_synthesized + result.frames_faded + result.frames_passthrough
    if total == 0:
        return ""
    line = (
        f"mouth: {100 * result.frames_synthesized / total:.1f} % synthesized, {100 * result.frames_faded / total:.1f} %"
        f" faded, {100 * result.frames_passthrough / total:.1f} % the target's own"
    )
    if result.frames_low_confidence:
        line += f" ({result.frames_low_confidence} frames of low confidence"
        if result.worst_frames:
            worst = result.worst_frames[0]
            line += f"; worst #{worst.frame}: {worst.reason} {worst.value:.3g}, confidence {worst.confidence:.2f}"
        line += ")"
    return line


if __name__ == "__main__":
    sys.exit(main())
