"""Shared data paths and a small in-memory video encoder for the face tests."""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np

from deploy.samples import SAMPLE_DATA

SHARED_DATA = SAMPLE_DATA
OBAMA = SHARED_DATA / "speakers" / "obama" / "obama_clip1.mp4"
KATIE = SHARED_DATA / "targets" / "hdtf_katiehill_512.mp4"


def encode_clip(
    frames: Sequence[np.ndarray],
    *,
    rate: Fraction = Fraction(30),
    fmt: str = "mp4",
    codec: str = "libx264",
    time_base: Fraction | None = None,
    pts: Sequence[int] | None = None,
    display_rotation_ccw: int | None = None,
    crf: int = 12,
) -> bytes:
    """Encode BGR uint8 [H, W, 3] frames into a video held in memory.

    Args:
        frames: Frames, all the same (even) size.
        rate: Nominal frame rate.
        fmt: Container format ("mp4", "mpeg", "matroska", ...).
        codec: Encoder ("libx264", "libx265", "mpeg2video", ...).
        time_base: Stream time base (default 1 / rate).
        pts: Presentation timestamps in time_base units (default 0, 1, 2, ...): irregular values make VFR.
        display_rotation_ccw: Display-matrix rotation, degrees counter-clockwise.
        crf: Quality for x264/x265 (lower = better).
    """
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if time_base is not None:
            stream.codec_context.time_base = time_base
            stream.time_base = time_base
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast"}
        elif codec == "libx265":
            stream.options = {"crf": str(crf), "preset": "ultrafast", "x265-params": "log-level=none"}
        if display_rotation_ccw is not None:
            stream.set_display_rotation(display_rotation_ccw)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
            frame.pts = i if pts is None else int(pts[i])
            if time_base is not None:
                frame.time_base = time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buffer.getvalue()
