"""The lipsync core: delay removed exactly once, chunk seams invisible, timestamps right, silence closes the mouth."""

from fractions import Fraction

import numpy as np
import pytest

from services.lipsync import core
from services.runtime.errors import InvalidInput

DELAY = 20


def delayed_model(weights: np.ndarray, *, delay: int = DELAY, memory: float = 0.0):
    """A causal stand-in for the LSTM: output row i = weights . x[i - delay] (+ a decaying state)."""

    def run(x: np.ndarray) -> np.ndarray:
        shifted = np.zeros_like(x)
        shifted[delay:] = x[: len(x) - delay] if delay else x
        out = shifted @ weights
        if memory:
            state = np.zeros(weights.shape[1])
            for i in range(len(out)):  # an IIR "state" that starts at zero like the LSTM's
                state = memory * state + out[i]
                out[i] = state
        return out.astype(np.float32)

    return run


def test_an_impulse_comes_out_at_its_own_time():
    features = np.zeros((500, 28), np.float32)
    features[237, 0] = 5.0
    rows = core.predict_rows(features, delayed_model(np.eye(28, 4)), delay=DELAY)
    change = np.abs(np.diff(rows[:, 0], prepend=0))
    assert rows.shape == (500, 4)
    assert int(np.argmax(np.abs(rows[:, 0]))) == 237  # no constant offset: the delay is removed once
    assert change[:200].max() == 0  # no garbage at the start


def test_output_frames_sample_the_rows_at_their_presentation_times():
    rows = np.arange(1000, dtype=np.float32)[:, None]  # value = row index
    times = core.output_frame_times(300, Fraction(30000, 1001))
    frames = core.resample(rows, start_seconds=0.0125, rate=100.0, times=times)
    expected = np.clip((times - 0.0125) * 100, 0, 999)
    np.testing.assert_allclose(frames[:, 0], expected, atol=1e-3)
    assert times[1] == pytest.approx(1001 / 30000)


def test_impulse_time_survives_to_the_output_frame():
    features = np.zeros((400, 28), np.float32)
    features[146:155, 0] = np.hanning(9)  # a 90 ms pulse peaking at row 150: 0.0125 + 1.5 s
    rows = core.predict_rows(features, delayed_model(np.eye(28, 2)), delay=DELAY)
    times = core.output_frame_times(120, Fraction(30))
    frames = core.resample(rows, start_seconds=0.0125, rate=100.0, times=times)
    peak_frame = int(np.argmax(frames[:, 0]))
    assert abs(times[peak_frame] - 1.5125) <= 1 / 30  # within one output frame


@pytest.mark.parametrize(("chunk", "overlap"), [(300, 200), (500, 120), (3000, 200)])
def test_chunked_and_unchunked_agree(chunk, overlap):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2345, 28)).astype(np.float32)
    model = delayed_model(rng.standard_normal((28, 6)) * 0.1, memory=0.8)
    whole = core.predict_rows(features, model, delay=DELAY, chunk_rows=10_000, overlap_rows=200)
    chunked = core.predict_rows(features, model, delay=DELAY, chunk_rows=chunk, overlap_rows=overlap)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)


def test_chunks_tile_the_rows_exactly_once():
    chunks = core.plan_chunks(1000, delay=DELAY, chunk_rows=300, overlap_rows=100)
    kept = np.concatenate([np.arange(c.keep_start, c.keep_stop) for c in chunks])
    np.testing.assert_array_equal(kept, np.arange(1000))
    assert all(c.input_stop == c.keep_stop + DELAY for c in chunks)


def test_bad_chunking_and_features():
    with pytest.raises(InvalidInput, match="overlap"):
        core.plan_chunks(100, delay=DELAY, overlap_rows=20)
    with pytest.raises(InvalidInput, match="no feature rows"):
        core.plan_chunks(0, delay=DELAY)
    with pytest.raises(InvalidInput, match=r"\[T, 28\]"):
        core.predict_rows(np.zeros((10, 13)), delayed_model(np.eye(28, 2)), delay=DELAY)
    with pytest.raises(InvalidInput, match="NaN"):
        core.predict_rows(np.full((10, 28), np.nan), delayed_model(np.eye(28, 2)), delay=DELAY)


def test_pca_reconstruction_and_frame_count():
    rng = np.random.default_rng(1)
    components = np.linalg.qr(rng.standard_normal((40, 3)))[0].T
    mean = rng.standard_normal(40)
    coefficients = rng.standard_normal((7, 3))
    shapes = core.shapes_from_coefficients(coefficients, mean, components)
    assert shapes.shape == (7, 20, 2)
    np.testing.assert_allclose((shapes.reshape(7, 40) - mean) @ components.T, coefficients, atol=1e-5)
    assert core.default_frame_count(400, 100.0, Fraction(30000, 1001)) == 120
    assert core.default_frame_count(400, 100.0, Fraction(25)) == 100


def test_silence_closes_the_mouth_with_a_ramp():
    rest = np.zeros((20, 2), np.float32)
    rest[13:16, 1] = -1.0  # upper inner lip
    rest[17:20, 1] = 1.0  # lower inner lip
    open_mouth = np.repeat(rest[None], 90, axis=0)
    activity = np.zeros(300, np.uint8)
    activity[100:200] = 1  # speech from 1 s to 2 s at 100 Hz
    times = core.output_frame_times(90, Fraction(30))
    weights = core.silence_weights(activity, activity_rate=100.0, times=times, ramp_seconds=0.1)
    blended = core.blend_silence(open_mouth, weights, rest)
    opening = blended[:, 19, 1] - blended[:, 13, 1]
    assert opening[10] == pytest.approx(0, abs=1e-3) and opening[80] == pytest.approx(0, abs=1e-3)
    assert opening[45] == pytest.approx(2.0, abs=1e-3)
    assert np.all(np.diff(opening[20:45]) >= -1e-6)  # opens smoothly, no jump


def test_amplitude_normalisation_brings_a_hesitant_mouth_up_to_the_speakers_spread():
    mean = np.zeros((20, 2))
    mean[:, 0] = np.linspace(0.33, 0.67, 20)
    mean[0, 0], mean[6, 0] = 0.33, 0.67
    mean[[19, 18, 17], 0] = mean[[13, 14, 15], 0]
    mean[[19, 18, 17], 1] = 0.05  # lips apart: the opening stays positive
    component = np.zeros((20, 2))
    component[[17, 18, 19], 1] = 1.0
    components = component.reshape(1, 40) / np.linalg.norm(component)
    coefficients = np.random.default_rng(0).standard_normal((300, 1)) * 0.01
    opening = core.mouth_opening_ratio(core.shapes_from_coefficients(coefficients, mean.reshape(40), components))
    spread = float(opening.std())
    scaled, gain = core.normalise_amplitude(
        coefficients, mean.reshape(40), components, reference_std=1.5 * spread, max_gain=2.0
    )
    assert gain == pytest.approx(1.5, rel=1e-3)
    closed = opening <= np.percentile(opening, core.CLOSED_ANCHOR_PERCENTILE)
    anchor = coefficients[closed].mean(axis=0)  # the scaling pivots on the prediction's most closed mouth
    np.testing.assert_allclose(scaled, anchor + 1.5 * (coefficients - anchor), rtol=1e-5)
    _, capped = core.normalise_amplitude(
        coefficients, mean.reshape(40), components, reference_std=9 * spread, max_gain=1.3
    )
    assert capped == 1.3
    _, off_by_default = core.normalise_amplitude(coefficients, mean.reshape(40), components, reference_std=9 * spread)
    assert off_by_default == 1.0
    _, never_damps = core.normalise_amplitude(coefficients, mean.reshape(40), components, reference_std=spread / 2)
    assert never_damps == 1.0
    pauses = np.concatenate([np.zeros((300, 1)), coefficients])  # a still mouth in a pause
    _, with_pauses = core.normalise_amplitude(
        pauses, mean.reshape(40), components, reference_std=1.5 * spread, max_gain=3.0
    )
    all_frames = core.mouth_opening_ratio(core.shapes_from_coefficients(pauses, mean.reshape(40), components))
    assert with_pauses == pytest.approx(1.5 * spread / all_frames.std(), rel=1e-3)  # pauses count, as in the card
    unchanged, none = core.normalise_amplitude(coefficients, mean.reshape(40), components, reference_std=0.0)
    assert none == 1.0 and np.allclose(unchanged, coefficients)
    with pytest.raises(InvalidInput, match="max_amplitude_gain"):
        core.normalise_amplitude(coefficients, mean.reshape(40), components, reference_std=spread, max_gain=0.5)


def test_amplitude_normalisation_keeps_closures_closed_and_opens_the_open_mouths_further():
    """Scaled about the mean mouth, a mouth the model closed would be pushed past closed (crossed lips)."""
    mean = np.zeros((20, 2))
    mean[:, 0] = np.linspace(0.33, 0.67, 20)
    mean[0, 0], mean[6, 0] = 0.33, 0.67
    mean[[19, 18, 17], 0] = mean[[13, 14, 15], 0]
    mean[[19, 18, 17], 1] = 0.05  # the mean mouth is half open
    component = np.zeros((20, 2))
    component[[17, 18, 19], 1] = 1.0
    components = component.reshape(1, 40) / np.linalg.norm(component)
    gap_per_unit = float(components[0, 2 * 19 + 1])
    # a mouth that closes (gap 0) in a fifth of the frames and opens up to twice the mean gap elsewhere
    gaps = np.concatenate([np.zeros(60), np.linspace(0.02, 0.1, 240)])
    coefficients = ((gaps - 0.05) / gap_per_unit)[:, None]
    shapes = core.shapes_from_coefficients(coefficients, mean.reshape(40), components)
    spread = float(core.mouth_opening_ratio(shapes).std())
    scaled, gain = core.normalise_amplitude(
        coefficients, mean.reshape(40), components, reference_std=1.3 * spread, max_gain=1.5
    )
    assert gain == pytest.approx(1.3, rel=1e-3)
    opening = core.mouth_opening_ratio(core.shapes_from_coefficients(scaled, mean.reshape(40), components))
    np.testing.assert_allclose(opening[:60], 0.0, atol=1e-6)  # closed stays closed, not crossed
    assert opening[-1] == pytest.approx(1.3 * core.mouth_opening_ratio(shapes)[-1], rel=1e-4)  # open grows
    about_the_mean = core.shapes_from_coefficients(1.3 * coefficients, mean.reshape(40), components)
    assert (core.mouth_opening_ratio(about_the_mean)[:60] > 0.01).all()  # pivoting on the mean: crossed lips,
    # which read as open again
    assert opening.std() == pytest.approx(1.3 * spread, rel=1e-3)


def test_lips_pushed_past_each_other_meet_halfway_and_open_lips_stay():
    shape = np.zeros((2, 20, 2), np.float32)
    shape[:, [13, 14, 15], 1] = 0.50  # upper inner lip
    shape[0, [19, 18, 17], 1] = 0.47  # lower lip above the upper one: crossed
    shape[1, [19, 18, 17], 1] = 0.55  # open
    out = core.uncross_lips(shape)
    np.testing.assert_allclose(out[0, [13, 14, 15, 17, 18, 19], 1], 0.485)
    np.testing.assert_array_equal(out[1], shape[1])
