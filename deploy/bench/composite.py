"""Benchmark of the composite core: frames per second on one core at 512² and 1080p, end to end and per part (prints).

Run: `python -m deploy.bench.composite [--frames 40] [--data ../shared/data]`. The process is pinned to one CPU
(OpenCV, FFmpeg and x264 single-threaded) so the numbers are per core. Each clip's first N frames are re-encoded
as H.264 (CRF 12) in memory and analysed by the face core (not timed); every output frame then shows target frame
i with the texture and mouth shape of frame i + 5 (so jaw correction and colour matching do real work).
Parts: decode (sequential, `TargetFrames`), warp (`LowerFaceWarp` + `to_frame`), jaw (displacement + remap),
blend (mask, colour match, Laplacian pyramid: `composite_frame` minus warp and jaw), encode (x264 veryfast CRF 18).
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import cv2
import numpy as np

from deploy.bench.clips import head
from deploy.samples import SAMPLE_DATA
from services.composite.core import RenderOptions, TargetFrames, encode_segment, render_segment
from services.composite.render import BlendSettings, composite_frame, correct_jaw, jaw_displacement
from services.face.core import LandmarkDetector, analyze_video
from services.runtime.canonical import LowerFaceWarp

CLIPS = (
    ("512x512", "targets/hdtf_katiehill_512.mp4"),
    ("1920x1080", "targets/woman_1080p.mp4"),
)
SHIFT = 5


def _fps(count: int, seconds: float) -> str:
    return f"{count / seconds:8.1f}" if seconds > 0 else "     inf"


def bench_clip(label: str, path: Path, frames: int, detector: LandmarkDetector) -> None:
    data, rate = head(path, frames)
    analysis = analyze_video(data, detector=detector, decode_threads=1)
    n = analysis.frame_count
    valid = np.flatnonzero(analysis.face_valid)
    if len(valid) < n:
        print(f"{label}: {n - len(valid)} of {n} frames without a face (they pass through)")
    frame_map = np.arange(n)
    source = (frame_map + SHIFT) % n
    textures = analysis.crops[source]
    mouths = analysis.canonical_mouth[source]
    geometry = analysis.geometry
    settings = BlendSettings()

    t0 = time.perf_counter()
    decoded = [frame for _, frame in TargetFrames(data, frame_map, decode_threads=1)]
    t_decode = time.perf_counter() - t0

    t_warp = t_jaw = t_total = 0.0
    out_frames = []
    shifts = []
    for i, frame in enumerate(decoded):
        if not (analysis.face_valid[i] and analysis.face_valid[source[i]]):
            out_frames.append(frame)
            continue
        landmarks = analysis.landmarks[i]
        t0 = time.perf_counter()
        warp = LowerFaceWarp(landmarks, geometry)
        warp.to_frame(textures[i], frame.shape)
        t1 = time.perf_counter()
        delta = jaw_displacement(warp.canonical, geometry.template, synth_mouth=mouths[i])
        _, _, shift = correct_jaw(frame, landmarks, warp, delta)
        t2 = time.perf_counter()
        result = composite_frame(
            frame, landmarks, textures[i], geometry=geometry, synth_mouth=mouths[i], settings=settings
        )
        t3 = time.perf_counter()
        t_warp += t1 - t0
        t_jaw += t2 - t1
        t_total += t3 - t2
        shifts.append(shift)
        out_frames.append(result.image)
    t_blend = max(t_total - t_warp - t_jaw, 0.0)
    height, width = decoded[0].shape[:2]

    t0 = time.perf_counter()
    encode_segment(iter(out_frames), width=width, height=height, fps=rate, path_or_buffer=io.BytesIO(), threads=1)
    t_encode = time.perf_counter() - t0

    t0 = time.perf_counter()
    summary = render_segment(
        data,
        frame_map,
        analysis.landmarks,
        analysis.face_valid,
        textures,
        mouths,
        io.BytesIO(),
        width=width,
        height=height,
        fps=rate,
        geometry=geometry,
        timestamps=analysis.timestamps,
        options=RenderOptions(encoder_threads=1),
        decode_threads=1,
    )
    t_end = time.perf_counter() - t0
    composited = summary.frames_composited
    face_px = np.median(analysis.head_pose[valid, 5]) if len(valid) else 0.0
    print(
        f"{label}: {n} frames, {composited} composited, inter-ocular {face_px:.0f} px, "
        f"median jaw shift {np.median(shifts) if shifts else 0:.1f} px"
    )
    print(f"  end to end (decode + composite + encode) {_fps(n, t_end)} frames/s per core")
    print(f"  decode                                   {_fps(n, t_decode)} frames/s")
    print(f"  composite (warp + jaw + blend)           {_fps(len(shifts), t_total)} frames/s")
    print(f"    warp  (LowerFaceWarp + to_frame)       {_fps(len(shifts), t_warp)} frames/s")
    print(f"    jaw   (displacement field + remap)     {_fps(len(shifts), t_jaw)} frames/s")
    print(f"    blend (mask, colour, pyramid)          {_fps(len(shifts), t_blend)} frames/s")
    print(f"  encode  (x264 veryfast, CRF 18)          {_fps(n, t_encode)} frames/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--data", type=Path, default=SAMPLE_DATA)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cv2.setNumThreads(1)
    detector = LandmarkDetector()
    for label, rel in CLIPS:
        path = args.data / rel
        if not path.is_file():
            print(f"{label}: {path} missing, skipped")
            continue
        bench_clip(label, path, args.frames, detector)


if __name__ == "__main__":
    main()
