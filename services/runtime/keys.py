"""Content hashes and deterministic object keys, so re-runs find what earlier runs stored."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from services.runtime.errors import InvalidInput

MAX_KEY_LENGTH = 1024
_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9._=+-]+$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SPEAKER = re.compile(r"[a-z0-9_-]{1,64}")
_MODEL_CARD = re.compile(r"models/([a-z0-9_-]{1,64})/(\d+)/assets\.extra/model_card\.json")
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
"""Date of every member of the archives the runtime writes (frame zips, npz): with the clock in them, equal content
gave unequal bytes (and unequal sha256), so two writers of one deterministic key disagreed about what it holds."""
_DERIVED = re.compile(r"^[A-Za-z0-9._=+-]+/[0-9a-f]{32}/|/[0-9a-f]{64}[^/]*$")


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """The SHA-256 of `data`, hex."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 of a file, hex, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def is_sha256(value: str) -> bool:
    """Whether `value` is a lower-case hex SHA-256 digest (what derived keys take as inputs)."""
    return bool(_HEX64.match(value))


def canonical_json(value: object) -> str:
    """JSON with sorted keys and no whitespace: equal inputs give byte-equal text (and equal hashes)."""

    def check(item: object) -> None:
        if isinstance(item, float) and not math.isfinite(item):
            raise InvalidInput(f"parameter value {item!r} is not finite")
        if isinstance(item, Mapping):
            for sub in item.values():
                check(sub)
        elif isinstance(item, list | tuple):
            for sub in item:
                check(sub)

    check(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def validate_key(key: str) -> str:
    """Return `key` if it is a safe object key: relative, "/"-separated, no empty or dot-dot segments."""
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidInput(f"object key must be 1..{MAX_KEY_LENGTH} characters, got {len(key)}")
    for segment in key.split("/"):
        if segment in ("", ".", "..") or not _KEY_SEGMENT.match(segment):
            raise InvalidInput(
                f"object key {key!r} has an invalid segment {segment!r} "
                "(allowed: letters, digits and ._=+- between single slashes)"
            )
    return key


def validate_speaker(name: str) -> str:
    """Return `name` if it is a valid speaker name: the TF Serving model name and the `models/<speaker>/` segment."""
    if not _SPEAKER.fullmatch(name or ""):
        raise InvalidInput(f"speaker name {name!r} must match [a-z0-9_-]{{1,64}}")
    return name


def derive_key(
    kind: str, name: str, *, inputs: Sequence[str] = (), params: Mapping[str, object] | None = None, version: int = 1
) -> str:
    """Deterministic key `<kind>/<digest>/<name>` of a stage output.

    The digest covers the kind, a format version, the content hashes of the inputs (in order) and
    the parameters, so the same inputs with the same parameters always land on the same key and a
    change of any of them lands elsewhere (no stale cache hits).
    """
    for sha in inputs:
        if not _HEX64.match(sha):
            raise InvalidInput(f"input hash {sha!r} is not a sha256 hex digest")
    document = {"kind": kind, "version": version, "inputs": list(inputs), "params": dict(params or {})}
    digest = sha256_bytes(canonical_json(document).encode())[:32]
    return validate_key(f"{kind}/{digest}/{name}")


def derive_prefix(
    kind: str, *, inputs: Sequence[str] = (), params: Mapping[str, object] | None = None, version: int = 1
) -> str:
    """Deterministic folder `<kind>/<digest>` for a stage output made of several objects."""
    return derive_key(kind, "_", inputs=inputs, params=params, version=version).rsplit("/", 1)[0]


def is_derived_key(key: str) -> bool:
    """Whether `key` names its content.

    A stage output (`derive_key`, `derive_prefix`) or a content-addressed blob (`content_key`) always stands for
    the same content, so its first complete write is kept (BlobStore writes it once).
    """
    return bool(_DERIVED.search(key))


def content_key(prefix: str, sha256: str, suffix: str = "") -> str:
    """Key of a blob addressed by its own content: `<prefix>/<sha256><suffix>`."""
    if not _HEX64.match(sha256):
        raise InvalidInput(f"{sha256!r} is not a sha256 hex digest")
    return validate_key(f"{prefix}/{sha256}{suffix}")


def trained_speakers(keys: Iterable[str]) -> list[str]:
    """The speakers, by name, with a complete model version among `keys` (the keys under `models/`).

    A version (`models/<speaker>/<version>/`, version > 0) is complete once its `assets.extra/model_card.json`
    exists: the trainer uploads the card last.
    """
    found = {m.group(1) for key in keys if (m := _MODEL_CARD.fullmatch(key)) and int(m.group(2)) > 0}
    return sorted(found)
