"""gRPC servicer of the orchestrator.

RPCs that this class does not override are answered by the generated base class with
UNIMPLEMENTED; issue 7 fills them in.
"""

from __future__ import annotations

from audio2video.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from services.runtime.blobstore import BlobStore
from services.runtime.config import Config
from services.runtime.server import ServiceBinding, store_backed_bindings


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """Jobs over the stages; job manifests live in the object store."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store


def bindings(config: Config) -> list[ServiceBinding]:
    """What `python -m orchestrator` serves."""
    return store_backed_bindings(
        config, orchestrator_pb2, orchestrator_pb2_grpc, "OrchestratorService", OrchestratorServicer
    )
