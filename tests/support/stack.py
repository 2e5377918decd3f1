"""The real local stack with a tiny trained speaker, shared by the tests that render through it.

One stack (two texture replicas, as deployments scale it) trained once per test session (`e2e_stack` in
tests/conftest.py): tests/test_e2e.py drives it as a user does, tests/evaluation/test_resynth.py renders on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from audio2video.lipsync.v1 import lipsync_pb2
from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from audio2video.orchestrator.v1 import orchestrator_pb2_grpc
from client.jobs import upload
from deploy.demo import speaker_has_model
from deploy.local import stack_environment
from services.runtime.blobstore import BlobStore
from services.runtime.config import Config
from services.runtime.security import ClientSecurity
from tests.conftest import REPO, SHARED_DATA, make_stack_env, stop_stack, wait_until
from tests.support.otlp import SpanReceiver

SPEAKER = "e2e"
SPEAKER_VIDEO = SHARED_DATA / "speakers" / "feifeili" / "feifeili_clip3.mp4"


def a2v(env, *args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Stack:
    """The running stack: its environment, the orchestrator's stub, the store, the pids of its processes."""

    def __init__(self, env: dict[str, str], spans: SpanReceiver | None = None) -> None:
        self.env = env
        self.spans = spans  # what the stack's processes exported over OTLP
        # As `a2v` calls it: with A2V_TLS on, over mTLS with the local caller's token (made by `a2v up`).
        security = ClientSecurity.from_env(stack_environment(env))
        self.stub = orchestrator_pb2_grpc.OrchestratorServiceStub(security.channel(env["A2V_ORCHESTRATOR_ADDR"], []))
        self.store = BlobStore.from_config(Config.from_env("test", stack_environment(env)).store)
        self.tls = security.tls.enabled

    def pid(self, name: str) -> int:
        state = json.loads((Path(self.env["A2V_STACK_DIR"]) / "state.json").read_text())
        return next(entry["pid"] for entry in state if entry["name"] == name)

    def spec(self, audio: Path, **options) -> pb.RenderJobSpec:
        return pb.RenderJobSpec(
            audio=upload(self.store, audio),
            target_video=upload(self.store, SPEAKER_VIDEO),
            model=lipsync_pb2.ModelSpec(speaker=SPEAKER),
            options=pb.JobOptions(**options),
        )

    def submit(self, audio: Path, **options) -> pb.Job:
        return self.stub.SubmitJob(pb.SubmitJobRequest(spec=self.spec(audio, **options)), timeout=60).job

    def job(self, job_id: str) -> pb.Job:
        return self.stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30).job

    def wait(self, job_id: str, timeout: float = 600) -> pb.Job:
        for _ in self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout):
            pass
        return self.job(job_id)

    def poll(self, job_id: str, timeout: float = 600) -> pb.Job:
        """The job once terminal, by polling (survives an orchestrator restart, unlike a watch stream)."""
        terminal = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)

        def finished():
            try:
                return self.job(job_id).state in terminal
            except grpc.RpcError:
                return False

        assert wait_until(finished, timeout=timeout, interval=0.5)
        return self.job(job_id)


@contextmanager
def trained_stack(root: Path, *, tls: bool = False) -> Iterator[Stack]:
    """The local stack with two texture replicas and the `e2e` speaker trained through the job API; stopped after.

    With `tls` every service of ours takes mTLS and bearer tokens only (`A2V_TLS=1 a2v up`: a throwaway CA).
    """
    env = make_stack_env(root, replicas=2)
    if tls:
        env["A2V_TLS"] = "1"
    env["A2V_JOB_LEASE_SECONDS"] = "6"  # a second orchestrator takes over a dead one's jobs within seconds
    # Traces on, as a deployment with a collector has them: every process exports to a receiver in this process.
    spans = SpanReceiver()
    spans.start()
    env["A2V_OTLP_ENDPOINT"] = spans.endpoint
    env["OTEL_BSP_SCHEDULE_DELAY"] = "200"  # milliseconds between exports (default 5 s)
    try:
        up = a2v(env, "up", timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        running = Stack(env, spans)
        # Training through the job API, short (the quality run is `python -m evaluation.quality`).
        spec = pb.TrainJobSpec(
            speaker=SPEAKER,
            videos=[pb.TrainingVideo(clip_id="clip3", video=upload(running.store, SPEAKER_VIDEO))],
        )
        spec.options.training.max_epochs = 3
        job = running.stub.TrainSpeaker(pb.TrainSpeakerRequest(spec=spec), timeout=60).job
        events = list(running.stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=600))
        assert events[0].HasField("snapshot")
        trained = running.job(job.id)
        assert trained.state == pb.JOB_STATE_SUCCEEDED, trained.failure_reason
        assert trained.train_result.model.version >= 1
        assert any(e.HasField("progress") for e in events)
        stages = {pb.STAGE_AUDIO, pb.STAGE_FACE, pb.STAGE_DATASET, pb.STAGE_TRAIN, pb.STAGE_EXPORT}
        assert {s.stage for s in trained.stages} == stages
        assert all(s.state == pb.STAGE_STATE_SUCCEEDED for s in trained.stages)
        # The job ends once TF Serving serves the new version: the model sync copied it from the store and sent
        # the stand-in its new model list (HandleReloadConfigRequest), which started with none.
        assert trained.train_result.model.state == lipsync_pb2.MODEL_STATE_AVAILABLE, trained.train_result.model
        assert speaker_has_model(env, SPEAKER)
        yield running
    finally:
        stop_stack(env)
        spans.stop()
