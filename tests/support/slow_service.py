"""A real service process for shutdown tests: RetimingService whose Retime sleeps for N ms.

`python -m tests.support.slow_service` is started by tests exactly like a stage (`run_service`),
so SIGTERM handling is the production path.
"""

import time

from audio2video.retiming.v1 import retiming_pb2, retiming_pb2_grpc
from services.runtime.server import binding_for, run_service
from services.runtime.status import grpc_errors


class SlowRetiming(retiming_pb2_grpc.RetimingServiceServicer):
    """Sleeps `output_frame_count` milliseconds, then answers with that count."""

    @grpc_errors
    def Retime(self, request, context):
        time.sleep(request.output_frame_count / 1000.0)
        return retiming_pb2.RetimeResponse(output_frame_count=request.output_frame_count)


def bindings(_config):
    return [binding_for(retiming_pb2, retiming_pb2_grpc, "RetimingService", SlowRetiming())]


if __name__ == "__main__":
    run_service("slow-retiming", bindings)
