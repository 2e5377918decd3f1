"""Speaker dataset (pure): pair 100 Hz audio features with mouth shapes by timestamps, split by clip, mouth PCA."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.signal

from services.runtime.canonical import mouth_opening_ratio
from services.runtime.errors import InvalidInput, NoFace

MOUTH_POINTS = 20
# audio.v1 features: 13 MFCCs, the log energy (natural log of the frame's mean power), then derivatives.
LOG_ENERGY_COLUMN = 13
SYNC_MAX_LAG_SECONDS = 0.25
SYNC_MIN_CORRELATION = 0.2
SYNC_MIN_SECONDS = 4.0
_SYNC_BAND_HZ = (1.0, 8.0)
_SYNC_DYNAMIC_RANGE = math.log(1e4)  # 40 dB of power below the loud level; quieter frames are clamped


@dataclass(frozen=True, eq=False)
class ClipTracks:
    """One training video of a speaker: its face analysis tracks and its audio features.

    Attributes:
        clip_id: stable name of the clip, e.g. "obama_clip1".
        timestamps: float64 [F], presentation time of each video frame in seconds (container origin).
        mouth_shapes: float32 [F, 20, 2], canonical mouth landmarks (points 48-67); NaN where no face.
        face_valid: bool [F], True where the frame has a face.
        features: float32 [T, D] audio features; row k is centred at feature_start_seconds + k / feature_rate.
        feature_start_seconds: time of feature row 0 (0.0125 s for 25 ms windows).
        feature_rate: feature rows per second (100).
    """

    clip_id: str
    timestamps: np.ndarray
    mouth_shapes: np.ndarray
    face_valid: np.ndarray
    features: np.ndarray
    feature_start_seconds: float = 0.0125
    feature_rate: float = 100.0


@dataclass(frozen=True)
class SyncOffset:
    """How far a clip's mouth trails its own audio, as measured (and corrected) before pairing.

    Recordings differ in audio-video offset: the three Obama clips of the sample data put the mouth 1 to 5
    frames ahead of the sound. Pairing them as they are teaches the model a blurred mixture of offsets,
    and its mouth then leads or trails held-out footage (a -3 frame lag and r 0.35 instead of 0 and 0.39
    on obama_weekly_720p, trained on clips 1 and 2).

    Attributes:
        seconds: > 0 the mouth moves after its sound, < 0 before it; the amount the pairing shifts.
        correlation: peak correlation of the band-passed mouth opening and log energy (NaN: not measured).
        applied: the shift was used (peak correlation >= SYNC_MIN_CORRELATION, inside the lag range).
    """

    seconds: float = 0.0
    correlation: float = math.nan
    applied: bool = False


@dataclass(frozen=True, eq=False)
class PairedClip:
    """Feature rows of one clip that fall inside runs of valid faces, with their interpolated shapes."""

    features: np.ndarray  # float32 [R, D]
    shapes: np.ndarray  # float32 [R, 20, 2]
    times: np.ndarray  # float64 [R]
    section_offsets: np.ndarray  # int64 [S + 1], row ranges of the sections within this clip
    dropped_rows: int


@dataclass(frozen=True, eq=False)
class MouthPCA:
    """Mean-centred PCA of mouth shapes flattened as (x48, y48, ..., x67, y67).

    Attributes:
        mean: float32 [40].
        components: float32 [K, 40], orthonormal rows, by decreasing variance.
        explained_variance: float32 [K], variance along each component.
        retained_variance: cumulative share of the total variance kept, in (0, 1].
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    retained_variance: float

    def project(self, shapes: np.ndarray) -> np.ndarray:
        """float32 [N, 20, 2] shapes -> float32 [N, K] coefficients."""
        flat = np.asarray(shapes, np.float64).reshape(len(shapes), 2 * MOUTH_POINTS)
        return ((flat - self.mean) @ self.components.T).astype(np.float32)

    def reconstruct(self, coefficients: np.ndarray) -> np.ndarray:
        """float [N, K] coefficients -> float32 [N, 20, 2] shapes."""
        flat = self.mean + np.asarray(coefficients, np.float64) @ self.components
        return flat.reshape(len(flat), MOUTH_POINTS, 2).astype(np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean.astype(np.float32),
            "components": self.components.astype(np.float32),
            "explained_variance": self.explained_variance.astype(np.float32),
            "retained_variance": np.float64(self.retained_variance),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> MouthPCA:
        return cls(
            arrays["mean"], arrays["components"], arrays["explained_variance"], float(arrays["retained_variance"])
        )


@dataclass(frozen=True, eq=False)
class SpeakerDataset:
    """Training pairs of a speaker; see face.v1.BuildSpeakerDatasetResult for the stored layout."""

    features: np.ndarray
    shapes: np.ndarray
    coefficients: np.ndarray
    times: np.ndarray
    section_offsets: np.ndarray
    section_clip: np.ndarray
    clip_ids: tuple[str, ...]
    is_validation: np.ndarray
    feature_mean: np.ndarray
    feature_std: np.ndarray
    pca: MouthPCA
    dropped_rows: int
    sync_offsets: tuple[SyncOffset, ...] = ()

    def rows_of(self, validation: bool) -> int:
        lengths = np.diff(self.section_offsets)
        return int(lengths[self.is_validation[self.section_clip] == validation].sum())

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "features": self.features,
            "shapes": self.shapes,
            "coefficients": self.coefficients,
            "times": self.times,
            "section_offsets": self.section_offsets,
            "section_clip": self.section_clip,
            "clip_ids": np.array(self.clip_ids, dtype=str),
            "is_validation": self.is_validation.astype(np.uint8),
            "feature_mean": self.feature_mean,
            "feature_std": self.feature_std,
            # Per clip: measured audio-to-mouth offset (s, > 0 = mouth behind), its peak correlation, applied.
            "clip_sync_offset_seconds": np.array([o.seconds for o in self.sync_offsets], np.float32),
            "clip_sync_correlation": np.array([o.correlation for o in self.sync_offsets], np.float32),
            "clip_sync_applied": np.array([o.applied for o in self.sync_offsets], np.uint8),
        }


def _check_clip(clip: ClipTracks) -> None:
    frames = len(clip.timestamps)
    if clip.mouth_shapes.shape != (frames, MOUTH_POINTS, 2):
        raise InvalidInput(
            f"clip {clip.clip_id}: mouth_shapes has shape {clip.mouth_shapes.shape}, "
            f"expected ({frames}, {MOUTH_POINTS}, 2)"
        )
    if clip.face_valid.shape != (frames,):
        raise InvalidInput(f"clip {clip.clip_id}: face_valid has shape {clip.face_valid.shape}, expected ({frames},)")
    if clip.features.ndim != 2 or clip.features.shape[0] == 0:
        raise InvalidInput(f"clip {clip.clip_id}: features must be [T, D] with T > 0, got {clip.features.shape}")
    if frames and np.any(np.diff(clip.timestamps) <= 0):
        raise InvalidInput(f"clip {clip.clip_id}: frame timestamps must strictly increase")
    if not clip.feature_rate > 0:
        raise InvalidInput(f"clip {clip.clip_id}: feature_rate must be > 0, got {clip.feature_rate}")


def pair_clip(clip: ClipTracks) -> PairedClip:
    """Feature rows whose time lies between two consecutive valid frames, with linearly interpolated shapes.

    A row is kept when the frames just before and after its time both have a face, so interpolation
    never bridges a no-face gap; runs of kept rows are sections (a gap or the clip end closes one).
    """
    _check_clip(clip)
    valid = clip.face_valid.astype(bool) & np.isfinite(clip.mouth_shapes).all(axis=(1, 2))
    times = clip.feature_start_seconds + np.arange(len(clip.features)) / clip.feature_rate
    ts = clip.timestamps
    if len(ts) < 2:
        empty = np.zeros((0,), np.int64)
        return PairedClip(
            clip.features[:0],
            np.zeros((0, MOUTH_POINTS, 2), np.float32),
            times[:0],
            np.zeros(1, np.int64) if empty.size == 0 else empty,
            len(times),
        )
    after = np.searchsorted(ts, times, side="right")  # index of the first frame later than t
    before = after - 1
    inside = (before >= 0) & (after < len(ts))
    exact_last = times == ts[-1]  # a row exactly on the last frame uses it alone
    before_clip = np.clip(before, 0, len(ts) - 1)
    after_clip = np.clip(after, 0, len(ts) - 1)
    keep = (inside & valid[before_clip] & valid[after_clip]) | (exact_last & valid[-1])
    rows = np.flatnonzero(keep)
    b, a = before_clip[rows], after_clip[rows]
    span = np.where(a > b, ts[a] - ts[b], 1.0)
    weight = np.where(a > b, (times[rows] - ts[b]) / span, 0.0)[:, None, None]
    shapes = (1 - weight) * clip.mouth_shapes[b] + weight * clip.mouth_shapes[a]
    breaks = np.flatnonzero(np.diff(rows) > 1) + 1
    offsets = np.concatenate([[0], breaks, [len(rows)]]).astype(np.int64) if len(rows) else np.zeros(1, np.int64)
    return PairedClip(
        clip.features[rows].astype(np.float32), shapes.astype(np.float32), times[rows], offsets, len(times) - len(rows)
    )


def estimate_sync_offset(
    clip: ClipTracks,
    *,
    max_lag_seconds: float = SYNC_MAX_LAG_SECONDS,
    min_correlation: float = SYNC_MIN_CORRELATION,
) -> SyncOffset:
    """The clip's audio-to-mouth offset: cross-correlation of mouth opening and loudness, both 1-8 Hz.

    Per 100 Hz feature row: the log energy (clamped 40 dB below its 99th percentile, so pauses add no
    variance) and the inner-lip opening over mouth width interpolated from the frames. Both are band-passed
    1-8 Hz (the syllable rate; zero phase), and the lag with the highest Pearson correlation wins; it is
    applied only with a clear peak (>= `min_correlation`, not at the end of the range). Clips shorter than
    SYNC_MIN_SECONDS of faces are not measured.

    Args:
        clip: one clip's tracks.
        max_lag_seconds: largest offset searched either way, > 0.
        min_correlation: peak correlation needed to apply the offset.

    Returns:
        The offset; `applied` False when not measurable or not clear (seconds then still reports the peak).
    """
    if not max_lag_seconds > 0:
        raise InvalidInput(f"max_lag_seconds must be > 0, got {max_lag_seconds}")
    _check_clip(clip)
    valid = clip.face_valid.astype(bool) & np.isfinite(clip.mouth_shapes).all(axis=(1, 2))
    features = np.asarray(clip.features, np.float64)
    rate = float(clip.feature_rate)
    if features.ndim != 2 or features.shape[1] <= LOG_ENERGY_COLUMN or valid.sum() < 2:
        return SyncOffset()
    times = clip.feature_start_seconds + np.arange(len(features)) / rate
    ts = np.asarray(clip.timestamps, np.float64)
    inside = (times >= ts[valid][0]) & (times <= ts[valid][-1])
    if inside.sum() < SYNC_MIN_SECONDS * rate:
        return SyncOffset()
    opening = np.interp(times[inside], ts[valid], mouth_opening_ratio(clip.mouth_shapes[valid]))
    energy = features[inside, LOG_ENERGY_COLUMN]
    energy = np.maximum(energy, np.percentile(energy, 99) - _SYNC_DYNAMIC_RANGE)
    band = scipy.signal.butter(2, _SYNC_BAND_HZ, btype="band", fs=rate, output="sos")
    audio = scipy.signal.sosfiltfilt(band, energy)
    mouth = scipy.signal.sosfiltfilt(band, opening)
    max_lag = max(1, round(max_lag_seconds * rate))
    lags = np.arange(-max_lag, max_lag + 1)
    scores = np.full(len(lags), -np.inf)
    for i, lag in enumerate(lags):  # the mouth at row j + lag against the audio at row j
        a = audio[max(0, -lag) : len(audio) - max(0, lag)]
        m = mouth[max(0, lag) : len(mouth) - max(0, -lag)]
        if len(a) > 2 and a.std() > 0 and m.std() > 0:
            scores[i] = float(np.corrcoef(a, m)[0, 1])
    best = int(np.argmax(scores))
    if not np.isfinite(scores[best]):
        return SyncOffset()
    clear = scores[best] >= min_correlation and 0 < best < len(lags) - 1
    return SyncOffset(float(lags[best] / rate), float(scores[best]), bool(clear))


def align_clip(clip: ClipTracks, offset: SyncOffset) -> ClipTracks:
    """The clip with its feature rows re-timed by an applied offset, so pairing puts each sound on its mouth."""
    if not offset.applied:
        return clip
    return dataclasses.replace(clip, feature_start_seconds=clip.feature_start_seconds + offset.seconds)


def fit_mouth_pca(shapes: np.ndarray, *, retained_variance: float = 0.99, max_components: int = 0) -> MouthPCA:
    """Mean-centred PCA of float [N, 20, 2] shapes keeping the fewest components reaching `retained_variance`."""
    if not 0 < retained_variance <= 1:
        raise InvalidInput(f"retained_variance must be in (0, 1], got {retained_variance}")
    if max_components < 0:
        raise InvalidInput(f"max_components must be >= 0, got {max_components}")
    flat = np.asarray(shapes, np.float64).reshape(-1, 2 * MOUTH_POINTS)
    if len(flat) < 2:
        raise InvalidInput(f"a mouth PCA needs at least 2 shapes, got {len(flat)}")
    mean = flat.mean(axis=0)
    _, singular, vt = np.linalg.svd(flat - mean, full_matrices=False)
    variance = singular**2 / (len(flat) - 1)
    total = variance.sum()
    if total <= 0:
        raise InvalidInput("mouth shapes do not vary: no PCA can be fitted")
    cumulative = np.cumsum(variance) / total
    keep = int(np.searchsorted(cumulative, retained_variance - 1e-12) + 1)
    keep = min(keep, len(variance), max_components or len(variance))
    return MouthPCA(
        mean.astype(np.float32),
        vt[:keep].astype(np.float32),
        variance[:keep].astype(np.float32),
        float(cumulative[keep - 1]),
    )


def choose_validation(
    clip_ids: Sequence[str],
    *,
    validation_clip_ids: Sequence[str] = (),
    validation_fraction: float = 0.2,
    seed: int = 42,
) -> np.ndarray:
    """bool [C]: which whole clips are held out (named ones, else a seeded draw; never the only clip)."""
    if validation_clip_ids:
        unknown = sorted(set(validation_clip_ids) - set(clip_ids))
        if unknown:
            raise InvalidInput(f"validation clips {unknown} are not among the clips {list(clip_ids)}")
        chosen = np.array([cid in set(validation_clip_ids) for cid in clip_ids])
        if chosen.all():
            raise InvalidInput("every clip is marked for validation: none is left to train on")
        return chosen
    if not 0 <= validation_fraction < 1:
        raise InvalidInput(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    count = len(clip_ids)
    n_validation = 0
    if count >= 2 and validation_fraction > 0:
        n_validation = max(1, math.floor(count * validation_fraction))
    chosen = np.zeros(count, bool)
    chosen[np.random.default_rng(seed).permutation(count)[:n_validation]] = True
    return chosen


def build_speaker_dataset(
    clips: Sequence[ClipTracks],
    *,
    validation_clip_ids: Sequence[str] = (),
    validation_fraction: float = 0.2,
    seed: int = 42,
    retained_variance: float = 0.99,
    max_components: int = 0,
    sync_correction: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> SpeakerDataset:
    """Pair each clip, split by whole clips, fit the mouth PCA on training frames, and normalise statistics.

    With `sync_correction` each clip's audio-to-mouth offset is measured (`estimate_sync_offset`) and, where
    clear, removed before pairing, so every clip teaches the same timing (the mouth on its own sound).

    Raises:
        InvalidInput: no clips, duplicate clip ids, inconsistent shapes or feature widths.
        NoFace: no clip has any feature row inside a run of valid faces.
    """
    if not clips:
        raise InvalidInput("a speaker dataset needs at least one clip")
    clip_ids = tuple(clip.clip_id for clip in clips)
    if len(set(clip_ids)) != len(clip_ids):
        raise InvalidInput(f"clip ids must be unique, got {list(clip_ids)}")
    widths = {clip.features.shape[1] if clip.features.ndim == 2 else -1 for clip in clips}
    if len(widths) != 1:
        raise InvalidInput(f"clips have different feature widths {sorted(widths)}")
    is_validation = choose_validation(
        clip_ids, validation_clip_ids=validation_clip_ids, validation_fraction=validation_fraction, seed=seed
    )
    sync_offsets = tuple(estimate_sync_offset(clip) if sync_correction else SyncOffset() for clip in clips)
    paired: list[PairedClip] = []
    for index, clip in enumerate(clips):
        paired.append(pair_clip(align_clip(clip, sync_offsets[index])))
        if progress:
            progress(index + 1, len(clips))
    if sum(len(p.times) for p in paired) == 0:
        raise NoFace("no feature frame of any clip lies within a run of frames with a face")
    train = [p for p, held_out in zip(paired, is_validation, strict=True) if not held_out]
    train_shapes = [
        clip.mouth_shapes[clip.face_valid.astype(bool)]
        for clip, held_out in zip(clips, is_validation, strict=True)
        if not held_out
    ]
    train_shapes = np.concatenate(train_shapes) if train_shapes else np.zeros((0, MOUTH_POINTS, 2))
    train_shapes = train_shapes[np.isfinite(train_shapes).all(axis=(1, 2))]
    if sum(len(p.times) for p in train) == 0:
        raise NoFace("the training clips have no feature frame within a run of frames with a face")
    pca = fit_mouth_pca(train_shapes, retained_variance=retained_variance, max_components=max_components)

    sections, section_clip, offset = [0], [], 0
    for index, p in enumerate(paired):
        for length in np.diff(p.section_offsets):
            offset += int(length)
            sections.append(offset)
            section_clip.append(index)
    features = np.concatenate([p.features for p in paired])
    shapes = np.concatenate([p.shapes for p in paired])
    train_features = np.concatenate([p.features for p in train])
    std = train_features.std(axis=0)
    return SpeakerDataset(
        features=features,
        shapes=shapes,
        coefficients=pca.project(shapes),
        times=np.concatenate([p.times for p in paired]),
        section_offsets=np.asarray(sections, np.int64),
        section_clip=np.asarray(section_clip, np.int32),
        clip_ids=clip_ids,
        is_validation=is_validation,
        feature_mean=train_features.mean(axis=0).astype(np.float32),
        # A constant feature (e.g. digital silence everywhere) must not divide by zero downstream.
        feature_std=np.where(std > 1e-8, std, 1.0).astype(np.float32),
        pca=pca,
        dropped_rows=sum(p.dropped_rows for p in paired),
        sync_offsets=sync_offsets,
    )
