"""Mouth-shape accuracy on synthetic clips with a known mapping from audio to mouth: model and baselines."""

import math

import numpy as np
import pytest

from evaluation.shape import SpeakerModel, evaluate_mouth_shapes, load_speaker_model, shape_scores
from services.face.dataset import ClipTracks, fit_mouth_pca
from services.lipsync import model as lstm
from services.runtime.canonical import CANONICAL_TEMPLATE
from services.runtime.errors import InvalidInput, NoFace, NotFound

FPS = 30.0
REST = CANONICAL_TEMPLATE[48:68].astype(np.float64)
OPEN = np.zeros((20, 2))
OPEN[[7, 8, 9, 10, 11, 17, 18, 19], 1] = 0.08  # lower lip (outer 55-59, inner 65-67) moves down


def latent(t: np.ndarray, phase: float) -> np.ndarray:
    """Mouth opening in [0, 1] driven by a 3 Hz syllable rhythm."""
    return 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t + phase)


def clip(name: str, seconds: float, *, phase: float, seed: int, invalid: slice | None = None) -> ClipTracks:
    """Frames at 30 fps with shapes REST + s(t) OPEN; features at 100 Hz whose column 0 is s(t), the rest noise."""
    frames = np.arange(int(seconds * FPS)) / FPS
    shapes = (REST[None] + latent(frames, phase)[:, None, None] * OPEN[None]).astype(np.float32)
    valid = np.ones(len(frames), bool)
    if invalid is not None:
        valid[invalid] = False
        shapes[invalid] = np.nan
    rows = int(seconds * 100)
    times = 0.0125 + np.arange(rows) / 100
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((rows, lstm.FEATURE_DIM)).astype(np.float32)
    features[:, 0] = latent(times, phase)
    return ClipTracks(name, frames, shapes, valid, features, 0.0125, 100.0)


def oracle_model(train: ClipTracks, *, delay: int = 4) -> SpeakerModel:
    """A 'network' that reads s(t) from the normalised features and outputs its PCA coefficients d rows later."""
    pca = fit_mouth_pca(train.mouth_shapes[train.face_valid])
    mean, std = train.features.mean(axis=0), train.features.std(axis=0)

    def network(x: np.ndarray) -> np.ndarray:
        s = x[0, :, 0] * std[0] + mean[0]
        shapes = REST[None] + s[:, None, None] * OPEN[None]
        coefficients = pca.project(shapes)
        delayed = np.concatenate([np.zeros((delay, coefficients.shape[1])), coefficients[:-delay]])
        return delayed[None].astype(np.float32)  # output step t = the mouth of input step t - delay

    card = {"delay_steps": delay, "dataset": {"train_clip_ids": [train.clip_id]}}
    return SpeakerModel("spk", 3, network, pca, mean.astype(np.float32), std.astype(np.float32), card)


@pytest.fixture(scope="module")
def train() -> ClipTracks:
    return clip("train", 12.0, phase=0.0, seed=1)


@pytest.fixture(scope="module")
def held_out() -> ClipTracks:
    return clip("held", 6.0, phase=1.0, seed=2, invalid=slice(60, 75))


def test_a_perfect_model_beats_ridge_which_beats_the_mean_shape(train, held_out):
    result = evaluate_mouth_shapes(held_out, model=oracle_model(train), train_clips=[train])
    model, ridge, mean = (result.scores[k] for k in ("model", "ridge", "mean_shape"))
    assert model.landmark_error < 0.01 and model.opening_correlation > 0.999
    assert model.opening_lag_ms == 0.0
    assert ridge.opening_correlation > 0.95 and ridge.landmark_error < 0.3 * mean.landmark_error
    assert math.isnan(mean.opening_correlation) and mean.opening_lag_ms is None
    # the mean shape is half open: its error is about the mean |s - 0.5| x 0.08 x (8 / 20 points) / width 0.34
    assert mean.landmark_error == pytest.approx(0.318 * 0.08 * 8 / 20 / 0.3438, rel=0.1)
    assert result.ridge_alpha is not None and result.pca_components >= 1
    # 6 s of rows minus the 0.5 s without a face (and the interpolation edges around it)
    assert 540 <= result.rows <= 550 and result.times.shape == (result.rows,)
    assert set(result.openings) == {"model", "ridge", "mean_shape"}
    assert result.notes == ()
    data = result.as_dict()
    assert data["predictors"]["mean_shape"]["opening_correlation"] is None
    assert data["predictors"]["model"]["landmark_error"] == pytest.approx(model.landmark_error)


def test_a_model_delay_mismatch_shows_as_an_opening_lag(train, held_out):
    model = oracle_model(train, delay=4)
    wrong = SpeakerModel(
        model.speaker,
        model.version,
        model.network,
        model.pca,
        model.feature_mean,
        model.feature_std,
        {"delay_steps": 0},
    )
    lagging = evaluate_mouth_shapes(held_out, model=wrong).scores["model"]
    assert lagging.opening_lag_ms == pytest.approx(40.0)  # 4 rows of 10 ms late
    assert lagging.opening_correlation < 0.99


def test_baselines_only_without_a_model(train, held_out):
    result = evaluate_mouth_shapes(held_out, train_clips=[train])
    assert set(result.scores) == {"mean_shape", "ridge"}
    assert result.scores["ridge"].opening_correlation > 0.95


def test_a_held_out_clip_the_model_was_trained_on_is_noted(train):
    result = evaluate_mouth_shapes(train, model=oracle_model(train))
    assert result.notes and "not held out" in result.notes[0]


def test_shape_scores_of_identical_shapes_are_perfect():
    shapes = clip("x", 2.0, phase=0.3, seed=0).mouth_shapes
    scores = shape_scores(shapes, shapes)
    assert scores.landmark_error == 0.0 and scores.landmark_rmse == 0.0
    assert scores.opening_correlation == pytest.approx(1.0) and scores.opening_lag_ms == 0.0


def test_bad_inputs(train, held_out):
    with pytest.raises(InvalidInput, match="model or training clips"):
        evaluate_mouth_shapes(held_out)
    narrow = ClipTracks("n", held_out.timestamps, held_out.mouth_shapes, held_out.face_valid, held_out.features[:, :5])
    with pytest.raises(InvalidInput, match="normalisation columns"):
        evaluate_mouth_shapes(narrow, model=oracle_model(train))
    faceless = ClipTracks(
        "f", held_out.timestamps, held_out.mouth_shapes, np.zeros_like(held_out.face_valid), held_out.features
    )
    with pytest.raises(NoFace):
        evaluate_mouth_shapes(faceless, model=oracle_model(train))
    with pytest.raises(InvalidInput, match="window_rows"):
        evaluate_mouth_shapes(held_out, train_clips=[train], window_rows=-1)
    with pytest.raises(InvalidInput, match=r"\[N, 20, 2\]"):
        shape_scores(np.zeros((5, 20, 2)), np.zeros((4, 20, 2)))


def test_loading_a_missing_model_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="no model of speaker 'spk'"):
        load_speaker_model(tmp_path, "spk")
    card = tmp_path / "spk" / "2" / "assets.extra"
    card.mkdir(parents=True)
    (card / "model_card.json").write_text("{}")
    with pytest.raises(NotFound, match=r"no version 5 .* \(versions \[2\]\)"):
        load_speaker_model(tmp_path, "spk", 5)
    with pytest.raises(InvalidInput, match="malformed"):
        load_speaker_model(tmp_path, "spk")  # no pca.npz
