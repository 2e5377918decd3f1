"""Mouth-shape accuracy on a held-out clip: a speaker model vs the mean-shape and ridge baselines.

All three predictors are scored on the same rows: the held-out clip's 100 Hz feature rows that lie inside runs
of frames with a face (`face.dataset.pair_clip`), against the clip's tracked canonical mouth shapes
interpolated to those rows. Scores (`lipsync.model`): landmark error normalised by the true mouth width, RMSE in
canonical template units, the Pearson correlation of the inner-lip opening and the lag (argmax of its
cross-correlation, `lipsync.quality.opening_lag`; > 0 = the prediction lags the truth).

Baselines: the mean shape is the training mean (the model's PCA mean, else the training clips' mean); ridge
regression maps a +-200 ms window of normalised features to the PCA coefficients (closed form, alpha chosen on
the last 20 % of the training rows, as `lipsync.quality` does), fitted on the training clips given.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.quality import Ridge, choose_alpha, opening_lag, rows_of, windowed
from services.face.dataset import ClipTracks, MouthPCA, build_speaker_dataset, pair_clip
from services.lipsync import model as lstm
from services.runtime.canonical import inner_lip_gap
from services.runtime.errors import InvalidInput, NoFace, NotFound

DEFAULT_WINDOW_ROWS = 20
ROW_RATE_HZ = 100.0


@dataclass(frozen=True, eq=False)
class SpeakerModel:
    """A trained speaker LSTM with what it needs to run: PCA, feature normalisation and model card.

    Attributes:
        speaker, version: which model.
        network: anything `lipsync.model.predict_sequence` runs (a loaded `serving_default` signature, a
            keras.Model, or a callable float32 [1, t, F] -> [1, t, K]).
        pca: the mouth PCA the network's coefficients belong to.
        feature_mean, feature_std: float32 [F] normalisation of the training features.
        card: the model card (assets.extra/model_card.json); `delay_steps` sets the delay.
    """

    speaker: str
    version: int
    network: Any
    pca: MouthPCA
    feature_mean: np.ndarray
    feature_std: np.ndarray
    card: dict = field(default_factory=dict)

    @property
    def delay(self) -> int:
        return int(self.card.get("delay_steps", lstm.DEFAULT_DELAY_STEPS))


def model_versions(models_dir: str | os.PathLike, speaker: str) -> list[int]:
    """Complete versions (with a model card) of a speaker in a models folder, ascending."""
    root = Path(models_dir) / speaker
    if not root.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in root.iterdir()
        if p.name.isdigit() and int(p.name) > 0 and (p / "assets.extra" / "model_card.json").is_file()
    )


def load_speaker_model(models_dir: str | os.PathLike, speaker: str, version: int | None = None) -> SpeakerModel:
    """Load `<models_dir>/<speaker>/<version>/` as the trainer exports it (through `lipsync.model`, which imports
    TensorFlow).

    Args:
        models_dir: the models folder (A2V_MODELS_DIR / the trainer's --models-dir).
        speaker: the speaker name.
        version: the version; None = the latest complete one.

    Raises:
        NotFound: no such folder, speaker or version.
        InvalidInput: a malformed version (missing PCA or normalisation, mismatched dimensions).
    """
    versions = model_versions(models_dir, speaker)
    if not versions:
        raise NotFound(f"no model of speaker {speaker!r} in {models_dir} (expected {speaker}/<version>/assets.extra)")
    version = versions[-1] if version is None else int(version)
    if version not in versions:
        raise NotFound(f"speaker {speaker!r} has no version {version} in {models_dir} (versions {versions})")
    folder = Path(models_dir) / speaker / str(version)
    extra = folder / "assets.extra"
    try:
        card = json.loads((extra / "model_card.json").read_text())
        with np.load(extra / "pca.npz") as arrays:
            pca = MouthPCA.from_arrays({k: arrays[k] for k in arrays.files})
        with np.load(extra / "normalization.npz") as arrays:
            mean, std = arrays["feature_mean"].astype(np.float32), arrays["feature_std"].astype(np.float32)
    except (OSError, KeyError, ValueError) as exc:
        raise InvalidInput(f"model {speaker} version {version} in {folder} is malformed: {exc}") from exc
    # The SavedModel is loaded (and TensorFlow imported) by the module that trains and exports it, once here.
    network = lstm.runner(folder)
    return SpeakerModel(speaker, version, network, pca, mean, std, card)


@dataclass(frozen=True)
class ShapeScores:
    """How close one predictor's mouth shapes are to the truth.

    Attributes:
        landmark_error: mean |predicted - true| point distance / true mouth width (unitless).
        landmark_rmse: root mean square point distance, canonical template units.
        opening_correlation: Pearson correlation of the inner-lip opening (NaN for a constant prediction).
        opening_lag_ms: lag of the predicted opening behind the true one, ms (None for a constant prediction).
    """

    landmark_error: float
    landmark_rmse: float
    opening_correlation: float
    opening_lag_ms: float | None

    def as_dict(self) -> dict:
        return {
            "landmark_error": self.landmark_error,
            "landmark_rmse": self.landmark_rmse,
            "opening_correlation": None if math.isnan(self.opening_correlation) else self.opening_correlation,
            "opening_lag_ms": self.opening_lag_ms,
        }


def shape_scores(predicted: np.ndarray, truth: np.ndarray, *, rate_hz: float = ROW_RATE_HZ) -> ShapeScores:
    """Scores of float [N, 20, 2] predicted shapes against the true ones (rows at `rate_hz`).

    Raises:
        InvalidInput: shapes not both [N, 20, 2] or N = 0.
    """
    error, correlation = lstm.mouth_metrics(predicted, truth)  # checks the shapes
    difference = np.asarray(predicted, np.float64) - np.asarray(truth, np.float64)
    rmse = float(np.sqrt(np.mean(np.sum(difference**2, axis=-1))))
    constant = np.ptp(inner_lip_gap(predicted)) == 0 or len(truth) < 3
    lag = None
    if not constant:
        max_lag = max(1, min(30, len(truth) // 3))
        lag = opening_lag(predicted, truth, max_lag=max_lag) * 1000.0 / rate_hz
    return ShapeScores(error, rmse, correlation, lag)


@dataclass(frozen=True, eq=False)
class ShapeEvaluation:
    """Mouth-shape accuracy of every predictor on one held-out clip.

    Attributes:
        clip_id: the held-out clip.
        rows: scored feature rows (100 Hz).
        times: float64 [rows] time of each row, seconds.
        truth_opening: float64 [rows] true inner-lip opening (canonical units).
        scores: predictor name ("model", "mean_shape", "ridge") -> ShapeScores.
        openings: predictor name -> float64 [rows] its predicted opening.
        ridge_alpha: the ridge penalty chosen (None without training clips).
        pca_components, retained_variance: of the PCA used.
        notes: caveats (e.g. the clip was in the model's training set).
    """

    clip_id: str
    rows: int
    times: np.ndarray
    truth_opening: np.ndarray
    scores: dict[str, ShapeScores]
    openings: dict[str, np.ndarray]
    ridge_alpha: float | None
    pca_components: int
    retained_variance: float
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {
            "clip_id": self.clip_id,
            "rows": self.rows,
            "scored_seconds": self.rows / ROW_RATE_HZ,
            "predictors": {name: s.as_dict() for name, s in self.scores.items()},
            "ridge_alpha": self.ridge_alpha,
            "pca_components": self.pca_components,
            "pca_retained_variance": self.retained_variance,
            "notes": list(self.notes),
        }


def _sections(offsets: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.diff(offsets) > 0)


def _concat_paired(clips: Sequence[ClipTracks]):
    paired = [pair_clip(c) for c in clips]
    offsets = [0]
    for p in paired:
        offsets.extend((offsets[-1] + np.asarray(p.section_offsets[1:])).tolist())
    features = np.concatenate([p.features for p in paired])
    shapes = np.concatenate([p.shapes for p in paired])
    return features, shapes, np.asarray(offsets, np.int64)


def fit_ridge(
    features_norm: np.ndarray,
    coefficients: np.ndarray,
    offsets: np.ndarray,
    *,
    window_rows: int = DEFAULT_WINDOW_ROWS,
) -> tuple[Ridge, float]:
    """Ridge regression from +-window_rows of normalised features to PCA coefficients; (model, alpha).

    The penalty is chosen among `lipsync.quality.ALPHAS` on the last 20 % of the rows, then the model is
    refitted on all rows.
    """
    sections = _sections(offsets)
    x = windowed(features_norm, offsets, sections, window_rows)
    y = np.asarray(coefficients, np.float64)[rows_of(offsets, sections)]
    if len(x) < 10:
        raise InvalidInput(f"ridge needs at least 10 training rows, got {len(x)}")
    cut = int(0.8 * len(x))
    alpha, _ = choose_alpha(x[:cut], y[:cut], x[cut:], y[cut:])
    return Ridge(x, y, alpha), alpha


def evaluate_mouth_shapes(
    held_out: ClipTracks,
    *,
    model: SpeakerModel | None = None,
    train_clips: Sequence[ClipTracks] = (),
    window_rows: int = DEFAULT_WINDOW_ROWS,
    progress: Callable[[str], None] | None = None,
) -> ShapeEvaluation:
    """Score the model (if any), the mean shape and ridge (if training clips are given) on a held-out clip.

    Args:
        held_out: tracks and features of the held-out clip (`lipsync.quality.analyse_clip`).
        model: the speaker model; None = baselines only (PCA and normalisation then come from train_clips).
        train_clips: clips to fit the ridge baseline on (and, without a model, the PCA and normalisation).
        window_rows: ridge window half-width in 10 ms rows, >= 0.
        progress: called with a short message before each predictor runs.

    Returns:
        ShapeEvaluation.

    Raises:
        InvalidInput: neither a model nor training clips, mismatched feature widths, bad window.
        NoFace: the held-out clip has no row inside a run of face frames.
    """
    if model is None and not train_clips:
        raise InvalidInput("mouth-shape evaluation needs a speaker model or training clips (or both)")
    if window_rows < 0:
        raise InvalidInput(f"window_rows must be >= 0, got {window_rows}")
    say = progress or (lambda _message: None)
    notes: list[str] = []
    if model is not None:
        pca, mean, std = model.pca, model.feature_mean, model.feature_std
        trained_on = set(model.card.get("dataset", {}).get("train_clip_ids", []))
        if held_out.clip_id in trained_on:
            notes.append(f"{held_out.clip_id} is among the model's training clips: the scores are not held out")
    else:
        dataset = build_speaker_dataset(list(train_clips), validation_fraction=0.0)
        pca, mean, std = dataset.pca, dataset.feature_mean, dataset.feature_std
    if held_out.features.ndim != 2 or held_out.features.shape[1] != len(mean):
        raise InvalidInput(
            f"held-out features {held_out.features.shape} do not match the {len(mean)} normalisation columns"
        )
    paired = pair_clip(held_out)
    if len(paired.times) == 0:
        raise NoFace(f"{held_out.clip_id}: no feature row lies within a run of frames with a face")
    offsets = paired.section_offsets
    sections = _sections(offsets)
    features = ((paired.features - mean) / std).astype(np.float32)
    truth = paired.shapes
    predictions: dict[str, np.ndarray] = {}
    if model is not None:
        say(f"model {model.speaker} v{model.version} on {len(truth)} rows")
        coefficients = np.concatenate(
            [
                lstm.predict_sequence(model.network, features[offsets[s] : offsets[s + 1]], delay=model.delay)
                for s in sections
            ]
        )
        if coefficients.shape[1] != len(pca.components):
            raise InvalidInput(
                f"the model outputs {coefficients.shape[1]} coefficients, its PCA has {len(pca.components)}"
            )
        predictions["model"] = pca.reconstruct(coefficients)
    predictions["mean_shape"] = np.repeat(pca.mean.reshape(1, -1, 2).astype(np.float32), len(truth), axis=0)
    alpha = None
    if train_clips:
        say(f"ridge on {len(train_clips)} training clip(s)")
        for clip in train_clips:
            if clip.features.ndim != 2 or clip.features.shape[1] != len(mean):
                raise InvalidInput(f"training clip {clip.clip_id} has features {clip.features.shape}")
        train_features, train_shapes, train_offsets = _concat_paired(train_clips)
        if len(train_features) == 0:
            raise NoFace("the training clips have no feature row within a run of frames with a face")
        ridge, alpha = fit_ridge(
            ((train_features - mean) / std).astype(np.float32),
            pca.project(train_shapes),
            train_offsets,
            window_rows=window_rows,
        )
        predictions["ridge"] = pca.reconstruct(ridge(windowed(features, offsets, sections, window_rows)))
    return ShapeEvaluation(
        clip_id=held_out.clip_id,
        rows=len(truth),
        times=np.asarray(paired.times, np.float64),
        truth_opening=inner_lip_gap(truth),
        scores={name: shape_scores(shapes, truth) for name, shapes in predictions.items()},
        openings={name: inner_lip_gap(shapes) for name, shapes in predictions.items()},
        ridge_alpha=alpha,
        pca_components=len(pca.components),
        retained_variance=float(pca.retained_variance),
        notes=tuple(notes),
    )
