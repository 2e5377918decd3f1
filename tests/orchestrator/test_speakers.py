"""The trained speakers through the orchestrator (OrchestratorService.ListSpeakers, `a2v speakers`; issue 16): a caller
with only the orchestrator's address and a token lists them, with neither store credentials nor a stage's address.

Real servers on loopback: the session's S3 server (a bucket of this test's own, holding only these speakers), the TF
Serving stand-in serving one speaker's SavedModel, the lipsync stage over both, the orchestrator with tokens on.
"""

import json
import os
import subprocess
import sys
import uuid

import grpc
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from audio2video.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc
from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from audio2video.orchestrator.v1 import orchestrator_pb2_grpc
from client.jobs import Connection
from orchestrator.jobs import JobManager
from orchestrator.presign import Callers
from orchestrator.servicer import OrchestratorServicer
from orchestrator.speakers import Speakers
from services.runtime.blobstore import BlobStore
from services.runtime.clients import create_channel
from services.runtime.config import AuthConfig
from services.runtime.security import ClientSecurity
from services.runtime.server import binding_for
from tests.conftest import REPO

pytestmark = pytest.mark.integration
TOKENS = {"alice": "alice-token-0123456789-abcdef", "audio": "audio-token-0123456789-abcdef"}
SCOPES = {"alice": ["jobs"], "audio": ["stage:audio"]}
SERVED = "served-speaker"  # version 1 stored and served by the TF Serving stand-in
STORED = "stored-speaker"  # versions 1 and 2 stored, neither served
ORCHESTRATOR = "audio2video.orchestrator.v1.OrchestratorService"


class NoPipeline:
    """Nothing here runs a job."""


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """TF Serving's folder: a SavedModel of the served speaker's version 1 (the lipsync tests' serving contract)."""
    from tests.lipsync.test_servicer import save_delayed_linear

    root = tmp_path_factory.mktemp("served")
    save_delayed_linear(root, SERVED)
    return root


@pytest.fixture()
def orchestrator(s3_server, run_server, models_dir, tmp_path):
    """The orchestrator (tokens on) over a store of its own and a real lipsync stage; yields its address."""
    from services.lipsync.servicer import LipsyncServicer
    from services.lipsync.serving import ServingClient
    from services.tfserving.models import ModelManager
    from services.tfserving.servicer import bindings as tfserving_bindings
    from tests.lipsync.test_servicer import store_model_assets

    store = BlobStore.from_config(s3_server.config(bucket=f"speakers-{uuid.uuid4().hex[:8]}"))
    store.ensure_bucket()
    for speaker, version in ((SERVED, 1), (STORED, 1), (STORED, 2)):
        store_model_assets(store, speaker, version)
    store.put_bytes("models/unfinished/1/saved_model.pb", b"exported, no model card yet")
    manager = ModelManager(models_dir, poll_seconds=0.2)
    assert manager.wait_ready(timeout=60)
    serving = ServingClient(f"127.0.0.1:{run_server(tfserving_bindings(manager, load_wait_seconds=10))}")
    lipsync_port = run_server(
        [binding_for(lipsync_pb2, lipsync_pb2_grpc, "LipsyncService", LipsyncServicer(store, serving))]
    )
    channel = create_channel(f"127.0.0.1:{lipsync_port}", ["audio2video.lipsync.v1.LipsyncService"])
    tokens = tmp_path / "tokens.json"
    callers = [{"name": name, "token": token, "scopes": SCOPES[name]} for name, token in TOKENS.items()]
    tokens.write_text(json.dumps({"callers": callers}))
    servicer = OrchestratorServicer(
        JobManager(store, NoPipeline()),
        callers=Callers(str(tokens)),
        speakers=Speakers(store, lipsync_pb2_grpc.LipsyncServiceStub(channel)),
    )
    binding = binding_for(pb, orchestrator_pb2_grpc, "OrchestratorService", servicer)
    yield f"127.0.0.1:{run_server([binding], auth=AuthConfig(tokens_file=str(tokens)))}"
    channel.close()
    serving.close()
    manager.close()


def stub(address: str, name: str | None) -> orchestrator_pb2_grpc.OrchestratorServiceStub:
    security = ClientSecurity(token=TOKENS[name] if name else "")
    return orchestrator_pb2_grpc.OrchestratorServiceStub(create_channel(address, [ORCHESTRATOR], security=security))


def test_list_speakers_describes_every_trained_speaker_through_the_lipsync_stage(orchestrator):
    speakers = stub(orchestrator, "alice").ListSpeakers(pb.ListSpeakersRequest()).speakers
    assert [s.speaker for s in speakers] == [SERVED, STORED]  # by name; no card, no trained version: left out
    served, stored = speakers
    assert [v.version for v in stored.versions] == [2, 1] and stored.latest_available_version == 0
    assert {v.state for v in stored.versions} == {lipsync_pb2.MODEL_STATE_NOT_LOADED}
    assert served.latest_available_version == 1
    assert served.versions[0].state == lipsync_pb2.MODEL_STATE_AVAILABLE
    assert served.versions[0].model_card.key == f"models/{SERVED}/1/assets.extra/model_card.json"


def test_list_speakers_needs_the_jobs_scope(orchestrator):
    for caller, code in (("audio", grpc.StatusCode.PERMISSION_DENIED), (None, grpc.StatusCode.UNAUTHENTICATED)):
        with pytest.raises(grpc.RpcError) as refused:
            stub(orchestrator, caller).ListSpeakers(pb.ListSpeakersRequest())
        assert refused.value.code() == code


def test_a2v_speakers_needs_only_the_orchestrator_and_a_token(orchestrator):
    # deploy/.env's store credentials and stage addresses overridden: none to use, no stage to reach.
    environ = {
        **os.environ,
        "A2V_ORCHESTRATOR_ADDR": orchestrator,
        "A2V_AUTH_TOKEN": TOKENS["alice"],
        "A2V_S3_ACCESS_KEY": "",
        "A2V_S3_SECRET_KEY": "",
        "A2V_LIPSYNC_ADDR": "127.0.0.1:1",
        "A2V_TLS": "0",
    }
    assert Connection(environ).store is None

    listed = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "speakers"],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["SPEAKER", "VERSION", "STATE", "SERVED", "CREATED", "PCA", "NOTE"]
    assert [row.split()[:4] for row in rows] == [
        [SERVED, "1", "available", "yes"],
        [STORED, "2", "not_loaded", "no"],
        [STORED, "1", "not_loaded", "no"],
    ]
    assert "yes (latest)" in rows[0]


def test_without_a_lipsync_stage_the_rpc_is_a_failed_precondition(run_server):
    servicer = OrchestratorServicer(JobManager(None, NoPipeline()))
    port = run_server([binding_for(pb, orchestrator_pb2_grpc, "OrchestratorService", servicer)])
    with pytest.raises(grpc.RpcError) as refused:
        stub(f"127.0.0.1:{port}", None).ListSpeakers(pb.ListSpeakersRequest())
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
