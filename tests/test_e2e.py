"""The whole system as a user runs it: the local stack, `a2v` against the orchestrator, a real mp4 out."""

import shutil
import subprocess
import sys
import time

import av
import grpc
import pytest

from audio2video.lipsync.v1 import lipsync_pb2
from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from audio2video.orchestrator.v1 import orchestrator_pb2_grpc
from deploy.local import stack_environment
from orchestrator.cli import upload
from services.runtime.blobstore import BlobStore
from services.runtime.config import Config
from tests.conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.integration
SPEAKER_VIDEO = SHARED_DATA / "speakers" / "feifeili" / "feifeili_clip3.mp4"
AUDIO = SHARED_DATA / "audio" / "arctic_sentence_4s.wav"


def a2v(env, *args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_train_then_render_through_the_orchestrator(stack_env, tmp_path):
    env = stack_env
    up = a2v(env, "up", timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(grpc.insecure_channel(env["A2V_ORCHESTRATOR_ADDR"]))

    # Training through the job API, short (the quality run is `python -m services.lipsync.quality`).
    store = BlobStore.from_config(Config.from_env("test", stack_environment(env)).store)
    spec = pb.TrainJobSpec(
        speaker="e2e", videos=[pb.TrainingVideo(clip_id="clip3", video=upload(store, SPEAKER_VIDEO))]
    )
    spec.options.training.max_epochs = 3
    job = stub.TrainSpeaker(pb.TrainSpeakerRequest(spec=spec), timeout=60).job
    events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=600))
    assert events[0].HasField("snapshot")
    final = stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=30).job
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.failure_reason
    assert final.train_result.model.version >= 1
    assert any(e.HasField("progress") for e in events)

    # Rendering with the command line, as a user does; TF Serving picks the new model up within seconds.
    out = tmp_path / "out.mp4"
    deadline = time.monotonic() + 60
    while True:
        run = a2v(
            env, "run", "--speaker", "e2e", "--audio", str(AUDIO), "--video", str(SPEAKER_VIDEO), "--out", str(out)
        )
        if run.returncode == 0 or time.monotonic() > deadline or "NOT_FOUND" not in run.stderr:
            break
        time.sleep(2)
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

    # Four jobs at once all complete (they share the target's analysis and the replicas).
    video = upload(store, SPEAKER_VIDEO)
    jobs = []
    for audio_path in (AUDIO, SHARED_DATA / "audio" / "finance_news_5s.wav"):
        for retime in (True, False):
            spec = pb.RenderJobSpec(
                audio=upload(store, audio_path),
                target_video=video,
                model=lipsync_pb2.ModelSpec(speaker="e2e"),
                options=pb.JobOptions(retiming=retime),
            )
            jobs.append(stub.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=60).job)
    for job in jobs:
        for _ in stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=600):
            pass
        done = stub.GetJob(pb.GetJobRequest(job_id=job.id), timeout=30).job
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
        assert done.render_result.retimed == done.render.options.retiming
    assert len({stub.GetJob(pb.GetJobRequest(job_id=j.id)).job.result.key for j in jobs}) == 4

    # Cancelling a running job stops it within seconds, and it says so.
    long_audio = upload(store, SHARED_DATA / "audio" / "commentary_60s.wav")
    running = stub.SubmitJob(
        pb.SubmitJobRequest(
            spec=pb.RenderJobSpec(
                audio=long_audio, target_video=upload(store, SPEAKER_VIDEO), model=lipsync_pb2.ModelSpec(speaker="e2e")
            )
        ),
        timeout=60,
    ).job
    time.sleep(3)
    stub.CancelJob(pb.CancelJobRequest(job_id=running.id), timeout=30)
    started = time.monotonic()
    for _ in stub.WatchJob(pb.WatchJobRequest(job_id=running.id), timeout=120):
        pass
    cancelled = stub.GetJob(pb.GetJobRequest(job_id=running.id), timeout=30).job
    assert cancelled.state == pb.JOB_STATE_CANCELLED and cancelled.cancel_requested
    assert time.monotonic() - started < 60
    assert not cancelled.HasField("result")

    # A failing job ends with a reason and the right code; nothing hangs.
    bad = a2v(
        env,
        "run",
        "--speaker",
        "nobody",
        "--audio",
        str(AUDIO),
        "--video",
        str(SPEAKER_VIDEO),
        "--out",
        str(tmp_path / "never.mp4"),
    )
    assert bad.returncode != 0 and "nobody" in bad.stderr
    assert not (tmp_path / "never.mp4").exists()
