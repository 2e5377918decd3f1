"""The whole system as a user runs it: the local stack, `a2v` against the orchestrator, a real mp4 out.

One stack (two texture replicas, as deployments scale it) and one trained speaker serve every test here
(`e2e_stack`, shared with the other tests that render: tests/support/stack.py); the tests run in file order
and the last one kills a texture replica. Every test runs twice: on that stack, and on one with TLS and tokens on
(`e2e_tls_stack`: `A2V_TLS=1 a2v up`).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import av
import grpc
import pytest

from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import REPO, SHARED_DATA, wait_until
from tests.support.stack import SPEAKER_VIDEO, a2v

pytestmark = pytest.mark.integration
AUDIO = SHARED_DATA / "audio" / "arctic_sentence_4s.wav"
RENDER_STAGES = {
    pb.STAGE_AUDIO,
    pb.STAGE_FACE,
    pb.STAGE_LIPSYNC,
    pb.STAGE_RETIMING,
    pb.STAGE_TEXTURE,
    pb.STAGE_TEETH,
    pb.STAGE_COMPOSITE,
    pb.STAGE_FINALIZE,
}


def stage(job: pb.Job, which: int) -> pb.StageStatus:
    return next(s for s in job.stages if s.stage == which)


@pytest.fixture(scope="module", params=["plaintext", "tls"])
def stack(request):
    """The session's local stack (two texture replicas, the `e2e` speaker trained through the job API), once as is
    and once with TLS and tokens on (mTLS between the services, `a2v` with the local caller's token)."""
    secure = request.param == "tls"
    stack = request.getfixturevalue("e2e_tls_stack" if secure else "e2e_stack")
    assert stack.tls == secure
    return stack


def test_render_with_the_command_line(stack, tmp_path):
    out = tmp_path / "out.mp4"
    run = a2v(
        stack.env, "run", "--speaker", "e2e", "--audio", str(AUDIO), "--video", str(SPEAKER_VIDEO), "--out", str(out)
    )
    assert run.returncode == 0, run.stdout + run.stderr
    with av.open(str(out)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
        assert (video.width, video.height) == (256, 256) and video.average_rate == 30
        frames = sum(1 for _ in container.decode(video))
    assert frames == 120  # 4.0 s of audio at 30 fps
    if shutil.which("ffprobe"):
        check = subprocess.run(
            [str(SHARED_DATA.parent / "tools" / "check-output"), str(out), str(SPEAKER_VIDEO), str(AUDIO)],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stdout

    # The job's record: every stage finished, timed, with its outputs; progress and ETA were reported.
    job_id = run.stdout.split()[1]
    job = stack.job(job_id)
    assert {s.stage for s in job.stages} == RENDER_STAGES
    for status in job.stages:
        assert status.state == pb.STAGE_STATE_SUCCEEDED, pb.Stage.Name(status.stage)
        assert status.attempts >= 1 and status.busy_seconds > 0, pb.Stage.Name(status.stage)
    assert stage(job, pb.STAGE_COMPOSITE).done == 120
    assert "segment/000000" in stage(job, pb.STAGE_COMPOSITE).outputs
    assert stage(job, pb.STAGE_FINALIZE).outputs["video"].key == job.result.key
    assert job.fraction_done == 1.0 and job.eta_seconds == 0.0


def test_four_jobs_at_once(stack):
    """They share the target's analysis and the two texture replicas."""
    jobs = [
        stack.submit(audio_path, retiming=retime)
        for audio_path in (AUDIO, SHARED_DATA / "audio" / "finance_news_5s.wav")
        for retime in (True, False)
    ]
    for job in jobs:
        done = stack.wait(job.id)
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
        assert done.render_result.retimed == done.render.options.retiming
    assert len({stack.job(j.id).result.key for j in jobs}) == 4


def test_cancel_stops_a_running_job_within_seconds(stack):
    running = stack.submit(SHARED_DATA / "audio" / "commentary_60s.wav")
    time.sleep(3)
    stack.stub.CancelJob(pb.CancelJobRequest(job_id=running.id), timeout=30)
    started = time.monotonic()
    cancelled = stack.wait(running.id, timeout=120)
    assert cancelled.state == pb.JOB_STATE_CANCELLED and cancelled.cancel_requested
    assert time.monotonic() - started < 60
    assert not cancelled.HasField("result")
    assert not any(s.state == pb.STAGE_STATE_RUNNING for s in cancelled.stages)


def test_a_failing_job_names_its_reason(stack, tmp_path):
    never = tmp_path / "never.mp4"
    bad = a2v(
        stack.env,
        "run",
        "--speaker",
        "nobody",
        "--audio",
        str(AUDIO),
        "--video",
        str(SPEAKER_VIDEO),
        "--out",
        str(never),
    )
    assert bad.returncode != 0 and "nobody" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not never.exists()
    failed = next(j for j in stack.stub.ListJobs(pb.ListJobsRequest(speaker="nobody")).jobs)
    assert failed.state == pb.JOB_STATE_FAILED and failed.failed_stage == pb.STAGE_LIPSYNC
    assert failed.failure_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_one_stage_on_its_own(stack):
    """What another system does: call a stage with a local file and get the output keys back."""
    request = json.dumps({"audio": {"key": f"@{AUDIO}"}, "outputFrameRate": {"numerator": 30, "denominator": 1}})
    called = a2v(stack.env, "stage", "audio", "Extract", "--request", request)
    assert called.returncode == 0, called.stderr
    result = json.loads(called.stdout)
    assert result["outputFrameCount"] == "120"
    features = result["features"]["object"]["key"]
    assert stack.store.stat(features).size_bytes > 0
    wrong = a2v(stack.env, "stage", "audio", "Extract", "--request", '{"audio": {"key": "uploads/none.wav"}}')
    assert wrong.returncode == 1 and "NOT_FOUND" in wrong.stderr
    unknown = a2v(stack.env, "stage", "mouth", "Predict")
    assert unknown.returncode == 2 and "unknown stage" in unknown.stderr


def test_orchestrator_killed_mid_job_resumes_without_redoing_stages(stack):
    audio = SHARED_DATA / "audio" / "radio_address_8s.wav"
    job = stack.submit(audio, chunk_frames=30, max_parallel_chunks=1)
    # A user watching it from the command line stays with it through the restart.
    watching = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "watch", job.id],
        cwd=REPO,
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def some_chunks_done():
        current = stack.job(job.id)
        assert current.state == pb.JOB_STATE_RUNNING, current.failure_reason
        composite = [s for s in current.stages if s.stage == pb.STAGE_COMPOSITE]
        return bool(composite) and composite[0].done >= 60

    assert wait_until(some_chunks_done, timeout=300, interval=0.1)
    os.kill(stack.pid("orchestrator"), signal.SIGKILL)
    restart = a2v(stack.env, "up", timeout=120)
    assert restart.returncode == 0 and "restarted what had exited: orchestrator" in restart.stdout, restart.stdout

    finished = stack.poll(job.id)
    assert finished.state == pb.JOB_STATE_SUCCEEDED, finished.failure_reason
    assert finished.render_result.frame_count == 240
    # Everything before the chunks came back from the first run; so did the chunks it had finished.
    for done_before in (pb.STAGE_AUDIO, pb.STAGE_FACE, pb.STAGE_LIPSYNC, pb.STAGE_RETIMING):
        assert stage(finished, done_before).cached, pb.Stage.Name(done_before)
    assert stage(finished, pb.STAGE_COMPOSITE).cached_calls >= 2
    assert stage(finished, pb.STAGE_TEXTURE).cached_calls >= 2
    assert not stage(finished, pb.STAGE_FINALIZE).cached
    out, err = watching.communicate(timeout=120)
    assert watching.returncode == 0, out + err
    assert f"job {job.id} succeeded" in out and "watching again" in err


def test_a_texture_replica_killed_mid_job_the_job_completes(stack):
    audio = SHARED_DATA / "audio" / "political_address_8s.wav"
    job = stack.submit(audio, chunk_frames=60, max_parallel_chunks=2)

    def texture_running():
        current = stack.job(job.id)
        assert current.state in (pb.JOB_STATE_PENDING, pb.JOB_STATE_RUNNING), current.failure_reason
        return any(s.stage == pb.STAGE_TEXTURE and s.state == pb.STAGE_STATE_RUNNING for s in current.stages)

    # The first two chunks go one to each replica (round robin): kill the second replica halfway through its own.
    assert wait_until(texture_running, timeout=300, interval=0.02)
    time.sleep(1.5)
    os.kill(stack.pid("texture-2"), signal.SIGKILL)
    finished = stack.wait(job.id)
    assert finished.state == pb.JOB_STATE_SUCCEEDED, finished.failure_reason
    assert finished.render_result.frame_count == 240
    texture = stage(finished, pb.STAGE_TEXTURE)
    assert texture.done == 240 and texture.state == pb.STAGE_STATE_SUCCEEDED
    # A call the replica had not answered yet is retried by the channel itself; one it was streaming
    # progress for is made again by the orchestrator (counted, with the error it got).
    assert texture.attempts >= 4
    assert texture.attempts == 4 or texture.error.startswith("UNAVAILABLE"), texture
