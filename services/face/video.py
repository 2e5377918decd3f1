"""Video decoding for the face stage: the runtime's media helpers (services.runtime.media).

Kept as a name for the tools that still import it from here; new code imports services.runtime.media.
"""

from services.runtime.media import (
    SNAP_TOLERANCE,
    STANDARD_RATES,
    VFR_RATE_TOLERANCE,
    VideoInfo,
    VideoSource,
    iter_frames,
    probe_video,
)

__all__ = [
    "SNAP_TOLERANCE",
    "STANDARD_RATES",
    "VFR_RATE_TOLERANCE",
    "VideoInfo",
    "VideoSource",
    "iter_frames",
    "probe_video",
]
