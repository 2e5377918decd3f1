"""Benchmark of the texture core: frames/s per core at n = 100 against the naive reference, and flicker (prints only).

Run: `python -m deploy.bench.texture [--clip speakers/obama/obama_clip2.mp4] [--split 600]`. One real clip is
analysed (face core); its first `split` frames are the target (the candidates) and the mouth shapes of the
remaining frames drive the synthesis, so the real footage of those frames is the reference for flicker and
error. The process is pinned to one CPU with BLAS and OpenCV single-threaded, so the numbers are per core.
"""

from __future__ import annotations

import os

# Before numpy loads: one BLAS thread, so frames/s are per core.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from deploy.samples import SAMPLE_DATA  # noqa: E402
from services.face.core import LandmarkDetector, VideoAnalysis, analyze_video  # noqa: E402
from services.texture.core import (  # noqa: E402
    TargetBank,
    TextureOptions,
    flicker,
    mouth_region_mask,
    prepare_target,
    quantize_weights,
    synthesize,
    weighted_median,
    weighted_median_reference,
)


def _fps(bank, shapes, frames: int, chunk: int, options: TextureOptions, *, reference: bool = False):
    """Synthesize output frames [0, frames) in chunks as the servicer would; (frames/s, chunks)."""
    t0 = time.perf_counter()
    chunks = [
        synthesize(bank, shapes, a, min(a + chunk, frames), options=options, reference=reference)
        for a in range(0, frames, chunk)
    ]
    return frames / (time.perf_counter() - t0), chunks


def _best_ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


DEFAULT_CLIP = SAMPLE_DATA / "speakers" / "obama" / "obama_clip2.mp4"


@dataclass(frozen=True)
class Prepared:
    """A clip split into a target (the candidates) and a driving track (the remaining frames' shapes)."""

    analysis: VideoAnalysis  # of the whole clip
    bank: TargetBank  # of frames [0, split)
    split: int
    shapes: np.ndarray  # float32 [n, 20, 2] driving mouth shapes (frames after the split with a face)
    real: np.ndarray  # uint8 [n, h, w, 3] the real crops of those frames
    analysis_seconds: float
    prepare_seconds: float


def prepare(clip: Path, split: int) -> Prepared:
    """Analyse `clip` (face core) and prepare its first `split` frames as the target bank."""
    t0 = time.perf_counter()
    analysis = analyze_video(clip, detector=LandmarkDetector())
    analysed = time.perf_counter() - t0
    split = min(split, analysis.frame_count - 2)
    t0 = time.perf_counter()
    bank = prepare_target(
        analysis.canonical_mouth[:split],
        analysis.face_valid[:split],
        analysis.crops[:split],
        analysis.crop_masks[:split],
        analysis.geometry,
        jaw_lines=analysis.jaw[:split],
    )
    prepared = time.perf_counter() - t0
    driver = analysis.face_valid[split:]
    shapes = np.ascontiguousarray(analysis.canonical_mouth[split:][driver])
    return Prepared(analysis, bank, split, shapes, analysis.crops[split:][driver], analysed, prepared)


def compare_with_reference(
    prepared: Prepared, *, frames: int = 120, reference_frames: int = 30, chunk: int = 30
) -> dict:
    """Fast synthesis against the naive reference (sort-based weighted median) on the same frames.

    Returns:
        dict: candidates, frames, reference_frames, fast_fps and reference_fps (frames/s on this process's
        cores), speedup, identical (textures equal on the common frames), kernel_fast_ms and
        kernel_reference_ms (the weighted median of one frame's candidates).
    """
    opts = TextureOptions()
    bank, shapes = prepared.bank, prepared.shapes
    frames = min(frames, len(shapes))
    ref_frames = min(reference_frames, frames)
    synthesize(bank, shapes, 0, min(4, len(shapes)), options=opts)  # warm caches
    fast_fps, fast_chunks = _fps(bank, shapes, frames, chunk, opts)
    ref_fps, ref_chunks = _fps(bank, shapes, ref_frames, chunk, opts, reference=True)
    same = all(
        np.array_equal(a.textures, b.textures)
        for a, b in zip(fast_chunks, ref_chunks, strict=False)
        if a.stop <= ref_frames
    )
    first = fast_chunks[0]
    cand = first.candidates[0]
    q = quantize_weights(first.candidate_weights[0])
    values = bank.luma[cand]
    return {
        "candidates": int(first.candidates.shape[1]),  # what the target's size allows (`candidates_for`)
        "chunk": chunk,
        "frames": frames,
        "reference_frames": ref_frames,
        "fast_fps": fast_fps,
        "reference_fps": ref_fps,
        "speedup": fast_fps / ref_fps,
        "identical": bool(same),
        "kernel_pixels": int(values.shape[1]),
        "kernel_fast_ms": _best_ms(lambda: weighted_median(values, q)),
        "kernel_reference_ms": _best_ms(lambda: weighted_median_reference(values, q), repeats=3),
    }


def reference_comparison(
    clip: Path = DEFAULT_CLIP, *, split: int = 600, frames: int = 120, reference_frames: int = 30, chunk: int = 30
) -> dict:
    """`compare_with_reference` on a real clip (analysed first, not timed), with the clip's name added."""
    prepared = prepare(clip, split)
    return {
        "clip": clip.name,
        "target_frames": prepared.split,
        **compare_with_reference(prepared, frames=frames, reference_frames=reference_frames, chunk=chunk),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP)
    parser.add_argument("--split", type=int, default=600, help="frames of the clip used as the target")
    parser.add_argument("--frames", type=int, default=120, help="output frames timed with the fast median")
    parser.add_argument("--reference-frames", type=int, default=30, help="output frames timed with the reference")
    parser.add_argument("--chunk", type=int, default=30)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cv2.setNumThreads(1)

    prepared = prepare(args.clip, args.split)
    analysis, bank, split = prepared.analysis, prepared.bank, prepared.split
    f = analysis.frame_count
    print(f"analysed {args.clip.name}: {f} frames in {prepared.analysis_seconds:.1f} s; target = frames [0, {split})")
    h, w = bank.crop_shape
    print(
        f"prepare_target: {1e3 * prepared.prepare_seconds:.0f} ms, {bank.usable_count} usable frames, "
        f"crops {w}x{h}, {bank.nbytes / 2**20:.0f} MiB"
    )
    shapes, real = prepared.shapes, prepared.real
    n_out = len(shapes)
    opts = TextureOptions()

    numbers = compare_with_reference(
        prepared, frames=args.frames, reference_frames=args.reference_frames, chunk=args.chunk
    )
    print(f"\n== throughput, one core, n = {numbers['candidates']} candidates, chunks of {args.chunk} frames")
    frames = numbers["frames"]
    print(f"fast (bitwise search + GEMV): {numbers['fast_fps']:6.1f} frames/s  ({frames} frames)")
    reference_frames = numbers["reference_frames"]
    print(f"naive numpy reference (sort): {numbers['reference_fps']:6.1f} frames/s  ({reference_frames} frames)")
    print(f"speed-up {numbers['speedup']:.1f}x; textures identical on the common frames: {numbers['identical']}")
    for label, variant in (
        ("median only inside the mouth region", TextureOptions(median_region="mouth")),
        ("per-channel median (seed)", TextureOptions(median_mode="per_channel")),
    ):
        fps, _ = _fps(bank, shapes, min(frames, 60), args.chunk, variant)
        print(f"{label}: {fps:6.1f} frames/s")

    # The kernel alone on one frame's candidates.
    print(
        f"weighted median kernel, {numbers['candidates']} x {numbers['kernel_pixels']} px: "
        f"fast {numbers['kernel_fast_ms']:.1f} ms, reference {numbers['kernel_reference_ms']:.1f} ms"
    )

    print(f"\n== flicker (mean |frame difference| inside the mouth region, uint8 levels), {n_out} driven frames")
    region = mouth_region_mask(np.nanmean(analysis.canonical_mouth, axis=0), analysis.geometry)
    speed = np.r_[0.0, np.linalg.norm(np.diff(shapes.reshape(n_out, -1), axis=0), axis=1)]
    still = speed <= np.quantile(speed, 0.25)
    print(f"region: {int((region > 0).sum())} px; 'still' = the quarter of frames whose driving shape moves least")
    print(f"{'':34s} {'all':>6s} {'still':>6s} {'err':>6s}")
    print(f"{'real footage (driven frames)':34s} {flicker(real, region):6.2f} {flicker(real, region, still):6.2f}")
    target_real = analysis.crops[:split][analysis.face_valid[:split]]
    print(f"{'real footage (target frames)':34s} {flicker(target_real, region):6.2f}")
    for label, variant in (
        ("synthesized, defaults", opts),
        ("synthesized, no coherence", TextureOptions(temporal_coherence_weight=0.0)),
        ("synthesized, no smoothing", TextureOptions(shape_smoothing_sigma_frames=0.0)),
        ("synthesized, neither", TextureOptions(temporal_coherence_weight=0.0, shape_smoothing_sigma_frames=0.0)),
        ("synthesized, coherence 0.5", TextureOptions(temporal_coherence_weight=0.5)),
    ):
        _, chunks = _fps(bank, shapes, n_out, args.chunk, variant)
        tex = np.concatenate([c.textures for c in chunks])
        err = (np.abs(tex.astype(np.float32) - real).mean(axis=3) * region).sum(axis=(1, 2)).mean() / region.sum()
        print(f"{label:34s} {flicker(tex, region):6.2f} {flicker(tex, region, still):6.2f} {err:6.2f}")
    print("err = mean |synthesized - real| of the driven frames inside the region (uint8 levels)")


if __name__ == "__main__":
    main()
