"""`make up` / `make down`: the whole local stack as real processes, and nothing left behind."""

import json
import subprocess

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from audio2video.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from client.environment import stack_environment
from deploy.local import COMPONENTS, MODEL_SYNC, STACK_COMPONENTS, WEED_PORT_COUNT, _alive, _port_free, read_env_file
from services.runtime.clients import health_status
from services.runtime.config import parse_address
from services.runtime.security import ClientSecurity
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def make(target, env):
    return subprocess.run(["make", "-s", target], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_up_serves_every_stage_and_down_leaves_nothing_behind(stack_env):
    up = make("up", stack_env)
    assert up.returncode == 0, up.stdout + up.stderr
    state = json.loads((REPO / stack_env["A2V_STACK_DIR"] / "state.json").read_text())
    assert {entry["name"] for entry in state} == {"s3"} | {c.name for c in STACK_COMPONENTS}

    for component in STACK_COMPONENTS:
        address = stack_env[f"A2V_{component.name.upper()}_ADDR"]
        with grpc.insecure_channel(address) as channel:
            assert health_status(channel, component.grpc_service) == "SERVING", component.name
            services = ProtoReflectionDescriptorDatabase(channel).get_services()
        if component is not MODEL_SYNC:  # TF Serving's sidecar serves health only (SERVING: the list is written)
            assert component.grpc_service in services  # what `grpcurl -plaintext ADDRESS list` shows

    status = make("status", stack_env)
    assert status.returncode == 0 and status.stdout.count("SERVING") == len(STACK_COMPONENTS), status.stdout
    again = make("up", stack_env)
    assert again.returncode == 0 and "already up" in again.stdout

    down = make("down", stack_env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not any(_alive(entry["pid"]) for entry in state)
    addresses = [stack_env["A2V_S3_ENDPOINT"]] + [e["address"] for e in state]
    base = int(stack_env["A2V_WEED_PORT_BASE"])
    addresses += [f"127.0.0.1:{port}" for port in range(base, base + WEED_PORT_COUNT)]
    assert [a for a in addresses if not _port_free(*parse_address(a))] == []
    after = make("status", stack_env)
    assert after.returncode != 0 and "stack is down" in after.stdout


def test_down_when_nothing_runs_is_fine(stack_env):
    result = make("down", stack_env)
    assert result.returncode == 0 and "stack is down" in result.stdout


def test_env_file_names_every_component_address():
    values = read_env_file()
    for component in STACK_COMPONENTS:
        assert f"A2V_{component.name.upper()}_ADDR" in values
    assert {"A2V_S3_ENDPOINT", "A2V_S3_ACCESS_KEY", "A2V_S3_SECRET_KEY", "A2V_S3_BUCKET"} <= set(values)


@pytest.mark.slow  # a second whole stack (~70 s); the default suite covers TLS on loopback servers
def test_with_tls_on_every_service_takes_only_tls_and_its_callers_tokens(stack_env):
    env = {**stack_env, "A2V_TLS": "1"}
    up = make("up", env)
    assert up.returncode == 0, up.stdout + up.stderr
    status = make("status", env)
    assert status.returncode == 0 and status.stdout.count("SERVING") == len(STACK_COMPONENTS), status.stdout
    client = ClientSecurity.from_env(stack_environment(env))  # what `a2v` uses: the stack's CA and its token
    for component in COMPONENTS:
        address = env[f"A2V_{component.name.upper()}_ADDR"]
        with grpc.insecure_channel(address) as channel:
            assert health_status(channel, component.grpc_service) == "UNREACHABLE", component.name  # plaintext
        with client.channel(address, []) as channel:
            assert health_status(channel, component.grpc_service) == "SERVING", component.name
    address = env["A2V_ORCHESTRATOR_ADDR"]
    anonymous = ClientSecurity(client.tls)
    for security, expected in ((anonymous, grpc.StatusCode.UNAUTHENTICATED), (client, None)):
        with security.channel(address, []) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            try:
                stub.ListJobs(orchestrator_pb2.ListJobsRequest(), timeout=10)
                code = None
            except grpc.RpcError as exc:
                code = exc.code()
        assert code == expected
