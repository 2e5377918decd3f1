"""The local stack with TLS on (`A2V_TLS=1 a2v up`): its throwaway CA and tokens, as services and `a2v` read them."""

import dataclasses

import grpc
import pytest

from audio2video.retiming.v1 import retiming_pb2, retiming_pb2_grpc
from client.environment import pki_folder, stack_environment
from deploy import healthcheck
from deploy.local import COMPONENTS, MODEL_SYNC, TF_SERVING_STAND_IN, LocalStack
from deploy.pki import LOCAL_CALLERS, client_certificate, make_local_security
from services.runtime.clients import create_channel, wait_for_serving
from services.runtime.config import Config
from services.runtime.security import ClientSecurity
from services.runtime.server import binding_for, create_server
from tests.runtime.test_server import RETIMING, ScriptedRetiming

pytestmark = pytest.mark.integration


def test_services_and_a2v_of_a_tls_stack_reach_each_other_with_their_own_tokens(tmp_path):
    environ = {"A2V_TLS": "1", "A2V_STACK_DIR": str(tmp_path), "A2V_S3_ACCESS_KEY": "a", "A2V_S3_SECRET_KEY": "b"}
    make_local_security(pki_folder(environ))
    stack = LocalStack(stack_environment(environ))
    for plaintext in (TF_SERVING_STAND_IN.name, MODEL_SYNC.name):
        assert stack._security_env(plaintext) == {"A2V_TLS": "0"}  # as the real TF Serving and its clients
    service_env = {**stack.env, **stack._security_env("retiming-2"), "A2V_LISTEN": "127.0.0.1:0"}
    assert all(stack._security_env(c.name)["A2V_TLS"] == "1" for c in COMPONENTS)

    config = Config.from_env("retiming", service_env)
    assert config.server.tls.enabled and config.server.tls.client_auth and config.server.auth.tokens_file
    binding = binding_for(retiming_pb2, retiming_pb2_grpc, "RetimingService", ScriptedRetiming(tag=2))
    server, port = create_server(config.server, [binding])
    server.start()
    server.load_and_mark_serving()
    try:
        address = f"127.0.0.1:{port}"
        wait_for_serving(address, RETIMING, timeout_seconds=10, security=stack._client_security("retiming"))
        for who in (ClientSecurity.from_env(service_env), ClientSecurity.from_env(stack_environment(environ))):
            stub = retiming_pb2_grpc.RetimingServiceStub(create_channel(address, [RETIMING], security=who))
            assert stub.Retime(retiming_pb2.RetimeRequest(output_frame_count=1), timeout=5).output_frame_count == 2
        anonymous = ClientSecurity(ClientSecurity.from_env(service_env).tls, token="")
        stub = retiming_pb2_grpc.RetimingServiceStub(create_channel(address, [RETIMING], security=anonymous))
        with pytest.raises(grpc.RpcError) as err:
            stub.Retime(retiming_pb2.RetimeRequest(output_frame_count=1), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the shared certificate names no caller
        for caller in LOCAL_CALLERS:  # each caller's own certificate is in the callers file: no token needed
            own = client_certificate(pki_folder(environ), caller)
            tls = dataclasses.replace(anonymous.tls, cert_file=str(own.cert_file), key_file=str(own.key_file))
            channel = create_channel(address, [RETIMING], security=ClientSecurity(tls))
            stub = retiming_pb2_grpc.RetimingServiceStub(channel)
            assert stub.Retime(retiming_pb2.RetimeRequest(output_frame_count=1), timeout=5).output_frame_count == 2
    finally:
        server.stop(0).wait()


def test_without_a2v_tls_nothing_changes(tmp_path):
    environ = {"A2V_STACK_DIR": str(tmp_path)}
    assert "A2V_TLS_CA" not in stack_environment(environ)
    assert LocalStack(stack_environment(environ))._security_env("orchestrator") == {}


def test_the_container_health_check_asks_over_tls_when_the_service_takes_tls(tmp_path, monkeypatch):
    service_env = make_local_security(tmp_path)
    config = Config.from_env("retiming", {**service_env, "A2V_S3_ACCESS_KEY": "a", "A2V_S3_SECRET_KEY": "b"})
    binding = binding_for(retiming_pb2, retiming_pb2_grpc, "RetimingService", ScriptedRetiming())
    server, port = create_server(config.server, [binding])
    server.start()
    server.load_and_mark_serving()
    try:
        monkeypatch.setenv("A2V_LISTEN", f"127.0.0.1:{port}")
        assert healthcheck.main([RETIMING]) == 1  # plaintext: refused
        for key, value in service_env.items():
            monkeypatch.setenv(key, value)
        assert healthcheck.main([RETIMING]) == 0
    finally:
        server.stop(0).wait()
