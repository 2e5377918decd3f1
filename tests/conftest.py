"""Fixtures that start real servers (the S3 server, gRPC services on loopback) and always stop them."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local import WEED_PORT_COUNT, weed_command
from deploy.ports import free_port, free_port_block, isolated_stack_env
from deploy.samples import SAMPLE_DATA
from services.runtime.blobstore import BlobStore, wait_for_store
from services.runtime.config import StoreConfig

ACCESS_KEY = "a2v-test"
SECRET_KEY = "a2v-test-secret-key"
REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = SAMPLE_DATA


class S3Server:
    """A real `weed mini` process on loopback with its own data folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.port_base = free_port_block(WEED_PORT_COUNT)
        self.log_path = root / "s3.log"
        self.process: subprocess.Popen | None = None

    def config(self, bucket: str = "a2v-test") -> StoreConfig:
        return StoreConfig(
            endpoint=self.endpoint,
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            bucket=bucket,
            part_size_bytes=5 * 1024 * 1024,
        )

    def env(self, bucket: str = "a2v-test") -> dict[str, str]:
        """Environment a service process needs to use this server."""
        return {
            "A2V_S3_ENDPOINT": self.endpoint,
            "A2V_S3_ACCESS_KEY": ACCESS_KEY,
            "A2V_S3_SECRET_KEY": SECRET_KEY,
            "A2V_S3_BUCKET": bucket,
        }

    def start(self) -> None:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                weed_command(self.root / "data", self.endpoint, self.port_base),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_for_store(BlobStore.from_config(self.config()), timeout_seconds=60)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def store(s3_server) -> BlobStore:
    """A blob store on the session's S3 server; each test writes under its own key prefix."""
    return BlobStore.from_config(s3_server.config())


@pytest.fixture()
def key_prefix() -> str:
    return f"test/{uuid.uuid4().hex[:12]}"


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture()
def run_server():
    """Start real gRPC servers on loopback port 0 for given bindings; all are stopped after the test."""
    from services.runtime.config import ServerConfig
    from services.runtime.server import create_server

    servers = []

    def start(bindings, **config) -> int:
        server, port = create_server(ServerConfig(service="test", **config), bindings)
        server.start()
        server.load_and_mark_serving()
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop(0).wait()


def analyse_clip(store: BlobStore, key: str, path: Path, frames: int):
    """Store the first `frames` frames of a real clip and analyse them with the face stage (no gRPC)."""
    from audio2video.face.v1 import face_pb2
    from services.face.servicer import FaceServicer
    from services.runtime.media import iter_frames
    from services.runtime.protos import object_ref
    from tests.face.helpers import encode_clip

    images = [image for _, _, image in iter_frames(path, stop=frames)]
    video = object_ref(store.put_bytes(key, encode_clip(images), content_type="video/mp4"))
    events = list(FaceServicer(store).Analyze(face_pb2.AnalyzeRequest(video=video), None))
    return video, events[-1].result


@pytest.fixture(scope="session")
def katie_target(s3_server):
    """A real 512x512 target with visible teeth, 100 frames, analysed: (video ref, AnalyzeResult)."""
    store = BlobStore.from_config(s3_server.config())
    return analyse_clip(store, "fixtures/katie100.mp4", SHARED_DATA / "targets" / "hdtf_katiehill_512.mp4", 100)


def make_stack_env(root: Path, *, replicas: int = 1) -> dict[str, str]:
    """Environment for a stack on free ports with its own state folder under `root` (never the developer's)."""
    return isolated_stack_env(root / "stack", replicas=replicas)


def stop_stack(env: dict[str, str]) -> None:
    """Whatever happened, stop what a test started."""
    subprocess.run(["make", "-s", "down"], cwd=REPO, env=env, capture_output=True, timeout=120)


@pytest.fixture()
def stack_env(tmp_path):
    """Environment for a stack on free ports with its own state folder; the stack is stopped afterwards."""
    env = make_stack_env(tmp_path)
    yield env
    stop_stack(env)


@pytest.fixture(scope="session")
def e2e_stack(tmp_path_factory):
    """The local stack with the tiny `e2e` speaker trained, once per session (tests/support/stack.py)."""
    from tests.support.stack import trained_stack

    with trained_stack(tmp_path_factory.mktemp("e2e")) as stack:
        yield stack


@pytest.fixture(scope="session")
def e2e_tls_stack(tmp_path_factory):
    """The same stack with TLS and tokens on (`A2V_TLS=1 a2v up`), for the e2e suite's second mode."""
    from tests.support.stack import trained_stack

    with trained_stack(tmp_path_factory.mktemp("e2e-tls"), tls=True) as stack:
        yield stack
