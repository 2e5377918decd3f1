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


def load_result(store: BlobStore, key: str, message_type: type[M]) -> M | None:
    """The stored result at `key`, or None when the stage has not finished there before."""
    if not store.exists(key):
        return None
    try:
        return json_format.Parse(store.get_bytes(key), message_type(), ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError) as exc:  # not UTF-8: some other object, corrupt like bad JSON
        raise IntegrityError(f"stored result {key} is not a valid {message_type.DESCRIPTOR.name}: {exc}") from exc
