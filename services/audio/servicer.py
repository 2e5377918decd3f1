"""gRPC servicer of the `audio` stage: fetch blobs, call the core, store blobs, map errors.

RPCs that this class does not override are answered by the generated base class with
UNIMPLEMENTED; the stage's issue fills them in.
"""

from __future__ import annotations

from audio2video.audio.v1 import audio_pb2, audio_pb2_grpc
from services.runtime.blobstore import BlobStore
from services.runtime.config import Config
from services.runtime.server import ServiceBinding, store_backed_bindings


class AudioServicer(audio_pb2_grpc.AudioServiceServicer):
    """The audio stage over the object store."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store


def bindings(config: Config) -> list[ServiceBinding]:
    """What `python -m services.audio` serves."""
    return store_backed_bindings(config, audio_pb2, audio_pb2_grpc, "AudioService", AudioServicer)
