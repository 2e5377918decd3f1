"""Long jobs from the command line, through the real local stack (`e2e_stack`, shared with tests/test_e2e.py).

A job may outlast any deadline the client has for its calls; `a2v jobs`, `watch`, `cancel`, `get` and `speakers`
find jobs and models again from another shell.
"""

import av
import pytest

from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import SHARED_DATA
from tests.support.stack import SPEAKER, SPEAKER_VIDEO, a2v

pytestmark = pytest.mark.integration
AUDIO = SHARED_DATA / "audio" / "political_address_8s.wav"  # long enough to outlast two client deadlines
CLIENT_DEADLINE_SECONDS = 2


@pytest.fixture(scope="module")
def long_render(e2e_stack, tmp_path_factory):
    """`a2v run` of a job that takes several times as long as every deadline the client's calls have."""
    out = tmp_path_factory.mktemp("cli") / "out.mp4"
    env = {**e2e_stack.env, "A2V_RPC_TIMEOUT_SECONDS": str(CLIENT_DEADLINE_SECONDS)}
    # Chunks of their own size: texture and composite are computed afresh, not found in the cache.
    args = ["--audio", str(AUDIO), "--video", str(SPEAKER_VIDEO), "--out", str(out), "--chunk-frames", "40"]
    run = a2v(env, "run", "--speaker", SPEAKER, "--no-retiming", *args)
    assert run.returncode == 0, run.stdout + run.stderr
    job = e2e_stack.job(run.stdout.split()[1])
    return job, out


def test_a_job_longer_than_the_clients_deadline_is_followed_to_its_end(long_render):
    job, out = long_render
    assert job.state == pb.JOB_STATE_SUCCEEDED
    took = (job.finished.ToMilliseconds() - job.created.ToMilliseconds()) / 1000
    assert took > 2 * CLIENT_DEADLINE_SECONDS, f"the job took {took} s: too short to show anything"
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == job.render_result.frame_count >= 240  # 8 s at 30 fps


def test_training_reports_every_batch_of_frames_of_its_videos(e2e_stack):
    """Not one event per video: with minutes of footage the job's watchers heard nothing for minutes."""
    (trained,) = e2e_stack.stub.ListJobs(
        pb.ListJobsRequest(kind=pb.JOB_KIND_TRAIN_SPEAKER, speaker=SPEAKER), timeout=30
    ).jobs
    face = next(s for s in trained.stages if s.stage == pb.STAGE_FACE)
    with av.open(str(SPEAKER_VIDEO)) as container:
        frames = container.streams.video[0].frames
    assert (face.unit, face.done, face.total) == ("frames", frames, frames)
    # The orchestrator still holds the job's events: watching from the first one replays them.
    events = list(e2e_stack.stub.WatchJob(pb.WatchJobRequest(job_id=trained.id, after_sequence=1), timeout=60))
    face_done = [e.progress.done for e in events if e.HasField("progress") and e.progress.stage == "face"]
    assert len([done for done in face_done if 0 < done < frames]) >= 3, face_done
    assert face_done == sorted(face_done) and face_done[-1] == frames
    audio = [e.progress for e in events if e.HasField("progress") and e.progress.stage == "audio"]
    assert audio and audio[-1].unit == "seconds" and audio[-1].done == audio[-1].total


def test_jobs_watch_and_get_find_a_finished_job_again(e2e_stack, long_render, tmp_path):
    job, out = long_render
    listed = a2v(e2e_stack.env, "jobs")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split()[:3] == ["JOB", "KIND", "STATE"]
    line = next(line for line in listed.stdout.splitlines() if line.startswith(job.id))
    assert line.split()[1:4] == ["render", "succeeded", SPEAKER]
    trainings = a2v(e2e_stack.env, "jobs", "--kind", "train", "--state", "succeeded")
    assert [line.split()[1] for line in trainings.stdout.splitlines()[1:]] == ["train"]

    watched = a2v(e2e_stack.env, "watch", job.id)
    assert watched.returncode == 0, watched.stderr
    assert f"a2v get {job.id} --out" in watched.stdout

    again = tmp_path / "again.mp4"
    got = a2v(e2e_stack.env, "get", job.id, "--out", str(again))
    assert got.returncode == 0, got.stderr
    assert again.read_bytes() == out.read_bytes()

    training_id = trainings.stdout.splitlines()[1].split()[0]
    not_a_video = a2v(e2e_stack.env, "get", training_id, "--out", str(tmp_path / "model.mp4"))
    assert not_a_video.returncode == 1 and "training job" in not_a_video.stderr
    unknown = a2v(e2e_stack.env, "watch", "0123456789abcdef0123")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_cancel_from_another_shell(e2e_stack):
    running = e2e_stack.submit(SHARED_DATA / "audio" / "commentary_60s.wav", chunk_frames=45)
    cancelled = a2v(e2e_stack.env, "cancel", running.id)
    assert cancelled.returncode == 0 and f"cancelling job {running.id}" in cancelled.stdout
    watched = a2v(e2e_stack.env, "watch", running.id, timeout=120)
    assert watched.returncode == 1 and f"job {running.id} cancelled" in watched.stderr
    assert e2e_stack.job(running.id).state == pb.JOB_STATE_CANCELLED
    again = a2v(e2e_stack.env, "cancel", running.id)
    assert again.returncode == 0 and "already ended (cancelled)" in again.stdout


def test_speakers_lists_the_trained_versions_and_what_is_served(e2e_stack):
    listed = a2v(e2e_stack.env, "speakers")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:4] == ["SPEAKER", "VERSION", "STATE", "SERVED"]
    newest = next(row.split() for row in rows if row.split()[0] == SPEAKER)  # newest first
    assert int(newest[1]) >= 1 and newest[2:5] == ["available", "yes", "(latest)"], listed.stdout


def every_action(parser, path=()):
    """(command path, action) of every argument of `parser` and of its subcommands, help flags aside."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from every_action(sub, (*path, name))
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_argument_of_every_command_has_a_help_text():
    from evaluation.cli import _parser as eval_parser
    from orchestrator.cli import build_parser

    actions = [
        (path, action)
        for parser, prefix in ((build_parser(), ()), (eval_parser("a2v eval"), ("eval",)))
        for path, action in every_action(parser, prefix)
    ]
    assert len({path for path, _ in actions}) >= 12  # the subcommands were walked
    missing = [" ".join(("a2v", *path, action.dest)) for path, action in actions if not (action.help or "").strip()]
    assert missing == []
