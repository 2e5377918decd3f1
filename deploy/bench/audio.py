"""Benchmark of the audio core: seconds of compute per minute of audio (prints numbers, asserts nothing)."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from deploy.samples import SAMPLE_DATA
from services.audio import core

DATA = SAMPLE_DATA
DEFAULT_FILES = [
    DATA / "audio" / "commentary_60s.wav",
    DATA / "audio" / "woman_1080p_own_audio.mp3",
    DATA / "speakers" / "obama" / "obama_clip1.mp4",
]


def bench_file(path: Path, repeats: int) -> None:
    """Times decode, loudness normalisation, features and speech activity on one file (median of repeats)."""
    timings: dict[str, list[float]] = {"decode": [], "normalize": [], "features": [], "activity": []}
    audio = None
    for run in range(repeats + 1):  # run 0 warms caches (filterbank, FFT plans, file pages)
        t0 = time.perf_counter()
        audio = core.decode_audio(path)
        t1 = time.perf_counter()
        normalised = core.normalize_loudness(audio)
        t2 = time.perf_counter()
        core.extract_features(normalised.samples)
        t3 = time.perf_counter()
        core.detect_speech(normalised.samples, output_fps=30000 / 1001)
        t4 = time.perf_counter()
        if run:
            for name, seconds in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                timings[name].append(seconds)
    minutes = audio.duration_seconds / 60.0
    medians = {name: statistics.median(values) for name, values in timings.items()}
    total = sum(medians.values())
    parts = "  ".join(f"{name} {seconds / minutes:.4f}" for name, seconds in medians.items())
    print(
        f"{path.name}: {audio.duration_seconds:.1f} s {audio.source_codec} {audio.source_sample_rate} Hz "
        f"x{audio.source_channels} | s per audio minute: {parts}  total {total / minutes:.4f} "
        f"({minutes * 60 / total:.0f}x real time)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="*", type=Path, help="audio files (default: shared sample clips)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per file (median reported)")
    args = parser.parse_args()
    print("audio core benchmark: median seconds of compute per minute of audio, one process")
    for path in args.files or DEFAULT_FILES:
        if path.exists():
            bench_file(path, args.repeats)
        else:
            print(f"{path}: missing, skipped")


if __name__ == "__main__":
    main()
