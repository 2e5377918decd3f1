"""Benchmark of the teeth core: proxy selection and enhancement frames per second on one core (prints only).

Run: `python -m deploy.bench.teeth [--frames 150] [--repeat 4] [--data ../shared/data]`. The target is the
first N frames of a real clip where the speaker shows her teeth, analysed by the face core (not timed); the
"synthesized textures" are its crops blurred (sigma 2 px), as blurry as weighted-median textures. The process
is pinned to one CPU with OpenCV single-threaded, so the numbers are per core.
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
from services.teeth.core import ProxyImages, enhance, select_proxies

CLIP = "targets/hdtf_katiehill_512.mp4"


def _best_of(runs: int, call) -> float:
    """Fastest wall time of `runs` calls, seconds."""
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=150, help="target frames analysed")
    parser.add_argument("--repeat", type=int, default=4, help="the textures are tiled this many times per chunk")
    parser.add_argument("--runs", type=int, default=3, help="timed runs (best kept)")
    parser.add_argument("--data", type=Path, default=SAMPLE_DATA)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cv2.setNumThreads(1)

    t0 = time.perf_counter()
    analysis = analyze_video(head(args.data / CLIP, args.frames)[0], detector=LandmarkDetector())
    crops, shapes, valid = analysis.crops, analysis.canonical_mouth, analysis.face_valid
    print(f"target: {CLIP}, {len(crops)} frames ({int(valid.sum())} with a face), crops {crops.shape[1:3]}")
    print(f"  analysed in {time.perf_counter() - t0:.1f} s (not part of the numbers below)")

    seconds = _best_of(args.runs, lambda: select_proxies(crops, shapes, valid, masks=analysis.crop_masks))
    proxies = select_proxies(crops, shapes, valid, masks=analysis.crop_masks)
    per_frame_ms = 1000 * seconds / len(crops)
    print(
        f"select_proxies: {len(crops) / seconds:9.0f} target frames/s/core  ({per_frame_ms:.3f} ms/frame)"
        f"  -> upper {proxies.upper_frame} ({proxies.upper_score:.4f}), lower {proxies.lower_frame}"
        f" ({proxies.lower_score:.4f}), medians {proxies.median_upper_score:.4f} / {proxies.median_lower_score:.4f}"
    )
    if not proxies.has_visible_teeth:
        print("the target shows no teeth: enhance would pass through; nothing to time")
        return
    images = ProxyImages.from_target(proxies, crops, shapes)
    face = np.flatnonzero(valid)
    textures = np.tile(np.stack([cv2.GaussianBlur(c, (0, 0), 2.0) for c in crops[face]]), (args.repeat, 1, 1, 1))
    chunk_shapes = np.tile(shapes[face], (args.repeat, 1, 1))
    n = len(textures)
    for label, options in (
        ("enhance (defaults)", {}),
        ("enhance (detail only)", {"sharpen_amount": 0.0}),
        ("enhance (sharpen only)", {"detail_strength": 0.0}),
    ):
        seconds = _best_of(args.runs, lambda o=options: enhance(textures, chunk_shapes, proxies, images, **o))
        print(
            f"{label:23s}: {n / seconds:8.0f} frames/s/core  ({1000 * seconds / n:.3f} ms/frame, chunk of {n},"
            f" {seconds / (n / 30.0):.4f} s per output second at 30 fps)"
        )
    out = enhance(textures, chunk_shapes, proxies, images)
    print(f"frames enhanced: {out.frames_enhanced} of {n} (the rest show a closed mouth)")


if __name__ == "__main__":
    main()
