"""gRPC servicer of the `teeth` stage: fetch blobs, call the core, store blobs, map errors.

RPCs that this class does not override are answered by the generated base class with
UNIMPLEMENTED; the stage's issue fills them in.
"""

from __future__ import annotations

from audio2video.teeth.v1 import teeth_pb2, teeth_pb2_grpc
from services.runtime.blobstore import BlobStore
from services.runtime.config import Config
from services.runtime.server import ServiceBinding, store_backed_bindings


class TeethServicer(teeth_pb2_grpc.TeethServiceServicer):
    """The teeth stage over the object store."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store


def bindings(config: Config) -> list[ServiceBinding]:
    """What `python -m services.teeth` serves."""
    return store_backed_bindings(config, teeth_pb2, teeth_pb2_grpc, "TeethService", TeethServicer)
