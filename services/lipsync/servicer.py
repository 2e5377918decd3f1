"""gRPC servicer of the `lipsync` stage: fetch blobs, call the core, store blobs, map errors.

RPCs that this class does not override are answered by the generated base class with
UNIMPLEMENTED; the stage's issue fills them in.
"""

from __future__ import annotations

from audio2video.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc
from services.runtime.blobstore import BlobStore
from services.runtime.config import Config
from services.runtime.server import ServiceBinding, store_backed_bindings


class LipsyncServicer(lipsync_pb2_grpc.LipsyncServiceServicer):
    """The lipsync stage over the object store."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store


def bindings(config: Config) -> list[ServiceBinding]:
    """What `python -m services.lipsync` serves."""
    return store_backed_bindings(config, lipsync_pb2, lipsync_pb2_grpc, "LipsyncService", LipsyncServicer)
