"""The retiming core: the DP equals a brute force, silence stills the head, long audio loops, bad input is refused."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from services.retiming import core
from services.retiming.core import LoopMode, RetimeOptions
from services.runtime.errors import InvalidInput

# --------------------------------------------------------------------------------------------------
# an independent, loop-by-loop statement of the model (module docstring of core.py)


def naive_timeline(m: int, length: int, mode: LoopMode) -> list[int]:
    if m == 1:
        return [0] * length
    out, frame, step = [], 0, 1
    while len(out) < length:
        out.append(frame)
        if mode == LoopMode.LOOP:
            frame = (frame + 1) % m
        else:
            if not 0 <= frame + step < m:
                step = -step
            frame += step
    return out


def naive_cost(positions, activity, motion, openness, valid, options: RetimeOptions, timeline) -> float:
    n, m = len(activity), len(motion)
    raw = [bool(openness[j] < options.blink_threshold and valid[j]) for j in range(m)]
    blink = [raw[j] or (0 < j < m - 1 and raw[j - 1] and raw[j + 1]) for j in range(m)]
    onset = [False] * n
    for i in range(1, n):
        if activity[i] and not activity[i - 1]:
            for k in range(i, min(n, i + options.onset_delay_frames + 1)):
                onset[k] = True
    total = 0.0
    for i, p in enumerate(positions):
        j = timeline[p]
        if not activity[i]:
            total += options.silence_motion_weight * motion[j]
        if onset[i]:
            total -= options.onset_reward_weight * motion[j]
        if not valid[j]:
            total += options.no_face_weight
        if i > 0 and p == positions[i - 1]:
            total += options.hold_penalty_weight * (motion[j] + options.blink_weight * blink[j])
    return total


def all_paths(n: int, length: int, max_hold: int):
    """Every position path: free start, steps of 0 or +1, at most max_hold holds in a row, inside [0, length)."""
    for start in range(length):
        for steps in itertools.product((0, 1), repeat=n - 1):
            path, run = [start], 0
            for step in steps:
                run = run + 1 if step == 0 else 0
                if run > max_hold or path[-1] + step >= length:
                    break
                path.append(path[-1] + step)
            else:
                yield path


def random_case(rng: np.random.Generator, n: int, m: int):
    activity = (rng.random(n) < 0.5).astype(np.uint8)
    motion = rng.random(m).astype(np.float32) * rng.choice([0.05, 1.0])
    openness = np.where(rng.random(m) < 0.3, 0.01, 0.05).astype(np.float32)
    valid = rng.random(m) < 0.8
    options = RetimeOptions(
        silence_motion_weight=float(rng.choice([0.0, 1.0, rng.random() * 3])),
        onset_reward_weight=float(rng.choice([0.0, 2.0, rng.random() * 3])),
        onset_delay_frames=int(rng.integers(0, 4)),
        hold_penalty_weight=float(rng.choice([0.0, 2.0, rng.random() * 3])),
        blink_weight=float(rng.choice([0.0, 1.0])),
        max_hold_frames=int(rng.integers(1, 4)),
        loop_mode=LoopMode(int(rng.integers(1, 3))),
        no_face_weight=float(rng.choice([0.0, 1.0, rng.random()])),
    )
    return activity, motion, openness, valid, options


def assert_valid_path(result: core.RetimeResult, m: int, max_hold: int, mode: LoopMode) -> None:
    p = result.positions
    steps = np.diff(p)
    assert result.frames.dtype == np.int32
    assert np.isin(steps, [0, 1]).all()  # never backwards on the timeline, never skips
    assert result.frames.min() >= 0 and result.frames.max() < m
    timeline = np.array(naive_timeline(m, max(m, len(p)), mode))
    np.testing.assert_array_equal(result.frames, timeline[p])
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[-1], p, [p[-1] + 1]])) != 0))
    assert runs.max() <= max_hold + 1


# --------------------------------------------------------------------------------------------------
# the DP


@pytest.mark.parametrize("seed", range(60))
def test_dp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(1, 8)), int(rng.integers(1, 8))
    activity, motion, openness, valid, options = random_case(rng, n, m)
    result = core.retime(activity, motion, openness, valid, options=options)

    timeline = naive_timeline(m, max(m, n), options.loop_mode)
    costs = sorted(
        (naive_cost(path, activity, motion, openness, valid, options, timeline), path)
        for path in all_paths(n, max(m, n), options.max_hold_frames)
    )
    best_cost, best_path = costs[0]
    assert result.total_cost == pytest.approx(best_cost, abs=1e-9)
    chosen = naive_cost(list(result.positions), activity, motion, openness, valid, options, timeline)
    assert chosen == pytest.approx(result.total_cost, abs=1e-9)  # the reported cost is the path's
    if len(costs) == 1 or costs[1][0] > best_cost + 1e-9:  # unique optimum: the same path
        assert list(result.positions) == best_path
    assert_valid_path(result, m, options.max_hold_frames, options.loop_mode)


@pytest.mark.parametrize("seed", range(10))
def test_dp_matches_brute_force_with_many_ties(seed):
    """Integer costs make many paths tie; the DP must still reach the minimum."""
    rng = np.random.default_rng(100 + seed)
    n, m = 7, int(rng.integers(2, 6))
    activity = (rng.random(n) < 0.5).astype(np.uint8)
    motion = rng.integers(0, 2, m).astype(np.float32)
    openness = np.full(m, 0.05, np.float32)
    valid = np.ones(m, bool)
    options = RetimeOptions(max_hold_frames=2, loop_mode=LoopMode(1 + seed % 2))
    result = core.retime(activity, motion, openness, valid, options=options)
    timeline = naive_timeline(m, max(m, n), options.loop_mode)
    best = min(naive_cost(path, activity, motion, openness, valid, options, timeline) for path in all_paths(n, n, 2))
    assert result.total_cost == pytest.approx(best, abs=1e-12)


def test_checkpointed_backtrack_equals_the_single_pass():
    rng = np.random.default_rng(7)
    m = 300
    activity = np.repeat(rng.random(25) < 0.5, 20)  # N = 500.astype(np.uint8)
    motion = rng.random(m).astype(np.float32) * 0.05
    openness = rng.random(m).astype(np.float32) * 0.06
    valid = rng.random(m) < 0.95
    for holds in (1, 3):
        options = RetimeOptions(max_hold_frames=holds)
        whole = core.retime(activity, motion, openness, valid, options=options)
        blocks = core.retime(activity, motion, openness, valid, options=options, max_pointer_bytes=1000)
        np.testing.assert_array_equal(whole.positions, blocks.positions)
        assert whole.total_cost == blocks.total_cost


def burst_target(m: int, seed: int = 0) -> np.ndarray:
    """Motion everywhere, varying: bursts of fast head movement over a moving baseline."""
    rng = np.random.default_rng(seed)
    t = np.arange(m)
    motion = 0.01 + 0.01 * np.abs(np.sin(t / 7.0)) + 0.004 * rng.random(m)
    for start in rng.integers(0, m - 10, m // 40):
        motion[start : start + 8] += 0.05
    return motion.astype(np.float32)


def test_silence_keeps_the_head_still():
    n, m = 900, 1200
    motion = burst_target(m)
    activity = np.zeros(n, np.uint8)
    for start in range(150, n, 300):  # 5 s of silence, then 5 s of speech
        activity[start : start + 150] = 1
    openness = np.full(m, 0.05, np.float32)
    valid = np.ones(m, bool)
    silent = activity == 0

    retimed = core.retime(activity, motion, openness, valid)
    plain = core.retime(activity, motion, openness, valid, enabled=False)
    shown, shown_plain = motion[retimed.frames], motion[plain.frames]
    assert shown[silent].mean() < 0.85 * shown_plain[silent].mean()
    assert shown[silent].mean() < shown[~silent].mean()  # motion moved into speech
    assert retimed.hold_frames > 0 and plain.hold_frames == 0
    assert_valid_path(retimed, m, 1, LoopMode.PING_PONG)
    assert np.all(np.diff(retimed.frames) >= 0)  # M >= N: no extension, never backwards
    assert retimed.wraps == 0


def test_motion_is_placed_at_speech_onsets():
    n, m = 40, 100
    activity = np.zeros(n, np.uint8)
    activity[20:] = 1
    motion = np.zeros(m, np.float32)
    motion[50:53] = 0.1
    result = core.retime(activity, motion, np.full(m, 0.05, np.float32), np.ones(m, bool))
    np.testing.assert_array_equal(result.frames[20:23], [50, 51, 52])  # the onset window 20..22
    assert result.total_cost == pytest.approx(-2.0 * 0.3)


def test_blinks_are_not_frozen():
    n, m = 200, 260
    motion = (0.001 + 0.02 * (np.arange(m) % 2)).astype(np.float32)  # holding even frames pays off
    openness = np.full(m, 0.05, np.float32)
    blinks = [30, 32, 34, 90, 92, 150, 154]  # the odd frames between 30..34 are filled in by the closing
    openness[blinks] = 0.01
    activity = np.zeros(n, np.uint8)
    valid = np.ones(m, bool)

    def held(result):
        return set(result.frames[1:][np.diff(result.positions) == 0].tolist())

    result = core.retime(activity, motion, openness, valid)
    assert result.hold_frames > 50
    assert not held(result) & {*blinks, 31, 33}
    ignored = core.retime(activity, motion, openness, valid, options=RetimeOptions(blink_weight=0.0))
    assert held(ignored) & set(blinks)  # the test would notice frozen blinks
    assert ignored.total_cost < result.total_cost


def test_frames_without_a_face_are_avoided():
    n, m = 100, 400
    motion = np.full(m, 0.01, np.float32)
    valid = np.ones(m, bool)
    valid[:250] = False
    activity = np.ones(n, np.uint8)
    result = core.retime(activity, motion, np.full(m, 0.05, np.float32), valid)
    assert valid[result.frames].all()


@pytest.mark.parametrize("mode", [LoopMode.LOOP, LoopMode.PING_PONG])
@pytest.mark.parametrize("holds", [1, 2])
def test_audio_three_times_longer_than_the_target(mode, holds):
    n, m = 600, 200
    activity = np.zeros(n, np.uint8)
    activity[100:250] = 1
    activity[400:550] = 1
    motion = burst_target(m, seed=1)
    options = RetimeOptions(loop_mode=mode, max_hold_frames=holds)
    result = core.retime(activity, motion, np.full(m, 0.05, np.float32), np.ones(m, bool), options=options)
    assert result.frames.shape == (n,)
    assert_valid_path(result, m, holds, mode)
    assert result.wraps >= 1
    assert result.wraps == core.count_wraps(result.positions, m, mode)
    jumps = np.diff(result.frames)
    if mode == LoopMode.LOOP:  # forward, except the cut at a wrap
        assert set(np.unique(jumps)) <= {0, 1, -(m - 1)}
        assert np.count_nonzero(jumps == -(m - 1)) == result.wraps
    else:  # no cut: one frame at a time, backwards only between turns
        assert set(np.unique(jumps)) <= {-1, 0, 1}
    plain = core.retime(
        activity, motion, np.full(m, 0.05, np.float32), np.ones(m, bool), enabled=False, options=options
    )
    assert_valid_path(plain, m, 0, mode)


@pytest.mark.parametrize("holds", [1, 2, 5])
def test_max_hold_is_respected(holds):
    rng = np.random.default_rng(holds)
    n, m = 300, 400
    motion = burst_target(m, seed=holds)
    activity = np.zeros(n, np.uint8)  # all silence: holding is attractive everywhere
    options = RetimeOptions(max_hold_frames=holds, hold_penalty_weight=0.0)
    result = core.retime(activity, motion, rng.random(m).astype(np.float32), np.ones(m, bool), options=options)
    assert_valid_path(result, m, holds, LoopMode.PING_PONG)
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[-1], result.positions, [m + 1]])) != 0))
    assert runs.max() == holds + 1  # the bound is reached, not exceeded


@pytest.mark.parametrize("mode", [LoopMode.LOOP, LoopMode.PING_PONG])
def test_disabled_is_plain_playback(mode):
    m = 10
    motion = burst_target(m * 10)[:m]
    openness, valid = np.full(m, 0.05, np.float32), np.ones(m, bool)
    short = core.retime(np.zeros(7, np.uint8), motion, openness, valid, enabled=False)
    np.testing.assert_array_equal(short.frames, np.arange(7))
    assert (short.enabled, short.total_cost, short.hold_frames, short.wraps) == (False, 0.0, 0, 0)
    options = RetimeOptions(loop_mode=mode)
    long = core.retime(np.ones(25, np.uint8), motion, openness, valid, enabled=False, options=options)
    np.testing.assert_array_equal(long.frames, naive_timeline(m, 25, mode))
    np.testing.assert_array_equal(long.positions, np.arange(25))
    assert long.wraps == 2  # LOOP: 9 -> 0 twice; PING_PONG: turns after positions 9 and 18


def test_single_frame_inputs():
    one = core.retime(np.ones(1, np.uint8), np.zeros(1, np.float32), np.zeros(1, np.float32), np.ones(1, bool))
    assert list(one.frames) == [0]
    many = core.retime(np.zeros(50, np.uint8), np.ones(1, np.float32), np.ones(1, np.float32), np.zeros(1, bool))
    assert list(many.frames) == [0] * 50 and many.hold_frames == 49


# --------------------------------------------------------------------------------------------------
# helpers


def test_extend_timeline():
    np.testing.assert_array_equal(core.extend_timeline(4, 11, LoopMode.LOOP), [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2])
    np.testing.assert_array_equal(core.extend_timeline(4, 11, LoopMode.PING_PONG), [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2])
    np.testing.assert_array_equal(core.extend_timeline(2, 5, LoopMode.PING_PONG), [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(core.extend_timeline(1, 3, LoopMode.PING_PONG), [0, 0, 0])
    for m in range(1, 9):
        for mode in LoopMode:
            np.testing.assert_array_equal(core.extend_timeline(m, 40, mode), naive_timeline(m, 40, mode))


def test_count_wraps():
    assert core.count_wraps(np.arange(10), 4, LoopMode.LOOP) == 2  # wraps at 4 and 8
    assert core.count_wraps(np.arange(10), 4, LoopMode.PING_PONG) == 2  # turns after 3 and 6
    assert core.count_wraps(np.arange(4), 4, LoopMode.PING_PONG) == 0  # reached the end, not turned
    assert core.count_wraps(np.arange(5), 4, LoopMode.PING_PONG) == 1
    assert core.count_wraps(np.arange(3, 9), 4, LoopMode.LOOP) == 2


def test_onset_window_and_blinks():
    speech = np.array([1, 0, 0, 1, 1, 1, 1, 0, 1, 0], bool)
    np.testing.assert_array_equal(core.onset_window(speech, 2), [0, 0, 0, 1, 1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(core.onset_window(speech, 0), [0, 0, 0, 1, 0, 0, 0, 0, 1, 0])
    openness = np.array([0.01, 0.05, 0.01, 0.05, 0.05, 0.01, 0.01])
    valid = np.array([1, 1, 1, 1, 1, 1, 0], bool)
    np.testing.assert_array_equal(core.blink_frames(openness, valid, 0.02), [1, 1, 1, 0, 0, 1, 0])


def test_resample_activity():
    activity = np.zeros(100, np.uint8)
    activity[5] = 1  # [0.05, 0.06) s
    per_frame = core.resample_activity(activity, rate=100.0, fps=25.0, frame_count=26)
    assert list(np.flatnonzero(per_frame)) == [1]  # frame 1 = [0.04, 0.08)
    activity[:] = 0
    activity[4] = 1  # [0.04, 0.05) touches frame 0 = [0, 0.04) only at its end: not inside
    assert list(np.flatnonzero(core.resample_activity(activity, rate=100.0, fps=25.0, frame_count=3))) == [1]
    activity[:] = 0
    activity[3] = 1  # [0.03, 0.04) overlaps frames 0 = [0, 1/30) and 1 at 30 fps
    assert list(np.flatnonzero(core.resample_activity(activity, rate=100.0, fps=30.0, frame_count=3))) == [0, 1]
    assert core.resample_activity(activity, rate=100.0, fps=30.0, frame_count=40)[34:].sum() == 0


def test_progress_is_reported_and_can_stop_the_work():
    calls = []
    args = (np.zeros(600, np.uint8), np.ones(700, np.float32), np.ones(700, np.float32), np.ones(700, bool))
    core.retime(*args, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(256, 600), (512, 600)]

    class Stop(Exception):
        pass

    def stop(done, total):
        raise Stop

    with pytest.raises(Stop):
        core.retime(*args, progress=stop)


# --------------------------------------------------------------------------------------------------
# bad inputs


GOOD = {
    "speech_activity": np.ones(5, np.uint8),
    "head_motion": np.ones(8, np.float32),
    "eye_openness": np.ones(8, np.float32),
    "face_valid": np.ones(8, bool),
}


def with_(**changes):
    return {**GOOD, **changes}


@pytest.mark.parametrize(
    ("inputs", "options", "message"),
    [
        (with_(speech_activity=np.zeros(0, np.uint8)), None, "N > 0"),
        (with_(speech_activity=np.ones((2, 3), np.uint8)), None, "1-D"),
        (with_(speech_activity=np.array([0, 1, 2], np.uint8)), None, "only 0 and 1"),
        (with_(speech_activity=np.array(["a"])), None, "dtype"),
        (with_(head_motion=np.zeros(0, np.float32)), None, "no frames"),
        (with_(head_motion=np.ones(7, np.float32)), None, "eye_openness has 8 frames but head_motion has 7"),
        (with_(eye_openness=np.ones(9, np.float32)), None, "eye_openness has 9 frames"),
        (with_(face_valid=np.ones((8, 1), bool)), None, "face_valid must be 1-D"),
        (with_(face_valid=np.full(8, 0.5)), None, "face_valid must be bool"),
        (with_(head_motion=np.array([0, 1, np.nan, 0, 0, 0, 0, 0], np.float32)), None, "non-finite value (nan)"),
        (with_(head_motion=np.array([0, 1, np.inf, 0, 0, 0, 0, 0])), None, "at target frame 2"),
        (with_(head_motion=np.full(8, -0.1)), None, "must be >= 0"),
        (with_(eye_openness=np.full(8, np.nan)), None, "eye_openness holds a non-finite"),
        (GOOD, RetimeOptions(silence_motion_weight=-1.0), "silence_motion_weight"),
        (GOOD, RetimeOptions(onset_reward_weight=float("nan")), "onset_reward_weight"),
        (GOOD, RetimeOptions(hold_penalty_weight=-0.5), "hold_penalty_weight"),
        (GOOD, RetimeOptions(blink_weight=-1.0), "blink_weight"),
        (GOOD, RetimeOptions(no_face_weight=float("inf")), "no_face_weight"),
        (GOOD, RetimeOptions(blink_threshold=0.0), "blink_threshold"),
        (GOOD, RetimeOptions(onset_delay_frames=-1), "onset_delay_frames"),
        (GOOD, RetimeOptions(max_hold_frames=0), "max_hold_frames"),
        (GOOD, RetimeOptions(max_hold_frames=256), "max_hold_frames"),
        (GOOD, RetimeOptions(loop_mode=0), "loop_mode"),
    ],
)
def test_bad_inputs_are_refused_clearly(inputs, options, message):
    with pytest.raises(InvalidInput, match=None) as caught:
        core.retime(**inputs, options=options)
    assert message in str(caught.value)
    assert caught.value.status == "INVALID_ARGUMENT"


def test_bad_helper_arguments():
    with pytest.raises(InvalidInput, match="target frame count"):
        core.extend_timeline(0, 5)
    with pytest.raises(InvalidInput, match="rate and fps"):
        core.resample_activity(np.ones(3), rate=0.0, fps=30.0, frame_count=3)
    with pytest.raises(InvalidInput, match="max_pointer_bytes"):
        core.retime(**GOOD, max_pointer_bytes=0)
