"""Following a job from the command line: replayed events, a watch that survives an orchestrator restart, Ctrl-C.

The orchestrator here is the real one (OrchestratorServicer over JobManager, manifests in the real S3 server) on
loopback; only the pipeline is a scripted one whose steps the test releases, so every event is known.
"""

import os
import pty
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from audio2video.common.v1 import common_pb2
from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from audio2video.orchestrator.v1 import orchestrator_pb2_grpc
from client.jobs import Connection, watch_events
from deploy.ports import free_port
from orchestrator.jobs import JobManager, JobRun
from orchestrator.pipeline import StageFailed
from orchestrator.servicer import OrchestratorServicer
from services.runtime.clients import create_channel
from services.runtime.config import ServerConfig
from services.runtime.errors import Cancelled
from services.runtime.server import binding_for, create_server
from tests.conftest import REPO, wait_until

STEPS = 6


class SteppedPipeline:
    """Renders in STEPS texture steps, each one once the test releases it; `first` skips steps a run before did."""

    def __init__(self, first: int = 1) -> None:
        self.first = first
        self.released = threading.Semaphore(0)

    def release(self, steps: int = 1) -> None:
        for _ in range(steps):
            self.released.release()

    def render(self, spec, *, reporter, stop):
        for done in range(self.first, STEPS + 1):
            while not self.released.acquire(timeout=0.05):
                if stop.is_set():
                    raise Cancelled("the job was cancelled")
            reporter.progress(pb.STAGE_TEXTURE, done, STEPS, "frames")
        return pb.RenderJobResult(video=common_pb2.ObjectRef(key="jobs/none/output.mp4"), frame_count=STEPS)


class Orchestrator:
    """The orchestrator's gRPC server on a fixed loopback port; `restart` replaces it as a new process would."""

    def __init__(self, store, port: int) -> None:
        self.store, self.port = store, port
        self.server = self.manager = None

    def start(self, pipeline: SteppedPipeline) -> JobManager:
        self.manager = JobManager(self.store, pipeline)
        binding = binding_for(pb, orchestrator_pb2_grpc, "OrchestratorService", OrchestratorServicer(self.manager))
        self.server, _ = create_server(ServerConfig(service="orchestrator", listen=f"127.0.0.1:{self.port}"), [binding])
        self.server.start()
        self.server.load_and_mark_serving()
        return self.manager

    def stop(self) -> None:
        self.server.stop(0).wait()


@pytest.fixture()
def orchestrator(store):
    started = []

    def start(pipeline: SteppedPipeline, port: int | None = None) -> Orchestrator:
        running = Orchestrator(store, port or free_port())
        running.start(pipeline)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
        for run in running.manager.runs.values():  # a job still blocked in a scripted pipeline ends
            run.stop.set()
        assert wait_until(lambda r=running: all(run.ended() for run in r.manager.runs.values()), timeout=10)


def submit(manager: JobManager, store, key_prefix: str) -> pb.Job:
    audio = store.put_bytes(f"{key_prefix}/audio.wav", b"RIFF", content_type="audio/wav")
    video = store.put_bytes(f"{key_prefix}/video.mp4", b"mp4", content_type="video/mp4")
    spec = pb.RenderJobSpec(
        audio=common_pb2.ObjectRef(key=audio.key),
        target_video=common_pb2.ObjectRef(key=video.key),
        model={"speaker": "nobody"},
    )
    return manager.submit(render=spec)


def client_env(s3_server, port: int) -> dict[str, str]:
    return {**s3_server.env(), "A2V_ORCHESTRATOR_ADDR": f"127.0.0.1:{port}", "A2V_WATCH_RECONNECT_SECONDS": "60"}


def progress_of(events) -> list[int]:
    return [e.progress.done for e in events if e.HasField("progress")]


def test_a_watch_resumes_after_the_last_event_it_saw():
    """The orchestrator's side: a watcher asking again with its last sequence gets what it missed, once."""
    manager = JobManager(store=None, pipeline=None)
    run = manager.runs["job1"] = JobRun(pb.Job(id="job1", state=pb.JOB_STATE_RUNNING))
    for done in range(1, 5):
        run.emit(progress={"stage": "texture", "done": done, "total": 4, "unit": "frames"})
    run.job.state = pb.JOB_STATE_SUCCEEDED
    run.emit(state_changed={"previous": pb.JOB_STATE_RUNNING, "current": pb.JOB_STATE_SUCCEEDED})

    resumed = list(manager.watch("job1", 2, lambda: True))
    assert resumed[0].HasField("snapshot") and resumed[0].sequence == 5
    assert [e.sequence for e in resumed[1:]] == [3, 4, 5] and progress_of(resumed) == [3, 4]
    # From now: the snapshot only (the job has ended). A sequence this process never issued (the orchestrator
    # restarted since the watcher saw it): from the snapshot on, which says where the numbering stands.
    assert [e.sequence for e in manager.watch("job1", 0, lambda: True)] == [5]
    assert [e.sequence for e in manager.watch("job1", 99, lambda: True)] == [5]


@pytest.mark.integration
def test_watching_goes_on_across_an_orchestrator_restart(orchestrator, store, s3_server, key_prefix):
    first = SteppedPipeline()
    running = orchestrator(first)
    job = submit(running.manager, store, key_prefix)
    stub = Connection(client_env(s3_server, running.port)).orchestrator
    events, drops = [], []

    def watch() -> None:
        for event in watch_events(stub, job.id, on_reconnect=lambda reason, delay: drops.append(reason)):
            events.append(event)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert wait_until(lambda: events, timeout=10)  # the snapshot: watching
    first.release(3)
    assert wait_until(lambda: progress_of(events) == [1, 2, 3], timeout=10)

    # The orchestrator goes away mid-job; a new one on the same address resumes the job from its manifest and
    # numbers its events afresh.
    running.stop()
    assert wait_until(lambda: drops, timeout=10)
    resumed = SteppedPipeline(first=4)
    restarted = orchestrator(resumed, port=running.port)
    assert restarted.manager.resume() == 1
    assert wait_until(lambda: sum(e.HasField("snapshot") for e in events) == 2, timeout=20)  # watching it again
    resumed.release(3)
    watcher.join(timeout=30)
    assert not watcher.is_alive()

    assert progress_of(events) == [1, 2, 3, 4, 5, 6]  # each once, none missed
    assert events[-1].state_changed.current == pb.JOB_STATE_SUCCEEDED
    assert all(reason.startswith(("UNAVAILABLE", "CANCELLED")) for reason in drops), drops


def _interruptible() -> None:
    """The child takes Ctrl-C as a user's shell gives it. A test run started in the background (`make test &`)
    ignores SIGINT, children inherit that, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def a2v_watch(env: dict[str, str], job_id: str, **streams) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "watch", job_id],
        cwd=REPO,
        env={**os.environ, **env},
        text=True,
        preexec_fn=_interruptible,
        **streams,
    )


@pytest.mark.integration
def test_ctrl_c_leaves_the_job_running_and_says_how_to_get_back_to_it(orchestrator, store, s3_server, key_prefix):
    pipeline = SteppedPipeline()
    running = orchestrator(pipeline)
    job = submit(running.manager, store, key_prefix)
    pipeline.release(1)
    watching = a2v_watch(
        client_env(s3_server, running.port),
        job.id,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert watching.stdout.readline() == f"job {job.id}\n"
        time.sleep(0.5)  # watching
        watching.send_signal(signal.SIGINT)
        out, err = watching.communicate(timeout=30)
    finally:
        watching.kill()
    assert watching.returncode == 130, out + err
    assert f"a2v watch {job.id}" in err and f"a2v cancel {job.id}" in err
    assert "Traceback" not in out + err
    assert (
        running.manager.get(job.id).state == pb.JOB_STATE_RUNNING and not running.manager.get(job.id).cancel_requested
    )


@pytest.mark.integration
def test_ctrl_c_at_a_terminal_asks_whether_to_cancel_the_job(orchestrator, store, s3_server, key_prefix):
    pipeline = SteppedPipeline()
    running = orchestrator(pipeline)
    job = submit(running.manager, store, key_prefix)
    terminal, other_end = pty.openpty()
    watching = a2v_watch(
        client_env(s3_server, running.port),
        job.id,
        stdin=other_end,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(other_end)
    try:
        assert watching.stdout.readline() == f"job {job.id}\n"
        time.sleep(0.5)
        watching.send_signal(signal.SIGINT)
        os.write(terminal, b"y\n")  # the terminal holds the answer until the question reads it
        out, err = watching.communicate(timeout=30)
    finally:
        watching.kill()
        os.close(terminal)
    assert watching.returncode == 130, out + err
    assert f"cancel job {job.id}? [y/N]" in err and f"cancelling job {job.id}" in err
    assert "Traceback" not in out + err
    assert wait_until(lambda: running.manager.get(job.id).state == pb.JOB_STATE_CANCELLED, timeout=10)


@pytest.mark.integration
def test_people_watching_their_jobs_never_keep_calls_from_running(store, key_prefix):
    """Watch streams last as long as their jobs: they are bounded apart and take no running slot, so six watchers
    on a server that runs one call at once (and admits two) leave it free for Get, List and Submit."""
    pipeline = SteppedPipeline()
    manager = JobManager(store, pipeline)
    binding = binding_for(pb, orchestrator_pb2_grpc, "OrchestratorService", OrchestratorServicer(manager))
    server, port = create_server(
        ServerConfig(service="orchestrator", max_workers=1, max_concurrent_rpcs=2, max_waiting_calls=6), [binding]
    )
    server.start()
    server.load_and_mark_serving()
    try:
        job = submit(manager, store, key_prefix)
        channel = create_channel(f"127.0.0.1:{port}", [binding.name], timeout_seconds=30)
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        streams = [stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=30) for _ in range(6)]
        snapshots = [next(stream) for stream in streams]  # all six are watching
        assert all(s.HasField("snapshot") for s in snapshots)
        started = time.monotonic()
        assert stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=5).job.id == job.id
        assert stub.ListJobs(pb.ListJobsRequest(), timeout=5).jobs
        assert time.monotonic() - started < 3
        with pytest.raises(grpc.RpcError) as refused:  # a seventh watcher is over its own bound
            next(stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=5))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        pipeline.release(STEPS)
        for stream in streams:  # every watcher follows the job to its end
            ended = [e.state_changed.current for e in stream if e.HasField("state_changed")]
            assert pb.JOB_STATE_SUCCEEDED in ended
    finally:
        server.stop(0).wait()
        for run in manager.runs.values():
            run.stop.set()


class FailingOncePipeline(SteppedPipeline):
    """Fails in lipsync the first time (its model not trained yet, say), then renders."""

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    def render(self, spec, *, reporter, stop):
        self.runs += 1
        if self.runs == 1:
            raise StageFailed(pb.STAGE_LIPSYNC, "NOT_FOUND", "no model for speaker 'nobody'")
        self.release(STEPS)
        return super().render(spec, reporter=reporter, stop=stop)


@pytest.mark.integration
def test_a_failed_job_is_run_again_with_retry(orchestrator, store, s3_server, key_prefix):
    pipeline = FailingOncePipeline()
    running = orchestrator(pipeline)
    job = submit(running.manager, store, key_prefix)
    stub = Connection(client_env(s3_server, running.port)).orchestrator
    assert wait_until(lambda: stub.GetJob(pb.GetJobRequest(job_id=job.id)).job.state == pb.JOB_STATE_FAILED, timeout=10)
    failed = stub.GetJob(pb.GetJobRequest(job_id=job.id)).job
    assert failed.failed_stage == pb.STAGE_LIPSYNC and "nobody" in failed.failure_reason

    stub.RetryJob(pb.RetryJobRequest(job_id=job.id))  # the cause fixed (the model trained): run it again

    assert wait_until(
        lambda: stub.GetJob(pb.GetJobRequest(job_id=job.id)).job.state == pb.JOB_STATE_SUCCEEDED, timeout=10
    )
    again = stub.GetJob(pb.GetJobRequest(job_id=job.id)).job
    assert again.retries == 1 and again.result.key and not again.failure_reason and pipeline.runs == 2
