"""The shared server and client helpers through real gRPC servers on loopback."""

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from audio2video.retiming.v1 import retiming_pb2, retiming_pb2_grpc
from audio2video.texture.v1 import texture_pb2, texture_pb2_grpc
from services.runtime.clients import create_channel, health_status, is_busy, rpc_failure, wait_for_serving
from services.runtime.config import ServerConfig
from services.runtime.errors import InvalidInput, NotFound, Unavailable
from services.runtime.server import binding_for, create_server
from services.runtime.status import grpc_errors
from tests.conftest import REPO, free_port, wait_until

pytestmark = pytest.mark.integration
RETIMING = "audio2video.retiming.v1.RetimingService"
TEXTURE = "audio2video.texture.v1.TextureService"


class ScriptedRetiming(retiming_pb2_grpc.RetimingServiceServicer):
    """Retime behaves by `request_id`: "sleep:<ms>", "invalid", "bug", "flaky", else echoes `tag`."""

    def __init__(self, tag: int = 0) -> None:
        self.tag = tag
        self.calls = 0

    @grpc_errors
    def Retime(self, request, context):
        self.calls += 1
        kind, _, argument = request.request_id.partition(":")
        if kind == "sleep":
            time.sleep(int(argument) / 1000)
        elif kind == "invalid":
            raise InvalidInput("output_frame_count must be > 0, got -3")
        elif kind == "bug":
            raise KeyError("private detail")
        elif kind == "flaky" and self.calls == 1:
            raise Unavailable("replica warming up")
        return retiming_pb2.RetimeResponse(output_frame_count=self.tag)


class StreamingTexture(texture_pb2_grpc.TextureServiceServicer):
    """Synthesize sends one progress event, then fails with NOT_FOUND."""

    @grpc_errors
    def Synthesize(self, request, context):
        yield texture_pb2.SynthesizeEvent(progress={"stage": "texture", "done": 1, "total": 2})
        raise NotFound("object not found: audio2video/analysis/x.json")


def start(servicer=None, *, load=None, **config):
    servicer = servicer or ScriptedRetiming()
    binding = binding_for(retiming_pb2, retiming_pb2_grpc, "RetimingService", servicer, load=load)
    server, port = create_server(ServerConfig(service="test", **config), [binding])
    server.start()
    return server, port


def stub(port_or_target, timeout_seconds=10.0):
    target = port_or_target if isinstance(port_or_target, str) else f"127.0.0.1:{port_or_target}"
    channel = create_channel(target, [RETIMING], timeout_seconds=timeout_seconds)
    return retiming_pb2_grpc.RetimingServiceStub(channel), channel


def test_health_goes_from_not_serving_to_serving_once_loaded():
    loaded = threading.Event()
    server, port = start(load=loaded.wait)
    loader = threading.Thread(target=server.load_and_mark_serving)
    loader.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert health_status(channel, "") == "SERVING"  # the process is alive...
            assert health_status(channel, RETIMING) == "NOT_SERVING"  # ...but its models are not loaded
            assert health_status(channel, "no.such.Service") == "SERVICE_UNKNOWN"
            loaded.set()
            assert wait_until(lambda: health_status(channel, RETIMING) == "SERVING")
    finally:
        loaded.set()
        loader.join()
        server.stop(0).wait()


def test_reflection_lists_the_service_and_health(serving):
    _, port = serving()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {RETIMING, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_unbuilt_rpcs_answer_unimplemented(serving):
    _, port = serving(retiming_pb2_grpc.RetimingServiceServicer())  # the generated base: nothing overridden
    retiming, channel = stub(port)
    with channel, pytest.raises(grpc.RpcError) as err:
        retiming.Retime(retiming_pb2.RetimeRequest(output_frame_count=3))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_bad_input_is_invalid_argument_with_its_message(serving):
    _, port = serving()
    retiming, channel = stub(port)
    with channel, pytest.raises(grpc.RpcError) as err:
        retiming.Retime(retiming_pb2.RetimeRequest(request_id="invalid"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be > 0, got -3" in err.value.details()


def test_unexpected_errors_are_internal_without_details(serving):
    _, port = serving()
    retiming, channel = stub(port)
    with channel, pytest.raises(grpc.RpcError) as err:
        retiming.Retime(retiming_pb2.RetimeRequest(request_id="bug"))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "private detail" not in err.value.details()
    assert "ref " in err.value.details()


def test_streaming_errors_map_after_progress():
    binding = binding_for(texture_pb2, texture_pb2_grpc, "TextureService", StreamingTexture())
    server, port = create_server(ServerConfig(service="test"), [binding])
    server.start()
    try:
        channel = create_channel(f"127.0.0.1:{port}", [TEXTURE], timeout_seconds=10)
        events = []
        with channel, pytest.raises(grpc.RpcError) as err:
            for event in texture_pb2_grpc.TextureServiceStub(channel).Synthesize(texture_pb2.SynthesizeRequest()):
                events.append(event)
        assert [e.progress.done for e in events] == [1]
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "analysis/x.json" in err.value.details()
    finally:
        server.stop(0).wait()


def test_oversized_request_is_resource_exhausted(serving):
    _, port = serving(max_message_bytes=64 * 1024)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 << 20)])
    with channel, pytest.raises(grpc.RpcError) as err:
        retiming_pb2_grpc.RetimingServiceStub(channel).Retime(
            retiming_pb2.RetimeRequest(request_id="x" * (1 << 20)), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_every_call_has_a_deadline_from_the_service_config(serving):
    _, port = serving()
    retiming, channel = stub(port, timeout_seconds=0.5)
    started = time.monotonic()
    with channel, pytest.raises(grpc.RpcError) as err:
        retiming.Retime(retiming_pb2.RetimeRequest(request_id="sleep:5000"))  # no timeout= passed
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3


def test_a_server_that_is_not_up_fails_fast_with_unavailable():
    retiming, channel = stub(free_port(), timeout_seconds=10)
    started = time.monotonic()
    with channel, pytest.raises(grpc.RpcError) as err:
        retiming.Retime(retiming_pb2.RetimeRequest())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 10
    with pytest.raises(Unavailable, match="not SERVING"):
        wait_for_serving(f"127.0.0.1:{free_port()}", RETIMING, timeout_seconds=0.5)


def test_unavailable_is_retried_by_the_channel(serving):
    servicer = ScriptedRetiming(tag=7)
    _, port = serving(servicer)
    retiming, channel = stub(port)
    with channel:
        assert retiming.Retime(retiming_pb2.RetimeRequest(request_id="flaky")).output_frame_count == 7
    assert servicer.calls == 2


def test_calls_beyond_the_concurrency_bound_are_refused(serving):
    _, port = serving(max_concurrent_rpcs=1)
    retiming, channel = stub(port)
    outcomes = []

    def call():
        try:
            retiming.Retime(retiming_pb2.RetimeRequest(request_id="sleep:1000"))
            outcomes.append("ok")
        except grpc.RpcError as exc:
            outcomes.append(exc.code())

    with channel:
        threads = [threading.Thread(target=call) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert outcomes.count("ok") >= 1
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes


def test_health_answers_while_every_call_slot_is_taken(serving):
    """Eight long streams used to leave the 2 s probes waiting behind them (one thread pool, one bound)."""
    _, port = serving(max_workers=2, max_concurrent_rpcs=4)
    retiming, channel = stub(port, timeout_seconds=30)
    outcomes = []

    def call():
        try:
            retiming.Retime(retiming_pb2.RetimeRequest(request_id="sleep:3000"))
            outcomes.append("ok")
        except grpc.RpcError as exc:
            outcomes.append(rpc_failure(exc))

    with channel:
        grpc.channel_ready_future(channel).result(timeout=5)
        threads = [threading.Thread(target=call) for _ in range(4)]  # 2 running, 2 waiting for a worker
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as probe:
            for _ in range(5):
                started = time.monotonic()
                assert health_status(probe, RETIMING, timeout_seconds=2.0) == "SERVING"
                assert time.monotonic() - started < 0.5
        with pytest.raises(grpc.RpcError) as refused:  # a fifth call is over the bound: refused at once, as busy
            retiming.Retime(retiming_pb2.RetimeRequest(request_id="sleep:10"))
        code, detail = rpc_failure(refused.value)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and is_busy(code, detail)
        for thread in threads:
            thread.join()
    assert outcomes == ["ok"] * 4


def test_round_robin_reaches_every_replica(serving):
    _, first = serving(ScriptedRetiming(tag=1))
    _, second = serving(ScriptedRetiming(tag=2))
    retiming, channel = stub(f"ipv4:127.0.0.1:{first},127.0.0.1:{second}")
    with channel:
        grpc.channel_ready_future(channel).result(timeout=5)
        seen = {retiming.Retime(retiming_pb2.RetimeRequest()).output_frame_count for _ in range(10)}
    assert seen == {1, 2}


def test_sigterm_drains_an_in_flight_call_then_exits(s3_server):
    port = free_port()
    env = {**os.environ, **s3_server.env(), "A2V_LISTEN": f"127.0.0.1:{port}", "A2V_GRACE_SECONDS": "10"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.slow_service"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_serving(f"127.0.0.1:{port}", RETIMING, timeout_seconds=30)
        retiming, channel = stub(port)
        with channel:
            in_flight = retiming.Retime.future(retiming_pb2.RetimeRequest(output_frame_count=1500))
            time.sleep(0.4)
            process.send_signal(signal.SIGTERM)
            assert in_flight.result(timeout=10).output_frame_count == 1500  # drained, not cut
        assert process.wait(timeout=15) == 0
        log = process.stdout.read().decode()
        assert "draining" in log and '"service": "slow-retiming"' in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
