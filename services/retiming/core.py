"""Pure core of the `retiming` stage: which target frame to show at each output frame (dynamic programming).

The model (the seed's Stage I with its bugs fixed; docs/DESIGN.md, "retiming"):

Timeline. The target's M frames are laid out on an *extended timeline* of L = max(M, N) positions so that
N output frames always fit, whatever the moves: `LoopMode.LOOP` repeats 0..M-1, 0..M-1, ... (a cut at each
wrap), `LoopMode.PING_PONG` plays 0..M-1, M-2..0, 1..M-1, ... (no cut; the target runs backwards on the
way back). When M >= N the timeline is the target itself (L = M) and nothing wraps.

Path. Output frame i shows timeline position p_i (target frame ext[p_i]). p_0 is free (any position), and
each step either *advances* (p_i = p_(i-1) + 1) or *holds* (p_i = p_(i-1)), with at most
`max_hold_frames` holds in a row. Positions never decrease, so the video never runs backwards except
where the ping-pong timeline itself does. Frames are never skipped (a skip is a visible jump; the seed
did not allow it either). The plain-playback path p_i = i is always feasible (L >= N), so the DP always
has an answer.

Cost of a path (all weights are `RetimeOptions`; V_j = head_motion[j], B_j = blink frame, F_j = no face):

    sum_i  silence_motion_weight * V_j       if output frame i is silent
         - onset_reward_weight   * V_j       if i is within onset_delay_frames after a speech onset
         + no_face_weight        * F_j
         + hold_penalty_weight   * (V_j + blink_weight * B_j)   if frame i holds (p_i = p_(i-1))
    with j = ext[p_i].

A speech onset is an output frame i >= 1 with speech at i and silence at i - 1; the reward applies to
frames onset .. onset + onset_delay_frames (the seed rewarded only frame onset + 2, a single frame, which
the seed's own notes list as a weakness; this window includes that frame). Blinks: frames whose eye openness
is below `blink_threshold` (only where a face was found), with single-frame gaps between blink frames
filled (the seed's 3-element closing); a blink frame counts `blink_weight` extra motion when held, so a
blink is passed at normal speed rather than frozen with closed eyes. Blinks do not count as head motion in
the silence term: a still head that blinks looks natural.

DP. State (i, p, k): output frame i shows position p after exactly k consecutive holds (0 <= k <= h,
h = max_hold_frames). Row i is computed from row i - 1 with whole-array numpy operations over p:

    S_i[0, p] = min_k S_(i-1)[k, p - 1] + G_i[p]                 (advance; p = 0 only at i = 0)
    S_i[k, p] = S_(i-1)[k - 1, p] + G_i[p] + hold cost[p]        (hold, 1 <= k <= h)

The only choice to remember is the k of the advance's predecessor (a hold's predecessor is implied), so
back-pointers are uint8 [N, L] (h <= 255): 16.2 MB for N = 1800 (1 min at 30 fps) against M = 9000
(5 min), a quarter of int32 back-pointers. Live state is (h + 1) x L float64 twice. When N x L bytes
exceed `max_pointer_bytes`, the forward pass keeps only a snapshot of the state every K rows and the
backtrack recomputes one block of K rows of back-pointers at a time (about twice the time; memory
O(L * (K + (N / K) * 8 (h + 1)))). The answer is backtracked from the minimum of the last row; ties go to
the lowest final position, then the fewest trailing holds, and inside the DP to the fewest holds.
Time is O(N * L * (h + 1)).
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from services.runtime.errors import InvalidInput

MAX_HOLD_FRAMES_LIMIT = 255
"""Largest `max_hold_frames` (back-pointers are uint8; time grows linearly with it)."""
MAX_ONSET_DELAY_FRAMES = 10_000
DEFAULT_MAX_POINTER_BYTES = 64 * 2**20
"""Back-pointer memory above which the DP switches to checkpointed (block-recomputed) back-pointers."""
_PROGRESS_EVERY_ROWS = 256

ProgressCallback = Callable[[int, int], None]
"""`progress(done_rows, total_rows)` during the forward pass; it may raise (e.g. `Cancelled`) to stop."""


class LoopMode(enum.IntEnum):
    """How the target timeline is extended when it is shorter than the audio (values as in the proto)."""

    LOOP = 1
    """0, 1, ..., M-1, 0, 1, ... (a cut at each wrap)."""
    PING_PONG = 2
    """0, 1, ..., M-1, M-2, ..., 0, 1, ... (no cut; plays backwards on the way back)."""


@dataclass(frozen=True)
class RetimeOptions:
    """Cost weights of the re-timing DP (names and defaults of retiming.v1.RetimeOptions).

    The proto's "0 / unset = default" rules for `blink_threshold`, `max_hold_frames` and `loop_mode` are
    applied by the servicer when it builds this object; here every value is taken as given.

    Attributes:
        silence_motion_weight: >= 0; cost per unit of head motion shown during a silent output frame.
        onset_reward_weight: >= 0; reward per unit of head motion shown in the onset window (seed aU).
        onset_delay_frames: >= 0; the reward applies to output frames onset .. onset + this (seed: 2).
        hold_penalty_weight: >= 0; cost per unit of motion (+ blink) of a held frame (seed aS).
        blink_weight: >= 0; motion added to blink frames in the hold cost (seed aB); 0 ignores blinks.
        blink_threshold: > 0; eye openness (inter-ocular^2 units) below which a frame is a blink.
        max_hold_frames: 1 .. 255; longest run of extra repeats of one target frame (seed: 1).
        loop_mode: extension of a too-short target.
        no_face_weight: >= 0; cost per output frame that shows a target frame without a face (those pass
            through the compositor unchanged, out of sync). Not in retiming.v1; the servicer keeps the
            default.
    """

    silence_motion_weight: float = 1.0
    onset_reward_weight: float = 2.0
    onset_delay_frames: int = 2
    hold_penalty_weight: float = 2.0
    blink_weight: float = 1.0
    blink_threshold: float = 0.02
    max_hold_frames: int = 1
    loop_mode: LoopMode = LoopMode.PING_PONG
    no_face_weight: float = 1.0

    def validate(self) -> None:
        """Raises `InvalidInput` naming the first bad option."""
        for name in (
            "silence_motion_weight",
            "onset_reward_weight",
            "hold_penalty_weight",
            "blink_weight",
            "no_face_weight",
        ):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise InvalidInput(f"option {name} must be a finite number >= 0, got {value!r}")
        threshold = self.blink_threshold
        if not isinstance(threshold, numbers.Real) or not math.isfinite(threshold) or threshold <= 0:
            raise InvalidInput(f"option blink_threshold must be a finite number > 0, got {threshold!r}")
        delay = self.onset_delay_frames
        if not _is_int(delay) or not 0 <= delay <= MAX_ONSET_DELAY_FRAMES:
            raise InvalidInput(
                f"option onset_delay_frames must be an integer in [0, {MAX_ONSET_DELAY_FRAMES}], got {delay!r}"
            )
        hold = self.max_hold_frames
        if not _is_int(hold) or not 1 <= hold <= MAX_HOLD_FRAMES_LIMIT:
            raise InvalidInput(
                f"option max_hold_frames must be an integer in [1, {MAX_HOLD_FRAMES_LIMIT}], got {hold!r}"
            )
        try:
            LoopMode(self.loop_mode)
        except ValueError:
            raise InvalidInput(f"option loop_mode must be LOOP (1) or PING_PONG (2), got {self.loop_mode!r}") from None


@dataclass(frozen=True, eq=False)
class RetimeResult:
    """Target frame per output frame, and what the chosen path did.

    Attributes:
        frames: int32 [N], target frame index shown at each output frame, in [0, M). Read-only.
        positions: int64 [N], position on the extended timeline (see `extend_timeline`), non-decreasing,
            steps of 0 or 1; frames = extend_timeline(M, L, loop_mode)[positions]. Read-only.
        target_frame_count: M.
        enabled: True = DP re-timing, False = plain playback (positions = 0..N-1).
        hold_frames: output frames i >= 1 whose target frame equals frame i - 1's.
        wraps: times the path crossed a wrap (LOOP) or a turn (PING_PONG) of the extended timeline.
        total_cost: cost of the path under the options (0.0 when disabled).
    """

    frames: np.ndarray
    positions: np.ndarray
    target_frame_count: int
    enabled: bool
    hold_frames: int
    wraps: int
    total_cost: float

    @property
    def output_frame_count(self) -> int:
        """N."""
        return len(self.frames)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def extend_timeline(target_frames: int, length: int, mode: LoopMode = LoopMode.PING_PONG) -> np.ndarray:
    """Target frame index at each of `length` timeline positions: int32 [length] in [0, target_frames).

    LOOP: p mod M. PING_PONG: 0..M-1, M-2..0, 1.. (period 2 (M - 1); M = 1 gives all zeros).
    """
    if not _is_int(target_frames) or target_frames <= 0:
        raise InvalidInput(f"target frame count must be a positive integer, got {target_frames!r}")
    if not _is_int(length) or length < 0:
        raise InvalidInput(f"timeline length must be an integer >= 0, got {length!r}")
    p = np.arange(length, dtype=np.int64)
    if LoopMode(mode) == LoopMode.LOOP or target_frames == 1:
        out = p % target_frames
    else:
        period = 2 * (target_frames - 1)
        r = p % period
        out = np.where(r < target_frames, r, period - r)
    return out.astype(np.int32)


def count_wraps(positions: np.ndarray, target_frames: int, mode: LoopMode = LoopMode.PING_PONG) -> int:
    """Wraps (LOOP) or turns (PING_PONG) crossed by a non-decreasing path on the extended timeline.

    LOOP wraps between positions kM - 1 and kM; PING_PONG turns between k (M - 1) and k (M - 1) + 1
    (k >= 1). With M = 1 every advance is a wrap.
    """
    p = np.asarray(positions, dtype=np.int64)
    if p.size < 2:
        return 0
    if LoopMode(mode) == LoopMode.LOOP or target_frames == 1:
        segment = p // target_frames
    else:
        segment = np.maximum(p - 1, 0) // (target_frames - 1)
    return int(segment[-1] - segment[0])


def resample_activity(activity: np.ndarray, *, rate: float, fps: float, frame_count: int) -> np.ndarray:
    """Speech activity at `rate` Hz -> uint8 [frame_count] per output frame at `fps`.

    Output frame i covers [i / fps, (i + 1) / fps) and activity sample k covers [k / rate, (k + 1) / rate);
    a frame is speech when any sample overlapping it is. Frames past the end of the activity are silent.
    """
    a = np.asarray(activity)
    if a.ndim != 1:
        raise InvalidInput(f"speech activity must be 1-D, got shape {a.shape}")
    if not (math.isfinite(rate) and rate > 0 and math.isfinite(fps) and fps > 0):
        raise InvalidInput(f"activity rate and fps must be > 0, got rate={rate!r} fps={fps!r}")
    if not _is_int(frame_count) or frame_count < 0:
        raise InvalidInput(f"output frame count must be an integer >= 0, got {frame_count!r}")
    speech = _activity_bool(a)
    cumulative = np.concatenate([[0], np.cumsum(speech, dtype=np.int64)])
    i = np.arange(frame_count, dtype=np.float64)
    eps = 1e-9  # frame edges that fall on a sample edge up to float error count as exactly on it
    first = np.clip(np.floor(i * rate / fps + eps).astype(np.int64), 0, a.size)
    stop = np.clip(np.ceil((i + 1) * rate / fps - eps).astype(np.int64), 0, a.size)
    stop = np.maximum(stop, first)
    return (cumulative[stop] - cumulative[first] > 0).astype(np.uint8)


def _activity_bool(activity: np.ndarray) -> np.ndarray:
    a = np.asarray(activity)
    if a.dtype == bool:
        return a
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise InvalidInput(f"speech activity must be bool or numeric 0/1, got dtype {a.dtype}")
    bad = (a != 0) & (a != 1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InvalidInput(f"speech activity must hold only 0 and 1, got {a[first]!r} at frame {first}")
    return a == 1


def _validate_inputs(
    speech_activity: np.ndarray, head_motion: np.ndarray, eye_openness: np.ndarray, face_valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    activity = np.asarray(speech_activity)
    if activity.ndim != 1:
        raise InvalidInput(f"speech activity must be 1-D [N], got shape {activity.shape}")
    if activity.size == 0:
        raise InvalidInput("speech activity is empty: the output needs N > 0 frames")
    speech = _activity_bool(activity)
    arrays = {"head_motion": head_motion, "eye_openness": eye_openness, "face_valid": face_valid}
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    for name, value in arrays.items():
        if value.ndim != 1:
            raise InvalidInput(f"{name} must be 1-D [M], got shape {value.shape}")
    m = arrays["head_motion"].size
    if m == 0:
        raise InvalidInput("the target has no frames (head_motion is empty)")
    for name, value in arrays.items():
        if value.size != m:
            raise InvalidInput(f"{name} has {value.size} frames but head_motion has {m}")
    for name in ("head_motion", "eye_openness"):
        value = arrays[name]
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise InvalidInput(f"{name} must be numeric, got dtype {value.dtype}")
        finite = np.isfinite(value)
        if not finite.all():
            first = int(np.flatnonzero(~finite)[0])
            raise InvalidInput(f"{name} holds a non-finite value ({value[first]}) at target frame {first}")
    motion = arrays["head_motion"].astype(np.float64)
    if (motion < 0).any():
        first = int(np.flatnonzero(motion < 0)[0])
        raise InvalidInput(f"head_motion is a speed and must be >= 0, got {motion[first]} at target frame {first}")
    valid = arrays["face_valid"]
    if valid.dtype != bool:
        if not np.issubdtype(valid.dtype, np.integer) or ((valid != 0) & (valid != 1)).any():
            raise InvalidInput(f"face_valid must be bool (or 0/1), got dtype {valid.dtype}")
        valid = valid == 1
    return speech, motion, arrays["eye_openness"].astype(np.float64), valid


def blink_frames(eye_openness: np.ndarray, face_valid: np.ndarray, threshold: float) -> np.ndarray:
    """Blinks, bool [M]: openness below `threshold` where a face was found, single-frame gaps between blinks filled."""
    blink = (np.asarray(eye_openness) < threshold) & np.asarray(face_valid, bool)
    if blink.size >= 3:
        blink[1:-1] |= blink[:-2] & blink[2:]
    return blink


def onset_window(speech: np.ndarray, delay_frames: int) -> np.ndarray:
    """Speech onsets, bool [N]: frames onset .. onset + delay_frames after each speech onset.

    An onset is a frame i with speech where frame i - 1 is silent.
    """
    speech = np.asarray(speech, bool)
    n = speech.size
    onsets = np.flatnonzero(speech[1:] & ~speech[:-1]) + 1
    marks = np.zeros(n + 1, np.int64)
    np.add.at(marks, onsets, 1)
    np.add.at(marks, np.minimum(onsets + delay_frames + 1, n), -1)
    return np.cumsum(marks[:n]) > 0


class _Costs:
    """Per-position cost rows on the extended timeline; row i's match cost depends only on (silent, onset)."""

    def __init__(
        self,
        speech: np.ndarray,
        motion: np.ndarray,
        blink: np.ndarray,
        valid: np.ndarray,
        timeline: np.ndarray,
        options: RetimeOptions,
    ) -> None:
        o = options
        self.holds = o.max_hold_frames
        self.motion = motion[timeline]
        self.hold = (o.hold_penalty_weight * (motion + o.blink_weight * blink))[timeline]
        self.base = (o.no_face_weight * ~valid)[timeline].astype(np.float64)
        self.silence = o.silence_motion_weight
        self.reward = o.onset_reward_weight
        self.kind = (~speech).astype(np.int8) + 2 * onset_window(speech, o.onset_delay_frames).astype(np.int8)
        self._rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(match cost, match + hold cost) float64 [L] of output frame i."""
        kind = int(self.kind[i])
        if kind not in self._rows:
            match = self.base.copy()
            if kind & 1:
                match += self.silence * self.motion
            if kind & 2:
                match -= self.reward * self.motion
            self._rows[kind] = (match, match + self.hold)
        return self._rows[kind]


def _forward(
    costs: _Costs,
    state: np.ndarray | None,
    start: int,
    stop: int,
    *,
    pointers: np.ndarray | None = None,
    snapshots: dict[int, np.ndarray] | None = None,
    block: int = 0,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Rows [start, stop) of the DP from `state` (after row start - 1; None when start = 0).

    state: float64 [h + 1, L], state[k, p] = best cost of a path at position p after exactly k holds.
    pointers (if given): uint8 [stop - start, L] receives, per row and position, the k of the advance's
    predecessor. snapshots (if given) receives a copy of the state before every row that is a positive
    multiple of `block`, keyed by that row. Returns the state after row stop - 1.
    """
    holds = costs.holds
    length = costs.motion.size
    offset = start
    if state is None:
        state = np.full((holds + 1, length), np.inf)
        state[0] = costs.row(0)[0]
        start = 1
    else:
        state = state.copy()
    spare = np.empty_like(state)
    best = np.empty(length - 1)
    better = np.empty(length - 1, bool)
    for i in range(start, stop):
        if snapshots is not None and i % block == 0:
            snapshots[i] = state.copy()
        match, match_hold = costs.row(i)
        before = state[:, :-1]
        if pointers is None:
            np.min(before, axis=0, out=best)
        elif holds == 1:  # the default: two passes over L
            np.less(before[1], before[0], out=pointers[i - offset, 1:].view(bool))
            np.minimum(before[0], before[1], out=best)
        else:  # a running minimum over k: three passes over L per state, no argmin + gather
            choice = pointers[i - offset, 1:]
            best[:] = before[0]
            choice[:] = 0
            for k in range(1, holds + 1):
                np.less(before[k], best, out=better)
                np.copyto(choice, k, where=better)
                np.minimum(best, before[k], out=best)
        spare[0, 0] = np.inf
        np.add(best, match[1:], out=spare[0, 1:])
        np.add(state[:-1], match_hold, out=spare[1:])
        state, spare = spare, state
        if progress is not None and (i + 1) % _PROGRESS_EVERY_ROWS == 0:
            progress(i + 1, costs.kind.size)
    return state


def _backtrack_block(
    pointers: np.ndarray, start: int, stop: int, position: int, hold: int, out: np.ndarray
) -> tuple[int, int]:
    """Walks rows stop - 1 down to max(start, 1); returns (position, hold) at row start - 1 (or row 0)."""
    for i in range(stop - 1, max(start, 1) - 1, -1):
        out[i] = position
        if hold > 0:
            hold -= 1
        else:
            hold = int(pointers[i - start, position])
            position -= 1
    return position, hold


def retime(
    speech_activity: np.ndarray,
    head_motion: np.ndarray,
    eye_openness: np.ndarray,
    face_valid: np.ndarray,
    *,
    enabled: bool = True,
    options: RetimeOptions | None = None,
    max_pointer_bytes: int = DEFAULT_MAX_POINTER_BYTES,
    progress: ProgressCallback | None = None,
) -> RetimeResult:
    """Chooses the target frame shown at each output frame (see the module docstring for the model).

    Args:
        speech_activity: bool or 0/1 integers [N], N >= 1, one per output frame (1 = speech).
        head_motion: float [M], M >= 1, head speed per target frame (inter-ocular units per frame), finite,
            >= 0, already interpolated over frames without a face.
        eye_openness: float [M], finite, inter-ocular^2 units (a blink is below `blink_threshold`).
        face_valid: bool [M], True where the target frame has a face.
        enabled: False = plain playback: output frame i shows extended-timeline position i (no DP).
        options: cost weights and loop mode (defaults = retiming.v1 defaults).
        max_pointer_bytes: > 0; back-pointer memory above which the checkpointed DP is used.
        progress: called every 256 rows of the forward pass.

    Returns:
        `RetimeResult`; frames int32 [N] in [0, M).

    Raises:
        InvalidInput: empty activity (N = 0) or target (M = 0), shapes that disagree, non-finite or
            negative motion, non-finite eye openness, activity other than 0/1, bad options.
    """
    options = RetimeOptions() if options is None else options
    options.validate()
    if not _is_int(max_pointer_bytes) or max_pointer_bytes <= 0:
        raise InvalidInput(f"max_pointer_bytes must be a positive integer, got {max_pointer_bytes!r}")
    speech, motion, openness, valid = _validate_inputs(speech_activity, head_motion, eye_openness, face_valid)
    n, m = speech.size, motion.size
    mode = LoopMode(options.loop_mode)
    length = max(m, n)
    timeline = extend_timeline(m, length, mode)

    if not enabled:
        positions = np.arange(n, dtype=np.int64)
        total_cost = 0.0
    else:
        blink = blink_frames(openness, valid, options.blink_threshold)
        costs = _Costs(speech, motion, blink, valid, timeline, options)
        positions, total_cost = _solve(costs, n, length, max_pointer_bytes, progress)

    frames = timeline[positions]
    positions.flags.writeable = False
    frames.flags.writeable = False
    return RetimeResult(
        frames=frames,
        positions=positions,
        target_frame_count=m,
        enabled=bool(enabled),
        hold_frames=int(np.count_nonzero(frames[1:] == frames[:-1])),
        wraps=count_wraps(positions, m, mode),
        total_cost=float(total_cost),
    )


def _solve(
    costs: _Costs, n: int, length: int, max_pointer_bytes: int, progress: ProgressCallback | None
) -> tuple[np.ndarray, float]:
    """Minimum-cost path: int64 positions [N] and its cost."""
    holds = costs.holds
    if n * length <= max_pointer_bytes:
        block = n
    else:  # rows per recomputed block: the budget, or the memory-balancing size if the budget is tiny
        balanced = math.isqrt(8 * (holds + 1) * n) + 1
        block = max(1, max_pointer_bytes // length, min(balanced, n))
    positions = np.empty(n, dtype=np.int64)
    snapshots: dict[int, np.ndarray] = {}
    if block >= n:
        pointers = np.zeros((n, length), np.uint8)
        state = _forward(costs, None, 0, n, pointers=pointers, progress=progress)
    else:
        state = _forward(costs, None, 0, n, snapshots=snapshots, block=block, progress=progress)
    # Ties: lowest final position, then fewest trailing holds.
    flat = int(np.argmin(state.T.ravel()))
    position, hold = divmod(flat, holds + 1)
    total_cost = float(state[hold, position])
    if not np.isfinite(total_cost):  # cannot happen: L >= N keeps plain playback feasible
        raise AssertionError("re-timing DP found no feasible path")
    starts = list(range(0, n, block))
    for start in reversed(starts):
        stop = min(start + block, n)
        if block < n:
            pointers = None  # release the previous block before allocating the next
            pointers = np.zeros((stop - start, length), np.uint8)
            _forward(costs, snapshots.get(start), start, stop, pointers=pointers)
        position, hold = _backtrack_block(pointers, start, stop, position, hold, positions)
    positions[0] = position
    return positions, total_cost
