"""Stage calls of a job through real gRPC servers on loopback: retries on UNAVAILABLE, give-ups, cancellation."""

import threading
import time

import grpc
import pytest

from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from audio2video.texture.v1 import texture_pb2, texture_pb2_grpc
from orchestrator.pipeline import Reporter, RetryPolicy, StageCaller, StageFailed, retry_delay
from services.runtime.clients import create_channel
from services.runtime.errors import Cancelled
from services.runtime.server import binding_for

SERVICE = "audio2video.texture.v1.TextureService"


class FlakyTexture(texture_pb2_grpc.TextureServiceServicer):
    """Streams one progress event, then fails `failures` times with `code` before answering."""

    def __init__(self, failures: int, code=grpc.StatusCode.UNAVAILABLE) -> None:
        self.failures, self.code, self.calls = failures, code, 0

    def Synthesize(self, request, context):
        self.calls += 1
        yield texture_pb2.SynthesizeEvent(progress={"stage": "texture", "done": 1, "total": 2, "unit": "frames"})
        if self.calls <= self.failures:
            context.abort(self.code, f"replica gone (call {self.calls})")
        yield texture_pb2.SynthesizeEvent(result=texture_pb2.SynthesizeResult(cached=self.calls > 1))


class Recorder(Reporter):
    def __init__(self) -> None:
        self.retries, self.finished, self.progress_seen = [], [], []

    def retrying(self, stage, attempt, error):
        self.retries.append((stage, attempt, error))

    def call_finished(self, stage, seconds, *, cached):
        self.finished.append((stage, seconds, cached))

    def progress(self, stage, done, total, unit):
        self.progress_seen.append((stage, done, total, unit))


@pytest.fixture()
def texture(run_server):
    def start(servicer):
        port = run_server([binding_for(texture_pb2, texture_pb2_grpc, "TextureService", servicer)])
        channel = create_channel(f"127.0.0.1:{port}", [SERVICE], timeout_seconds=30)
        return texture_pb2_grpc.TextureServiceStub(channel)

    return start


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr("orchestrator.pipeline.retry_delay", lambda attempt: 0.01)


def synthesize(stub):
    return lambda: stub.Synthesize(texture_pb2.SynthesizeRequest())


def test_a_stream_broken_by_unavailable_is_made_again(texture):
    servicer = FlakyTexture(failures=2)
    recorder = Recorder()
    result = StageCaller(recorder, None, max_attempts=3)(
        pb.STAGE_TEXTURE, synthesize(texture(servicer)), streaming=True
    )
    assert result.cached and servicer.calls == 3
    assert [(s, a) for s, a, _ in recorder.retries] == [(pb.STAGE_TEXTURE, 1), (pb.STAGE_TEXTURE, 2)]
    assert "UNAVAILABLE: replica gone (call 1)" in recorder.retries[0][2]
    assert len(recorder.finished) == 1 and recorder.finished[0][2] is True
    assert recorder.progress_seen.count((pb.STAGE_TEXTURE, 1, 2, "frames")) == 3


def test_out_of_attempts_fails_with_the_stage_and_the_cause(texture):
    servicer = FlakyTexture(failures=10)
    with pytest.raises(StageFailed) as failure:
        StageCaller(Recorder(), None, max_attempts=2)(pb.STAGE_TEXTURE, synthesize(texture(servicer)), streaming=True)
    assert servicer.calls == 2
    assert failure.value.status == "UNAVAILABLE" and failure.value.stage == pb.STAGE_TEXTURE
    assert str(failure.value) == "stage texture failed after 2 attempts: UNAVAILABLE: replica gone (call 2)"


def test_other_errors_are_not_retried(texture):
    servicer = FlakyTexture(failures=1, code=grpc.StatusCode.INVALID_ARGUMENT)
    recorder = Recorder()
    with pytest.raises(StageFailed) as failure:
        StageCaller(recorder, None, max_attempts=5)(pb.STAGE_TEXTURE, synthesize(texture(servicer)), streaming=True)
    assert servicer.calls == 1 and recorder.retries == []
    assert failure.value.status == "INVALID_ARGUMENT"
    assert str(failure.value) == "stage texture failed: INVALID_ARGUMENT: replica gone (call 1)"


def test_a_cancelled_job_stops_retrying(texture, monkeypatch):
    monkeypatch.setattr("orchestrator.pipeline.retry_delay", lambda attempt: 30.0)
    stop = threading.Event()
    servicer = FlakyTexture(failures=10)
    caller = StageCaller(Recorder(), stop, max_attempts=5)
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(Cancelled):
        caller(pb.STAGE_TEXTURE, synthesize(texture(servicer)), streaming=True)
    assert servicer.calls == 1  # the backoff wait ended at the cancellation, nothing more was called


def test_a_dead_address_gives_up_after_its_attempts():
    stub = texture_pb2_grpc.TextureServiceStub(create_channel("127.0.0.1:1", [SERVICE], timeout_seconds=5))
    recorder = Recorder()
    with pytest.raises(StageFailed) as failure:
        StageCaller(recorder, None, max_attempts=2)(pb.STAGE_TEXTURE, synthesize(stub), streaming=True)
    assert failure.value.status == "UNAVAILABLE" and len(recorder.retries) == 1


def test_backoff_grows_and_is_capped():
    delays = [retry_delay(attempt) for attempt in range(1, 8)]
    assert 0.5 <= delays[0] <= 0.625 and 1.0 <= delays[1] <= 1.25
    assert all(d <= 8.0 * 1.25 for d in delays) and delays[-1] >= 8.0


def test_calls_spread_over_every_replica_and_skip_a_dead_one(run_server):
    replicas = [FlakyTexture(failures=0) for _ in range(2)]
    ports = [run_server([binding_for(texture_pb2, texture_pb2_grpc, "TextureService", r)]) for r in replicas]
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports + [1])  # the third address is down
    stub = texture_pb2_grpc.TextureServiceStub(create_channel(target, [SERVICE], timeout_seconds=30))
    caller = StageCaller(Recorder(), None, max_attempts=3)
    for _ in range(10):
        caller(pb.STAGE_TEXTURE, synthesize(stub), streaming=True)
    calls = [r.calls for r in replicas]
    assert sum(calls) == 10 and min(calls) >= 3, calls  # the first picks may precede the second connection


class SlowTexture(texture_pb2_grpc.TextureServiceServicer):
    """Answers after `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls = seconds, 0

    def Synthesize(self, request, context):
        self.calls += 1
        time.sleep(self.seconds)
        yield texture_pb2.SynthesizeEvent(result=texture_pb2.SynthesizeResult())


def test_a_busy_stage_is_called_again_until_it_has_room(run_server):
    servicer = SlowTexture(1.0)
    port = run_server(
        [binding_for(texture_pb2, texture_pb2_grpc, "TextureService", servicer)], max_workers=1, max_concurrent_rpcs=1
    )
    stub = texture_pb2_grpc.TextureServiceStub(create_channel(f"127.0.0.1:{port}", [SERVICE], timeout_seconds=30))
    occupying = threading.Thread(target=lambda: list(stub.Synthesize(texture_pb2.SynthesizeRequest())))
    occupying.start()
    time.sleep(0.3)
    recorder = Recorder()
    policy = RetryPolicy(busy_seconds=30.0)
    StageCaller(recorder, None, max_attempts=1, policy=policy)(pb.STAGE_TEXTURE, synthesize(stub), streaming=True)
    occupying.join()
    assert servicer.calls == 2 and recorder.retries  # refused while the slot was taken, then served
    assert all("RESOURCE_EXHAUSTED: server busy" in error for _, _, error in recorder.retries)
    # RESOURCE_EXHAUSTED for a request over a limit is final.
    too_big = FlakyTexture(failures=1, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    with pytest.raises(StageFailed):
        StageCaller(Recorder(), None, max_attempts=3, policy=policy)(
            pb.STAGE_TEXTURE, synthesize(texture_for(run_server, too_big)), streaming=True
        )
    assert too_big.calls == 1


def test_unavailable_is_retried_for_the_outage_window_beyond_max_attempts(texture):
    servicer = FlakyTexture(failures=10**6)
    started = time.monotonic()
    with pytest.raises(StageFailed) as failure:
        StageCaller(Recorder(), None, max_attempts=2, policy=RetryPolicy(outage_seconds=1.0))(
            pb.STAGE_TEXTURE, synthesize(texture(servicer)), streaming=True
        )
    assert servicer.calls > 2 and 1.0 <= time.monotonic() - started < 10
    assert failure.value.status == "UNAVAILABLE"


def texture_for(run_server, servicer):
    port = run_server([binding_for(texture_pb2, texture_pb2_grpc, "TextureService", servicer)])
    return texture_pb2_grpc.TextureServiceStub(create_channel(f"127.0.0.1:{port}", [SERVICE], timeout_seconds=30))
