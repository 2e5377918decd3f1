"""Conversions between the runtime's dataclasses and `common.v1` messages, in one place."""

from __future__ import annotations

from fractions import Fraction
from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from audio2video.common.v1 import common_pb2
from services.runtime.blobstore import ArrayInfo, BlobRef, BlobStore
from services.runtime.errors import IntegrityError, InvalidInput

M = TypeVar("M", bound=Message)


def object_ref(blob: BlobRef) -> common_pb2.ObjectRef:
    """The ObjectRef message of a stored blob."""
    return common_pb2.ObjectRef(
        bucket=blob.bucket, key=blob.key, sha256=blob.sha256, content_type=blob.content_type, size_bytes=blob.size_bytes
    )


def array_ref(blob: BlobRef, info: ArrayInfo) -> common_pb2.ArrayRef:
    """The ArrayRef message of a stored array: its blob and its shape, dtype and frame rate."""
    meta = common_pb2.ArrayMeta(
        shape=list(info.shape),
        dtype=info.dtype,
        fps=info.fps,
        start_seconds=info.start_seconds,
        format_version=info.format_version,
    )
    return common_pb2.ArrayRef(object=object_ref(blob), meta=meta)


def blob_ref(ref: common_pb2.ObjectRef, *, default_bucket: str, what: str = "object") -> BlobRef:
    """The blob a request names; an empty key is a bad request, an empty bucket means the default."""
    if not ref.key:
        raise InvalidInput(f"{what} reference has no key")
    return BlobRef(ref.bucket or default_bucket, ref.key, ref.sha256, ref.content_type, ref.size_bytes)


NO_INPUT = "0" * 64
"""Stands for an optional input a request leaves unset in a derived key's inputs (no content hashes to it), so
that every input keeps its place in the list and two requests with different inputs set never share a key."""


def input_sha256(store: BlobStore, ref: common_pb2.ObjectRef, *, what: str = "input", optional: bool = False) -> str:
    """The content hash of an input a request names, for its derived key (`BlobStore.content_sha256`).

    A reference without `sha256` costs one stat; an `optional` one without a key is `NO_INPUT`. A missing object is
    NotFound, an unset required one InvalidInput (naming `what`).
    """
    if optional and not ref.key:
        return NO_INPUT
    return store.content_sha256(blob_ref(ref, default_bucket=store.bucket, what=what))


def frame_rate(rate: common_pb2.FrameRate, *, what: str = "frame rate") -> Fraction | None:
    """Exact rate of a FrameRate message; None when unset (0/0); bad values are InvalidInput."""
    if rate.numerator == 0 and rate.denominator == 0:
        return None
    if rate.numerator <= 0 or rate.denominator <= 0:
        raise InvalidInput(f"{what} {rate.numerator}/{rate.denominator} must be positive")
    value = Fraction(rate.numerator, rate.denominator)
    if not 1 <= value <= 240:
        raise InvalidInput(f"{what} {float(value):.3f} fps is outside 1..240")
    return value


def frame_rate_message(rate: Fraction | None) -> common_pb2.FrameRate:
    """The FrameRate message of an exact rate (empty for None)."""
    if rate is None:
        return common_pb2.FrameRate()
    return common_pb2.FrameRate(numerator=rate.numerator, denominator=rate.denominator)


def store_result(store: BlobStore, key: str, message: Message) -> BlobRef:
    """Write a stage's result message as JSON.

    Written after every output it names, so its presence means the stage finished: a crash mid-way never leaves
    something that looks complete.
    """
    text = json_format.MessageToJson(message, preserving_proto_field_name=True, sort_keys=True)
    return store.put_bytes(key, text.encode(), content_type="application/json")


def load_result(
    store: BlobStore, key: str, message_type: type[M], *, bucket: str | None = None, expected_sha256: str = ""
) -> M | None:
    """The stored result at `key`, or None when the stage has not finished there before.

    With `expected_sha256` (a reference's hash), content other than that is DATA_LOSS, as for any other blob.
    """
    if not store.exists(key, bucket=bucket):
        return None
    try:
        data = store.get_bytes(key, bucket=bucket, expected_sha256=expected_sha256)
        return json_format.Parse(data, message_type(), ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError) as exc:  # not UTF-8: some other object, corrupt like bad JSON
        raise IntegrityError(f"stored result {key} is not a valid {message_type.DESCRIPTOR.name}: {exc}") from exc
