"""Production jobs through the real local stack (`e2e_stack`): identical jobs at once, store outages, retries.

Issue 15: two identical renders at once used to replace each other's stage outputs (DATA_LOSS in composite); a
store restarted mid-job failed it with UNAVAILABLE; a failed job could only be submitted again from scratch.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from audio2video.orchestrator.v1 import orchestrator_pb2_grpc
from deploy.local import LocalStack, stack_environment
from deploy.ports import free_port
from services.runtime.clients import wait_for_serving
from tests.conftest import REPO, SHARED_DATA, wait_until
from tests.support.stack import a2v

pytestmark = pytest.mark.integration
CHUNK_STAGES = (pb.STAGE_TEXTURE, pb.STAGE_TEETH, pb.STAGE_COMPOSITE)


def stage(job: pb.Job, which: int) -> pb.StageStatus:
    return next(s for s in job.stages if s.stage == which)


def test_identical_renders_at_once_both_succeed_and_the_work_is_done_once(e2e_stack):
    audio = SHARED_DATA / "audio" / "finance_news_5s.wav"
    jobs = [None, None]

    def submit(index: int) -> None:  # chunk_frames 50: chunks no other test rendered
        jobs[index] = e2e_stack.submit(audio, chunk_frames=50, output_key="identical.mp4")

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first, second = sorted(jobs, key=lambda job: job.created.ToNanoseconds())
    waiting = e2e_stack.job(second.id)
    if waiting.state == pb.JOB_STATE_QUEUED:  # attached to the first one until it ends
        assert waiting.waiting_for_job in (first.id, "")
    done = [e2e_stack.wait(job.id) for job in (first, second)]
    for job in done:
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.failure_reason
        assert job.result.key == f"jobs/{job.id}/identical.mp4"  # inside the job's own folder
    assert done[0].result.sha256 == done[1].result.sha256  # byte-identical videos
    # One of them rendered the chunks; the other found every chunk in the store.
    for which in CHUNK_STAGES:
        cached = sorted(stage(job, which).cached for job in done)
        assert cached == [False, True], pb.Stage.Name(which)


def test_the_object_store_restarted_mid_job_the_job_rides_it_out(e2e_stack):
    job = e2e_stack.submit(SHARED_DATA / "audio" / "political_address_8s.wav", chunk_frames=40, max_parallel_chunks=1)

    def texture_running():
        current = e2e_stack.job(job.id)
        assert current.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING), current.failure_reason
        return any(s.stage == pb.STAGE_TEXTURE and s.state == pb.STAGE_STATE_RUNNING for s in current.stages)

    assert wait_until(texture_running, timeout=300, interval=0.05)
    os.killpg(e2e_stack.pid("s3"), signal.SIGKILL)
    time.sleep(5)
    restarted = a2v(e2e_stack.env, "up", timeout=120)
    assert restarted.returncode == 0 and "s3" in restarted.stdout, restarted.stdout + restarted.stderr
    finished = e2e_stack.poll(job.id, timeout=300)
    assert finished.state == pb.JOB_STATE_SUCCEEDED, finished.failure_reason
    assert finished.render_result.frame_count == 240


def test_a_cancelled_job_is_run_again_with_retry_reusing_its_finished_work(e2e_stack, tmp_path):
    job = e2e_stack.submit(SHARED_DATA / "audio" / "radio_address_8s.wav", chunk_frames=24, max_parallel_chunks=1)

    def some_chunks_done():
        current = e2e_stack.job(job.id)
        assert current.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING), current.failure_reason
        return any(s.stage == pb.STAGE_COMPOSITE and s.done >= 60 for s in current.stages)

    assert wait_until(some_chunks_done, timeout=300, interval=0.05)
    e2e_stack.stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=30)
    assert e2e_stack.wait(job.id).state == pb.JOB_STATE_CANCELLED
    out = tmp_path / "retried.mp4"
    retried = a2v(e2e_stack.env, "retry", job.id, "--out", str(out))
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert out.stat().st_size > 0
    again = e2e_stack.job(job.id)
    assert again.state == pb.JOB_STATE_SUCCEEDED and again.retries == 1
    for done_before in (pb.STAGE_AUDIO, pb.STAGE_LIPSYNC, pb.STAGE_RETIMING):
        assert stage(again, done_before).cached, pb.Stage.Name(done_before)
    assert stage(again, pb.STAGE_COMPOSITE).cached_calls >= 2
    finished = a2v(e2e_stack.env, "retry", job.id)
    assert finished.returncode == 1 and "FAILED_PRECONDITION" in finished.stderr and "succeeded" in finished.stderr


def start_orchestrator(env: dict[str, str], port: int, replica: str, log_path) -> subprocess.Popen:
    """A second orchestrator process over the stack's store and stages (another replica)."""
    environment = {**os.environ, **stack_environment(env)}
    environment.update(LocalStack(environment).client_environment())
    environment.update({"A2V_LISTEN": f"127.0.0.1:{port}", "A2V_REPLICA_ID": replica, "PYTHONUNBUFFERED": "1"})
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator"], cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT
        )
    wait_for_serving(f"127.0.0.1:{port}", "audio2video.orchestrator.v1.OrchestratorService", timeout_seconds=60)
    return process


def test_two_orchestrators_one_owner_per_job_any_replica_answers_and_a_dead_ones_job_is_taken_over(e2e_stack, tmp_path):
    port = free_port()
    other = start_orchestrator(e2e_stack.env, port, "replica-b", tmp_path / "b.log")
    b = orchestrator_pb2_grpc.OrchestratorServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    a = e2e_stack.stub  # the stack's own orchestrator
    try:
        spec = e2e_stack.spec(SHARED_DATA / "audio" / "arctic_sentence_4s.wav", chunk_frames=20, max_parallel_chunks=1)
        job = b.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=60).job
        events = []
        watcher = threading.Thread(
            target=lambda: events.extend(a.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=300)), daemon=True
        )
        watcher.start()  # replica A follows a job replica B runs

        def chunks_done():
            current = a.GetJob(pb.GetJobRequest(job_id=job.id), timeout=30).job
            assert current.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING), current.failure_reason
            return any(s.stage == pb.STAGE_COMPOSITE and s.done >= 40 for s in current.stages)

        assert wait_until(chunks_done, timeout=300, interval=0.1)
        other.kill()  # replica B dies mid-job; its lease runs out and A takes the job over
        other.wait()
        watcher.join(timeout=120)
        finished = e2e_stack.job(job.id)
        assert finished.state == pb.JOB_STATE_SUCCEEDED, finished.failure_reason
        assert finished.render_result.frame_count == 120
        assert next(s for s in finished.stages if s.stage == pb.STAGE_COMPOSITE).cached_calls >= 2  # B's chunks
        assert any(e.HasField("progress") for e in events)
        assert events[-1].state_changed.current == pb.JOB_STATE_SUCCEEDED

        # A cancellation asked of the replica that does not run the job reaches the one that does.
        other = start_orchestrator(e2e_stack.env, port, "replica-b", tmp_path / "b.log")
        long = b.SubmitJob(
            pb.SubmitJobRequest(spec=e2e_stack.spec(SHARED_DATA / "audio" / "commentary_60s.wav", chunk_frames=60)),
            timeout=60,
        ).job
        assert a.CancelJob(pb.CancelJobRequest(job_id=long.id), timeout=30).job.cancel_requested
        assert wait_until(lambda: e2e_stack.job(long.id).state == pb.JOB_STATE_CANCELLED, timeout=60, interval=0.2)
    finally:
        if other.poll() is None:
            other.terminate()
            other.wait(timeout=30)
