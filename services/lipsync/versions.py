"""Where a speaker's model versions live in the object store: `models/<speaker>/<version>/` (TF Serving's layout).

A version is complete once its `assets.extra/model_card.json` exists (the trainer uploads it last).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Mapping

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from audio2video.lipsync.v1 import lipsync_pb2
from services.runtime.blobstore import BlobStore
from services.runtime.keys import trained_speakers
from services.runtime.protos import object_ref


def version_prefix(speaker: str, version: int) -> str:
    """Object-store prefix of a model version, with the trailing slash."""
    return f"models/{speaker}/{version}/"


def extra_key(speaker: str, version: int, name: str) -> str:
    """Key of a file beside the SavedModel (pca.npz, normalization.npz, model_card.json)."""
    return f"{version_prefix(speaker, version)}assets.extra/{name}"


def stored_versions(store: BlobStore, speaker: str) -> list[int]:
    """Complete versions of a speaker in the store (with a model card), ascending."""
    pattern = re.compile(rf"models/{re.escape(speaker)}/(\d+)/assets\.extra/model_card\.json")
    found = {int(m.group(1)) for key in store.list_keys(f"models/{speaker}/") if (m := pattern.fullmatch(key))}
    return sorted(v for v in found if v > 0)


def reservation_key(speaker: str, version: int) -> str:
    return f"models/{speaker}/reserved/{version}.json"


def reserve_version(store: BlobStore, speaker: str, *, at_least: int = 1, owner: str = "") -> int:
    """The next version number of `speaker`, taken for good: a conditional write of its reservation, so two
    trainings finishing at once never export to the same `models/<speaker>/<version>/` (each gets its own).

    Numbers go on from the highest stored or reserved version (and `at_least`); one another trainer reserved first
    is skipped.
    """
    pattern = re.compile(rf"models/{re.escape(speaker)}/reserved/(\d+)\.json")
    reserved = [
        int(m.group(1)) for key in store.list_keys(f"models/{speaker}/reserved/") if (m := pattern.fullmatch(key))
    ]
    version = max([at_least - 1, *stored_versions(store, speaker), *reserved]) + 1
    body = json.dumps({"owner": owner or f"{socket.gethostname()}:{os.getpid()}", "at": time.time()}).encode()
    while store.write_versioned(reservation_key(speaker, version), body, etag=None) is None:
        version += 1
    return version


def stored_speakers(store: BlobStore) -> list[str]:
    """Speakers with at least one complete version in the store, by name (`a2v speakers`)."""
    return trained_speakers(store.list_keys("models/"))


def version_message(
    store: BlobStore,
    speaker: str,
    version: int,
    card: Mapping,
    state: int = lipsync_pb2.MODEL_STATE_UNSPECIFIED,
) -> lipsync_pb2.ModelVersion:
    """A stored version as `lipsync.v1.ModelVersion`: its model card's fields and references to its extra files.

    Args:
        store: the store holding the version (the extra files are looked up there; absent ones stay unset).
        speaker: the speaker name.
        version: the version number.
        card: the version's model card (`{}` when it has none: defaults only).
        state: its serving state (the caller asks TF Serving, or leaves it unspecified).
    """
    message = lipsync_pb2.ModelVersion(
        speaker=speaker,
        version=version,
        state=state,
        prefix=version_prefix(speaker, version),
        pca_components=int(card.get("pca_components", 0)),
        feature_dim=int(card.get("feature_dim", 28)),
        feature_rate_hz=float(card.get("feature_rate_hz", 100.0)),
        delay_steps=int(card.get("delay_steps", 20)),
        template_id=str(card.get("template_id", "")),
    )
    if card.get("created"):
        created = Timestamp()
        created.FromJsonString(card["created"])
        message.created.CopyFrom(created)
    for field, name in (("model_card", "model_card.json"), ("pca", "pca.npz"), ("normalization", "normalization.npz")):
        blob = store.stat(extra_key(speaker, version, name), missing_ok=True)
        if blob is not None:
            getattr(message, field).CopyFrom(object_ref(blob))
    if isinstance(card.get("training"), Mapping):
        json_format.ParseDict(card["training"], message.training, ignore_unknown_fields=True)
    metrics = card.get("metrics") or {}
    if isinstance(metrics, Mapping):
        json_format.ParseDict(
            {k: v for k, v in metrics.items() if v is not None}, message.metrics, ignore_unknown_fields=True
        )
    return message
