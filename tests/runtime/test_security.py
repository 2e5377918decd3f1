"""TLS, mTLS, bearer tokens and client certificates with scopes, through real gRPC servers on loopback
(services.runtime.security)."""

import dataclasses
import json
import os
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from audio2video.audio.v1 import audio_pb2, audio_pb2_grpc
from audio2video.common.v1 import common_pb2
from audio2video.retiming.v1 import retiming_pb2, retiming_pb2_grpc
from client.stages import call_stage
from deploy.pki import make_local_pki, write_tokens_file
from orchestrator.pipeline import StageClients
from services.audio.servicer import AudioServicer
from services.runtime import security
from services.runtime.clients import create_channel
from services.runtime.config import AuthConfig, Config, ConfigError, InputLimits, TlsConfig
from services.runtime.security import ClientSecurity, TokenAuth, TokenRegistry, required_scope
from services.runtime.server import binding_for
from tests.runtime.test_server import RETIMING, ScriptedRetiming

pytestmark = pytest.mark.integration
SCOPES = {
    "orchestrator": ["stage:*"],
    "retimer": ["stage:retiming"],
    "audio-only": ["stage:audio"],
    "submitter": ["jobs"],
    "operator": ["admin"],
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_local_pki(tmp_path_factory.mktemp("pki"), callers=("retimer", "submitter", "stranger"))


@pytest.fixture()
def by_certificate(tmp_path, pki):
    """A callers file naming two of the client certificates: retimer by its URI (SPIFFE ID), submitter by its CN."""
    path = tmp_path / "callers.json"
    scopes = {"retimer": ["stage:retiming"], "submitter": ["jobs"]}
    certificates = {"retimer": [pki.clients["retimer"].identity], "submitter": ["submitter"]}
    return path, write_tokens_file(path, scopes, certificates=certificates)


@pytest.fixture()
def tokens(tmp_path):
    path = tmp_path / "tokens.json"
    return path, write_tokens_file(path, SCOPES)


def server_tls(pki, *, client_auth=False) -> TlsConfig:
    return TlsConfig(True, str(pki.cert_file), str(pki.key_file), str(pki.ca_file), client_auth)


def client(port, *, tls: TlsConfig | None = None, token: str = ""):
    secure = ClientSecurity(tls or TlsConfig(), token)
    channel = create_channel(f"127.0.0.1:{port}", [RETIMING], timeout_seconds=5, security=secure)
    return retiming_pb2_grpc.RetimingServiceStub(channel), channel


def retime(port, **kwargs):
    stub, channel = client(port, **kwargs)
    with channel:
        return stub.Retime(retiming_pb2.RetimeRequest(output_frame_count=1), timeout=5)


def failure(port, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        retime(port, **kwargs)
    return err.value.code(), err.value.details()


def client_tls(pki, *, certificate=False, ca=True, caller="") -> TlsConfig:
    """A client's TLS: the shared service certificate with `certificate`, a caller's own with `caller`."""
    cert, key = (
        (pki.clients[caller].cert_file, pki.clients[caller].key_file) if caller else (pki.cert_file, pki.key_file)
    )
    return TlsConfig(
        True,
        str(cert) if certificate or caller else "",
        str(key) if certificate or caller else "",
        str(pki.ca_file) if ca else "",
        server_name="localhost",
    )


def test_a_tls_server_refuses_plaintext_and_unknown_cas_and_serves_tls(serving, pki):
    _, port = serving(ScriptedRetiming(tag=7), tls=server_tls(pki))
    assert failure(port)[0] == grpc.StatusCode.UNAVAILABLE  # a plaintext client
    assert failure(port, tls=client_tls(pki, ca=False))[0] == grpc.StatusCode.UNAVAILABLE  # system roots only
    assert retime(port, tls=client_tls(pki)).output_frame_count == 7


def test_mtls_refuses_a_client_without_a_certificate(serving, pki):
    _, port = serving(ScriptedRetiming(tag=3), tls=server_tls(pki, client_auth=True))
    assert failure(port, tls=client_tls(pki))[0] == grpc.StatusCode.UNAVAILABLE
    assert retime(port, tls=client_tls(pki, certificate=True)).output_frame_count == 3


def test_calls_need_a_known_token_with_the_methods_scope_and_health_stays_open(serving, tokens):
    path, token = tokens
    _, port = serving(ScriptedRetiming(tag=5), auth=AuthConfig(tokens_file=str(path)))
    code, detail = failure(port)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in detail
    code, detail = failure(port, token="x" * 40)
    assert (code, detail) == (grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token")
    for wrong in ("audio-only", "submitter"):
        code, detail = failure(port, token=token[wrong])
        assert code == grpc.StatusCode.PERMISSION_DENIED, wrong
        assert f"caller {wrong!r} lacks the scope 'stage:retiming'" in detail
    for right in ("retimer", "orchestrator", "operator"):
        assert retime(port, token=token[right]).output_frame_count == 5, right
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=RETIMING), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_and_tokens_together(serving, pki, tokens):
    path, token = tokens
    _, port = serving(ScriptedRetiming(tag=9), tls=server_tls(pki, client_auth=True), auth=AuthConfig(str(path)))
    tls = client_tls(pki, certificate=True)
    assert failure(port, tls=tls)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert failure(port, tls=tls, token=token["audio-only"])[0] == grpc.StatusCode.PERMISSION_DENIED
    assert retime(port, tls=tls, token=token["retimer"]).output_frame_count == 9


def test_a_client_certificate_names_its_caller_when_the_call_has_no_token(serving, pki, by_certificate):
    path, token = by_certificate
    _, port = serving(ScriptedRetiming(tag=6), tls=server_tls(pki, client_auth=True), auth=AuthConfig(str(path)))
    assert retime(port, tls=client_tls(pki, caller="retimer")).output_frame_count == 6  # its URI has the scope
    code, detail = failure(port, tls=client_tls(pki, caller="submitter"))  # known by its CN, without the scope
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert detail == f"caller 'submitter' lacks the scope 'stage:retiming' that /{RETIMING}/Retime needs"
    code, detail = failure(port, tls=client_tls(pki, caller="stranger"))  # signed by the CA, named by no caller
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert detail == "the client certificate (spiffe://a2v.local/stranger, stranger) names no caller"
    assert failure(port, tls=client_tls(pki, certificate=True))[0] == grpc.StatusCode.UNAUTHENTICATED  # the shared one


def test_a_token_wins_over_the_client_certificate(serving, pki, by_certificate):
    path, token = by_certificate
    _, port = serving(ScriptedRetiming(tag=8), tls=server_tls(pki, client_auth=True), auth=AuthConfig(str(path)))
    assert retime(port, tls=client_tls(pki, caller="stranger"), token=token["retimer"]).output_frame_count == 8
    code, detail = failure(port, tls=client_tls(pki, caller="retimer"), token=token["submitter"])
    assert code == grpc.StatusCode.PERMISSION_DENIED and "caller 'submitter'" in detail
    code, detail = failure(port, tls=client_tls(pki, caller="retimer"), token="x" * 40)
    assert (code, detail) == (grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token")


def test_without_mtls_a_client_certificate_names_no_caller(serving, pki, by_certificate):
    path, _ = by_certificate
    _, port = serving(ScriptedRetiming(tag=1), tls=server_tls(pki), auth=AuthConfig(str(path)))
    code, detail = failure(port, tls=client_tls(pki, caller="retimer"))  # the server never asked for it
    assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in detail


def test_a_streaming_call_is_checked_by_its_client_certificate_before_it_runs(pki, by_certificate):
    path, _ = by_certificate
    runs = []

    def count(_request, _context):
        runs.append(1)
        yield from (b"1", b"2")

    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[TokenAuth(TokenRegistry(path))])
    handlers = {"Count": grpc.unary_stream_rpc_method_handler(count)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(RETIMING, handlers)])
    port = server.add_secure_port("127.0.0.1:0", security.server_credentials(server_tls(pki, client_auth=True)))
    server.start()
    try:
        for caller, expected in (("retimer", [b"1", b"2"]), ("submitter", grpc.StatusCode.PERMISSION_DENIED)):
            secure = ClientSecurity(client_tls(pki, caller=caller))
            with secure.channel(f"127.0.0.1:{port}", []) as channel:
                call = channel.unary_stream(f"/{RETIMING}/Count")(b"", timeout=5)
                try:
                    assert list(call) == expected, caller
                except grpc.RpcError as err:
                    assert err.code() == expected, caller
        assert len(runs) == 1
    finally:
        server.stop(0).wait()


def test_a_long_running_client_presents_its_renewed_certificate(serving, pki, by_certificate, tmp_path, monkeypatch):
    """cert-manager rewrites a client's certificate files weeks before they expire: the open channel follows."""
    path, _ = by_certificate
    _, port = serving(ScriptedRetiming(tag=4), tls=server_tls(pki, client_auth=True), auth=AuthConfig(str(path)))
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"

    def install(caller: str, stamp: int) -> None:
        for target, source in ((cert, pki.clients[caller].cert_file), (key, pki.clients[caller].key_file)):
            target.write_bytes(source.read_bytes())
            os.utime(target, ns=(stamp, stamp))

    install("submitter", 10**18)  # a caller without the scope, so the server tells the two certificates apart
    monkeypatch.setattr(security, "RENEWAL_CHECK_SECONDS", 0.0)
    stub, channel = client(port, tls=TlsConfig(True, str(cert), str(key), str(pki.ca_file), server_name="localhost"))
    request = retiming_pb2.RetimeRequest(output_frame_count=1)
    with channel:
        with pytest.raises(grpc.RpcError) as denied:
            stub.Retime(request, timeout=5)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED  # the first certificate
        install("retimer", 2 * 10**18)  # renewed (here: a caller with the scope)
        assert stub.Retime(request, timeout=5).output_frame_count == 4  # the same stub, the new certificate
        key.unlink()  # in the middle of a rewrite: the channel of the last complete pair goes on
        assert stub.Retime(request, timeout=5).output_frame_count == 4


def test_reflection_can_be_switched_off(serving):
    _, port = serving(auth=AuthConfig(reflection=False))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as err:
        ProtoReflectionDescriptorDatabase(channel).get_services()
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_changed_tokens_file_is_read_again(serving, tokens, monkeypatch):
    monkeypatch.setattr(security, "RELOAD_CHECK_SECONDS", 0.0)
    path, token = tokens
    _, port = serving(auth=AuthConfig(tokens_file=str(path)))
    assert retime(port, token=token["retimer"])
    new = write_tokens_file(path, {"retimer": ["stage:retiming"]})  # every token replaced
    assert failure(port, token=token["retimer"])[0] == grpc.StatusCode.UNAUTHENTICATED
    assert retime(port, token=new["retimer"])
    path.write_text("not json")  # a broken file keeps the callers it replaced
    assert retime(port, token=new["retimer"])


def test_scopes_of_methods():
    assert required_scope("/audio2video.orchestrator.v1.OrchestratorService/SubmitJob") == "jobs"
    assert required_scope("/audio2video.texture.v1.TextureService/Synthesize") == "stage:texture"
    assert required_scope("/audio2video.lipsync.v1.TrainerService/Train") == "stage:trainer"
    assert required_scope("/tensorflow.serving.ModelService/HandleReloadConfigRequest") == "admin"


def test_configuration_fails_fast_and_reads_the_client_side(tmp_path, pki):
    base = {"A2V_S3_ACCESS_KEY": "a", "A2V_S3_SECRET_KEY": "b"}
    with pytest.raises(ConfigError, match="A2V_TLS_CERT is required"):
        Config.from_env("test", {**base, "A2V_TLS": "1"})
    server = Config.from_env("test", {**base, **pki.environment(), "A2V_REFLECTION": "0"}).server
    assert server.tls == dataclasses.replace(server_tls(pki, client_auth=True), server_name="localhost")
    assert server.auth.reflection is False
    (tmp_path / "token").write_text("secret-token-123456\n")
    client_side = ClientSecurity.from_env({**pki.environment(), "A2V_AUTH_TOKEN_FILE": str(tmp_path / "token")})
    assert client_side.token == "secret-token-123456" and client_side.tls.server_name == "localhost"
    assert ClientSecurity.from_env({}) == ClientSecurity()
    with pytest.raises(ConfigError, match="callers file: caller 'x': a token has at least 16"):
        security.parse_callers('{"callers": [{"name": "x", "token": "short", "scopes": []}]}')


def test_a_callers_file_names_tokens_certificates_or_both():
    by_certificate = {"name": "a2v", "certificates": ["spiffe://a2v.local/a2v"], "scopes": ["jobs"]}
    both = {"name": "orchestrator", "token": "t" * 16, "certificates": ["orchestrator"], "scopes": ["stage:*"]}
    callers = security.parse_callers(json.dumps({"callers": [by_certificate, both]}))
    assert {i: c.name for i, c in callers.by_identity.items()} == {
        "spiffe://a2v.local/a2v": "a2v",
        "orchestrator": "orchestrator",
    }
    assert [c.name for c in callers.by_token.values()] == ["orchestrator"]
    with pytest.raises(ConfigError, match="caller 'x' needs a token or certificates"):
        security.parse_callers('{"callers": [{"name": "x", "certificates": [], "scopes": []}]}')
    with pytest.raises(ConfigError, match="callers 'x' and 'y' share the identity 'cn'"):
        security.parse_callers(
            '{"callers": [{"name": "x", "certificates": ["cn"], "scopes": []},'
            ' {"name": "y", "certificates": ["cn"], "scopes": []}]}'
        )


def test_a2v_stage_and_the_orchestrators_stage_clients_use_tls_and_their_token(serving, pki, tokens):
    path, token = tokens
    _, port = serving(ScriptedRetiming(tag=4), tls=server_tls(pki, client_auth=True), auth=AuthConfig(str(path)))
    environ = {**pki.environment(), "A2V_RETIMING_ADDR": f"127.0.0.1:{port}", "A2V_AUTH_TOKEN": token["retimer"]}
    request = '{"outputFrameCount": 1}'
    assert call_stage("retiming", "Retime", request, environ=environ, timeout_seconds=5) == {"outputFrameCount": "4"}
    with pytest.raises(grpc.RpcError) as err:
        call_stage("retiming", "Retime", request, environ={**environ, "A2V_AUTH_TOKEN": token["submitter"]})
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    names = ("audio", "face", "lipsync", "texture", "teeth", "composite")
    stages = {f"A2V_{name.upper()}_ADDR": f"127.0.0.1:{port}" for name in names}
    clients = StageClients.from_env({**environ, **stages, "A2V_AUTH_TOKEN": token["orchestrator"]}, timeout_seconds=5)
    assert clients.retiming.Retime(retiming_pb2.RetimeRequest(output_frame_count=1)).output_frame_count == 4


def test_a_stage_refuses_a_request_naming_another_bucket(store, key_prefix, run_server):
    servicer = AudioServicer(store, InputLimits(max_seconds=60))
    port = run_server([binding_for(audio_pb2, audio_pb2_grpc, "AudioService", servicer)])
    stub = audio_pb2_grpc.AudioServiceStub(create_channel(f"127.0.0.1:{port}", timeout_seconds=10))
    for bucket in ("other-stage", "audio2video-private"):
        request = audio_pb2.ExtractRequest(audio=common_pb2.ObjectRef(bucket=bucket, key=f"{key_prefix}/a.wav"))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Extract(request))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"bucket '{bucket}' is not one this service uses" in err.value.details()
