"""Where a speaker's model versions live in the object store: `models/<speaker>/<version>/` (TF Serving's layout).

A version is complete once its `assets.extra/model_card.json` exists (the trainer uploads it last).
"""

from __future__ import annotations

import re

from services.runtime.blobstore import BlobStore


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
