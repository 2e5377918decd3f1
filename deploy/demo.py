"""`make demo`: start the local stack, train the speaker if needed, render the audio onto the target video.

Defaults use the real sample data beside the repository: the `obama` speaker trained on obama_clip1.mp4
(once; the model is kept), driven by commentary_60s.wav onto obama_clip2.mp4, written to out/demo.mp4.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc

from audio2video.lipsync.v1 import lipsync_pb2
from audio2video.orchestrator.v1 import orchestrator_pb2
from deploy.local import REPO, LocalStack, stack_environment
from deploy.samples import SAMPLE_DATA
from orchestrator.cli import upload
from orchestrator.pipeline import Pipeline, StageClients
from services.runtime.blobstore import BlobStore
from services.runtime.config import Config

DEFAULT_AUDIO = SAMPLE_DATA / "audio" / "commentary_60s.wav"
DEFAULT_VIDEO = SAMPLE_DATA / "speakers" / "obama" / "obama_clip2.mp4"
DEFAULT_TRAINING = [SAMPLE_DATA / "speakers" / "obama" / "obama_clip1.mp4"]


class ProgressLine:
    """One updating terminal line per stage."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.last = ""

    def __call__(self, stage: int, done: int, total: int, unit: str) -> None:
        name = orchestrator_pb2.Stage.Name(stage).removeprefix("STAGE_").lower()
        amount = f"{done}/{total}" if total else f"{done}"
        line = f"  {name:<10} {amount} {unit}  ({time.monotonic() - self.started:.0f} s)"
        if line != self.last:
            print(f"\r{line:<70}", end="", flush=True)
            self.last = line

    def done(self, message: str) -> None:
        print(f"\r  {message:<70}")


def speaker_has_model(clients: StageClients, speaker: str) -> bool:
    try:
        return (
            clients.lipsync.DescribeModel(lipsync_pb2.DescribeModelRequest(speaker=speaker)).latest_available_version
            > 0
        )
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise


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
        help="videos to train the speaker on when it has no model (default: obama_clip1.mp4)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "out" / "demo.mp4", help="where to write the video")
    parser.add_argument("--no-retiming", action="store_true", help="play the target as it is (no re-timing)")
    args = parser.parse_args(argv)

    env = stack_environment()
    stack = LocalStack(env)
    print("1. local stack")
    if stack.up() != 0:
        return 1
    store = BlobStore.from_config(Config.from_env("demo", env).store)
    client_env = {**env, **stack.client_environment()}
    clients = StageClients.from_env(client_env)
    pipeline = Pipeline(clients, models_dir=str(stack.models_dir))
    try:
        if not speaker_has_model(clients, args.speaker):
            videos = args.train or DEFAULT_TRAINING
            print(f"2. training speaker {args.speaker!r} on {', '.join(v.name for v in videos)}")
            progress = ProgressLine()
            spec = orchestrator_pb2.TrainJobSpec(
                speaker=args.speaker,
                videos=[
                    orchestrator_pb2.TrainingVideo(clip_id=v.stem, video=upload(store, v.resolve())) for v in videos
                ],
            )
            card = pipeline.train(spec, progress=progress, store_env=env)
            progress.done(card["summary"])
            deadline = time.monotonic() + 60
            while not speaker_has_model(clients, args.speaker):  # TF Serving picks the new version up
                if time.monotonic() > deadline:
                    print("the trained model did not become available in TF Serving", file=sys.stderr)
                    return 1
                time.sleep(1)
        else:
            print(f"2. speaker {args.speaker!r} already has a model")
        print(f"3. rendering {args.audio.name} onto {args.video.name}")
        progress = ProgressLine()
        spec = orchestrator_pb2.RenderJobSpec(
            audio=upload(store, args.audio.resolve()),
            target_video=upload(store, args.video.resolve()),
            model=lipsync_pb2.ModelSpec(speaker=args.speaker),
            options=orchestrator_pb2.JobOptions(retiming=not args.no_retiming),
        )
        result = pipeline.render(spec, progress=progress)
        progress.done(
            f"rendered {result.frame_count} frames ({result.duration_seconds:.1f} s) at "
            f"{result.width}x{result.height} in {time.monotonic() - progress.started:.0f} s"
        )
    except grpc.RpcError as exc:
        print(f"\nfailed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    store.get_file(result.video.key, args.out)
    print(f"4. wrote {args.out}  (the stack stays up: `make down` stops it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
