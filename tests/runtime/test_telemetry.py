"""Telemetry of the shared runtime: call metrics by method and code, log correlation across a call, the metrics
endpoint and its reader."""

import logging

import grpc
import pytest
from prometheus_client import REGISTRY

from audio2video.retiming.v1 import retiming_pb2, retiming_pb2_grpc
from deploy.ports import free_port
from services.runtime.clients import create_channel
from services.runtime.server import binding_for
from services.runtime.telemetry import (
    CorrelationFilter,
    correlation,
    ids_of_call,
    read_call_counts,
    start_metrics_server,
)

pytestmark = pytest.mark.integration
SERVICE = "audio2video.retiming.v1.RetimingService"


class Echo(retiming_pb2_grpc.RetimingServiceServicer):
    """Logs a line per call; refuses a frame count of 0 as a bad request."""

    def Retime(self, request, context):
        logging.getLogger("tests.echo").info("retime %d", request.output_frame_count)
        if request.output_frame_count == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no frames")
        return retiming_pb2.RetimeResponse(output_frame_count=request.output_frame_count)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(CorrelationFilter())

    def emit(self, record):
        self.records.append(record)


def handled(code: str) -> float:
    labels = {"grpc_service": SERVICE, "grpc_method": "Retime", "grpc_code": code}
    return REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0


def test_calls_are_counted_by_code_and_their_logs_carry_the_callers_job(run_server):
    port = run_server([binding_for(retiming_pb2, retiming_pb2_grpc, "RetimingService", Echo())])
    lines = Lines()
    logger = logging.getLogger("tests.echo")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    ok, bad = handled("OK"), handled("INVALID_ARGUMENT")
    try:
        stub = retiming_pb2_grpc.RetimingServiceStub(create_channel(f"127.0.0.1:{port}", [SERVICE]))
        with correlation(job_id="job-1"):
            stub.Retime(retiming_pb2.RetimeRequest(output_frame_count=3), timeout=10)  # the id from metadata
        stub.Retime(retiming_pb2.RetimeRequest(output_frame_count=4, request_id="job-2/retiming"), timeout=10)
        with pytest.raises(grpc.RpcError) as failed:
            stub.Retime(retiming_pb2.RetimeRequest(output_frame_count=0), timeout=10)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        logger.removeHandler(lines)
    assert handled("OK") - ok == 2 and handled("INVALID_ARGUMENT") - bad == 1
    labels = {"grpc_service": SERVICE, "grpc_method": "Retime"}
    assert REGISTRY.get_sample_value("grpc_server_in_flight", labels) == 0
    assert REGISTRY.get_sample_value("grpc_server_handling_seconds_count", {**labels, "grpc_code": "OK"}) >= 2
    jobs = [(getattr(r, "job_id", ""), getattr(r, "request_id", "")) for r in lines.records]
    assert jobs == [("job-1", ""), ("job-2", "job-2/retiming"), ("", "")]

    metrics_port = start_metrics_server("127.0.0.1", free_port())
    counts = read_call_counts("127.0.0.1", metrics_port)
    assert counts.by_method[f"{SERVICE}/Retime"] >= 3 and counts.errors >= 1
    assert counts.requests >= counts.errors and counts.in_flight == 0


def test_ids_of_a_call_come_from_its_message_then_its_metadata():
    request = retiming_pb2.RetimeRequest(request_id="abc/retiming/000030-000060")
    assert ids_of_call(request, {}) == ("abc", "abc/retiming/000030-000060")
    assert ids_of_call(retiming_pb2.RetimeRequest(request_id="plain"), {}) == ("", "plain")
    assert ids_of_call(retiming_pb2.RetimeRequest(), {"a2v-job-id": "j", "a2v-request-id": "r"}) == ("j", "r")
    assert start_metrics_server("127.0.0.1", 0) is None  # port 0: no metrics server
