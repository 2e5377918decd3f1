"""gRPC servicer of the `retiming` stage: fetch blobs, call the core, store blobs, map errors.

RPCs that this class does not override are answered by the generated base class with
UNIMPLEMENTED; the stage's issue fills them in.
"""

from __future__ import annotations

from audio2video.retiming.v1 import retiming_pb2, retiming_pb2_grpc
from services.runtime.blobstore import BlobStore
from services.runtime.config import Config
from services.runtime.server import ServiceBinding, store_backed_bindings


class RetimingServicer(retiming_pb2_grpc.RetimingServiceServicer):
    """The retiming stage over the object store."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store


def bindings(config: Config) -> list[ServiceBinding]:
    """What `python -m services.retiming` serves."""
    return store_backed_bindings(config, retiming_pb2, retiming_pb2_grpc, "RetimingService", RetimingServicer)
