"""Reading a target's analysis (face.v1.VideoAnalysis manifest and its arrays): shared by the stages after `face`."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
from google.protobuf.message import Message

from audio2video.common.v1 import common_pb2
from audio2video.face.v1 import face_pb2
from services.runtime.blobstore import ArrayInfo, BlobStore
from services.runtime.canonical import CanonicalGeometry
from services.runtime.errors import InvalidInput, NotFound
from services.runtime.frames import FRAMES_CONTENT_TYPE, decode_frames, encode_frames
from services.runtime.keys import canonical_json, sha256_bytes
from services.runtime.protos import array_ref, blob_ref, input_sha256, load_result


def load_manifest(store: BlobStore, ref: common_pb2.ObjectRef) -> face_pb2.VideoAnalysis:
    """The analysis manifest named by `ref`; NotFound when it is missing (the video was not analysed)."""
    source = blob_ref(ref, default_bucket=store.bucket, what="analysis manifest")
    # Read as its reference says (bucket, hash): a derived key counts the manifest by that hash (`analysis_sha256`).
    manifest = load_result(
        store, source.key, face_pb2.VideoAnalysis, bucket=source.bucket, expected_sha256=source.sha256
    )
    if manifest is None:
        raise NotFound(f"analysis manifest not found: {source.bucket}/{source.key}")
    if manifest.info.frame_count <= 0:
        raise InvalidInput(f"analysis manifest {source.key} describes no frames")
    return manifest


def analysis_sha256(store: BlobStore, ref: common_pb2.ObjectRef, manifest: face_pb2.VideoAnalysis) -> str:
    """Content identity of a target's analysis, for the derived keys and caches of the stages that read it.

    The hash of the manifest's content and of every blob it names (its own hash when the manifest records it,
    else a stat each, `BlobStore.content_sha256`): rewriting the manifest or any array under its key gives
    another identity, where the manifest's key alone would have kept naming the old results.
    """
    hashes = [input_sha256(store, ref, what="analysis manifest")]
    hashes += [input_sha256(store, blob, what="analysis blob") for blob in _object_refs(manifest) if blob.key]
    return sha256_bytes(canonical_json(hashes).encode())


def _object_refs(message: Message) -> list[common_pb2.ObjectRef]:
    """Every ObjectRef set in `message`, depth first in field order."""
    found = []
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        if isinstance(value, Message):
            items = [value]
        else:  # a repeated field or a map (its values)
            items = list(value.values()) if hasattr(value, "keys") else list(value)
        for item in items:
            if not isinstance(item, Message):
                continue
            found += [item] if isinstance(item, common_pb2.ObjectRef) else _object_refs(item)
    return found


def load_array(store: BlobStore, ref: common_pb2.ArrayRef, *, what: str = "array") -> tuple[np.ndarray, ArrayInfo]:
    """An array blob, checked against the sha256 its reference records."""
    source = blob_ref(ref.object, default_bucket=store.bucket, what=what)
    return store.get_array(source.key, bucket=source.bucket, expected_sha256=source.sha256)


def load_frames(
    store: BlobStore, ref: common_pb2.ArrayRef, *, what: str = "frames", indices: list[int] | np.ndarray | None = None
) -> np.ndarray:
    """An image stack stored as a PNG frame archive (crops, masks, textures); `indices` reads only those."""
    source = blob_ref(ref.object, default_bucket=store.bucket, what=what)
    data = store.get_bytes(source.key, bucket=source.bucket, expected_sha256=source.sha256)
    return decode_frames(data, indices=indices)


def store_frames(store: BlobStore, key: str, frames: np.ndarray, *, fps: float = 0.0) -> common_pb2.ArrayRef:
    """Store an image stack as a PNG frame archive; the reference carries its shape, dtype and rate."""
    blob = store.put_bytes(key, encode_frames(frames), content_type=FRAMES_CONTENT_TYPE)
    return array_ref(blob, ArrayInfo(tuple(frames.shape), str(frames.dtype), fps))


def load_geometry(store: BlobStore, manifest: face_pb2.VideoAnalysis) -> CanonicalGeometry:
    """The canonical template and crop geometry the analysis was made with."""
    geometry = manifest.geometry
    template, _ = load_array(store, geometry.template, what="canonical template")
    region = geometry.crop_region
    created = CanonicalGeometry.create(
        template=template,
        crop_region=(region.left, region.top, region.right, region.bottom),
        crop_size=(geometry.crop_width_px, geometry.crop_height_px),
    )
    if geometry.template_id and created.template_id != geometry.template_id:
        raise InvalidInput(f"stored template hashes to {created.template_id}, the manifest says {geometry.template_id}")
    return created


class BoundedCache:
    """Thread-safe LRU of loaded values by key, bounded by total bytes (e.g. a target's crops per replica).

    Consecutive chunks of one job reuse what the first one loaded; a value larger than the whole budget
    is returned without being kept.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: str, load: Callable[[], object], size: Callable[[object], int]) -> object:
        """The item under `key`, made with `load()` and kept (its `size` counted) while the cache has room."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key][0]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:  # one load per key even when several chunks of one job arrive at once
            with self._lock:
                if key in self._items:
                    self.hits += 1
                    return self._items[key][0]
            value = load()
            nbytes = int(size(value))
            with self._lock:
                self.misses += 1
                self._loading.pop(key, None)
                if nbytes <= self.max_bytes:
                    self._items[key] = (value, nbytes)
                    while sum(n for _, n in self._items.values()) > self.max_bytes:
                        self._items.popitem(last=False)
            return value
