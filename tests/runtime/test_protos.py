"""Conversions to and from common.v1 messages, and stored results."""

from fractions import Fraction

import numpy as np
import pytest

from audio2video.audio.v1 import audio_pb2
from audio2video.common.v1 import common_pb2
from services.runtime.errors import IntegrityError, InvalidInput
from services.runtime.protos import (
    array_ref,
    blob_ref,
    frame_rate,
    frame_rate_message,
    load_result,
    object_ref,
    store_result,
)


def test_frame_rates_are_exact_rationals():
    assert frame_rate(common_pb2.FrameRate(numerator=30000, denominator=1001)) == Fraction(30000, 1001)
    assert frame_rate(common_pb2.FrameRate()) is None
    assert frame_rate_message(Fraction(25)) == common_pb2.FrameRate(numerator=25, denominator=1)
    for bad in [(0, 1), (30, 0), (-30, 1), (1000, 1)]:
        with pytest.raises(InvalidInput):
            frame_rate(common_pb2.FrameRate(numerator=bad[0], denominator=bad[1]))


def test_a_reference_without_key_is_invalid_and_empty_bucket_means_default():
    with pytest.raises(InvalidInput, match="audio reference has no key"):
        blob_ref(common_pb2.ObjectRef(), default_bucket="b", what="audio")
    assert blob_ref(common_pb2.ObjectRef(key="k"), default_bucket="b").bucket == "b"


@pytest.mark.integration
def test_refs_and_results_round_trip_through_the_store(store, key_prefix):
    blob, info = store.put_array(f"{key_prefix}/a.npy", np.zeros((4, 28), np.float32), fps=100.0)
    ref = array_ref(blob, info)
    assert list(ref.meta.shape) == [4, 28] and ref.meta.fps == 100.0 and ref.object.key == blob.key
    assert object_ref(blob).sha256 == blob.sha256

    result = audio_pb2.ExtractResult(features=ref, duration_seconds=0.04, source_codec="pcm_s16le")
    key = f"{key_prefix}/result.json"
    assert load_result(store, key, audio_pb2.ExtractResult) is None
    store_result(store, key, result)
    assert load_result(store, key, audio_pb2.ExtractResult) == result

    store.put_bytes(key, b"{not json")
    with pytest.raises(IntegrityError, match="not a valid ExtractResult"):
        load_result(store, key, audio_pb2.ExtractResult)
