"""Speaker dataset: pairing by timestamps, sections at no-face gaps, clip-wise split, mean-centred PCA."""

import numpy as np
import pytest

from services.face.dataset import (
    ClipTracks,
    MouthPCA,
    SyncOffset,
    build_speaker_dataset,
    choose_validation,
    estimate_sync_offset,
    fit_mouth_pca,
    pair_clip,
)
from services.runtime.canonical import mouth_opening_ratio
from services.runtime.errors import InvalidInput, NoFace

FPS = 30000 / 1001


def make_clip(clip_id="c1", seconds=3.0, fps=FPS, invalid=(), seed=0, latent=3):
    """Mouth shapes that move linearly in time plus a few latent modes; features at 100 Hz."""
    rng = np.random.default_rng(seed)
    frames = int(seconds * fps)
    timestamps = np.arange(frames) / fps
    basis = rng.standard_normal((latent, 40))
    weights = np.stack([np.sin(2 * np.pi * (k + 1) * 0.7 * timestamps) for k in range(latent)], axis=1)
    shapes = (0.5 + 0.01 * weights @ basis).reshape(frames, 20, 2).astype(np.float32)
    valid = np.ones(frames, bool)
    valid[list(invalid)] = False
    shapes[~valid] = np.nan
    features = rng.standard_normal((int(seconds * 100), 28)).astype(np.float32)
    return ClipTracks(clip_id, timestamps, shapes, valid, features)


def test_rows_get_shapes_interpolated_by_time_not_by_index():
    timestamps = np.array([0.0, 0.1, 0.2, 0.3])
    shapes = np.zeros((4, 20, 2), np.float32)
    shapes[:, :, 0] = (timestamps * 10)[:, None]  # x = 10 * t: linear, so interpolation is exact
    clip = ClipTracks("c", timestamps, shapes, np.ones(4, bool), np.zeros((40, 28), np.float32))
    paired = pair_clip(clip)
    np.testing.assert_allclose(paired.shapes[:, 0, 0], paired.times * 10, atol=1e-5)
    assert paired.times[0] == pytest.approx(0.0125) and paired.times[-1] <= 0.3
    assert paired.dropped_rows == 40 - len(paired.times)


def test_no_face_gaps_split_sections_and_are_never_bridged():
    clip = make_clip(invalid=range(30, 45))
    paired = pair_clip(clip)
    assert len(paired.section_offsets) == 3  # two sections
    gap_start, gap_end = clip.timestamps[29], clip.timestamps[45]
    assert not np.any((paired.times > gap_start) & (paired.times < gap_end))
    assert np.isfinite(paired.shapes).all()


def test_pca_is_mean_centred_and_keeps_the_latent_modes():
    clip = make_clip(latent=3)
    pca = fit_mouth_pca(clip.mouth_shapes, retained_variance=0.99)
    assert len(pca.components) == 3
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(3), atol=1e-5)
    coefficients = pca.project(clip.mouth_shapes)
    np.testing.assert_allclose(coefficients.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(pca.reconstruct(coefficients), clip.mouth_shapes, atol=1e-5)
    assert pca.retained_variance >= 0.99
    assert len(fit_mouth_pca(clip.mouth_shapes, max_components=2).components) == 2
    restored = MouthPCA.from_arrays(pca.arrays())
    np.testing.assert_array_equal(restored.components, pca.components)


def test_validation_is_whole_clips():
    ids = ["a", "b", "c", "d", "e"]
    assert choose_validation(ids, validation_fraction=0.2).sum() == 1
    assert choose_validation(ids, validation_fraction=0.2, seed=1).sum() == 1
    assert choose_validation(["only"], validation_fraction=0.5).sum() == 0
    assert list(choose_validation(ids, validation_clip_ids=["b", "e"])) == [False, True, False, False, True]
    with pytest.raises(InvalidInput, match="not among the clips"):
        choose_validation(ids, validation_clip_ids=["z"])
    with pytest.raises(InvalidInput, match="none is left"):
        choose_validation(["a"], validation_clip_ids=["a"])


def test_dataset_of_two_clips():
    clips = [make_clip("train", seed=1), make_clip("held_out", seed=2, invalid=range(10, 20))]
    progress = []
    dataset = build_speaker_dataset(
        clips, validation_clip_ids=["held_out"], progress=lambda done, total: progress.append((done, total))
    )
    assert progress == [(1, 2), (2, 2)]
    assert dataset.clip_ids == ("train", "held_out")
    assert list(dataset.is_validation) == [False, True]
    assert dataset.rows_of(validation=False) + dataset.rows_of(validation=True) == len(dataset.features)
    assert dataset.section_offsets[-1] == len(dataset.features)
    assert list(dataset.section_clip) == [0, 1, 1]
    train_rows = dataset.features[: dataset.rows_of(validation=False)]
    np.testing.assert_allclose(dataset.feature_mean, train_rows.mean(axis=0), atol=1e-5)
    assert dataset.coefficients.shape == (len(dataset.features), len(dataset.pca.components))
    assert set(dataset.arrays()) >= {
        "features",
        "shapes",
        "coefficients",
        "times",
        "section_offsets",
        "section_clip",
        "clip_ids",
        "is_validation",
        "feature_mean",
        "feature_std",
    }


def test_bad_inputs():
    clip = make_clip()
    with pytest.raises(InvalidInput, match="at least one clip"):
        build_speaker_dataset([])
    with pytest.raises(InvalidInput, match="unique"):
        build_speaker_dataset([clip, clip])
    wrong = ClipTracks("w", clip.timestamps, clip.mouth_shapes[:, :10], clip.face_valid, clip.features)
    with pytest.raises(InvalidInput, match="mouth_shapes has shape"):
        build_speaker_dataset([wrong])
    faceless = make_clip(invalid=range(int(3 * FPS)))
    with pytest.raises(NoFace):
        build_speaker_dataset([faceless])
    with pytest.raises(InvalidInput, match="retained_variance"):
        fit_mouth_pca(clip.mouth_shapes, retained_variance=1.5)


# ---------------------------------------------------------------------- audio-to-mouth offset


def talking_clip(mouth_lag_seconds, *, seconds=12.0, fps=25.0, seed=3, clip_id="talk"):
    """A clip whose mouth opening follows its loudness (syllable-rate envelope) `mouth_lag_seconds` later."""
    rng = np.random.default_rng(seed)
    rates = rng.uniform(2.0, 6.0, 6)
    phases = rng.uniform(0, 2 * np.pi, 6)

    def envelope(t):
        return np.sin(2 * np.pi * rates[:, None] * t[None, :] + phases[:, None]).sum(axis=0)

    feature_times = 0.0125 + np.arange(int(seconds * 100)) / 100
    features = rng.standard_normal((len(feature_times), 28)).astype(np.float32) * 0.1
    features[:, 13] = envelope(feature_times)
    timestamps = np.arange(int(seconds * fps)) / fps
    opening = 0.15 + 0.02 * envelope(timestamps - mouth_lag_seconds)
    shapes = np.zeros((len(timestamps), 20, 2), np.float32)
    shapes[:, :, 0] = np.linspace(0.33, 0.67, 20)[None]
    shapes[:, 0, 0], shapes[:, 6, 0] = 0.33, 0.67  # the corners: a mouth 0.34 wide
    shapes[:, :, 1] = 0.75
    shapes[:, [19, 18, 17], 1] = 0.75 + opening[:, None] * 0.34  # lower inner lip: opening x mouth width
    return ClipTracks(clip_id, timestamps, shapes, np.ones(len(timestamps), bool), features)


@pytest.mark.parametrize("lag_frames", [-4, -1, 0, 3])
def test_the_audio_to_mouth_offset_is_measured(lag_frames):
    offset = estimate_sync_offset(talking_clip(lag_frames / 25.0))
    assert offset.applied and offset.correlation > 0.9
    assert offset.seconds == pytest.approx(lag_frames / 25.0, abs=0.015)


def test_an_offset_without_a_clear_peak_or_too_short_is_not_applied():
    noisy = make_clip(seconds=12.0)  # mouth and loudness unrelated
    assert not estimate_sync_offset(noisy).applied
    short = talking_clip(0.1, seconds=3.0)
    assert estimate_sync_offset(short) == SyncOffset()
    with pytest.raises(InvalidInput, match="max_lag_seconds"):
        estimate_sync_offset(short, max_lag_seconds=0)


def test_the_dataset_removes_each_clips_offset_before_pairing():
    """Two clips 160 ms apart in offset end up paired alike: loudness on its own mouth opening."""
    clips = [talking_clip(-0.16, clip_id="early", seed=1), talking_clip(0.0, clip_id="synced", seed=2)]
    corrected = build_speaker_dataset(clips)
    plain = build_speaker_dataset(clips, sync_correction=False)
    arrays = corrected.arrays()
    np.testing.assert_allclose(arrays["clip_sync_offset_seconds"], [-0.16, 0.0], atol=0.015)
    assert arrays["clip_sync_applied"].tolist() == [1, 1]
    assert plain.arrays()["clip_sync_applied"].tolist() == [0, 0]

    def lag0_correlation(dataset, clip):
        rows = slice(dataset.section_offsets[clip], dataset.section_offsets[clip + 1])
        opening = mouth_opening_ratio(dataset.shapes[rows])
        return np.corrcoef(dataset.features[rows, 13], opening)[0, 1]

    assert lag0_correlation(corrected, 0) > 0.95
    assert lag0_correlation(plain, 0) < 0.8
