"""`make demo`: start the local stack, store the inputs, and drive the stages over gRPC.

Until the orchestrator lands (issue 7) this shows what the running system answers: every stage's
health and API, and real calls to the stages built so far (audio features, face analysis).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from audio2video.audio.v1 import audio_pb2, audio_pb2_grpc
from audio2video.common.v1 import common_pb2
from audio2video.face.v1 import face_pb2, face_pb2_grpc
from deploy.local import COMPONENTS, LocalStack, stack_environment
from deploy.samples import SAMPLE_DATA
from services.runtime.blobstore import BlobStore
from services.runtime.clients import create_channel, health_status
from services.runtime.config import Config

SHARED_DATA = SAMPLE_DATA
DEFAULT_AUDIO = SHARED_DATA / "audio" / "commentary_60s.wav"
DEFAULT_VIDEO = SHARED_DATA / "speakers" / "obama" / "obama_clip2.mp4"
CONTENT_TYPES = {".wav": "audio/wav", ".mp3": "audio/mpeg", ".m4a": "audio/mp4", ".mp4": "video/mp4"}


def upload(store: BlobStore, path: Path) -> common_pb2.ObjectRef:
    """Store a local input under its content hash (re-running the demo stores nothing twice)."""
    if not path.is_file():
        raise SystemExit(f"input not found: {path}")
    content_type = CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
    ref = store.put_content_addressed(
        "uploads",
        path.read_bytes(),
        suffix=path.suffix.lower(),
        content_type=content_type,
        metadata={"filename": path.name},
    )
    print(f"  stored {path.name} as s3://{ref.bucket}/{ref.key} ({ref.size_bytes} bytes)")
    return common_pb2.ObjectRef(
        bucket=ref.bucket, key=ref.key, sha256=ref.sha256, content_type=content_type, size_bytes=ref.size_bytes
    )


def final(events, stage: str):
    """Follow a progress stream on one line; return its result."""
    for event in events:
        if event.HasField("progress"):
            p = event.progress
            total = f"/{p.total}" if p.total else ""
            print(f"\r  {stage:<14} {p.done}{total} {p.unit}   ", end="", flush=True)
        else:
            print("\r", end="")
            return event.result
    raise RuntimeError(f"{stage} ended without a result")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.splitlines()[0])
    parser.add_argument("--audio", type=Path, default=DEFAULT_AUDIO, help="speech to lip-sync (any audio file)")
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO, help="target video of the speaker")
    args = parser.parse_args(argv)

    env = stack_environment()
    stack = LocalStack(env)
    print("1. local stack")
    if stack.up() != 0:
        return 1

    print("2. inputs into the object store")
    store = BlobStore.from_config(Config.from_env("demo", env).store)
    audio_ref = upload(store, args.audio.resolve())
    video_ref = upload(store, args.video.resolve())

    print("3. stages over gRPC (health and API, read by reflection)")
    addresses = stack.client_environment()
    for component in COMPONENTS:
        address = addresses[f"A2V_{component.name.upper()}_ADDR"]
        with grpc.insecure_channel(address) as channel:
            state = health_status(channel, component.grpc_service)
            pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
            methods = [method.name for method in pool.FindServiceByName(component.grpc_service).methods]
        print(f"  {component.name:<13} {state:<12} {', '.join(methods)}")

    print("4. the stages that are built, on the stored inputs")
    face = face_pb2_grpc.FaceServiceStub(
        create_channel(addresses["A2V_FACE_ADDR"], ["audio2video.face.v1.FaceService"], timeout_seconds=1800)
    )
    audio = audio_pb2_grpc.AudioServiceStub(
        create_channel(addresses["A2V_AUDIO_ADDR"], ["audio2video.audio.v1.AudioService"], timeout_seconds=600)
    )
    try:
        info = face.Probe(face_pb2.ProbeRequest(video=video_ref, request_id="demo")).info
        rate = info.frame_rate
        print(f"  face.Probe      {info.width}x{info.height} {info.codec} at {rate.numerator}/{rate.denominator} fps")
        extract = final(audio.Extract(audio_pb2.ExtractRequest(audio=audio_ref, output_frame_rate=rate)), "audio")
        print(
            f"  audio.Extract   {extract.duration_seconds:.1f} s of {extract.source_codec}: features "
            f"{list(extract.features.meta.shape)}, {extract.output_frame_count} output frames, "
            f"{extract.speech_fraction:.0%} speech{' (cached)' if extract.cached else ''}"
        )
        analysis = final(face.Analyze(face_pb2.AnalyzeRequest(video=video_ref, request_id="demo")), "face")
        summary = analysis.analysis
        print(
            f"  face.Analyze    {summary.valid_frame_count}/{summary.info.frame_count} frames with a face, "
            f"crops {list(summary.crops.meta.shape)}{' (cached)' if analysis.cached else ''}"
        )
        print(f"                  manifest s3://{analysis.manifest.bucket}/{analysis.manifest.key}")
    except grpc.RpcError as exc:
        print(f"  failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print("  lip sync, texture, teeth, re-timing and compositing land with issues 4-7: no video is rendered yet.")
    print("  The stack stays up for more calls; `make down` stops it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
