"""The LSTM core: windows inside sections with the delay applied once, training, early stopping, export."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d

from services.lipsync import model as lstm
from services.runtime.errors import Cancelled, InvalidInput

DELAY = 10


def smooth_noise(rows: int, dims: int, *, seed: int, sigma: float = 2.0) -> np.ndarray:
    noise = gaussian_filter1d(np.random.default_rng(seed).standard_normal((rows, dims)), sigma, axis=0)
    return (noise / noise.std(axis=0)).astype(np.float32)


def identity_task(rows: int = 6000, seed: int = 0):
    """Mouth coefficients equal to the audio of the same instant: the model must hold d steps of memory."""
    features = np.zeros((rows, lstm.FEATURE_DIM), np.float32)
    features[:, 0] = smooth_noise(rows, 1, seed=seed)[:, 0]
    coefficients = np.stack([features[:, 0], 0.5 * features[:, 0]], axis=1)
    offsets = np.array([0, rows // 3, 2 * rows // 3, rows])
    return features, coefficients, offsets


def graph_ops(path) -> set[str]:
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((path / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].graph_def
    return {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}


def masked_mse(model, sequences: lstm.Sequences) -> float:
    outputs = np.asarray(model(sequences.inputs, training=False))
    squared = ((outputs - sequences.targets) ** 2).sum(axis=-1)
    return float((squared * sequences.mask).sum() / (sequences.mask.sum() * sequences.targets.shape[-1]))


@pytest.fixture(scope="module")
def trained():
    """A small LSTM trained on the identity task with delay 10 (a few seconds on 2 cores)."""
    features, coefficients, offsets = identity_task()
    settings = lstm.TrainingSettings(
        hidden_units=32,
        delay_steps=DELAY,
        sequence_length=60,
        batch_size=32,
        max_epochs=40,
        learning_rate=1e-2,
        learning_rate_decay=0.97,
        dropout=0.0,
    )
    result = lstm.train_model(features, coefficients, offsets, [0, 1], [2], settings=settings)
    return result, features, coefficients, offsets


# -- windows --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("random_starts", [False, True])
def test_windows_never_cross_sections_and_targets_lag_by_exactly_the_delay(random_starts):
    lengths = [50, 7, 5, 130, 31]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rows = offsets[-1]
    section_of_row = np.repeat(np.arange(len(lengths)), lengths)
    # Column 0 = row index + 1 (so padding, 0, is told apart), column 1 = the row's section.
    features = np.zeros((rows, lstm.FEATURE_DIM), np.float32)
    features[:, 0] = np.arange(rows) + 1
    features[:, 1] = section_of_row
    coefficients = np.stack([np.arange(rows), section_of_row], axis=1).astype(np.float32)
    delay, length = 5, 20
    rng = np.random.default_rng(3) if random_starts else None
    seq = lstm.make_sequences(features, coefficients, offsets, [0, 1, 2, 3, 4], delay=delay, length=length, rng=rng)

    assert seq.inputs.shape[1:] == (length + delay, lstm.FEATURE_DIM) and seq.targets.shape[1:] == (length + delay, 2)
    assert not seq.mask[:, :delay].any()  # warm-up steps never carry a target
    for inputs, targets, mask in zip(seq.inputs, seq.targets, seq.mask, strict=True):
        inside = inputs[:, 0] > 0
        assert inside[0] and np.all(np.diff(inside.astype(int)) <= 0)  # real rows first, zero padding after
        assert len(set(inputs[inside, 1].tolist())) == 1  # one section per window
        section = int(inputs[0, 1])
        supervised = mask > 0
        np.testing.assert_array_equal(supervised, inside & (np.arange(length + delay) >= delay))
        input_rows = inputs[supervised, 0] - 1
        np.testing.assert_array_equal(targets[supervised, 0], input_rows - delay)  # mouth of row r - d
        np.testing.assert_array_equal(targets[supervised, 1], section)  # the target is in the same section
        assert not targets[~supervised].any() and not inputs[~inside].any()

    # Each section yields ceil((L - d) / length) windows; sections of <= d rows yield none.
    assert len(seq) == sum(-(-(n - delay) // length) for n in lengths if n > delay)
    if not random_starts:  # the fixed tiling makes every supervised mouth row a target exactly once
        targets = np.sort(seq.targets[seq.mask > 0][:, 0])
        expected = np.concatenate(
            [np.arange(a, b - delay) for a, b in zip(offsets[:-1], offsets[1:], strict=True) if b - a > delay]
        )
        np.testing.assert_array_equal(targets, expected)


def test_windows_of_selected_sections_only():
    offsets = np.array([0, 40, 80])
    features = np.zeros((80, lstm.FEATURE_DIM), np.float32)
    coefficients = np.arange(80, dtype=np.float32)[:, None]
    seq = lstm.make_sequences(features, coefficients, offsets, [1], delay=4, length=10)
    assert seq.targets[seq.mask > 0].min() >= 40
    assert len(lstm.make_sequences(features, coefficients, offsets, [], delay=4, length=10)) == 0


def test_bad_windows_and_settings_are_rejected():
    features = np.zeros((10, lstm.FEATURE_DIM), np.float32)
    with pytest.raises(InvalidInput, match="section_offsets"):
        lstm.make_sequences(features, np.zeros((10, 2)), np.array([0, 5]), [0], delay=2, length=4)
    with pytest.raises(InvalidInput, match="section indices"):
        lstm.make_sequences(features, np.zeros((10, 2)), np.array([0, 10]), [1], delay=2, length=4)
    with pytest.raises(InvalidInput, match="coefficients"):
        lstm.make_sequences(features, np.zeros((9, 2)), np.array([0, 10]), [0], delay=2, length=4)
    with pytest.raises(InvalidInput, match="dropout"):
        lstm.TrainingSettings(dropout=1.0)
    with pytest.raises(InvalidInput, match="learning_rate_decay"):
        lstm.TrainingSettings(learning_rate_decay=0.0)
    with pytest.raises(InvalidInput, match="no training window"):
        lstm.train_model(features, np.zeros((10, 2)), np.array([0, 10]), [0], settings=lstm.TrainingSettings())


def test_defaults_are_the_papers():
    s = lstm.TrainingSettings()
    assert (s.hidden_units, s.layers, s.delay_steps, s.sequence_length, s.batch_size) == (60, 1, 20, 100, 100)
    assert (s.max_epochs, s.learning_rate, s.learning_rate_decay, s.gradient_clip_norm) == (300, 1e-3, 0.99, 10.0)
    assert (s.dropout, s.early_stopping_patience, s.seed) == (0.2, 20, 42)
    model = lstm.build_model(28, 20, s)
    assert model.count_params() == (28 + 60 + 1) * 240 + 60 * 20 + 20  # the seed's ~22.6 k parameters


# -- training -------------------------------------------------------------------------------------------------


def test_training_learns_a_task_that_needs_the_look_ahead(trained):
    result, features, coefficients, offsets = trained
    variance = float(coefficients[offsets[2] :].var(axis=0).mean())
    assert result.best_validation_loss < 0.1 * variance
    assert result.final_train_loss < 0.1 * variance
    assert len(result.train_losses) == len(result.validation_losses) == result.epochs
    assert result.validation_losses[result.best_epoch - 1] == pytest.approx(result.best_validation_loss)
    # The reference inference, over a whole held-out section, tracks the truth.
    predicted = lstm.predict_sequence(result.model, features[offsets[2] :], delay=DELAY)
    assert predicted.shape == coefficients[offsets[2] :].shape
    assert lstm.pearson(predicted[:, 0], coefficients[offsets[2] :, 0]) > 0.9


def test_an_impulse_moves_the_mouth_at_its_own_row(trained):
    """The delay is removed exactly once: no constant offset and nothing before the impulse can be heard."""
    model = trained[0].model
    rows, k = 300, 150
    silence = np.zeros((rows, lstm.FEATURE_DIM), np.float32)
    impulse = silence.copy()
    impulse[k, 0] = 3.0
    change = np.linalg.norm(
        lstm.predict_sequence(model, impulse, delay=DELAY) - lstm.predict_sequence(model, silence, delay=DELAY), axis=1
    )
    assert abs(int(np.argmax(change)) - k) <= 1
    # Row t sees input up to t + d: rows before k - d cannot react (no garbage, no early response).
    assert change[: k - DELAY].max() == 0.0
    assert change[k - DELAY] > 0


def test_training_repeats_exactly_with_the_same_seed():
    features, coefficients, offsets = identity_task(rows=1200, seed=5)
    settings = lstm.TrainingSettings(hidden_units=8, delay_steps=4, sequence_length=30, batch_size=8, max_epochs=2)
    first = lstm.train_model(features, coefficients, offsets, [0, 1], [2], settings=settings)
    second = lstm.train_model(features, coefficients, offsets, [0, 1], [2], settings=settings)
    assert first.train_losses == second.train_losses
    for a, b in zip(first.model.get_weights(), second.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_early_stopping_keeps_the_best_epoch():
    """Validation targets are the negated relation: the better the fit, the worse validation gets."""
    features, coefficients, offsets = identity_task(rows=1500, seed=2)
    coefficients = coefficients.copy()
    coefficients[offsets[2] :] *= -1
    settings = lstm.TrainingSettings(
        hidden_units=8,
        delay_steps=4,
        sequence_length=30,
        batch_size=16,
        max_epochs=30,
        learning_rate=1e-2,
        early_stopping_patience=3,
    )
    epochs = []
    result = lstm.train_model(features, coefficients, offsets, [0, 1], [2], settings=settings, on_epoch=epochs.append)
    losses = result.validation_losses
    assert result.stopped_early and result.epochs < settings.max_epochs
    assert result.best_epoch == int(np.argmin(losses)) + 1 and result.epochs == result.best_epoch + 3
    validation = lstm.make_sequences(features, coefficients, offsets, [2], delay=4, length=30)
    assert masked_mse(result.model, validation) == pytest.approx(result.best_validation_loss, rel=1e-4)
    assert [e.epoch for e in epochs] == list(range(1, result.epochs + 1))
    assert epochs[1].learning_rate == pytest.approx(1e-2 * 0.99)


def test_without_validation_the_last_epoch_is_kept():
    features, coefficients, offsets = identity_task(rows=600)
    settings = lstm.TrainingSettings(hidden_units=4, delay_steps=2, sequence_length=20, max_epochs=3)
    result = lstm.train_model(features, coefficients, offsets, [0, 1, 2], settings=settings)
    assert result.epochs == result.best_epoch == 3 and not result.stopped_early
    assert result.validation_losses == [] and result.best_validation_loss is None


def test_training_can_be_cancelled():
    features, coefficients, offsets = identity_task(rows=600)
    settings = lstm.TrainingSettings(hidden_units=4, delay_steps=2, sequence_length=20, max_epochs=5)
    with pytest.raises(Cancelled):
        lstm.train_model(features, coefficients, offsets, [0, 1], settings=settings, should_stop=lambda: True)


# -- export and inference -------------------------------------------------------------------------------------


def test_export_serves_the_same_outputs_through_the_signature(trained, tmp_path):
    import tensorflow as tf

    model = trained[0].model
    path = lstm.export_saved_model(model, tmp_path / "1", n_features=lstm.FEATURE_DIM)
    assert (path / "saved_model.pb").is_file() and (path / "variables" / "variables.index").is_file()
    assert not any("Cudnn" in op for op in graph_ops(path))  # serves on CPU wherever it was exported
    signature = tf.saved_model.load(str(path)).signatures[lstm.SIGNATURE_KEY]
    _, inputs = signature.structured_input_signature
    assert list(inputs) == [lstm.INPUT_KEY] and inputs[lstm.INPUT_KEY].shape.as_list() == [None, None, 28]
    batch = np.random.default_rng(1).standard_normal((3, 77, lstm.FEATURE_DIM)).astype(np.float32)
    served = signature(features=tf.constant(batch))[lstm.OUTPUT_KEY].numpy()
    np.testing.assert_allclose(served, np.asarray(model(batch, training=False)), atol=1e-5)
    # The reference inference gives the same answer from the model, the signature and the folder.
    features = trained[1][:400]
    expected = lstm.predict_sequence(model, features, delay=DELAY)
    np.testing.assert_allclose(lstm.predict_sequence(signature, features, delay=DELAY), expected, atol=1e-5)
    np.testing.assert_allclose(lstm.predict_sequence(str(path), features, delay=DELAY), expected, atol=1e-5)


def test_chunked_serving_agrees_with_the_reference(trained):
    """The serving core's overlapping chunks reproduce one whole-sequence call of a trained LSTM."""
    from services.lipsync import core

    model, features = trained[0].model, trained[1][:2500]
    reference = lstm.predict_sequence(model, features, delay=DELAY)
    run = lambda window: model.predict_on_batch(window[None])[0]  # noqa: E731
    chunked = core.predict_rows(features, run, delay=DELAY, chunk_rows=600, overlap_rows=120)
    assert np.abs(chunked - reference).max() < 1e-3 * np.abs(reference).max()


def test_predict_sequence_checks_its_input(trained):
    with pytest.raises(InvalidInput, match="features"):
        lstm.predict_sequence(trained[0].model, np.zeros((0, lstm.FEATURE_DIM)), delay=DELAY)
    bad = np.zeros((5, lstm.FEATURE_DIM))
    bad[2, 3] = np.nan
    with pytest.raises(InvalidInput, match="NaN"):
        lstm.predict_sequence(trained[0].model, bad, delay=DELAY)


def test_metrics_are_normalised_by_mouth_width():
    truth = np.zeros((4, 20, 2))
    truth[:, :, 0] = np.linspace(0, 2, 20)  # corners (points 0 and 6) 6 * 2/19 apart
    truth[:, 19, 1] = [0.1, 0.2, 0.3, 0.4]  # the mouth opens frame by frame
    predicted = truth + [0.0, 0.05]  # every point 0.05 off
    width = 6 * 2 / 19
    error, correlation = lstm.mouth_metrics(predicted, truth)
    assert error == pytest.approx(0.05 / width)
    assert correlation == pytest.approx(1.0)
    assert np.isnan(lstm.pearson(np.ones(4), np.arange(4)))


# ---------------------------------------------------------------------- data-size defaults and amplitude


def test_training_defaults_follow_the_amount_of_speech_and_user_values_win():
    assert lstm.data_size_regime(20)[0] == "small"
    assert lstm.data_size_regime(600)[0] == "medium"
    assert lstm.data_size_regime(1800)[0] == "large"
    small = lstm.settings_for_data(60)
    assert (small.batch_size, small.dropout, small.layers) == (10, 0.5, 2)
    large = lstm.settings_for_data(1800, {"max_epochs": 7})
    assert large.max_epochs == 7 and large.batch_size == 100 and large.hidden_units == 128
    with pytest.raises(InvalidInput, match="train_seconds"):
        lstm.data_size_regime(-1)
    with pytest.raises(InvalidInput, match="dropout"):
        lstm.settings_for_data(60, {"dropout": 1.5})


def test_predicts_gain_cap_grows_with_the_training_speech():
    """A model trained on tens of minutes may lift an unfamiliar voice further than one trained on a minute."""
    caps = [lstm.predict_gain_cap(name) for name, _, _ in lstm.DATA_SIZE_REGIMES]
    assert caps == sorted(caps) and caps[0] == lstm.DEFAULT_PREDICT_GAIN_CAP and caps[-1] > caps[0]
    assert lstm.predict_gain_cap(None) == lstm.predict_gain_cap("unknown") == lstm.DEFAULT_PREDICT_GAIN_CAP


def _opening_pca():
    """A 1-component mouth PCA whose component opens the inner lips (mouth 0.34 wide)."""
    mean = np.zeros((20, 2))
    mean[:, 0] = np.linspace(0.33, 0.67, 20)
    mean[0, 0], mean[6, 0] = 0.33, 0.67
    mean[[19, 18, 17], 0] = mean[[13, 14, 15], 0]  # each lower inner-lip point right below its upper one
    component = np.zeros((20, 2))
    component[[17, 18, 19], 1] = 1.0
    component = component.reshape(1, 40) / np.linalg.norm(component)
    return mean.reshape(40), component


def test_amplitude_gain_restores_the_true_spread_of_the_opening():
    mean, components = _opening_pca()
    truth = np.random.default_rng(0).standard_normal((500, 1)) * 0.02 + 0.1  # the lips never cross
    damped = 0.1 + (truth - 0.1) * 0.4  # a model regressed to the mean: 0.4x the spread, same timing
    assert lstm.amplitude_gain(damped, truth, mean, components) == pytest.approx(2.5, rel=1e-3)
    assert lstm.amplitude_gain(truth * 3, truth, mean, components) == 1.0  # never damps
    assert lstm.amplitude_gain(0.1 + (truth - 0.1) * 0.01, truth, mean, components) == lstm.MAX_AMPLITUDE_GAIN
    assert lstm.amplitude_gain(np.full_like(truth, 0.1), truth, mean, components) == 1.0  # constant: no gain
    with pytest.raises(InvalidInput, match="must both be"):
        lstm.amplitude_gain(truth[:10], truth, mean, components)


def test_scaling_the_output_layer_scales_predictions_about_the_centre():
    settings = lstm.TrainingSettings(hidden_units=4, layers=1, seed=1)
    model = lstm.build_model(3, 2, settings)
    x = np.random.default_rng(1).standard_normal((1, 30, 3)).astype(np.float32)
    before = np.asarray(model.predict_on_batch(x))
    centre = np.array([0.1, -0.2], np.float32)
    lstm.scale_output(model, 2.0, centre)
    after = np.asarray(model.predict_on_batch(x))
    np.testing.assert_allclose(after, centre + 2.0 * (before - centre), atol=1e-5)
    with pytest.raises(InvalidInput, match="centre"):
        lstm.scale_output(model, 2.0, np.zeros(3))


def test_an_ensemble_averages_its_members_in_one_graph_and_scales_as_one():
    x = np.random.default_rng(2).standard_normal((1, 25, 3)).astype(np.float32)
    members = [lstm.build_model(3, 2, lstm.TrainingSettings(hidden_units=4, seed=s)) for s in (1, 2, 3)]
    outputs = [np.asarray(m.predict_on_batch(x)) for m in members]
    ensemble = lstm.average_models(members)
    np.testing.assert_allclose(np.asarray(ensemble.predict_on_batch(x)), np.mean(outputs, axis=0), atol=1e-5)
    lstm.scale_output(ensemble, 3.0, np.zeros(2, np.float32))
    np.testing.assert_allclose(np.asarray(ensemble.predict_on_batch(x)), 3 * np.mean(outputs, axis=0), atol=1e-5)
    assert lstm.average_models(members[:1]) is members[0]
    with pytest.raises(InvalidInput, match="ensemble"):
        lstm.TrainingSettings(ensemble=0)


def test_stretched_sections_replay_the_speech_slower_and_faster_after_the_original_rows():
    rows = np.arange(10, dtype=np.float32)
    features = np.zeros((10, lstm.FEATURE_DIM), np.float32)
    features[:, 0] = rows  # a static feature rising by 1 a row
    features[:, lstm.DELTA_COLUMNS] = 1.0  # its derivative: 1 a row
    coefficients = np.stack([rows * 2, -rows], axis=1)
    offsets = np.array([0, 4, 10])

    out_features, out_coefficients, out_offsets, added, origins = lstm.stretch_sections(
        features, coefficients, offsets, [1], (0.5, 2.0)
    )

    assert out_offsets.tolist() == [0, 4, 10, 13, 25] and added.tolist() == [2, 3]  # 6 rows -> 3 and 12
    assert origins.tolist() == [[0, 1], [1, 1]]  # (factor, section) of each copy
    np.testing.assert_array_equal(out_features[:10], features)  # the original rows and sections are untouched
    slow = slice(13, 25)
    np.testing.assert_allclose(out_features[slow, 0], np.linspace(4, 9, 12), atol=1e-5)  # same sounds, twice as long
    np.testing.assert_allclose(out_features[slow, lstm.DELTA_COLUMNS], 0.5)  # changing half as fast per row
    np.testing.assert_allclose(out_features[10:13, lstm.DELTA_COLUMNS], 2.0)
    np.testing.assert_allclose(out_coefficients[slow, 0], np.linspace(8, 18, 12), atol=1e-5)  # the mouth alike
    *_, short_origins = lstm.stretch_sections(features, coefficients, np.array([0, 1, 10]), [0, 1], (1.5,))
    assert short_origins.tolist() == [[0, 1]]  # a one-row section gets no copy
    with pytest.raises(InvalidInput):
        lstm.stretch_sections(features, coefficients, np.array([0, 4, 9]), [1], (2.0,))  # offsets not tiling rows


def test_tempo_augmentation_is_an_option_no_regime_turns_on():
    assert lstm.settings_for_data(60.0).tempo_augmentation == 0.0
    assert lstm.settings_for_data(1800.0).tempo_augmentation == 0.0
    assert lstm.settings_for_data(60.0, {"tempo_augmentation": 0.15}).tempo_augmentation == 0.15
    with pytest.raises(InvalidInput):
        lstm.TrainingSettings(tempo_augmentation=0.5)
