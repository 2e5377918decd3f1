"""The frame archive written one frame at a time (long videos' crops go to disk as they are made)."""

import io

import numpy as np
import pytest

from services.runtime.errors import InvalidInput
from services.runtime.frames import FramesWriter, decode_frames, encode_frames


def test_a_streamed_archive_equals_the_whole_stack_encoded_and_reads_back_bit_exact():
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 256, size=(5, 12, 10, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    with FramesWriter(buffer) as writer:
        for image in stack:
            writer.add(image)
        assert writer.finish() == (5, 12, 10, 3)
    assert buffer.getvalue() == encode_frames(stack)
    np.testing.assert_array_equal(decode_frames(buffer.getvalue(), indices=[4, 0]), stack[[4, 0]])


def test_an_empty_stack_keeps_its_frame_shape_and_a_wrong_frame_is_refused():
    assert decode_frames(encode_frames(np.zeros((0, 6, 4), np.uint8))).shape == (0, 6, 4)
    with FramesWriter(io.BytesIO()) as writer:
        writer.add(np.zeros((6, 4), np.uint8))
        with pytest.raises(InvalidInput, match="shape"):
            writer.add(np.zeros((6, 5), np.uint8))
        with pytest.raises(InvalidInput, match="uint8"):
            writer.add(np.zeros((6, 4), np.float32))


def test_an_archive_left_unfinished_by_a_failed_producer_is_closed_without_a_header():
    buffer = io.BytesIO()
    with pytest.raises(RuntimeError), FramesWriter(buffer) as writer:
        writer.add(np.zeros((6, 4), np.uint8))
        raise RuntimeError("the analysis failed")
    with pytest.raises(InvalidInput, match="not a frame archive"):
        decode_frames(buffer.getvalue())
