"""Texture synthesis throughput with 1 and 2 local replicas behind one round-robin channel (prints only).

Needs the local stack's object store (`make up`). Each replica is a real `python -m services.texture`
process limited to one BLAS thread; chunks are fanned out as the orchestrator does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from audio2video.common.v1 import common_pb2
from audio2video.face.v1 import face_pb2
from audio2video.texture.v1 import texture_pb2, texture_pb2_grpc
from deploy.local import REPO, LocalStack, stack_environment
from deploy.samples import SAMPLE_DATA
from services.face.servicer import FaceServicer
from services.runtime.blobstore import BlobStore
from services.runtime.clients import create_channel, wait_for_serving
from services.runtime.config import Config
from services.runtime.protos import array_ref, object_ref

SERVICE = "audio2video.texture.v1.TextureService"
CHUNK = 30


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(replicas: int, store: BlobStore | None, env: dict, manifest, shapes_ref, frames: int) -> float:
    """Frames/s of `replicas` fresh texture processes synthesizing `frames` frames (`store` is unused)."""
    ports = [free_port() for _ in range(replicas)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "services.texture"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={
                **env,
                "A2V_LISTEN": f"127.0.0.1:{port}",
                "OPENBLAS_NUM_THREADS": "1",
                "OMP_NUM_THREADS": "1",
                "OPENCV_FOR_THREADS_NUM": "1",
            },
        )
        for port in ports
    ]
    try:
        for port in ports:
            wait_for_serving(f"127.0.0.1:{port}", SERVICE, timeout_seconds=60)
        target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
        stub = texture_pb2_grpc.TextureServiceStub(create_channel(target, [SERVICE], timeout_seconds=600))
        run_id = uuid.uuid4().hex[:8]

        def chunk(start: int, warm: bool = False):
            prefix = f"bench/texture/{run_id}/{'warm' if warm else 'run'}/{start}"
            request = texture_pb2.SynthesizeRequest(
                frames=common_pb2.FrameRange(start=start, stop=min(start + CHUNK, frames)),
                mouth_shapes=shapes_ref,
                target_analysis=manifest,
                output_prefix=prefix,
            )
            return list(stub.Synthesize(request))[-1].result.frames_written

        with ThreadPoolExecutor(max_workers=replicas) as pool:  # each replica loads (and caches) the target
            list(pool.map(lambda s: chunk(s, warm=True), [0] * replicas * 2))
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=replicas) as pool:  # one chunk in flight per replica
            written = sum(pool.map(chunk, range(0, frames, CHUNK)))
        return written / (time.perf_counter() - started)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def prepare_inputs(store: BlobStore, frames: int = 240):
    """Analyse obama_clip2 (in this process) and store a driving track of `frames` of its own shapes, reversed.

    Returns:
        (analysis manifest ObjectRef, mouth shapes ArrayRef, frames of the target).
    """
    path = SAMPLE_DATA / "speakers" / "obama" / "obama_clip2.mp4"
    video = object_ref(
        store.put_content_addressed("uploads", path.read_bytes(), suffix=".mp4", content_type="video/mp4")
    )
    analysis = list(FaceServicer(store).Analyze(face_pb2.AnalyzeRequest(video=video), None))[-1].result
    shapes = store.get_array(analysis.analysis.mouth_shapes.object.key)[0]
    drive = np.ascontiguousarray(shapes[::-1][:frames])  # the clip's own shapes, reversed: a new track
    shapes_ref = array_ref(*store.put_array(f"bench/texture/shapes-{frames}.npy", drive, fps=30.0))
    return analysis.manifest, shapes_ref, len(shapes)


def measure(env: dict, manifest, shapes_ref, frames: int, replica_counts=(1, 2)) -> dict:
    """Frames/s of texture synthesis with each number of fresh replicas (real processes, one BLAS thread each).

    Args:
        env: Environment of the replicas (the object store's address and credentials).
        manifest: ObjectRef of the target's analysis manifest.
        shapes_ref: ArrayRef of float32 [>= frames, 20, 2] driving mouth shapes.
        frames: Output frames synthesized per measurement, in chunks of CHUNK.

    Returns:
        dict: frames, chunk, frames_per_second and speedup (against the first count), keyed by the replica
        count as a string.
    """
    rates = {n: run(n, None, env, manifest, shapes_ref, frames) for n in replica_counts}
    first = rates[replica_counts[0]]
    return {
        "frames": frames,
        "chunk": CHUNK,
        "frames_per_second": {str(n): rate for n, rate in rates.items()},
        "speedup": {str(n): rate / first for n, rate in rates.items()},
    }


def main() -> int:
    env = {**os.environ, **stack_environment()}
    stack = LocalStack(env)
    if stack.status() != 0:
        print("the local stack is not up: run `make up` first", file=sys.stderr)
        return 1
    store = BlobStore.from_config(Config.from_env("bench", env).store)
    frames = 240
    manifest, shapes_ref, target_frames = prepare_inputs(store, frames)
    results = measure(env, manifest, shapes_ref, frames)
    print(
        f"texture synthesis, {frames} frames in chunks of {CHUNK}, n = 100, 150x180 crops, target of "
        f"{target_frames} frames, on {os.cpu_count()} cores:"
    )
    for replicas, rate in results["frames_per_second"].items():
        print(f"  {replicas} replica(s): {rate:6.1f} frames/s   speed-up {results['speedup'][replicas]:.2f}x")
    print("target (issue 5): 2 replicas >= 1.8x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
