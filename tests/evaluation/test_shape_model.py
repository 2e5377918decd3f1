"""Mouth-shape evaluation of a real exported SavedModel (TensorFlow): loading, prediction and the `shape` command."""

import json
import re

import numpy as np
import pytest

from evaluation.cli import main
from evaluation.shape import evaluate_mouth_shapes, load_speaker_model, model_versions
from services.face.dataset import fit_mouth_pca
from services.lipsync import model as lstm
from services.runtime.canonical import inner_lip_gap
from tests.conftest import SHARED_DATA
from tests.evaluation.test_shape import clip

pytestmark = pytest.mark.slow  # TensorFlow import and export: ~15 s on 2 cores

DELAY = 5
FEIFEI = SHARED_DATA / "speakers" / "feifeili"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """models/spk/1: an untrained 8-unit LSTM exported as the trainer does, with PCA, normalisation and card."""
    train = clip("train", 12.0, phase=0.0, seed=1)
    pca = fit_mouth_pca(train.mouth_shapes, retained_variance=0.999)
    settings = lstm.TrainingSettings(hidden_units=8, delay_steps=DELAY, seed=3)
    network = lstm.build_model(lstm.FEATURE_DIM, len(pca.components), settings)
    root = tmp_path_factory.mktemp("models")
    version = root / "spk" / "1"
    lstm.export_saved_model(network, version)
    extra = version / "assets.extra"
    extra.mkdir()
    np.savez(extra / "pca.npz", **pca.arrays())
    mean, std = train.features.mean(axis=0), train.features.std(axis=0)
    np.savez(extra / "normalization.npz", feature_mean=mean.astype(np.float32), feature_std=std.astype(np.float32))
    card = {"speaker": "spk", "version": 1, "delay_steps": DELAY, "dataset": {"train_clip_ids": ["train"]}}
    (extra / "model_card.json").write_text(json.dumps(card))
    return root, network, train


def test_a_loaded_model_predicts_as_the_network_it_was_exported_from(models_dir):
    root, network, train = models_dir
    assert model_versions(root, "spk") == [1]
    model = load_speaker_model(root, "spk")
    assert (model.version, model.delay, len(model.pca.components)) == (1, DELAY, len(model.pca.components))
    held = clip("held", 4.0, phase=1.0, seed=2)
    result = evaluate_mouth_shapes(held, model=model, train_clips=[train])
    assert set(result.scores) == {"model", "mean_shape", "ridge"}
    features = ((held.features - model.feature_mean) / model.feature_std).astype(np.float32)
    expected = model.pca.reconstruct(lstm.predict_sequence(network, features[: result.rows], delay=DELAY))
    np.testing.assert_allclose(result.openings["model"], inner_lip_gap(expected), atol=1e-4)
    assert np.isfinite(result.scores["model"].landmark_error)


def test_the_shape_command_on_real_clips(models_dir, tmp_path, capsys):
    root, _, _ = models_dir
    json_path, html_path = tmp_path / "s.json", tmp_path / "s.html"
    code = main(
        [
            "shape",
            "--models-dir", str(root),
            "--speaker", "spk",
            "--clip", str(FEIFEI / "feifeili_clip1.mp4"),
            "--train-video", str(FEIFEI / "feifeili_clip2.mp4"),
            "--json", str(json_path),
            "--html", str(html_path),
        ]
    )  # fmt: skip
    assert code == 0
    assert "feifeili_clip1.mp4: model error" in capsys.readouterr().out
    data = json.loads(json_path.read_text())
    assert data["model"]["version"] == 1 and data["clip_id"] == "feifeili_clip1"
    assert 990 <= data["rows"] <= 1010  # 10 s of 100 Hz rows with a face
    ridge = data["predictors"]["ridge"]
    assert ridge["opening_correlation"] > 0.2  # ridge from 15 s of the same talk
    assert data["predictors"]["mean_shape"]["opening_correlation"] is None
    assert len(re.findall(r"data:image/png;base64,", html_path.read_text())) == 1
    missing = ["shape", "--models-dir", str(root), "--speaker", "spk", "--version", "7"]
    assert main([*missing, "--clip", str(FEIFEI / "feifeili_clip1.mp4")]) == 1
    assert "has no version 7" in capsys.readouterr().err
