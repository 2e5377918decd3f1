"""The orchestrator's job queue through its real gRPC server and the real S3 server: bounded admission, QUEUED with
positions, runners that never exceed their number, resume that skips a bad record, no job without its manifest.

The pipeline is scripted (a gate the test opens), so the test is about the queue, not about rendering.
"""

import threading
import uuid

import grpc
import pytest

from audio2video.common.v1 import common_pb2
from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from audio2video.orchestrator.v1 import orchestrator_pb2_grpc
from orchestrator.jobs import JobLimits, JobManager, manifest_key
from orchestrator.servicer import OrchestratorServicer
from services.runtime.blobstore import BlobStore
from services.runtime.config import ServerConfig
from services.runtime.errors import TooLarge
from services.runtime.server import binding_for, create_server
from tests.conftest import wait_until

pytestmark = pytest.mark.integration


class GatedPipeline:
    """Renders once the gate is open; counts how many renders run at once."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.active = self.most = self.renders = 0

    def render(self, spec, *, reporter, stop):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            while not self.gate.wait(0.05):
                if stop.is_set():
                    raise RuntimeError("stopped")
            reporter.progress(pb.STAGE_TEXTURE, 1, 1, "frames")
            with self.lock:
                self.renders += 1
            return pb.RenderJobResult(video=common_pb2.ObjectRef(key=f"jobs/x/{spec.model.speaker}.mp4"))
        finally:
            with self.lock:
                self.active -= 1


@pytest.fixture()
def bucket_store(s3_server):
    """A bucket of its own: other tests' unfinished jobs must not resume here."""
    store = BlobStore.from_config(s3_server.config(bucket=f"queue-{uuid.uuid4().hex[:8]}"))
    store.ensure_bucket()
    return store


@pytest.fixture()
def orchestrator(bucket_store):
    started = []

    def start(limits: JobLimits, pipeline=None):
        manager = JobManager(bucket_store, pipeline or GatedPipeline(), limits)
        binding = binding_for(pb, orchestrator_pb2_grpc, "OrchestratorService", OrchestratorServicer(manager))
        server, port = create_server(ServerConfig(service="orchestrator", max_concurrent_rpcs=128), [binding])
        server.start()
        server.load_and_mark_serving()
        started.append((server, manager))
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        return manager, stub

    yield start
    for server, manager in started:
        manager.pipeline.gate.set()
        server.stop(0).wait()


def spec(store: BlobStore, speaker: str) -> pb.RenderJobSpec:
    audio = store.put_bytes("inputs/audio.wav", b"RIFF")
    video = store.put_bytes("inputs/video.mp4", b"mp4")
    return pb.RenderJobSpec(
        audio=common_pb2.ObjectRef(key=audio.key, sha256=audio.sha256),
        target_video=common_pb2.ObjectRef(key=video.key, sha256=video.sha256),
        model={"speaker": speaker},
    )


def test_a_hundred_jobs_at_once_run_four_at_a_time_queue_in_order_and_none_is_lost(orchestrator, bucket_store):
    # Runners of other tests' managers live on in this process (a runner never ends): count only this one's.
    earlier = {t for t in threading.enumerate() if t.name.startswith("job")}
    manager, stub = orchestrator(JobLimits(max_running=4, max_queued=100, keep_finished=20))
    specs = [spec(bucket_store, f"s{i}") for i in range(105)]
    submitted, refused = [], []

    def submit(index: int) -> None:
        try:
            submitted.append(stub.SubmitJob(pb.SubmitJobRequest(spec=specs[index]), timeout=60).job)
        except grpc.RpcError as exc:
            refused.append((exc.code(), exc.details()))

    senders = [threading.Thread(target=submit, args=(i,)) for i in range(100)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    assert len(submitted) == 100 and not refused
    assert wait_until(lambda: manager.pipeline.active == 4, timeout=10)
    # 4 run, 96 wait in order; 4 more fit, the next one is refused (the queue holds 100).
    for index in range(100, 105):
        submit(index)
    assert len(submitted) == 104
    assert refused == [(grpc.StatusCode.RESOURCE_EXHAUSTED, refused[0][1])] and "queue is full" in refused[0][1]
    last = stub.GetJob(pb.GetJobRequest(job_id=submitted[-1].id)).job
    assert last.state == pb.JOB_STATE_QUEUED and last.queue_position == 100
    states = [stub.GetJob(pb.GetJobRequest(job_id=job.id)).job.state for job in submitted]
    assert states.count(pb.JOB_STATE_RUNNING) == 4 and states.count(pb.JOB_STATE_QUEUED) == 100
    job_threads = [t.name for t in threading.enumerate() if t.name.startswith("job") and t not in earlier]
    assert len(job_threads) == 4, job_threads  # the runners: not a thread per job

    manager.pipeline.gate.set()
    finished = [
        stub.GetJob(pb.GetJobRequest(job_id=job.id)).job
        for job in submitted
        if wait_until(lambda j=job: stub.GetJob(pb.GetJobRequest(job_id=j.id)).job.state == pb.JOB_STATE_SUCCEEDED, 30)
    ]
    assert len(finished) == 104 and manager.pipeline.most == 4 and manager.pipeline.renders == 104
    assert len(manager.runs) <= 20  # ended jobs leave memory; the store still answers for them
    listed = stub.ListJobs(pb.ListJobsRequest(page_size=500, state=pb.JOB_STATE_SUCCEEDED)).jobs
    assert len(listed) == 104


def test_identical_renders_wait_for_the_running_one(orchestrator, bucket_store):
    manager, stub = orchestrator(JobLimits(max_running=4))
    same = spec(bucket_store, "twin")
    first = stub.SubmitJob(pb.SubmitJobRequest(spec=same)).job
    assert wait_until(lambda: manager.pipeline.active == 1, timeout=10)
    second = stub.SubmitJob(pb.SubmitJobRequest(spec=same)).job
    assert wait_until(lambda: stub.GetJob(pb.GetJobRequest(job_id=second.id)).job.waiting_for_job == first.id, 10)
    assert manager.pipeline.active == 1  # a free runner does not start the twin alongside
    manager.pipeline.gate.set()
    for job in (first, second):
        assert wait_until(lambda j=job: stub.GetJob(pb.GetJobRequest(job_id=j.id)).job.state == pb.JOB_STATE_SUCCEEDED)


def test_a_queued_job_cancelled_leaves_the_queue_at_once(orchestrator, bucket_store):
    manager, stub = orchestrator(JobLimits(max_running=1))
    running = stub.SubmitJob(pb.SubmitJobRequest(spec=spec(bucket_store, "a"))).job
    queued = stub.SubmitJob(pb.SubmitJobRequest(spec=spec(bucket_store, "b"))).job
    behind = stub.SubmitJob(pb.SubmitJobRequest(spec=spec(bucket_store, "c"))).job
    assert stub.GetJob(pb.GetJobRequest(job_id=behind.id)).job.queue_position == 2
    stub.CancelJob(pb.CancelJobRequest(job_id=queued.id))
    assert stub.GetJob(pb.GetJobRequest(job_id=queued.id)).job.state == pb.JOB_STATE_CANCELLED
    assert stub.GetJob(pb.GetJobRequest(job_id=behind.id)).job.queue_position == 1
    manager.pipeline.gate.set()
    assert wait_until(lambda: stub.GetJob(pb.GetJobRequest(job_id=running.id)).job.state == pb.JOB_STATE_SUCCEEDED)


def test_a_corrupt_job_record_is_skipped_at_start_and_the_others_resume(bucket_store, caplog):
    good = pb.Job(id="a" * 20, kind=pb.JOB_KIND_RENDER, state=pb.JOB_STATE_RUNNING, render=spec(bucket_store, "g"))
    manager = JobManager(bucket_store, GatedPipeline(), JobLimits())
    manager._write(good)
    bucket_store.put_bytes(manifest_key("b" * 20), b"{not json")
    try:
        assert manager.resume() == 1
        assert "skipping the job record jobs/bbbbbbbbbbbbbbbbbbbb/job.json" in caplog.text
        assert [job.id for job in manager.list()] == [good.id]
    finally:
        manager.pipeline.gate.set()
    assert wait_until(lambda: manager.get(good.id).state == pb.JOB_STATE_SUCCEEDED)


def test_a_job_the_store_did_not_take_does_not_exist(bucket_store):
    # The inputs are there but the manifest cannot be written (here: over the store's size limit; an outage takes
    # the same path): no job is registered. Before, the job was registered first and stayed PENDING in memory.
    refusing = BlobStore(bucket_store.client, bucket_store.bucket, max_object_bytes=64)
    manager = JobManager(refusing, GatedPipeline(), JobLimits())
    with pytest.raises(TooLarge):
        manager.submit(render=spec(bucket_store, "x"))
    assert manager.runs == {} and not manager.queue and not manager.runners
    assert not list(bucket_store.list_keys("jobs/"))


def test_output_keys_stay_inside_the_job_folder(orchestrator, bucket_store):
    manager, stub = orchestrator(JobLimits())
    render = spec(bucket_store, "k")
    render.options.output_key = "job.json"
    with pytest.raises(grpc.RpcError) as refused:
        stub.SubmitJob(pb.SubmitJobRequest(spec=render))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    render.options.output_key = "jobs/0123456789abcdef0123/job.json"  # another job's manifest
    job = stub.SubmitJob(pb.SubmitJobRequest(spec=render)).job
    assert job.render.options.output_key == f"jobs/{job.id}/jobs/0123456789abcdef0123/job.json"
