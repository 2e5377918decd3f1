"""Production jobs through the real local stack (`e2e_stack`): identical jobs at once, store outages, retries.

Issue 15: two identical renders at once used to replace each other's stage outputs (DATA_LOSS in composite); a
store restarted mid-job failed it with UNAVAILABLE; a failed job could only be submitted again from scratch.
"""

import os
import signal
import threading
import time

import pytest

from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import SHARED_DATA, wait_until
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
    job = e2e_stack.submit(SHARED_DATA / "audio" / "radio_address_8s.wav", chunk_frames=30, max_parallel_chunks=1)

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
