"""Quality benchmark (prints, asserts nothing): the LSTM vs the mean shape and ridge regression on held-out speech.

`python -m evaluation.quality` analyses obama_clip1.mp4 (training) and obama_clip2.mp4 (held out) with the
face and audio cores, builds the speaker dataset, trains the LSTM and prints, for the held-out clip, the landmark
error normalised by the mouth width and the Pearson correlation of the mouth opening for three predictors: the
LSTM (`predict_sequence` over each section), the training mean shape, and ridge regression from a +-200 ms
window of normalised features (closed form; alpha chosen on a holdout of the training data).

Model selection, two ways (`--select-on`):
  validation  (default) as the trainer does it: the held-out clip is the dataset's validation clip, so the
              LSTM's early stopping sees its loss; ridge's alpha comes from the last 20 % of the training clip.
  train       strictly held out: the last 20 % of the training clip is the validation clip (early stopping
              and ridge's alpha both use it) and the held-out clip is used for nothing but the numbers.

Training defaults here differ from the paper's in five values, because 20 s of training speech give only
~40 windows per epoch: batch 10 (not 100, so an epoch takes several steps), learning rate 3e-3, sequence
length 50, dropout 0.5 (the model has tens of thousands of weights for ~2 000 rows) and 2 LSTM layers (on a
small grid, 2 layers gave the lowest validation loss on the held-back end of the training clip among the
60-unit models). `--paper-defaults` trains with TrainingSettings() as is. Training takes under a minute on
2 CPU cores (analysis about 15 s); `--epochs` caps the epochs (default 300; early stopping ends far sooner).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from deploy.samples import SAMPLE_DATA
from services.audio.core import decode_audio, extract_features, normalize_loudness
from services.face.core import analyze_video
from services.face.dataset import ClipTracks, build_speaker_dataset, pair_clip
from services.face.landmarks import LandmarkDetector
from services.lipsync import model as lstm
from services.runtime.canonical import inner_lip_gap

BENCHMARK_SETTINGS = {"batch_size": 10, "learning_rate": 3e-3, "sequence_length": 50, "dropout": 0.5, "layers": 2}
ALPHAS = tuple(10.0**k for k in range(-1, 7))


def analyse_clip(
    path: Path, detector: LandmarkDetector, *, progress: Callable[[int, int], None] | None = None
) -> ClipTracks:
    """Face tracks and audio features of one video (the cores the face and audio stages run).

    `progress(done_frames, total_frames)` is handed to the face analysis (see `analyze_video`).
    """
    analysis = analyze_video(path, detector=detector, progress=progress)
    audio = normalize_loudness(decode_audio(path))
    features = extract_features(audio.samples)
    return ClipTracks(
        clip_id=path.stem,
        timestamps=np.asarray(analysis.timestamps),
        mouth_shapes=np.asarray(analysis.canonical_mouth),
        face_valid=np.asarray(analysis.face_valid),
        features=np.asarray(features.values),
        feature_start_seconds=features.start_seconds,
        feature_rate=features.rate,
    )


def split_clip(clip: ClipTracks, fraction: float) -> tuple[ClipTracks, ClipTracks]:
    """The first `fraction` of a clip's time and the rest, as two clips (frames and feature rows cut alike)."""
    t0, t1 = clip.timestamps[0], clip.timestamps[-1]
    cut = t0 + fraction * (t1 - t0)
    frame = int(np.searchsorted(clip.timestamps, cut))
    row = max(0, math.ceil((cut - clip.feature_start_seconds) * clip.feature_rate))
    head = ClipTracks(
        f"{clip.clip_id}_head",
        clip.timestamps[:frame],
        clip.mouth_shapes[:frame],
        clip.face_valid[:frame],
        clip.features[:row],
        clip.feature_start_seconds,
        clip.feature_rate,
    )
    tail = ClipTracks(
        f"{clip.clip_id}_tail",
        clip.timestamps[frame:],
        clip.mouth_shapes[frame:],
        clip.face_valid[frame:],
        clip.features[row:],
        clip.feature_start_seconds + row / clip.feature_rate,
        clip.feature_rate,
    )
    return head, tail


def windowed(features_norm: np.ndarray, offsets: np.ndarray, sections, half: int) -> np.ndarray:
    """float64 [N, (2 half + 1) F]: each row's features from -half to +half rows, zero (the mean) past a section."""
    blocks = []
    for section in sections:
        a, b = int(offsets[section]), int(offsets[section + 1])
        pad = np.zeros((half, features_norm.shape[1]))
        padded = np.concatenate([pad, features_norm[a:b], pad])
        blocks.append(np.concatenate([padded[k : k + b - a] for k in range(2 * half + 1)], axis=1))
    return np.concatenate(blocks) if blocks else np.zeros((0, (2 * half + 1) * features_norm.shape[1]))


def rows_of(offsets: np.ndarray, sections) -> np.ndarray:
    return np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in sections]).astype(np.int64)


class Ridge:
    """Closed-form ridge regression with an unpenalised intercept."""

    def __init__(self, x: np.ndarray, y: np.ndarray, alpha: float) -> None:
        self.x_mean, self.y_mean = x.mean(axis=0), y.mean(axis=0)
        xc = x - self.x_mean
        self.weights = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - self.y_mean))
        self.alpha = alpha

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.x_mean) @ self.weights + self.y_mean


def choose_alpha(x_fit, y_fit, x_check, y_check) -> tuple[float, dict[float, float]]:
    errors = {alpha: float(np.mean((Ridge(x_fit, y_fit, alpha)(x_check) - y_check) ** 2)) for alpha in ALPHAS}
    return min(errors, key=errors.get), errors


def opening_lag(predicted: np.ndarray, truth: np.ndarray, max_lag: int = 30) -> int:
    """Rows (10 ms) by which the predicted mouth opening lags the true one (argmax of the cross-correlation)."""
    p = inner_lip_gap(predicted)
    t = inner_lip_gap(truth)
    p, t = p - p.mean(), t - t.mean()
    lags = range(-max_lag, max_lag + 1)
    scores = [float(np.dot(p[max(0, k) : len(p) + min(0, k)], t[max(0, -k) : len(t) + min(0, -k)])) for k in lags]
    return list(lags)[int(np.argmax(scores))]


def _fmt(value: float) -> str:
    return "   n/a" if value is None or math.isnan(value) else f"{value:6.4f}"


def main(argv: list[str] | None = None) -> int:
    defaults = lstm.TrainingSettings()
    parser = argparse.ArgumentParser(prog="python -m evaluation.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=SAMPLE_DATA / "speakers" / "obama")
    parser.add_argument("--train", default="obama_clip1.mp4", help="training video in --data-dir")
    parser.add_argument("--test", default="obama_clip2.mp4", help="held-out video in --data-dir")
    parser.add_argument("--select-on", choices=("validation", "train"), default="validation")
    parser.add_argument("--epochs", type=int, default=defaults.max_epochs, help="maximum epochs")
    parser.add_argument("--paper-defaults", action="store_true", help="train with TrainingSettings() as is")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--sequence-length", type=int)
    parser.add_argument("--dropout", type=float)
    parser.add_argument("--hidden-units", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--window-rows", type=int, default=20, help="ridge window half-width in rows (20 = 200 ms)")
    args = parser.parse_args(argv)

    chosen = {} if args.paper_defaults else dict(BENCHMARK_SETTINGS)
    for name in ("batch_size", "learning_rate", "sequence_length", "dropout", "hidden_units", "layers", "seed"):
        if getattr(args, name) is not None:
            chosen[name] = getattr(args, name)
    settings = lstm.TrainingSettings(max_epochs=args.epochs, **chosen)
    d = settings.delay_steps

    started = time.monotonic()
    detector = LandmarkDetector()
    train_clip = analyse_clip(args.data_dir / args.train, detector)
    test_clip = analyse_clip(args.data_dir / args.test, detector)
    analysed = time.monotonic()
    print(f"analysed {args.train} and {args.test} in {analysed - started:.1f} s")

    if args.select_on == "validation":
        dataset = build_speaker_dataset([train_clip, test_clip], validation_clip_ids=[test_clip.clip_id])
    else:
        head, tail = split_clip(train_clip, 0.8)
        dataset = build_speaker_dataset([head, tail], validation_clip_ids=[tail.clip_id])
    offsets = dataset.section_offsets
    held = dataset.is_validation[dataset.section_clip]
    train_sections, validation_sections = np.flatnonzero(~held), np.flatnonzero(held)
    features_norm = ((dataset.features - dataset.feature_mean) / dataset.feature_std).astype(np.float32)
    coefficients = dataset.coefficients

    # The evaluation rows: the held-out clip, paired like the dataset, normalised with the training statistics.
    if args.select_on == "validation":
        eval_features, eval_shapes, eval_offsets = features_norm, dataset.shapes, offsets
        eval_sections = validation_sections
    else:
        paired = pair_clip(test_clip)
        eval_features = ((paired.features - dataset.feature_mean) / dataset.feature_std).astype(np.float32)
        eval_shapes, eval_offsets = paired.shapes, paired.section_offsets
        eval_sections = np.arange(len(eval_offsets) - 1)
    eval_rows = rows_of(eval_offsets, eval_sections)
    truth = eval_shapes[eval_rows]
    print(
        f"dataset: {dataset.rows_of(False)} training rows, {dataset.rows_of(True)} validation rows, "
        f"K = {len(dataset.pca.components)} ({dataset.pca.retained_variance:.4f} of the variance); "
        f"evaluating on {len(eval_rows)} rows ({len(eval_rows) / 100:.1f} s) of {args.test}"
    )
    print(f"LSTM settings: {settings.as_dict()}")

    tic = time.monotonic()
    result = lstm.train_model(
        features_norm, coefficients, offsets, train_sections, validation_sections, settings=settings
    )
    training_seconds = time.monotonic() - tic
    print(
        f"trained {result.epochs} epochs in {training_seconds:.1f} s (best epoch {result.best_epoch}, "
        f"validation loss {_fmt(result.best_validation_loss)}, training loss {result.final_train_loss:.5f})"
    )
    lstm_shapes = np.concatenate(
        [
            dataset.pca.reconstruct(
                lstm.predict_sequence(result.model, eval_features[eval_offsets[s] : eval_offsets[s + 1]], delay=d)
            )
            for s in eval_sections
        ]
    )

    mean_shapes = np.repeat(dataset.pca.reconstruct(np.zeros((1, len(dataset.pca.components)))), len(truth), axis=0)

    half = args.window_rows
    x_train = windowed(features_norm, offsets, train_sections, half)
    y_train = coefficients[rows_of(offsets, train_sections)].astype(np.float64)
    if args.select_on == "validation":
        cut = int(0.8 * len(x_train))
        alpha, _ = choose_alpha(x_train[:cut], y_train[:cut], x_train[cut:], y_train[cut:])
        ridge = Ridge(x_train, y_train, alpha)
    else:
        x_check = windowed(features_norm, offsets, validation_sections, half)
        y_check = coefficients[rows_of(offsets, validation_sections)].astype(np.float64)
        alpha, _ = choose_alpha(x_train, y_train, x_check, y_check)
        ridge = Ridge(x_train, y_train, alpha)
    x_eval = windowed(eval_features, eval_offsets, eval_sections, half)
    ridge_shapes = dataset.pca.reconstruct(ridge(x_eval))

    print()
    print(f"held-out {args.test}, model selection on {args.select_on}:")
    print(f"  {'predictor':<34} {'landmark error / mouth width':>28} {'mouth-opening r':>16} {'lag (10 ms)':>12}")
    for name, shapes in (
        ("LSTM", lstm_shapes),
        ("mean shape", mean_shapes),
        (f"ridge +-{half * 10} ms (alpha {alpha:g})", ridge_shapes),
    ):
        error, correlation = lstm.mouth_metrics(shapes, truth)
        constant = np.ptp(inner_lip_gap(shapes)) == 0
        lag = "n/a" if constant else str(opening_lag(shapes, truth))
        print(f"  {name:<34} {error:>28.4f} {'n/a' if constant else _fmt(correlation):>16} {lag:>12}")
    print(f"\ntotal {time.monotonic() - started:.1f} s (training {training_seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
