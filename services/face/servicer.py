"""gRPC servicer of the `face` stage: fetch blobs, call the core, store blobs, map errors.

RPCs that this class does not override are answered by the generated base class with
UNIMPLEMENTED; the stage's issue fills them in.
"""

from __future__ import annotations

from audio2video.face.v1 import face_pb2, face_pb2_grpc
from services.runtime.blobstore import BlobStore
from services.runtime.config import Config
from services.runtime.server import ServiceBinding, store_backed_bindings


class FaceServicer(face_pb2_grpc.FaceServiceServicer):
    """The face stage over the object store."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store


def bindings(config: Config) -> list[ServiceBinding]:
    """What `python -m services.face` serves."""
    return store_backed_bindings(config, face_pb2, face_pb2_grpc, "FaceService", FaceServicer)
