"""Clips for the stage benchmarks: the first frames of a real clip, re-encoded in memory."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av

from services.runtime.media import iter_frames


def head(path: Path, frames: int) -> tuple[bytes, Fraction]:
    """The first `frames` frames of a clip as an H.264 mp4 (bytes, near-lossless: CRF 12) and its frame rate.

    Decoding cost then matches the source resolution, and every benchmark reads the same frames as the face
    stage (rotation applied, one decode thread).
    """
    with av.open(str(path)) as container:
        rate = Fraction(container.streams.video[0].average_rate)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = None
        for i, _, image in iter_frames(path, stop=frames, decode_threads=1):
            if stream is None:
                stream = out.add_stream("libx264", rate=rate)
                stream.height, stream.width = image.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": "12", "preset": "veryfast"}
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buffer.getvalue(), rate
