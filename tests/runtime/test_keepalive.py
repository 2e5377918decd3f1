"""Long calls through real servers on loopback: keepalive pings, connection age and open-ended deadlines.

Times are scaled down (pings every half second instead of every 30 s) through the same settings production uses.
"""

import time

import grpc
import pytest

from audio2video.retiming.v1 import retiming_pb2, retiming_pb2_grpc
from audio2video.texture.v1 import texture_pb2, texture_pb2_grpc
from services.runtime.clients import channel_options, create_channel
from services.runtime.config import Config, ServerConfig
from services.runtime.server import binding_for, create_server

pytestmark = pytest.mark.integration
TEXTURE = "audio2video.texture.v1.TextureService"
RETIMING = "audio2video.retiming.v1.RetimingService"


class SilentTexture(texture_pb2_grpc.TextureServiceServicer):
    """Synthesize: one progress event, then `request_id` seconds of silence, then the result."""

    def Synthesize(self, request, context):
        yield texture_pb2.SynthesizeEvent(progress={"stage": "texture", "done": 0, "total": 1})
        time.sleep(float(request.request_id))
        yield texture_pb2.SynthesizeEvent(result=texture_pb2.SynthesizeResult(cached=True))


class SleepingRetiming(retiming_pb2_grpc.RetimingServiceServicer):
    """Retime: sleeps `output_frame_count` milliseconds."""

    def Retime(self, request, context):
        time.sleep(request.output_frame_count / 1000)
        return retiming_pb2.RetimeResponse(output_frame_count=request.output_frame_count)


@pytest.fixture()
def server():
    """Start a real server with both services under a given ServerConfig; stopped after the test."""
    started = []

    def start(**config) -> int:
        bindings = [
            binding_for(texture_pb2, texture_pb2_grpc, "TextureService", SilentTexture()),
            binding_for(retiming_pb2, retiming_pb2_grpc, "RetimingService", SleepingRetiming()),
        ]
        running, port = create_server(ServerConfig(service="test", **config), bindings)
        running.start()
        running.load_and_mark_serving()
        started.append(running)
        return port

    yield start
    for running in started:
        running.stop(0).wait()


def silent_stream(port: int, seconds: float, **channel):
    """The result of a Synthesize stream that stays silent for `seconds`."""
    with create_channel(f"127.0.0.1:{port}", [TEXTURE], **channel) as opened:
        events = list(
            texture_pb2_grpc.TextureServiceStub(opened).Synthesize(
                texture_pb2.SynthesizeRequest(request_id=str(seconds))
            )
        )
    return events[-1].result


def test_clients_ping_no_more_often_than_servers_accept():
    """The defaults, as every service and client gets them (the server's options are those it was built with)."""
    config = Config.from_env("face", {"A2V_S3_ACCESS_KEY": "key", "A2V_S3_SECRET_KEY": "secret"})
    server, _ = create_server(config.server, [])
    try:
        client = dict(channel_options([TEXTURE]))
        accepted = server.options["grpc.http2.min_ping_interval_without_data_ms"]
        assert client["grpc.keepalive_time_ms"] >= accepted
        assert client["grpc.http2.max_pings_without_data"] == 0  # a silent stream keeps being checked
        # Connections age out (new replicas get calls), but calls in flight on them are never cut.
        assert server.options["grpc.max_connection_age_ms"] == 60_000
        assert "grpc.max_connection_age_grace_ms" not in server.options
    finally:
        server.stop(0).wait()


def test_a_silent_stream_outlives_pings_and_its_connections_age(server):
    """What training on minutes of footage does: no data for several ping intervals and past the connection's age."""
    port = server(min_ping_interval_seconds=0.5, max_connection_age_seconds=1.0)
    started = time.monotonic()
    assert silent_stream(port, 3.0, keepalive_seconds=0.5, timeout_seconds=60).cached
    assert time.monotonic() - started >= 3.0


def test_pings_more_often_than_the_server_accepts_end_the_stream(server):
    """The failure the agreement prevents: the server counts the pings as abuse and closes the connection."""
    port = server(min_ping_interval_seconds=5.0)
    with pytest.raises(grpc.RpcError) as err:
        silent_stream(port, 6.0, keepalive_seconds=0.5, timeout_seconds=60)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "too many pings" in err.value.details().lower()


def test_open_ended_methods_have_no_deadline_and_the_others_keep_theirs(server):
    port = server()
    stream = f"{TEXTURE}/Synthesize"
    assert silent_stream(port, 1.5, timeout_seconds=0.5, open_ended_methods=[stream]).cached
    with pytest.raises(grpc.RpcError) as err:
        silent_stream(port, 1.5, timeout_seconds=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with (
        create_channel(
            f"127.0.0.1:{port}", [TEXTURE, RETIMING], timeout_seconds=0.5, open_ended_methods=[stream]
        ) as opened,
        pytest.raises(grpc.RpcError) as err,
    ):
        retiming_pb2_grpc.RetimingServiceStub(opened).Retime(retiming_pb2.RetimeRequest(output_frame_count=1500))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
