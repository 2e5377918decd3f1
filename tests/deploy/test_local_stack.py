"""`make up` / `make down`: the whole local stack as real processes, and nothing left behind."""

import json
import subprocess

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from deploy.local import MODEL_SYNC, STACK_COMPONENTS, WEED_PORT_COUNT, _alive, _port_free, read_env_file
from services.runtime.clients import health_status
from services.runtime.config import parse_address
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
