"""Benchmark of the re-timing core: time and peak memory for 1 min of audio against a 5 min target (prints only).

Run: `python -m deploy.bench.retiming [--fps 30] [--audio-seconds 60] [--target-seconds 300] [--repeats 3]`.
Inputs are synthetic (speech in 2-6 s runs with 0.5-3 s pauses, head motion with bursts, blinks every ~4 s,
2 % of frames without a face). Peak memory is what numpy allocated during the call (tracemalloc), not the
process RSS. The naive reference is the seed's formulation (a Python loop over every (output frame,
target frame) cell, a float64 [N, L, h + 1] table and int64 back-pointers); it is timed on a smaller
problem and its per-cell time extrapolated, since running it at full size takes minutes.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from services.retiming import core
from services.retiming.core import LoopMode, RetimeOptions


def synthetic_inputs(n: int, m: int, fps: float, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(activity uint8 [N], head motion float32 [M], eye openness float32 [M], face_valid bool [M])."""
    rng = np.random.default_rng(seed)
    activity = np.zeros(n, np.uint8)
    i = int(rng.integers(0, int(2 * fps)))
    while i < n:
        run = int(rng.uniform(2, 6) * fps)
        activity[i : i + run] = 1
        i += run + int(rng.uniform(0.5, 3) * fps)
    t = np.arange(m)
    motion = 0.008 + 0.006 * np.abs(np.sin(t / (2.5 * fps))) + 0.003 * rng.random(m)
    for start in rng.integers(0, m, max(1, m // int(3 * fps))):
        motion[start : start + int(0.4 * fps)] += rng.uniform(0.02, 0.06)
    openness = np.full(m, 0.05) + 0.005 * rng.standard_normal(m)
    for start in rng.integers(0, m, max(1, m // int(4 * fps))):
        openness[start : start + 4] = 0.01
    valid = rng.random(m) > 0.02
    return activity, motion.astype(np.float32), openness.astype(np.float32), valid


def measure(call: Callable[[], object], repeats: int) -> tuple[float, int, object]:
    """(median seconds, peak traced bytes of one call, result)."""
    result = call()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    call()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return statistics.median(times), peak, result


def naive_retime(activity, motion, openness, valid, options: RetimeOptions) -> tuple[np.ndarray, float]:
    """The seed's loops with this module's costs: positions int64 [N] and the path cost."""
    n, m = len(activity), len(motion)
    length, holds = max(n, m), options.max_hold_frames
    timeline = core.extend_timeline(m, length, options.loop_mode)
    speech = np.asarray(activity, bool)
    onset = core.onset_window(speech, options.onset_delay_frames)
    blink = core.blink_frames(openness, valid, options.blink_threshold)
    v = motion.astype(np.float64)
    table = np.full((n, length, holds + 1), np.inf)
    back = np.zeros((n, length), np.int64)
    for i in range(n):
        for p in range(length):
            j = timeline[p]
            g = (
                options.silence_motion_weight * v[j] * (not speech[i])
                - options.onset_reward_weight * v[j] * onset[i]
                + options.no_face_weight * (not valid[j])
            )
            if i == 0:
                table[0, p, 0] = g
                continue
            if p > 0:
                k = int(np.argmin(table[i - 1, p - 1]))
                table[i, p, 0] = table[i - 1, p - 1, k] + g
                back[i, p] = k
            hold = options.hold_penalty_weight * (v[j] + options.blink_weight * blink[j])
            for k in range(1, holds + 1):
                table[i, p, k] = table[i - 1, p, k - 1] + hold + g
    p, k = divmod(int(np.argmin(table[-1])), holds + 1)
    cost = float(table[-1, p, k])
    positions = np.empty(n, np.int64)
    for i in range(n - 1, 0, -1):
        positions[i] = p
        if k > 0:
            k -= 1
        else:
            k = int(back[i, p])
            p -= 1
    positions[0] = p
    return positions, cost


def naive_comparison(n: int, m: int, fps: float, naive_scale: float) -> dict:
    """The naive reference on a problem `naive_scale` times the size, extrapolated per cell to N x M.

    Returns:
        dict: naive_n, naive_m, naive_seconds, naive_cost, fast_cost, same_cost, same_path,
        naive_extrapolated_seconds (at N x M) and naive_table_mib (its float64 + int64 tables at N x M).
    """
    small_n, small_m = max(2, round(n * naive_scale)), max(2, round(m * naive_scale))
    small = synthetic_inputs(small_n, small_m, fps, seed=2)
    options = RetimeOptions()
    t0 = time.perf_counter()
    naive_positions, naive_cost = naive_retime(*small, options)
    naive_seconds = time.perf_counter() - t0
    fast = core.retime(*small, options=options)
    cells = small_n * max(small_n, small_m)
    return {
        "naive_n": small_n,
        "naive_m": small_m,
        "naive_seconds": naive_seconds,
        "naive_cost": naive_cost,
        "fast_cost": fast.total_cost,
        "same_cost": abs(fast.total_cost - naive_cost) < 1e-9,
        "same_path": bool(np.array_equal(naive_positions, fast.positions)),
        "naive_extrapolated_seconds": naive_seconds / cells * n * max(n, m),
        "naive_table_mib": n * max(n, m) * (2 * 8 + 8) / 2**20,
    }


def reference_comparison(
    *,
    fps: float = 30.0,
    audio_seconds: float = 60.0,
    target_seconds: float = 300.0,
    repeats: int = 3,
    naive_scale: float = 0.05,
) -> dict:
    """The DP with defaults against the naive reference (extrapolated) for `audio_seconds` on a longer target.

    Returns:
        dict: n, m, fast_seconds (median), fast_peak_mib (numpy allocations), fast_real_time (audio seconds
        per second of compute), speedup (extrapolated naive seconds / fast seconds) and `naive_comparison`'s keys.
    """
    n, m = round(audio_seconds * fps), round(target_seconds * fps)
    inputs = synthetic_inputs(n, m, fps)
    seconds, peak, _ = measure(lambda: core.retime(*inputs), repeats)
    naive = naive_comparison(n, m, fps, naive_scale)
    return {
        "n": n,
        "m": m,
        "audio_seconds": audio_seconds,
        "target_seconds": target_seconds,
        "fast_seconds": seconds,
        "fast_peak_mib": peak / 2**20,
        "fast_real_time": audio_seconds / seconds,
        "speedup": naive["naive_extrapolated_seconds"] / seconds,
        **naive,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--audio-seconds", type=float, default=60.0)
    parser.add_argument("--target-seconds", type=float, default=300.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    parser.add_argument("--naive-scale", type=float, default=0.05, help="size factor of the naive reference")
    args = parser.parse_args()
    n, m = round(args.audio_seconds * args.fps), round(args.target_seconds * args.fps)
    inputs = synthetic_inputs(n, m, args.fps)
    print(
        f"re-timing core: N = {n} output frames ({args.audio_seconds:g} s) x M = {m} target frames "
        f"({args.target_seconds:g} s) at {args.fps:g} fps; median of {args.repeats}, one process"
    )

    cases = [
        ("DP, defaults (max_hold 1)", {}),
        ("DP, max_hold 4", {"options": RetimeOptions(max_hold_frames=4)}),
        ("DP, checkpointed back-pointers (4 MiB budget)", {"max_pointer_bytes": 4 * 2**20}),
        ("plain playback (disabled)", {"enabled": False}),
    ]
    baseline = None
    for label, kwargs in cases:
        seconds, peak, result = measure(lambda kwargs=kwargs: core.retime(*inputs, **kwargs), args.repeats)
        baseline = baseline or result
        silent = inputs[0] == 0
        still = float(inputs[1][result.frames][silent].mean())
        print(
            f"  {label:48s} {seconds * 1000:8.1f} ms  peak {peak / 2**20:7.1f} MiB  "
            f"({args.audio_seconds / seconds:,.0f}x real time)  holds {result.hold_frames}  "
            f"cost {result.total_cost:.3f}  silent-frame motion {still:.4f}"
        )
    print(
        f"  back-pointers uint8 N x L = {n * max(n, m) / 2**20:.1f} MiB "
        f"(int32 would be {4 * n * max(n, m) / 2**20:.1f} MiB)"
    )

    long_inputs = synthetic_inputs(3 * m, m, args.fps, seed=1)
    for mode in LoopMode:
        options = RetimeOptions(loop_mode=mode)
        seconds, peak, result = measure(lambda o=options: core.retime(*long_inputs, options=o), 1)
        print(
            f"  DP, audio 3x the target ({mode.name}, N = {3 * m}): {seconds:.2f} s  peak {peak / 2**20:.1f} MiB  "
            f"wraps {result.wraps}"
        )

    naive = naive_comparison(n, m, args.fps, args.naive_scale)
    agree = "same cost" if naive["same_cost"] else f"COST DIFFERS ({naive['naive_cost']} vs {naive['fast_cost']})"
    print(
        f"  naive reference at N = {naive['naive_n']}, M = {naive['naive_m']}: {naive['naive_seconds']:.2f} s "
        f"({agree}, {'same path' if naive['same_path'] else 'another path of that cost'}); "
        f"extrapolated to full size: ~{naive['naive_extrapolated_seconds']:.0f} s and "
        f"{naive['naive_table_mib']:.0f} MiB of tables"
    )


if __name__ == "__main__":
    main()
