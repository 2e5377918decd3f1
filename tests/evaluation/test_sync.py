"""The sync estimator on synthetic signals with known lags: the cross-correlation, the audio envelope, bad inputs."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d

from evaluation.sync import (
    audio_visual_sync,
    cross_correlation,
    frame_energy_db,
    modulation_band,
    shift_samples,
)
from services.runtime.errors import InvalidInput

FPS = 30.0
RATE = 16000


def speech_like_opening(frames: int, *, seed: int) -> np.ndarray:
    """A positive mouth-opening series with syllable-rate (2-6 Hz) bursts, like speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / FPS
    syllables = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 2 * np.pi)), 0, None)
    phrases = gaussian_filter1d(rng.standard_normal(frames), 4.0)
    return syllables * (1.0 + 0.5 * np.tanh(3 * phrases)) + 0.02 * rng.random(frames)


def shifted(series: np.ndarray, k: int) -> np.ndarray:
    """out[j] = series[j + k] (edges held): a mouth at frame i + k goes with this signal at frame i."""
    index = np.clip(np.arange(series.size) + k, 0, series.size - 1)
    return series[index]


@pytest.mark.parametrize("k", [-7, -3, -1, 0, 2, 5, 12])
def test_a_sine_modulated_opening_against_a_shifted_envelope_gives_that_lag(k):
    opening = speech_like_opening(600, seed=1)
    result = cross_correlation(opening, shifted(opening, k), fps=FPS, max_lag=15)
    assert result.lag_frames == k
    assert result.lag_ms == pytest.approx(k * 1000 / FPS)
    assert result.peak_correlation > 0.95
    assert result.lag_refined_frames == pytest.approx(k, abs=0.5)
    assert result.confidence > 0.5
    assert result.lags.tolist() == list(range(-15, 16))
    assert result.at_edge is False


@pytest.mark.parametrize("k", [-4, 3])
def test_a_noise_modulated_opening_with_noise_added_still_gives_the_lag(k):
    rng = np.random.default_rng(7)
    opening = gaussian_filter1d(rng.standard_normal(900), 1.5)
    envelope = shifted(opening, k) + 0.5 * opening.std() * rng.standard_normal(900)
    result = cross_correlation(opening, envelope, fps=FPS, max_lag=15)
    assert result.lag_frames == k
    assert 0.5 < result.peak_correlation < 0.99


def test_invalid_frames_are_left_out_of_the_correlation():
    opening = speech_like_opening(600, seed=2)
    envelope = shifted(opening, 3)
    corrupted = opening.copy()
    corrupted[100:160] = 50.0  # garbage where there is no face
    valid = np.ones(600, bool)
    valid[100:160] = False
    assert cross_correlation(corrupted, envelope, fps=FPS, valid=valid).lag_frames == 3
    assert cross_correlation(corrupted, envelope, fps=FPS, valid=valid).frames_used == 540


def test_a_peak_beyond_the_range_is_flagged_at_the_edge():
    opening = gaussian_filter1d(np.random.default_rng(3).standard_normal(600), 1.5)  # aperiodic: no alias peak
    result = cross_correlation(opening, shifted(opening, 9), fps=FPS, max_lag=5)
    assert result.at_edge and result.lag_frames == 5


@pytest.mark.parametrize("k", [-5, -2, 2, 5])
def test_audio_modulated_by_the_mouth_gives_the_lag_through_the_envelope(k):
    """Noise carrying the mouth opening as its amplitude, delayed by k frames: the full estimator finds k."""
    frames = 450
    opening = speech_like_opening(frames, seed=4)
    times = np.arange(frames) / FPS
    samples_t = np.arange(int(frames / FPS * RATE)) / RATE
    # The audio at time t carries the mouth of time t + k / fps: video behind the audio by k frames.
    amplitude = np.interp(samples_t + k / FPS, times + 0.5 / FPS, opening)
    rng = np.random.default_rng(5)
    samples = (0.3 * amplitude * rng.standard_normal(samples_t.size)).astype(np.float32)
    result, envelope = audio_visual_sync(opening, np.ones(frames, bool), samples, times, fps=FPS)
    assert result.lag_frames == k
    assert result.peak_correlation > 0.8
    assert envelope.shape == (frames,)


def test_shifting_the_audio_moves_the_lag_by_the_shift():
    frames = 450
    opening = speech_like_opening(frames, seed=6)
    times = np.arange(frames) / FPS
    samples_t = np.arange(int(frames / FPS * RATE)) / RATE
    amplitude = np.interp(samples_t, times + 0.5 / FPS, opening)
    samples = (0.3 * amplitude * np.random.default_rng(8).standard_normal(samples_t.size)).astype(np.float32)
    base, _ = audio_visual_sync(opening, np.ones(frames, bool), samples, times, fps=FPS)
    assert base.lag_frames == 0
    for s in (-5, -2, 2, 5):
        moved, _ = audio_visual_sync(opening, np.ones(frames, bool), shift_samples(samples, s, fps=FPS), times, fps=FPS)
        assert moved.lag_frames == -s  # delaying the audio puts the video ahead of it


def test_shift_samples_delays_and_advances_by_whole_frames():
    x = np.arange(16000, dtype=np.float32)
    delayed = shift_samples(x, 3, fps=FPS)
    assert delayed[:1600].tolist() == [0.0] * 1600 and delayed[1600] == 0.0 and delayed[1601] == 1.0
    advanced = shift_samples(x, -3, fps=FPS)
    assert advanced[0] == 1600.0 and advanced[-1600:].tolist() == [0.0] * 1600
    assert delayed.shape == x.shape and delayed.dtype == x.dtype
    with pytest.raises(InvalidInput, match="longer than the audio"):
        shift_samples(x, 40, fps=FPS)


def test_energy_envelope_follows_loudness_in_the_band_and_clamps_silence():
    times = np.arange(60) / FPS
    rng = np.random.default_rng(0)
    samples = np.zeros(2 * RATE, np.float32)
    samples[RATE // 2 : RATE] = 0.1 * rng.standard_normal(RATE // 2)  # 0.5-1.0 s loud, else digital silence
    levels, covered = frame_energy_db(samples, times, fps=FPS)
    loud = levels[20:28]  # frames well inside 0.5-1.0 s
    assert loud.min() > levels[:10].max() + 30
    assert levels[:10] == pytest.approx(np.full(10, levels.max() - 40.0), abs=1.0)  # clamped 40 dB down
    assert covered.all()
    _, covered_short = frame_energy_db(samples[: RATE // 2], times, fps=FPS)
    assert covered_short.sum() == 15  # frames 0..14 end by 0.5 s


def test_a_tone_outside_the_band_does_not_count():
    times = np.arange(30) / FPS
    t = np.arange(RATE) / RATE
    low_tone = (0.5 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    band_tone = (0.5 * np.sin(2 * np.pi * 1500 * t)).astype(np.float32)
    low, _ = frame_energy_db(low_tone, times, fps=FPS, dynamic_range_db=200)
    band, _ = frame_energy_db(band_tone, times, fps=FPS, dynamic_range_db=200)
    assert np.median(band) - np.median(low) > 40  # Hann leakage of 200 Hz into 800-3000 Hz is far below


def test_modulation_band_removes_slow_drift_without_shifting():
    t = np.arange(600) / FPS
    syllables = np.sin(2 * np.pi * 4 * t)
    filtered = modulation_band(syllables + 5 * t, FPS)  # a linear drift on top
    core = slice(100, 500)
    assert np.corrcoef(filtered[core], syllables[core])[0, 1] > 0.99
    assert abs(filtered[core].mean()) < 0.05


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cross_correlation(np.zeros(100), np.zeros(99), fps=FPS), "one length"),
        (lambda: cross_correlation(np.zeros((10, 2)), np.zeros((10, 2)), fps=FPS), "1-D"),
        (lambda: cross_correlation(np.random.rand(20), np.random.rand(20), fps=FPS), "only 20 valid frames"),
        (lambda: cross_correlation(np.random.rand(100), np.random.rand(100), fps=FPS, max_lag=0), "max_lag"),
        (lambda: cross_correlation(np.random.rand(100), np.random.rand(100), fps=0), "fps"),
        (lambda: cross_correlation(np.full(100, np.nan), np.random.rand(100), fps=FPS), "finite"),
        (lambda: cross_correlation(np.ones(100), np.random.rand(100), fps=FPS), "constant"),
        (lambda: frame_energy_db(np.zeros(0), np.arange(3.0), fps=FPS), "non-empty"),
        (lambda: frame_energy_db(np.zeros(100), np.array([0.0, 0.0]), fps=FPS), "increase"),
        (lambda: frame_energy_db(np.zeros(100), np.arange(3.0), fps=FPS, band_hz=(3000, 800)), "band_hz"),
        (lambda: frame_energy_db(np.zeros(1000), np.array([5.0, 6.0]), fps=FPS), "no video frame"),
        (lambda: modulation_band(np.random.rand(10), FPS), "too short"),
        (lambda: modulation_band(np.random.rand(100), 1.5), "too low"),
        (
            lambda: audio_visual_sync(np.zeros(50), np.ones(40, bool), np.zeros(1000), np.arange(50) / FPS, fps=FPS),
            "face_valid",
        ),
        (
            lambda: audio_visual_sync(np.zeros(50), np.zeros(50, bool), np.zeros(1000), np.arange(50) / FPS, fps=FPS),
            "frames with a face",
        ),
    ],
)
def test_bad_inputs_raise_invalid_input_naming_the_problem(call, message):
    with pytest.raises(InvalidInput, match=message):
        call()
