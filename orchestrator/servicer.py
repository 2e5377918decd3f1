"""gRPC servicer of the orchestrator: the public job API over `JobManager`."""

from __future__ import annotations

import os
import socket

from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from audio2video.orchestrator.v1 import orchestrator_pb2_grpc
from orchestrator import metrics
from orchestrator.jobs import JobLimits, JobManager
from orchestrator.leases import Leases
from orchestrator.pipeline import DEFAULT_SERVE_WAIT_SECONDS, Pipeline, RetryPolicy, StageClients
from orchestrator.presign import Callers, Presigner, PresignSettings
from orchestrator.speakers import Speakers
from orchestrator.trainers import trainer_from_env
from services.runtime.blobstore import BlobStore, wait_for_store
from services.runtime.config import Config, Env, parse_address
from services.runtime.errors import FailedPrecondition, InvalidInput, NotFound
from services.runtime.server import ServiceBinding, binding_for
from services.runtime.status import grpc_errors


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """Submit, watch, cancel and list render and training jobs.

    With a callers file a job belongs to the caller that submitted it: GetJob, WatchJob, CancelJob, RetryJob, a
    PresignObject download and ListJobs see only the caller's own jobs, unless it holds `admin`. Another caller's
    job is NOT_FOUND, the same answer as a job that does not exist (so no caller learns which ids are taken); a
    job recorded before owners were (no owner) is the admin's only. Without a callers file every caller sees every
    job, as before.
    """

    waiting_methods = ("WatchJob",)
    """Streams that wait on a job for as long as it runs: bounded apart (A2V_MAX_WAITING_CALLS), no running slot."""

    def __init__(
        self,
        jobs: JobManager,
        presigner: Presigner | None = None,
        callers: Callers | None = None,
        speakers: Speakers | None = None,
    ) -> None:
        self.jobs = jobs
        self.presigner = presigner
        self.callers = callers or Callers()
        self.speakers = speakers

    def _job(self, context, job_id: str) -> pb.Job:
        """The job `job_id` if the caller may see it; NOT_FOUND alike for another caller's job and a missing one."""
        owner = self.callers.jobs_of(context)
        if owner is None:
            return self.jobs.get(job_id)
        try:
            job = self.jobs.get(job_id)
        except NotFound:
            job = None
        if job is None or job.owner != owner:
            raise NotFound(f"no job {job_id} of caller {owner!r}")
        return job

    @grpc_errors
    def SubmitJob(self, request: pb.SubmitJobRequest, context) -> pb.SubmitJobResponse:
        """Start a render job; the same client_token returns the job it started before."""
        spec = request.spec
        inputs = [("audio", spec.audio), ("target video", spec.target_video)]
        self.callers.check_inputs(context, inputs, self.jobs.store.bucket)
        owner = self.callers.owner(context)
        return pb.SubmitJobResponse(job=self.jobs.submit(render=spec, client_token=request.client_token, owner=owner))

    @grpc_errors
    def TrainSpeaker(self, request: pb.TrainSpeakerRequest, context) -> pb.TrainSpeakerResponse:
        """Start a training job (analysis, dataset, LSTM training and export)."""
        inputs = [(f"training video {i}", video.video) for i, video in enumerate(request.spec.videos, start=1)]
        self.callers.check_inputs(context, inputs, self.jobs.store.bucket)
        job = self.jobs.submit(train=request.spec, client_token=request.client_token, owner=self.callers.owner(context))
        return pb.TrainSpeakerResponse(job=job)

    @grpc_errors
    def GetJob(self, request: pb.GetJobRequest, context) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=self._job(context, request.job_id))

    @grpc_errors
    def WatchJob(self, request: pb.WatchJobRequest, context):
        """A snapshot of the job, then its progress and state changes until it ends."""
        self._job(context, request.job_id)
        yield from self.jobs.watch(request.job_id, request.after_sequence, context.is_active)

    @grpc_errors
    def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.CancelJobResponse:
        self._job(context, request.job_id)
        return pb.CancelJobResponse(job=self.jobs.cancel(request.job_id))

    @grpc_errors
    def RetryJob(self, request: pb.RetryJobRequest, context) -> pb.RetryJobResponse:
        """Queue a failed or cancelled job again; its finished work is reused."""
        self._job(context, request.job_id)
        return pb.RetryJobResponse(job=self.jobs.retry(request.job_id))

    @grpc_errors
    def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        jobs = self.jobs.list(
            state=request.state,
            kind=request.kind,
            speaker=request.speaker,
            page_size=request.page_size,
            owner=self.callers.jobs_of(context),
        )
        return pb.ListJobsResponse(jobs=jobs)

    @grpc_errors
    def PresignObject(self, request: pb.PresignObjectRequest, context) -> pb.PresignObjectResponse:
        """A presigned PUT of an input under the caller's uploads prefix, or GET of a job's result."""
        if self.presigner is None:
            raise FailedPrecondition("this orchestrator hands out no presigned URLs")
        target = request.WhichOneof("target")
        if target == "upload":
            return self.presigner.upload(self.callers.name(context), request.upload)
        if target == "download":
            return self.presigner.download(self._job(context, request.download.job_id), request.download.key)
        raise InvalidInput("say what the URL is for: upload or download")

    @grpc_errors
    def ListSpeakers(self, request: pb.ListSpeakersRequest, context) -> pb.ListSpeakersResponse:
        """The speakers with a stored model, each as the lipsync stage describes it."""
        if self.speakers is None:
            raise FailedPrecondition("this orchestrator has no lipsync stage to describe speakers with")
        return pb.ListSpeakersResponse(speakers=self.speakers.list(request.request_id))


def replica_id(config: Config) -> str:
    """A2V_REPLICA_ID, default host name and port: the same after a restart in place (a restarted replica takes its
    own jobs back at once), different for every other replica (a Kubernetes pod's name is its host name)."""
    env = Env()
    value = env.get_str("A2V_REPLICA_ID", "")
    env.check()
    return value or f"{socket.gethostname()}:{parse_address(config.server.listen)[1]}"


def serve_wait_seconds() -> float:
    """A2V_SERVE_WAIT_SECONDS: how long a training job waits for TF Serving to serve its new version (120)."""
    env = Env()
    value = env.get_float("A2V_SERVE_WAIT_SECONDS", DEFAULT_SERVE_WAIT_SECONDS, minimum=0.0, maximum=86400.0)
    env.check()
    return value


def bindings(config: Config) -> list[ServiceBinding]:
    """What `python -m orchestrator` serves: SERVING once the store answers; unfinished jobs resume."""
    store = BlobStore.from_config(config.store)
    pipeline = Pipeline(
        StageClients.from_env(),
        models_dir=os.environ.get("A2V_MODELS_DIR"),
        trainer=trainer_from_env(),
        retry=RetryPolicy.from_env(),
        serve_wait_seconds=serve_wait_seconds(),
    )
    limits = JobLimits.from_env()
    jobs = JobManager(store, pipeline, limits, Leases(store, replica_id(config), limits.lease_seconds))
    metrics.watch_manager(jobs)

    def load() -> None:
        wait_for_store(store)
        jobs.resume()

    presigner = Presigner(store, config.store, PresignSettings.from_env())
    speakers = Speakers(store, pipeline.clients.lipsync)
    servicer = OrchestratorServicer(jobs, presigner, Callers(config.server.auth.tokens_file), speakers)
    return [binding_for(pb, orchestrator_pb2_grpc, "OrchestratorService", servicer, load=load)]
