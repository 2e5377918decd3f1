"""gRPC servicer of the `texture` stage: fetch blobs, call the core, store blobs, map errors.

RPCs that this class does not override are answered by the generated base class with
UNIMPLEMENTED; the stage's issue fills them in.
"""

from __future__ import annotations

from audio2video.texture.v1 import texture_pb2, texture_pb2_grpc
from services.runtime.blobstore import BlobStore
from services.runtime.config import Config
from services.runtime.server import ServiceBinding, store_backed_bindings


class TextureServicer(texture_pb2_grpc.TextureServiceServicer):
    """The texture stage over the object store."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store


def bindings(config: Config) -> list[ServiceBinding]:
    """What `python -m services.texture` serves."""
    return store_backed_bindings(config, texture_pb2, texture_pb2_grpc, "TextureService", TextureServicer)
