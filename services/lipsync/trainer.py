"""LSTM trainer: speaker dataset from the object store -> versioned SavedModel under models/<speaker>/<version>/.

`python -m services.lipsync.trainer --speaker obama --dataset KEY --pca KEY [options]` (a Kubernetes Job or a
local process). Version v of speaker S is stored as

    models/S/v/saved_model.pb, variables/..., fingerprint.pb      the SavedModel (signature "serving_default")
    models/S/v/assets.extra/pca.npz                             the dataset's mouth PCA, as stored
    models/S/v/assets.extra/normalization.npz                   feature_mean, feature_std float32 [28]
    models/S/v/assets.extra/model_card.json                     written last: its presence marks v complete

and, with a models folder (A2V_MODELS_DIR or --models-dir), as the same tree in <models_dir>/S/v/, moved into
place in one rename so a TF Serving polling the folder never sees half a version.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from audio2video.lipsync.v1 import lipsync_pb2
from services.lipsync import model as lstm
from services.lipsync.core import shapes_from_coefficients
from services.lipsync.versions import reserve_version, stored_versions, version_prefix  # noqa: F401 (re-exported)
from services.runtime.blobstore import NPZ_CONTENT_TYPE, BlobStore
from services.runtime.canonical import mouth_opening_ratio
from services.runtime.config import Config, ConfigError
from services.runtime.errors import A2VError, FailedPrecondition, InvalidInput
from services.runtime.keys import validate_speaker

log = logging.getLogger(__name__)

MODELS_DIR_VARIABLE = "A2V_MODELS_DIR"
TRAIN_SPEAKER_VARIABLE = "A2V_TRAIN_SPEAKER"
MODEL_CARD_FORMAT_VERSION = 1
MOUTH_VECTOR = 40
HELD_BACK_SHARE = 0.2  # of each section, when the dataset has no validation clip
MIN_HELD_BACK_ROWS = 100  # 1 s of supervised rows, at least
DATASET_ARRAYS = (
    "features",
    "shapes",
    "coefficients",
    "section_offsets",
    "section_clip",
    "clip_ids",
    "is_validation",
    "feature_mean",
    "feature_std",
)


# ----------------------------------------------------------------------------------------------------------
# TrainingOptions <-> TrainingSettings (the one place that knows the proto)


def settings_from_proto(options: lipsync_pb2.TrainingOptions | None) -> lstm.TrainingSettings:
    """TrainingSettings from the proto: zero / unset fields take the defaults (see lipsync.v1.TrainingOptions).

    Raises:
        InvalidInput: a value out of range.
    """
    defaults = lstm.TrainingSettings()
    if options is None:
        return defaults

    def optional(name: str):
        return getattr(options, name) if options.HasField(name) else getattr(defaults, name)

    return lstm.TrainingSettings(
        hidden_units=options.hidden_units or defaults.hidden_units,
        layers=options.layers or defaults.layers,
        delay_steps=optional("delay_steps"),
        sequence_length=options.sequence_length or defaults.sequence_length,
        batch_size=options.batch_size or defaults.batch_size,
        max_epochs=options.max_epochs or defaults.max_epochs,
        learning_rate=options.learning_rate or defaults.learning_rate,
        learning_rate_decay=optional("learning_rate_decay"),
        gradient_clip_norm=options.gradient_clip_norm or defaults.gradient_clip_norm,
        dropout=optional("dropout"),
        early_stopping_patience=optional("early_stopping_patience"),
        seed=optional("seed"),
        ensemble=options.ensemble or defaults.ensemble,
        tempo_augmentation=optional("tempo_augmentation"),
    )


def overrides_from_proto(options: lipsync_pb2.TrainingOptions | None) -> dict:
    """The fields a caller set (non-zero, or present for the optional ones), by TrainingSettings name.

    Everything else takes the defaults `lstm.settings_for_data` picks for the amount of training speech.
    """
    if options is None:
        return {}
    return {descriptor.name: value for descriptor, value in options.ListFields()}


def settings_to_proto(settings: lstm.TrainingSettings) -> lipsync_pb2.TrainingOptions:
    """Every field set explicitly (so a stored card says what was used, not "default")."""
    return lipsync_pb2.TrainingOptions(**settings.as_dict())


def metrics_to_proto(card: Mapping) -> lipsync_pb2.ValidationMetrics:
    """ValidationMetrics from a model card's "metrics" (absent values stay 0)."""
    metrics = card.get("metrics") or {}
    message = lipsync_pb2.ValidationMetrics()
    for name in ("train_loss", "validation_loss", "landmark_error", "mouth_open_correlation"):
        if metrics.get(name) is not None:
            setattr(message, name, float(metrics[name]))
    message.epochs = int(metrics.get("epochs") or card.get("epochs") or 0)
    return message


# ----------------------------------------------------------------------------------------------------------
# inputs


def _load_dataset(store: BlobStore, dataset_key: str, pca_key: str) -> tuple[dict, dict, bytes]:
    """Dataset arrays, PCA arrays and the PCA archive's bytes; every inconsistency is an InvalidInput."""
    dataset = store.get_arrays(dataset_key)
    missing = [name for name in DATASET_ARRAYS if name not in dataset]
    if missing:
        raise InvalidInput(
            f"dataset {dataset_key!r} lacks the arrays {missing} (see face.v1.BuildSpeakerDatasetResult)"
        )
    pca_bytes = store.get_bytes(pca_key)
    try:
        with np.load(io.BytesIO(pca_bytes), allow_pickle=False) as archive:
            pca = {name: archive[name] for name in archive.files}
    except (ValueError, OSError) as exc:
        raise InvalidInput(f"PCA {pca_key!r} is not a .npz archive: {exc}") from exc
    for name in ("mean", "components"):
        if name not in pca:
            raise InvalidInput(f"PCA {pca_key!r} lacks the array {name!r}")

    features, coefficients, shapes = dataset["features"], dataset["coefficients"], dataset["shapes"]
    rows = len(features)
    if features.ndim != 2 or features.shape[1] != lstm.FEATURE_DIM:
        raise InvalidInput(f"dataset features must be [R, {lstm.FEATURE_DIM}], got shape {features.shape}")
    if coefficients.ndim != 2 or len(coefficients) != rows:
        raise InvalidInput(f"dataset coefficients must be [{rows}, K], got shape {coefficients.shape}")
    if shapes.shape != (rows, lstm.MOUTH_POINTS, 2):
        raise InvalidInput(f"dataset shapes must be [{rows}, {lstm.MOUTH_POINTS}, 2], got shape {shapes.shape}")
    components, mean = pca["components"], pca["mean"]
    if components.ndim != 2 or components.shape[1] != MOUTH_VECTOR or mean.shape != (MOUTH_VECTOR,):
        raise InvalidInput(
            f"PCA must have mean [{MOUTH_VECTOR}] and components [K, {MOUTH_VECTOR}], "
            f"got {mean.shape} and {components.shape}"
        )
    if coefficients.shape[1] != components.shape[0]:
        raise InvalidInput(
            f"PCA dimension mismatch: the dataset has {coefficients.shape[1]} coefficients per row but the PCA "
            f"{pca_key!r} has {components.shape[0]} components (dataset and PCA of different builds?)"
        )
    for name in ("feature_mean", "feature_std"):
        if dataset[name].shape != (lstm.FEATURE_DIM,):
            raise InvalidInput(f"dataset {name} must be [{lstm.FEATURE_DIM}], got shape {dataset[name].shape}")
    if not np.all(dataset["feature_std"] > 0):
        raise InvalidInput("dataset feature_std must be > 0 everywhere")
    for name, array in (("features", features), ("coefficients", coefficients), ("shapes", shapes)):
        if not np.isfinite(array).all():
            raise InvalidInput(f"dataset {name} contain NaN or infinite values")
    offsets, section_clip = dataset["section_offsets"].astype(np.int64), dataset["section_clip"].astype(np.int64)
    if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != rows or np.any(np.diff(offsets) < 0):
        raise InvalidInput(f"dataset section_offsets must rise from 0 to the row count {rows}")
    n_clips = len(dataset["clip_ids"])
    if len(section_clip) != len(offsets) - 1 or (
        len(section_clip) and (section_clip.min() < 0 or section_clip.max() >= n_clips)
    ):
        raise InvalidInput(f"dataset section_clip must name one of the {n_clips} clips for each section")
    if len(dataset["is_validation"]) != n_clips:
        raise InvalidInput(f"dataset is_validation must have one entry per clip ({n_clips})")
    return dataset, pca, pca_bytes


def _scalar_str(value) -> str:
    return str(np.asarray(value).reshape(-1)[0]) if np.asarray(value).size else ""


# ----------------------------------------------------------------------------------------------------------
# versions


def _disk_versions(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def _content_type(path: Path) -> str:
    return {".json": "application/json", ".npz": NPZ_CONTENT_TYPE}.get(path.suffix, "application/octet-stream")


def hold_back_tails(
    section_offsets: np.ndarray, sections: np.ndarray, *, share: float, min_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split the last `share` of each of `sections` off as a validation section (those long enough to spare it).

    A single training clip has no validation clip, so without this it trains blind (no early stopping) and
    its output could not be calibrated. A tail shorter than `min_rows` is not split off.

    Returns:
        (new section_offsets, training section indices, validation section indices) into the new offsets.
    """
    offsets = np.asarray(section_offsets, np.int64)
    cuts = []
    for section in np.asarray(sections, np.int64):
        a, b = int(offsets[section]), int(offsets[section + 1])
        tail = int(round((b - a) * share))
        if tail >= min_rows and b - a - tail >= min_rows:
            cuts.append(b - tail)
    if not cuts:
        return offsets, np.asarray(sections, np.int64), np.zeros(0, np.int64)
    new = np.unique(np.concatenate([offsets, cuts]))
    cut_set = set(cuts)
    chosen = set()
    for section in np.asarray(sections, np.int64):
        a, b = int(offsets[section]), int(offsets[section + 1])
        chosen.update(np.flatnonzero((new[:-1] >= a) & (new[:-1] < b)).tolist())
    validation = np.array(sorted(i for i in chosen if int(new[i]) in cut_set), np.int64)
    training = np.array(sorted(chosen - set(validation.tolist())), np.int64)
    return new, training, validation


def _rows(offsets: np.ndarray, sections) -> np.ndarray:
    spans = [np.arange(offsets[s], offsets[s + 1]) for s in sections]
    return np.concatenate(spans).astype(np.int64) if spans else np.zeros(0, np.int64)


def _predict_sections(model, features_norm, coefficients, offsets, sections, delay: int):
    """(predicted, true) coefficients over whole sections, each predicted from the zero state in one call."""
    predicted, truth = [], []
    for section in sections:
        a, b = int(offsets[section]), int(offsets[section + 1])
        if b > a:
            predicted.append(lstm.predict_sequence(model, features_norm[a:b], delay=delay))
            truth.append(coefficients[a:b])
    if not predicted:
        return np.zeros((0, coefficients.shape[1])), np.zeros((0, coefficients.shape[1]))
    return np.concatenate(predicted), np.concatenate(truth)


def _validation_metrics(signature, dataset: dict, features_norm, pca: dict, offsets, sections, delay: int):
    """(landmark_error, mouth_open_correlation) of the exported model over whole validation sections."""
    predicted, _ = _predict_sections(signature, features_norm, dataset["coefficients"], offsets, sections, delay)
    if not len(predicted):
        return None, None
    truth = dataset["shapes"][_rows(offsets, sections)]
    shapes = shapes_from_coefficients(predicted, pca["mean"], pca["components"])
    error, correlation = lstm.mouth_metrics(shapes, truth)
    return error, (None if math.isnan(correlation) else correlation)


def _sync_card(dataset: dict, clip_ids: list[str]) -> dict:
    """Per clip: the audio-to-mouth offset the dataset measured and whether pairing removed it."""
    if "clip_sync_offset_seconds" not in dataset or len(dataset["clip_sync_offset_seconds"]) != len(clip_ids):
        return {}
    return {
        clip: {
            "offset_seconds": round(float(offset), 4),
            "correlation": None if not math.isfinite(float(r)) else round(float(r), 4),
            "applied": bool(applied),
        }
        for clip, offset, r, applied in zip(
            clip_ids,
            dataset["clip_sync_offset_seconds"],
            dataset["clip_sync_correlation"],
            dataset["clip_sync_applied"],
            strict=True,
        )
    }


# ----------------------------------------------------------------------------------------------------------
# training


def _split(dataset: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(training sections, validation sections, their row counts) of a dataset: sections of held-out clips
    validate, the others train; empty sections neither."""
    section_clip = dataset["section_clip"].astype(np.int64)
    lengths = np.diff(dataset["section_offsets"])
    is_validation = dataset["is_validation"].astype(bool)
    held_out = is_validation[section_clip] if len(section_clip) else np.zeros(0, bool)
    train_sections = np.flatnonzero(~held_out & (lengths > 0))
    validation_sections = np.flatnonzero(held_out & (lengths > 0))
    return (
        train_sections,
        validation_sections,
        int(lengths[train_sections].sum()),
        int(lengths[validation_sections].sum()),
    )


def tempo_augmented(dataset: Mapping[str, np.ndarray], spread: float) -> dict[str, np.ndarray]:
    """The dataset with its training clips also at tempi 1 - spread and 1 + spread, as more training clips.

    Each training section is stretched in time (`lstm.stretch_sections`: features, coefficients, mouth shapes and
    times alike) into a clip `<clip>@<tempo>`; the feature statistics are those of all training rows, stretched
    ones included. The copies are then held back, stopped on and calibrated like any clip.
    """
    factors = (1 - spread, 1 + spread)
    clip_ids = [str(c) for c in dataset["clip_ids"]]
    is_validation = dataset["is_validation"].astype(bool)
    section_clip = dataset["section_clip"].astype(np.int64)
    offsets = dataset["section_offsets"].astype(np.int64)
    training, _, _, _ = _split(dataset)
    rows = len(dataset["features"])
    shapes = dataset["shapes"].astype(np.float32)
    paired = np.concatenate(
        [dataset["coefficients"], shapes.reshape(rows, -1), dataset["times"].reshape(rows, 1)], axis=1
    ).astype(np.float32)
    features, stretched, new_offsets, added, origins = lstm.stretch_sections(
        dataset["features"], paired, offsets, training, factors
    )
    k = dataset["coefficients"].shape[1]
    copied = [c for c in range(len(clip_ids)) if not is_validation[c]]  # the training clips get tempo copies
    new_section_clip = [
        len(clip_ids) + factor_index * len(copied) + copied.index(int(section_clip[section]))
        for factor_index, section in origins
    ]
    out = dict(dataset)
    out["features"] = features
    out["coefficients"] = stretched[:, :k]
    out["shapes"] = stretched[:, k:-1].reshape(-1, *shapes.shape[1:])
    out["times"] = stretched[:, -1].astype(np.float64)
    out["section_offsets"] = new_offsets
    out["section_clip"] = np.concatenate([section_clip, new_section_clip]).astype(np.int32)
    out["clip_ids"] = np.array(clip_ids + [f"{clip_ids[c]}@{f:g}" for f in factors for c in copied], dtype=str)
    out["is_validation"] = np.concatenate([is_validation, np.zeros(len(factors) * len(copied), bool)]).astype(np.uint8)
    for name in ("clip_sync_offset_seconds", "clip_sync_correlation", "clip_sync_applied"):
        if name in dataset:
            out[name] = np.concatenate([dataset[name], *[dataset[name][copied]] * len(factors)])
    train_rows = _rows(new_offsets, np.concatenate([training, added]))
    std = features[train_rows].std(axis=0)
    out["feature_mean"] = features[train_rows].mean(axis=0).astype(np.float32)
    out["feature_std"] = np.where(std > 1e-8, std, 1.0).astype(np.float32)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class SpeakerFit:
    """What `fit_speaker` trained, and on which rows (section indices refer to `section_offsets`)."""

    settings: lstm.TrainingSettings
    trained: lstm.TrainingResult  # model = the calibrated (ensemble) model; histories of the first member
    runs: list
    gain: float
    regime: str
    train_seconds: float
    section_offsets: np.ndarray
    train_sections: np.ndarray
    validation_sections: np.ndarray
    features_norm: np.ndarray
    coefficients: np.ndarray
    train_rows: int
    validation_rows: int
    held_back: int
    dataset: Mapping[str, np.ndarray]  # what it trained on: the given dataset, with tempo-stretched clips if any


def fit_speaker(
    dataset: Mapping[str, np.ndarray],
    pca: Mapping[str, np.ndarray],
    *,
    settings: lstm.TrainingSettings | None = None,
    overrides: Mapping | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_epoch: Callable[[lstm.EpochResult], None] | None = None,
    name: str = "speaker",
) -> SpeakerFit:
    """Train a speaker's (ensemble) LSTM on dataset arrays and calibrate its output amplitude; no I/O.

    Settings: `settings` as given, else the data-size regime's with `overrides`. Validation: the dataset's
    validation clips, else the held-back end of every training section (`hold_back_tails`). The gain
    (`lstm.amplitude_gain` on the validation rows) is baked into the model's output layers.

    Raises:
        InvalidInput: no training rows; see `lstm.train_model`.
        Cancelled: should_stop returned True.
    """
    clip_ids = [str(c) for c in dataset["clip_ids"]]
    train_sections, validation_sections, train_rows, validation_rows = _split(dataset)
    if train_rows == 0:
        raise InvalidInput(f"dataset of {name} has no training rows (clips {clip_ids}, all held out or empty)")
    train_seconds = train_rows / lstm.FEATURE_RATE_HZ
    regime, _ = lstm.data_size_regime(train_seconds)
    if settings is None:
        settings = lstm.settings_for_data(train_seconds, dict(overrides or {}))
    if settings.tempo_augmentation > 0:  # from here on the stretched copies are training clips like the others
        dataset = tempo_augmented(dataset, settings.tempo_augmentation)
        train_sections, validation_sections, train_rows, validation_rows = _split(dataset)
    section_offsets = dataset["section_offsets"].astype(np.int64)
    held_back = 0
    if len(validation_sections) == 0:  # one clip: hold back the end of each section for stopping and calibration
        section_offsets, train_sections, validation_sections = hold_back_tails(
            section_offsets, train_sections, share=HELD_BACK_SHARE, min_rows=settings.delay_steps + MIN_HELD_BACK_ROWS
        )
        held_back = int(np.diff(section_offsets)[validation_sections].sum())
        train_rows, validation_rows = train_rows - held_back, held_back
    mean = dataset["feature_mean"].astype(np.float32)
    std = dataset["feature_std"].astype(np.float32)
    features_norm = ((dataset["features"] - mean) / std).astype(np.float32)
    coefficients = dataset["coefficients"].astype(np.float32)
    log.info(
        "training %s: %d train rows in %d sections, %d validation rows in %d sections, K=%d",
        name,
        train_rows,
        len(train_sections),
        validation_rows,
        len(validation_sections),
        coefficients.shape[1],
    )

    members, max_epochs = settings.ensemble, settings.max_epochs
    runs: list[lstm.TrainingResult] = []
    for member in range(members):

        def epoch_done(result: lstm.EpochResult, done_before: int = member * max_epochs) -> None:
            if progress is not None:  # all members' epochs on one scale; a member that stops early skips ahead
                progress(done_before + result.epoch, members * max_epochs)
            if on_epoch is not None:
                on_epoch(result)

        runs.append(
            lstm.train_model(
                features_norm,
                coefficients,
                section_offsets,
                train_sections,
                validation_sections,
                settings=dataclasses.replace(settings, seed=settings.seed + member),
                on_epoch=epoch_done,
                should_stop=should_stop,
            )
        )
    trained = dataclasses.replace(runs[0], model=lstm.average_models([run.model for run in runs]))

    gain = 1.0
    if len(validation_sections):
        predicted, truth = _predict_sections(
            trained.model, features_norm, coefficients, section_offsets, validation_sections, settings.delay_steps
        )
        gain = lstm.amplitude_gain(predicted, truth, pca["mean"], pca["components"])
        lstm.scale_output(trained.model, gain, coefficients[_rows(section_offsets, train_sections)].mean(axis=0))

    return SpeakerFit(
        settings,
        trained,
        runs,
        gain,
        regime,
        train_seconds,
        section_offsets,
        train_sections,
        validation_sections,
        features_norm,
        coefficients,
        train_rows,
        validation_rows,
        held_back,
        dataset,
    )


def train_speaker(
    store: BlobStore,
    *,
    speaker: str,
    dataset_key: str,
    pca_key: str,
    settings: lstm.TrainingSettings | None = None,
    overrides: Mapping | None = None,
    models_dir: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_epoch: Callable[[lstm.EpochResult], None] | None = None,
) -> dict:
    """Train a speaker's LSTM on a stored dataset and store it as the next version.

    Training uses the dataset's training clips; the validation clips drive early stopping and the metrics
    (landmark error / mouth width and mouth-opening correlation, from the exported SavedModel run over each
    whole validation section with `predict_sequence`). The new version is 1 + the largest complete version
    in the store (or in `models_dir`, if that is larger, so a local folder never gets a version replaced).

    Args:
        store: the object store holding the dataset and receiving the model.
        speaker: [a-z0-9_-]{1,64}; the TF Serving model name.
        dataset_key: key of the dataset .npz (face.v1.BuildSpeakerDatasetResult.dataset).
        pca_key: key of the mouth PCA .npz of the same build.
        settings: hyper-parameters, all of them; None = the defaults for the amount of training speech
            (`lstm.settings_for_data`) with `overrides` applied.
        overrides: TrainingSettings fields a caller set explicitly (used when `settings` is None).
        models_dir: also write the version to <models_dir>/<speaker>/<version>/ (atomically).
        progress: progress(done_epochs, max_epochs) after every epoch.
        should_stop: polled before every batch; True raises Cancelled.
        on_epoch: called with every epoch's losses.

    Returns:
        The model card (as stored in assets.extra/model_card.json).

    Raises:
        InvalidInput: bad speaker name, malformed dataset or PCA, mismatched PCA dimension, no training rows.
        NotFound: the dataset or PCA key does not exist.
        Cancelled: should_stop returned True.
        Unavailable: the object store is unreachable.
    """
    validate_speaker(speaker)
    started = time.monotonic()
    dataset, pca, pca_bytes = _load_dataset(store, dataset_key, pca_key)
    clip_ids = [str(c) for c in dataset["clip_ids"]]
    is_validation = dataset["is_validation"].astype(bool)
    models_root = Path(models_dir) / speaker if models_dir else None
    if models_root is not None:
        models_root.mkdir(parents=True, exist_ok=True)
    on_disk = _disk_versions(models_root) if models_root else []
    # Reserved before training (a conditional write): two trainings of one speaker started together each know their
    # own number from the start, and neither can export over the other's files. A failed training leaves a gap.
    version = reserve_version(store, speaker, at_least=1 + max([0, *on_disk]))
    log.info("training %s version %d", speaker, version)
    fit = fit_speaker(
        dataset,
        pca,
        settings=settings,
        overrides=overrides,
        progress=progress,
        should_stop=should_stop,
        on_epoch=on_epoch,
        name=f"{speaker} ({dataset_key})",
    )
    settings, trained, runs, gain = fit.settings, fit.trained, fit.runs, fit.gain
    section_offsets, validation_sections = fit.section_offsets, fit.validation_sections
    features_norm, coefficients = fit.features_norm, fit.coefficients
    train_rows, validation_rows, held_back = fit.train_rows, fit.validation_rows, fit.held_back
    train_sections, regime, train_seconds = fit.train_sections, fit.regime, fit.train_seconds
    dataset = fit.dataset  # with tempo augmentation: its stretched clips and the statistics the model was fed
    clip_ids = [str(c) for c in dataset["clip_ids"]]
    is_validation = dataset["is_validation"].astype(bool)

    prefix = version_prefix(speaker, version)
    work = Path(
        tempfile.mkdtemp(prefix=f".{version}.partial-", dir=models_root)
        if models_root
        else tempfile.mkdtemp(prefix="a2v-model-")
    )
    try:
        lstm.export_saved_model(trained.model, work, n_features=lstm.FEATURE_DIM)
        import tensorflow as tf

        signature = tf.saved_model.load(str(work)).signatures[lstm.SIGNATURE_KEY]
        error, correlation = _validation_metrics(
            signature, dataset, features_norm, pca, section_offsets, validation_sections, settings.delay_steps
        )
        extra = work / "assets.extra"
        extra.mkdir()
        (extra / "pca.npz").write_bytes(pca_bytes)
        np.savez(
            extra / "normalization.npz",
            feature_mean=dataset["feature_mean"].astype(np.float32),
            feature_std=dataset["feature_std"].astype(np.float32),
        )
        card = {
            "format_version": MODEL_CARD_FORMAT_VERSION,
            "speaker": speaker,
            "version": version,
            "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "prefix": prefix,
            "signature": {"name": lstm.SIGNATURE_KEY, "input": lstm.INPUT_KEY, "output": lstm.OUTPUT_KEY},
            "delay_steps": settings.delay_steps,
            "feature_dim": lstm.FEATURE_DIM,
            "feature_rate_hz": lstm.FEATURE_RATE_HZ,
            "pca_components": int(coefficients.shape[1]),
            "template_id": _scalar_str(pca.get("template_id", "")),
            "dataset": {
                "key": dataset_key,
                "pca_key": pca_key,
                "train_clip_ids": [c for c, v in zip(clip_ids, is_validation, strict=True) if not v],
                "validation_clip_ids": [c for c, v in zip(clip_ids, is_validation, strict=True) if v],
                "train_frames": train_rows,
                "validation_frames": validation_rows,
                "train_sections": len(train_sections),
                "validation_sections": len(validation_sections),
                "held_back_frames": held_back,
                "sync": _sync_card(dataset, clip_ids),
            },
            "regime": {"name": regime, "train_seconds": round(train_seconds, 2), "overrides": dict(overrides or {})},
            "training": settings.as_dict(),
            "amplitude_gain": round(gain, 4),
            # Predict's largest gain towards opening_std for this model (lstm.PREDICT_GAIN_CAPS, by regime).
            "max_amplitude_gain": lstm.predict_gain_cap(regime),
            # The speaker's real mouth-opening spread (inner-lip gap / mouth width) over the training rows:
            # Predict brings hesitant predictions of unfamiliar speech up to it (PredictOptions.max_amplitude_gain).
            "opening_std": float(
                np.nanstd(mouth_opening_ratio(dataset["shapes"][_rows(section_offsets, train_sections)]))
            ),
            "history": {
                "train_loss": trained.train_losses,
                "validation_loss": trained.validation_losses,
                "learning_rate": trained.learning_rates,
            },
            "epochs": trained.epochs,
            "best_epoch": trained.best_epoch,
            "ensemble": [
                {
                    "seed": settings.seed + index,
                    "epochs": run.epochs,
                    "best_epoch": run.best_epoch,
                    "best_validation_loss": run.best_validation_loss,
                    "seconds": round(run.seconds, 3),
                }
                for index, run in enumerate(runs)
            ],
            "stopped_early": trained.stopped_early,
            "training_seconds": round(sum(run.seconds for run in runs), 3),
            "metrics": {
                "train_loss": trained.final_train_loss,
                "validation_loss": trained.best_validation_loss,
                "landmark_error": error,
                "mouth_open_correlation": correlation,
                "epochs": trained.epochs,
            },
            "tensorflow_version": tf.__version__,
        }
        card_path = extra / "model_card.json"
        card_path.write_text(json.dumps(card, indent=2, allow_nan=False) + "\n")

        for stale in list(store.list_keys(prefix)):  # leftovers of an attempt that died before its card
            store.delete(stale)
        files = sorted(p for p in work.rglob("*") if p.is_file() and p != card_path)
        for path in [*files, card_path]:  # the card last: it marks the version complete
            store.put_file(prefix + path.relative_to(work).as_posix(), path, content_type=_content_type(path))
        if models_root is not None:
            work.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
            target = models_root / str(version)
            try:
                os.rename(work, target)
            except OSError as exc:
                raise FailedPrecondition(f"cannot move the new version into {target}: {exc}") from exc
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    log.info(
        "stored %s version %d (%d epochs, best %d, %.1f s total)",
        speaker,
        version,
        trained.epochs,
        trained.best_epoch,
        time.monotonic() - started,
    )
    return card


def summary_line(card: Mapping) -> str:
    """One line about a stored version: "stored <prefix>  epochs E (best B)  <metrics>" (n/a where unknown)."""
    metrics = card.get("metrics") or {}

    def show(name: str) -> str:
        value = metrics.get(name)
        return "n/a" if value is None else f"{value:.4f}"

    return (
        f"stored {card['prefix']}  epochs {card['epochs']} (best {card['best_epoch']})  "
        f"train_loss {show('train_loss')}  validation_loss {show('validation_loss')}  "
        f"landmark_error {show('landmark_error')}  mouth_open_correlation {show('mouth_open_correlation')}"
    )


# ----------------------------------------------------------------------------------------------------------
# command line


TRAINING_FLAGS = (  # (flag, TrainingSettings field, type, help)
    ("--epochs", "max_epochs", int, "maximum epochs"),
    ("--hidden-units", "hidden_units", int, "LSTM units per layer"),
    ("--layers", "layers", int, "stacked LSTM layers"),
    ("--delay-steps", "delay_steps", int, "steps (10 ms) of future audio the model hears"),
    ("--sequence-length", "sequence_length", int, "supervised steps per training window"),
    ("--batch-size", "batch_size", int, "windows per gradient step"),
    ("--learning-rate", "learning_rate", float, "Adam step size"),
    ("--learning-rate-decay", "learning_rate_decay", float, "factor on the learning rate after each epoch"),
    ("--gradient-clip-norm", "gradient_clip_norm", float, "global gradient norm clip"),
    ("--dropout", "dropout", float, "dropout rate on LSTM inputs and outputs"),
    ("--patience", "early_stopping_patience", int, "epochs without improvement before stopping; 0 = never"),
    ("--seed", "seed", int, "seed of initialisation, dropout and window sampling"),
    ("--ensemble", "ensemble", int, "models trained from successive seeds and averaged"),
    ("--tempo-augmentation", "tempo_augmentation", float, "also train on the speech at tempi 1 -/+ this; 0 = none"),
)


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.lipsync.trainer",
        description="Train a speaker's LSTM from a stored dataset and store it as models/<speaker>/<version>/.",
    )
    speaker = environ.get(TRAIN_SPEAKER_VARIABLE, "").strip()
    parser.add_argument(
        "--speaker", default=speaker or None, required=not speaker, help=f"speaker name (${TRAIN_SPEAKER_VARIABLE})"
    )
    parser.add_argument("--dataset", required=True, help="object key of the dataset .npz")
    parser.add_argument("--pca", required=True, help="object key of the PCA .npz")
    parser.add_argument(
        "--models-dir",
        default=environ.get(MODELS_DIR_VARIABLE, "").strip() or None,
        help=f"also write <dir>/<speaker>/<version>/ (${MODELS_DIR_VARIABLE})",
    )
    options = parser.add_argument_group(
        "training options (unset: chosen by the amount of training speech, see lstm.DATA_SIZE_REGIMES)"
    )
    for flag, name, kind, what in TRAINING_FLAGS:
        options.add_argument(flag, dest=name, type=kind, default=None, help=what)
    return parser


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    args = _parser(environ).parse_args(argv)
    job_id = environ.get("A2V_JOB_ID", "")  # set on the trainer Jobs the orchestrator starts in Kubernetes
    logging.basicConfig(level=logging.WARNING, format=f"job {job_id}: %(message)s" if job_id else "%(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    try:
        overrides = {name: getattr(args, name) for _, name, _, _ in TRAINING_FLAGS if getattr(args, name) is not None}
        lstm.TrainingSettings(**overrides)  # bad values fail here, before the dataset is read
        config = Config.from_env("trainer", environ)
        store = BlobStore.from_config(config.store)

        def report(epoch: lstm.EpochResult) -> None:
            validation = "-" if epoch.validation_loss is None else f"{epoch.validation_loss:.5f}"
            print(
                f"epoch {epoch.epoch}/{epoch.max_epochs}  train {epoch.train_loss:.5f}  validation {validation}  "
                f"lr {epoch.learning_rate:.2e}  best {epoch.best_epoch}  {epoch.seconds:.2f} s",
                flush=True,
            )

        card = train_speaker(
            store,
            speaker=args.speaker,
            dataset_key=args.dataset,
            pca_key=args.pca,
            overrides=overrides,
            models_dir=args.models_dir,
            on_epoch=report,
        )
    except (A2VError, ConfigError) as exc:
        print(f"trainer: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("trainer: error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: keep the traceback for the logs, end with the one-line reason
        log.exception("training failed")
        print(f"trainer: error: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(summary_line(card), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
