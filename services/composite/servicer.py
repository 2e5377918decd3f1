"""gRPC servicer of the `composite` stage: fetch blobs, call the core, store blobs, map errors.

RPCs that this class does not override are answered by the generated base class with
UNIMPLEMENTED; the stage's issue fills them in.
"""

from __future__ import annotations

from audio2video.composite.v1 import composite_pb2, composite_pb2_grpc
from services.runtime.blobstore import BlobStore
from services.runtime.config import Config
from services.runtime.server import ServiceBinding, store_backed_bindings


class CompositeServicer(composite_pb2_grpc.CompositeServiceServicer):
    """The composite stage over the object store."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store


def bindings(config: Config) -> list[ServiceBinding]:
    """What `python -m services.composite` serves."""
    return store_backed_bindings(config, composite_pb2, composite_pb2_grpc, "CompositeService", CompositeServicer)
