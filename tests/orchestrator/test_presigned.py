"""Presigned URLs (OrchestratorService.PresignObject): outside callers move inputs and results without store
credentials (issue 16, item 3).

Everything real: the S3 server of the session (`weed mini`), the orchestrator's gRPC server on loopback with the
token check on, `a2v`'s Connection with no store credentials in its environment, plain HTTP PUTs and GETs.
What the store enforces is tried against it: a body of another size than signed, a key other than signed, an
expired URL (weed refuses each: SignatureDoesNotMatch, AccessDenied "Request has expired").
"""

import json
import time
import uuid

import grpc
import pytest
import urllib3

from audio2video.common.v1 import common_pb2
from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from audio2video.orchestrator.v1 import orchestrator_pb2_grpc
from client.jobs import Connection, PresignedStore, upload
from client.stages import upload_references
from orchestrator.jobs import JobManager, manifest_key, now
from orchestrator.presign import Callers, Presigner, PresignSettings
from orchestrator.servicer import OrchestratorServicer
from services.runtime.clients import create_channel
from services.runtime.config import AuthConfig, ServerConfig
from services.runtime.errors import Forbidden, InvalidInput
from services.runtime.keys import sha256_bytes
from services.runtime.protos import load_result, store_result
from services.runtime.security import ClientSecurity
from services.runtime.server import binding_for, create_server

TOKENS = {
    "alice": "alice-token-0123456789-0123456789",
    "bob": "bob-token-0123456789ab",
    "audio": "audio-token-0123456789",
    "root": "root-token-0123456789ab",
}
SCOPES = {"alice": ["jobs"], "bob": ["jobs"], "audio": ["stage:audio"], "root": ["admin"]}
LIMIT = 64 * 1024


class NoPipeline:
    """Nothing here runs a job: the jobs of these tests are written as finished manifests, or fail at once."""

    def render(self, spec, *, reporter, stop):
        raise InvalidInput("no pipeline here")

    def train(self, spec, *, reporter, stop):
        raise InvalidInput("no pipeline here")


@pytest.fixture()
def orchestrator(store, s3_server, tmp_path):
    """The orchestrator's gRPC server on loopback with tokens on; yields (address, store)."""
    store.ensure_bucket()
    tokens = tmp_path / "tokens.json"
    callers = [{"name": name, "token": token, "scopes": SCOPES[name]} for name, token in TOKENS.items()]
    tokens.write_text(json.dumps({"callers": callers}))
    settings = PresignSettings(public_endpoint=f"localhost:{s3_server.port}", seconds=120, upload_max_bytes=LIMIT)
    servicer = OrchestratorServicer(
        JobManager(store, NoPipeline()), Presigner(store, s3_server.config(), settings), Callers(str(tokens))
    )
    binding = binding_for(pb, orchestrator_pb2_grpc, "OrchestratorService", servicer)
    config = ServerConfig(service="orchestrator", auth=AuthConfig(tokens_file=str(tokens)))
    server, port = create_server(config, [binding])
    server.start()
    server.load_and_mark_serving()
    yield f"127.0.0.1:{port}"
    server.stop(0).wait()


def outside_caller(address: str, name: str = "alice") -> dict[str, str]:
    """An `a2v` environment with the orchestrator's address and a token, and no store credentials at all."""
    return {"A2V_ORCHESTRATOR_ADDR": address, "A2V_AUTH_TOKEN": TOKENS[name], "A2V_UPLOAD_MAX_BYTES": str(LIMIT)}


def stub(address: str, name: str | None = "alice") -> orchestrator_pb2_grpc.OrchestratorServiceStub:
    security = ClientSecurity(token=TOKENS[name] if name else "")
    return orchestrator_pb2_grpc.OrchestratorServiceStub(
        create_channel(address, ["audio2video.orchestrator.v1.OrchestratorService"], security=security)
    )


def finished_job(store, files: dict[str, bytes], owner: str = "alice") -> pb.Job:
    """A SUCCEEDED render job of `owner` whose result is its first file, each file stored under jobs/<id>/."""
    job_id = uuid.uuid4().hex
    refs = {}
    for name, data in files.items():
        blob = store.put_bytes(f"jobs/{job_id}/{name}", data, content_type="video/mp4")
        refs[name] = common_pb2.ObjectRef(
            bucket=blob.bucket, key=blob.key, sha256=blob.sha256, size_bytes=blob.size_bytes
        )
    result = next(iter(refs.values()))
    job = pb.Job(id=job_id, kind=pb.JOB_KIND_RENDER, state=pb.JOB_STATE_SUCCEEDED, result=result, owner=owner)
    store_result(store, manifest_key(job_id), job)
    return job


def test_a2v_without_store_credentials_uploads_and_downloads_through_presigned_urls(orchestrator, store, tmp_path):
    connection = Connection(outside_caller(orchestrator))
    assert connection.store is None and isinstance(connection.uploads, PresignedStore)
    data = uuid.uuid4().bytes * 2000  # 32 kB, unique to this test
    source = tmp_path / "speech.wav"
    source.write_bytes(data)

    ref = upload(connection.uploads, source, max_bytes=connection.upload_max_bytes)

    assert ref.key == f"uploads/alice/{sha256_bytes(data)}.wav"
    assert store.get_bytes(ref.key) == data  # checked against the sha256 recorded with it
    assert store.stat(ref.key).content_type == "audio/wav"
    # The same content again: the store has it, nothing is sent.
    again = connection.uploads.orchestrator.PresignObject(
        pb.PresignObjectRequest(upload=pb.UploadTarget(sha256=ref.sha256, size_bytes=len(data), suffix=".wav"))
    )
    assert again.exists and not again.url and again.object.key == ref.key
    assert upload(connection.uploads, source).key == ref.key

    job = finished_job(store, {"out.mp4": b"mp4 bytes " * 500})
    out = connection.download(job, tmp_path / "got" / "out.mp4")
    assert out.read_bytes() == b"mp4 bytes " * 500
    # The URLs are on the public endpoint (the store as callers reach it), not the orchestrator's own.
    signed = stub(orchestrator).PresignObject(pb.PresignObjectRequest(download=pb.DownloadTarget(job_id=job.id)))
    assert signed.url.startswith("http://localhost:") and signed.method == "GET"


def test_each_caller_uploads_under_its_own_prefix(orchestrator, tmp_path):
    source = tmp_path / "clip.mp4"
    source.write_bytes(b"same bytes" * 100)
    alice = upload(Connection(outside_caller(orchestrator, "alice")).uploads, source)
    bob = upload(Connection(outside_caller(orchestrator, "bob")).uploads, source)
    assert alice.key.startswith("uploads/alice/") and bob.key.startswith("uploads/bob/")


def test_a_url_for_another_jobs_folder_or_anything_else_is_refused(orchestrator, store):
    mine = finished_job(store, {"out.mp4": b"mine", "extra.txt": b"also mine"})
    theirs = finished_job(store, {"out.mp4": b"theirs"}, owner="bob")
    orchestrator_stub = stub(orchestrator)

    def ask(key: str, job_id: str = mine.id):
        request = pb.PresignObjectRequest(download=pb.DownloadTarget(job_id=job_id, key=key))
        return orchestrator_stub.PresignObject(request)

    assert ask(f"jobs/{mine.id}/extra.txt").object.sha256 == sha256_bytes(b"also mine")
    for key in (theirs.result.key, f"jobs/{theirs.id}/job.json", "uploads/alice/x.wav", "models/x/1/card.json"):
        with pytest.raises(grpc.RpcError) as refused:
            ask(key)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, key
    with pytest.raises(grpc.RpcError) as bad:
        ask(f"jobs/{mine.id}/../{theirs.id}/out.mp4")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as unknown:
        ask("", job_id="nosuchjob")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_job_that_has_not_succeeded_has_no_result_to_download(orchestrator, store):
    job = pb.Job(id=uuid.uuid4().hex, kind=pb.JOB_KIND_RENDER, state=pb.JOB_STATE_FAILED, owner="alice")
    store_result(store, manifest_key(job.id), job)
    with pytest.raises(grpc.RpcError) as refused:
        stub(orchestrator).PresignObject(pb.PresignObjectRequest(download=pb.DownloadTarget(job_id=job.id)))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_the_rpc_needs_the_jobs_scope(orchestrator):
    request = pb.PresignObjectRequest(upload=pb.UploadTarget(sha256="0" * 64, size_bytes=1))
    for caller, code in (("audio", grpc.StatusCode.PERMISSION_DENIED), (None, grpc.StatusCode.UNAUTHENTICATED)):
        with pytest.raises(grpc.RpcError) as refused:
            stub(orchestrator, caller).PresignObject(request)
        assert refused.value.code() == code


def test_an_upload_over_the_limit_is_refused_and_the_store_holds_a_put_to_what_was_signed(orchestrator, store):
    orchestrator_stub = stub(orchestrator)
    with pytest.raises(grpc.RpcError) as too_large:
        orchestrator_stub.PresignObject(
            pb.PresignObjectRequest(upload=pb.UploadTarget(sha256="1" * 64, size_bytes=LIMIT + 1))
        )
    assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    data = uuid.uuid4().bytes * 64
    signed = orchestrator_stub.PresignObject(
        pb.PresignObjectRequest(upload=pb.UploadTarget(sha256=sha256_bytes(data), size_bytes=len(data)))
    )
    http = urllib3.PoolManager()
    headers = dict(signed.headers)
    bigger = data + b"more than was signed"
    refusals = {
        "a larger body": http.request(
            "PUT", signed.url, body=bigger, headers={**headers, "Content-Length": str(len(bigger))}
        ),
        "another hash": http.request("PUT", signed.url, body=data, headers={**headers, "x-amz-meta-sha256": "2" * 64}),
        "another key": http.request(
            "PUT", signed.url.replace("/uploads/alice/", "/uploads/bob/"), body=data, headers=headers
        ),
        "no length (chunked)": http.request(
            "PUT", signed.url, body=iter([data]), headers={k: v for k, v in headers.items() if k != "Content-Length"}
        ),
    }
    for what, response in refusals.items():
        assert response.status == 403, (what, response.data[:200])
    assert not store.exists(signed.object.key)
    assert not store.exists(signed.object.key.replace("/alice/", "/bob/"))
    assert http.request("PUT", signed.url, body=data, headers=headers).status == 200
    assert store.get_bytes(signed.object.key) == data


def test_an_expired_url_is_refused_by_the_store(store, s3_server):
    store.ensure_bucket()
    presigner = Presigner(store, s3_server.config(), PresignSettings(seconds=1))
    data = uuid.uuid4().bytes
    signed = presigner.upload("alice", pb.UploadTarget(sha256=sha256_bytes(data), size_bytes=len(data)))
    time.sleep(2.5)
    response = urllib3.PoolManager().request("PUT", signed.url, body=data, headers=dict(signed.headers))
    assert response.status == 403 and b"expired" in response.data
    assert not store.exists(signed.object.key)


def test_a2v_stage_uploads_its_at_paths_through_presigned_urls_without_store_credentials(orchestrator, store, tmp_path):
    source = tmp_path / "speech.wav"
    source.write_bytes(uuid.uuid4().bytes * 100)
    connection = Connection(outside_caller(orchestrator))
    request = upload_references({"audio": {"key": f"@{source}"}}, connection.uploads, max_bytes=LIMIT)
    assert request["audio"]["key"].startswith("uploads/alice/") and request["audio"]["bucket"] == store.bucket
    assert store.get_bytes(request["audio"]["key"]) == source.read_bytes()


class CallContext:
    """What Callers reads of a call: its metadata and, with mTLS, the verified client certificate's names."""

    def __init__(self, metadata=(), identities=()) -> None:
        self.metadata, self.identities = tuple(metadata), [name.encode() for name in identities]

    def invocation_metadata(self):
        return self.metadata

    def auth_context(self):
        return {"transport_security_type": [b"ssl"], "x509_subject_alternative_name": self.identities}


def test_a_caller_known_by_its_certificate_uploads_under_its_own_prefix(tmp_path):
    """With mTLS and no token the server's check names the caller from its certificate; so does the uploads prefix."""
    callers_file = tmp_path / "callers.json"
    callers_file.write_text(
        json.dumps(
            {
                "callers": [
                    {"name": "render-farm", "certificates": ["spiffe://a2v.local/render-farm"], "scopes": ["jobs"]},
                    {"name": "alice", "token": "alice-token-0123456789", "scopes": ["jobs"]},
                ]
            }
        )
    )
    callers = Callers(str(callers_file))
    assert callers.name(CallContext(identities=["spiffe://a2v.local/render-farm"])) == "render-farm"
    assert callers.name(
        CallContext([("authorization", "Bearer alice-token-0123456789")], ["spiffe://a2v.local/render-farm"])
    ) == (
        "alice"  # a token wins over the certificate, as in the server's check
    )
    with pytest.raises(Forbidden):
        callers.name(CallContext(identities=["spiffe://elsewhere/x"]))


def render_spec(audio: common_pb2.ObjectRef, video: common_pb2.ObjectRef) -> pb.SubmitJobRequest:
    return pb.SubmitJobRequest(spec=pb.RenderJobSpec(audio=audio, target_video=video, model={"speaker": "anyone"}))


def train_spec(*videos: common_pb2.ObjectRef) -> pb.TrainSpeakerRequest:
    spec = pb.TrainJobSpec(speaker="anyone", videos=[pb.TrainingVideo(clip_id="c", video=v) for v in videos])
    return pb.TrainSpeakerRequest(spec=spec)


def refused(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(request)
    return error.value


def test_a_job_names_only_its_callers_own_uploads_unless_the_caller_is_admin(orchestrator, store, tmp_path):
    """With a callers file a job's inputs are the caller's own uploads (issue 16): no rendering of another caller's
    upload or of a stage's internal blob; the admin scope names any key."""
    speech, video = tmp_path / "speech.wav", tmp_path / "target.mp4"
    speech.write_bytes(uuid.uuid4().bytes * 100)
    video.write_bytes(uuid.uuid4().bytes * 100)
    alice = Connection(outside_caller(orchestrator, "alice"))
    audio_ref, video_ref = upload(alice.uploads, speech), upload(alice.uploads, video)
    bobs = upload(Connection(outside_caller(orchestrator, "bob")).uploads, video)
    internal = store.put_bytes(f"audio/{uuid.uuid4().hex}/features.npy", b"a stage's blob")
    internal_ref = common_pb2.ObjectRef(key=internal.key)

    # Its own uploads: accepted (the job then fails in this test's pipeline, which runs nothing).
    assert alice.render("anyone", speech, video).render.audio.key == audio_ref.key
    assert alice.orchestrator.TrainSpeaker(train_spec(video_ref)).job.id

    bob = stub(orchestrator, "bob")
    for request, call in (
        (render_spec(audio_ref, bobs), bob.SubmitJob),  # alice's audio
        (render_spec(common_pb2.ObjectRef(key=bobs.key), internal_ref), bob.SubmitJob),  # a stage's blob
        (render_spec(audio_ref, video_ref), stub(orchestrator, "bob").SubmitJob),  # all of alice's
        (render_spec(common_pb2.ObjectRef(key=bobs.key), bobs), stub(orchestrator, "alice").SubmitJob),  # bob's
        (train_spec(bobs, video_ref), bob.TrainSpeaker),  # alice's video among bob's
        (train_spec(common_pb2.ObjectRef(key=bobs.key, bucket="another-bucket")), bob.TrainSpeaker),
    ):
        error = refused(call, request)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
    assert "bucket" in error.details()
    # Refused before the store is asked: a key that does not exist is not told apart from one that does.
    missing = refused(bob.SubmitJob, render_spec(common_pb2.ObjectRef(key="uploads/alice/none.wav"), bobs))
    assert missing.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "uploads/bob/" in missing.details() and "admin" in missing.details()
    sneaky = refused(bob.SubmitJob, render_spec(common_pb2.ObjectRef(key="uploads/bob/../alice/x.wav"), bobs))
    assert sneaky.code() == grpc.StatusCode.INVALID_ARGUMENT

    root = stub(orchestrator, "root")
    assert root.SubmitJob(render_spec(audio_ref, internal_ref)).job.id
    assert root.TrainSpeaker(train_spec(bobs, video_ref)).job.id


def test_with_store_credentials_and_a_token_a2v_uploads_under_its_callers_prefix(orchestrator, s3_server, tmp_path):
    """The direct-upload path (store credentials, no presigned URLs) asks the orchestrator for the caller's prefix,
    so that its jobs are accepted with authentication on."""
    speech = tmp_path / "speech.wav"
    speech.write_bytes(uuid.uuid4().bytes * 100)
    environ = {**outside_caller(orchestrator, "bob"), **s3_server.env(), "A2V_PRESIGNED": "0"}
    connection = Connection(environ)
    assert connection.store is not None and connection.transfers is None
    assert connection.upload_prefix == "uploads/bob"
    job = connection.render("anyone", speech, speech)
    assert job.render.audio.key == f"uploads/bob/{sha256_bytes(speech.read_bytes())}.wav"
    # Without a credential of its own (the open development stack) the prefix is the shared one.
    anonymous = Connection({**environ, "A2V_AUTH_TOKEN": ""})
    assert anonymous.upload_prefix == "uploads"


def test_without_a_callers_file_any_stored_input_goes_as_before():
    callers = Callers()
    inputs = [("audio", common_pb2.ObjectRef(key="audio/x/features.npy", bucket="elsewhere"))]
    callers.check_inputs(CallContext([("authorization", "Bearer whatever")]), inputs, "a2v-test")


def stored_job(store, owner: str, state: int = pb.JOB_STATE_FAILED) -> pb.Job:
    """A render job's manifest as the orchestrator writes it, of `owner` ("": recorded before jobs had owners)."""
    job = pb.Job(id=uuid.uuid4().hex[:20], kind=pb.JOB_KIND_RENDER, state=state, owner=owner, created=now())
    store_result(store, manifest_key(job.id), job)
    return job


def job_calls(orchestrator_stub: orchestrator_pb2_grpc.OrchestratorServiceStub, job_id: str) -> dict[str, object]:
    """Every RPC that acts on one job, as a call of no arguments."""
    return {
        "GetJob": lambda: orchestrator_stub.GetJob(pb.GetJobRequest(job_id=job_id)),
        "WatchJob": lambda: next(iter(orchestrator_stub.WatchJob(pb.WatchJobRequest(job_id=job_id)))),
        "CancelJob": lambda: orchestrator_stub.CancelJob(pb.CancelJobRequest(job_id=job_id)),
        "RetryJob": lambda: orchestrator_stub.RetryJob(pb.RetryJobRequest(job_id=job_id)),
        "PresignObject": lambda: orchestrator_stub.PresignObject(
            pb.PresignObjectRequest(download=pb.DownloadTarget(job_id=job_id))
        ),
    }


def listed(orchestrator_stub, job_ids) -> set[str]:
    return {j.id for j in orchestrator_stub.ListJobs(pb.ListJobsRequest(page_size=500)).jobs} & set(job_ids)


def test_a_job_is_its_submitters_and_the_admins_only(orchestrator, store, tmp_path):
    """With a callers file a job belongs to the caller that submitted it (issue 16): another caller can neither see,
    watch, cancel, retry nor download it, and is told no more than of a job that does not exist."""
    speech, video = tmp_path / "speech.wav", tmp_path / "target.mp4"
    speech.write_bytes(uuid.uuid4().bytes * 100)
    video.write_bytes(uuid.uuid4().bytes * 100)
    alice, bob, root = stub(orchestrator, "alice"), stub(orchestrator, "bob"), stub(orchestrator, "root")
    uploads = Connection(outside_caller(orchestrator, "alice")).uploads
    request = render_spec(upload(uploads, speech), upload(uploads, video))
    request.client_token = "the same token"

    submitted = alice.SubmitJob(request).job
    assert submitted.owner == "alice"
    assert load_result(store, manifest_key(submitted.id), pb.Job).owner == "alice"  # recorded with the job
    assert alice.SubmitJob(request).job.id == submitted.id  # idempotent for its caller
    assert root.SubmitJob(request).job.id != submitted.id  # a client token is its caller's own
    done = finished_job(store, {"out.mp4": b"alice's result"})
    failed, bobs, ownerless = stored_job(store, "alice"), stored_job(store, "bob"), stored_job(store, "")
    everything = [submitted.id, done.id, failed.id, bobs.id, ownerless.id]

    assert alice.GetJob(pb.GetJobRequest(job_id=done.id)).job.owner == "alice"
    assert next(iter(alice.WatchJob(pb.WatchJobRequest(job_id=done.id)))).snapshot.id == done.id
    assert alice.PresignObject(pb.PresignObjectRequest(download=pb.DownloadTarget(job_id=done.id))).url
    assert alice.RetryJob(pb.RetryJobRequest(job_id=failed.id)).job.retries == 1
    assert listed(alice, everything) == {submitted.id, done.id, failed.id}
    assert listed(bob, everything) == {bobs.id}
    assert listed(root, everything) == set(everything)

    # Another caller's job, and one recorded before jobs had owners, answer as a job that does not exist.
    for caller, name, job in ((bob, "bob", done), (bob, "bob", failed), (alice, "alice", ownerless)):
        for method, call in job_calls(caller, job.id).items():
            with pytest.raises(grpc.RpcError) as refusal:
                call()
            error = refusal.value
            assert error.code() == grpc.StatusCode.NOT_FOUND, (method, error.details())
            assert error.details() == f"no job {job.id} of caller {name!r}", method
    missing = refused(bob.GetJob, pb.GetJobRequest(job_id="0" * 20))
    assert (missing.code(), missing.details()) == (grpc.StatusCode.NOT_FOUND, f"no job {'0' * 20} of caller 'bob'")
    after = load_result(store, manifest_key(done.id), pb.Job)
    assert after.state == pb.JOB_STATE_SUCCEEDED and not after.cancel_requested and after.retries == 0

    # The admin scope acts on every job, those without an owner too.
    assert root.GetJob(pb.GetJobRequest(job_id=ownerless.id)).job.id == ownerless.id
    assert root.RetryJob(pb.RetryJobRequest(job_id=ownerless.id)).job.retries == 1
    assert root.RetryJob(pb.RetryJobRequest(job_id=bobs.id)).job.owner == "bob"  # a retry keeps the owner
    assert root.CancelJob(pb.CancelJobRequest(job_id=bobs.id)).job.id == bobs.id
    assert root.PresignObject(pb.PresignObjectRequest(download=pb.DownloadTarget(job_id=done.id))).url


def test_without_a_callers_file_every_caller_sees_every_job(store):
    """The open development stack: no owner recorded, no job hidden (Callers without a file, JobManager.list)."""
    callers, context = Callers(), CallContext([("authorization", "Bearer whatever")])
    assert callers.owner(context) == "" and callers.jobs_of(context) is None
    store.ensure_bucket()
    jobs = [stored_job(store, owner) for owner in ("", "alice")]
    manager = JobManager(store, NoPipeline())
    assert {j.id for j in jobs} <= {j.id for j in manager.list(page_size=500)}
    assert {j.id for j in manager.list(page_size=500, owner="alice")} & {j.id for j in jobs} == {jobs[1].id}
