"""Benchmark of the face analysis core: frames per second on one core at 256², 512² and 1080p (prints only).

Run: `python -m deploy.bench.face [--frames 60] [--data ../shared/data]`. The process is pinned to one CPU
(OpenCV and FFmpeg single-threaded) so the numbers are per core. Each clip's first N frames are re-encoded
losslessly-enough (x264 CRF 12) into memory first, so decoding cost matches the source resolution.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import cv2
import numpy as np

from deploy.bench.clips import head
from deploy.samples import SAMPLE_DATA
from services.face.core import LandmarkDetector, analyze_video
from services.runtime.frames import encode_frames
from services.runtime.media import iter_frames

CLIPS = (
    ("256x256", "speakers/obama/obama_clip1.mp4"),
    ("512x512", "targets/hdtf_katiehill_512.mp4"),
    ("1920x1080", "targets/woman_1080p.mp4"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--data", type=Path, default=SAMPLE_DATA)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    detector = LandmarkDetector()
    print(f"model load: {time.perf_counter() - t0:.2f} s (one core)")
    print(
        f"{'clip':<12} {'frames':>6} {'analysis f/s':>13} {'decode-only f/s':>16} {'detections':>10} {'crops/raw':>9}"
    )
    for label, rel in CLIPS:
        path = args.data / rel
        if not path.is_file():
            print(f"{label:<12} missing {path}")
            continue
        data, _ = head(path, args.frames)
        t0 = time.perf_counter()
        n = sum(1 for _ in iter_frames(data, decode_threads=1))
        decode_fps = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        analysis = analyze_video(data, detector=detector, decode_threads=1)
        fps = analysis.frame_count / (time.perf_counter() - t0)
        ratio = len(encode_frames(analysis.crops)) / analysis.crops.nbytes
        print(
            f"{label:<12} {analysis.frame_count:>6} {fps:>13.1f} {decode_fps:>16.1f} "
            f"{int(np.sum(analysis.detected)):>10} {ratio:>9.2f}"
        )
    print("targets (issue 3): >= 60 f/s/core at 256x256, >= 15 f/s/core at 1080p")


if __name__ == "__main__":
    main()
