"""Learning curve of the speaker model (prints, asserts nothing): held-out accuracy against minutes of training speech.

`python -m evaluation.learning_curve --train V1 [V2 ...] --test HELDOUT [--free-speech AUDIO] --minutes 1 5 30`
trains the model as `a2v train` does (`trainer.fit_speaker`: sync-corrected dataset, data-size regime, ensemble,
held-back ends, amplitude calibration) on the first M minutes of the training videos, for each M, and scores it on
the held-out video against its real mouth: mouth-opening r at lag 0, the best lag, the amplitude ratio and the
landmark error, beside the mean shape, ridge regression (+-200 ms of features) and the loudness floor (log energy).
With --free-speech it also reports the predicted mouth's amplitude (against the held-out real mouth's) and its
audio-to-mouth lag (`face.dataset.estimate_sync_offset` on the prediction) for speech of no footage.
Analyses are cached in --cache (one .npz per video), so a rerun trains only. Training on 30 minutes takes tens of
minutes on 2 cores: this is a quality command, never part of `make test`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from evaluation.lips import compare_openings
from evaluation.quality import Ridge, analyse_clip, choose_alpha, rows_of, windowed
from services.audio.core import decode_audio, extract_features, normalize_loudness
from services.face.dataset import ClipTracks, build_speaker_dataset, estimate_sync_offset, pair_clip
from services.lipsync import model as lstm
from services.lipsync import trainer
from services.lipsync.core import resample
from services.runtime.canonical import mouth_opening_ratio


def cached_analysis(path: Path, cache: Path, detector_factory) -> ClipTracks:
    """The clip's tracks, from `cache` when analysed before (keyed by name, size and mtime)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    file = cache / f"{path.stem}-{key}.npz"
    if file.exists():
        with np.load(file) as z:
            return ClipTracks(
                path.stem,
                z["timestamps"],
                z["mouth_shapes"],
                z["face_valid"],
                z["features"],
                float(z["feature_start_seconds"]),
                float(z["feature_rate"]),
            )
    clip = analyse_clip(path, detector_factory())
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(
        file,
        timestamps=clip.timestamps,
        mouth_shapes=clip.mouth_shapes,
        face_valid=clip.face_valid,
        features=clip.features,
        feature_start_seconds=clip.feature_start_seconds,
        feature_rate=clip.feature_rate,
    )
    return clip


def first_seconds(clips: list[ClipTracks], seconds: float) -> list[ClipTracks]:
    """The clips cut so that together they last `seconds` (whole clips first, then the start of the next)."""
    out, left = [], seconds
    for clip in clips:
        if left <= 0:
            break
        duration = clip.timestamps[-1] - clip.timestamps[0]
        if duration <= left:
            out.append(clip)
        else:
            frames = int(np.searchsorted(clip.timestamps, clip.timestamps[0] + left))
            rows = int(math.ceil((clip.timestamps[frames - 1] - clip.feature_start_seconds) * clip.feature_rate))
            out.append(
                dataclasses.replace(
                    clip,
                    timestamps=clip.timestamps[:frames],
                    mouth_shapes=clip.mouth_shapes[:frames],
                    face_valid=clip.face_valid[:frames],
                    features=clip.features[: max(rows, 1)],
                )
            )
        left -= duration
    return out


def opening_scores(predicted: np.ndarray, truth: np.ndarray, max_lag: int = 15) -> dict:
    """r at lag 0, best lag (frames, + = prediction behind), amplitude ratio and landmark error of [N, 20, 2] shapes.

    The openings are compared as `a2v eval resynth` compares them (`lips.compare_openings`).
    """
    compared = compare_openings(mouth_opening_ratio(predicted), mouth_opening_ratio(truth), fps=1.0, max_lag=max_lag)
    return {
        "r": compared.r_lag0,
        "best_lag": compared.best_lag_frames,
        "amplitude": compared.amplitude_ratio,
        "landmark_error": lstm.landmark_error(predicted, truth),
    }


def predict_frames(model, features_norm: np.ndarray, clip: ClipTracks, delay: int) -> np.ndarray:
    rows = lstm.predict_sequence(model, features_norm, delay=delay)
    return resample(rows, start_seconds=clip.feature_start_seconds, rate=clip.feature_rate, times=clip.timestamps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.learning_curve", description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, nargs="+", required=True, help="training videos of the speaker")
    parser.add_argument("--test", type=Path, required=True, help="held-out video of the speaker (real footage)")
    parser.add_argument("--free-speech", type=Path, help="speech without footage (amplitude and lag only)")
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 5.0, 30.0], help="training sizes")
    parser.add_argument("--cache", type=Path, default=Path("out/quality/analysis"), help="analysis cache folder")
    parser.add_argument("--json", type=Path, default=Path("out/quality/learning_curve.json"), help="results file")
    parser.add_argument("--max-epochs", type=int, help="cap the epochs (default: the regime's)")
    args = parser.parse_args(argv)

    def detector():
        from services.face.landmarks import LandmarkDetector

        return LandmarkDetector()

    started = time.monotonic()
    train_all = [cached_analysis(p, args.cache, detector) for p in args.train]
    test = cached_analysis(args.test, args.cache, detector)
    print(f"analysed in {time.monotonic() - started:.0f} s", flush=True)
    valid = test.face_valid.astype(bool) & np.isfinite(test.mouth_shapes).all(axis=(1, 2))
    truth = test.mouth_shapes[valid]
    free = None
    if args.free_speech:
        audio = normalize_loudness(decode_audio(args.free_speech))
        free = extract_features(audio.samples)
    results = []
    for minutes in args.minutes:
        clips = first_seconds(train_all, minutes * 60)
        dataset = build_speaker_dataset(clips, validation_fraction=0.0)
        arrays = dataset.arrays()
        pca = dataset.pca.arrays()
        tic = time.monotonic()
        overrides = {"max_epochs": args.max_epochs} if args.max_epochs else {}
        fit = trainer.fit_speaker(arrays, pca, overrides=overrides, name=f"{minutes:g} min")
        seconds = time.monotonic() - tic
        norm = ((test.features - dataset.feature_mean) / dataset.feature_std).astype(np.float32)
        delay = fit.settings.delay_steps
        row = {
            "minutes": minutes,
            "train_seconds": fit.train_seconds,
            "regime": fit.regime,
            "settings": fit.settings.as_dict(),
            "training_seconds": round(seconds, 1),
            "amplitude_gain": fit.gain,
            "lstm": opening_scores(
                dataset.pca.reconstruct(predict_frames(fit.trained.model, norm, test, delay))[valid], truth
            ),
            "mean_shape_error": lstm.landmark_error(
                np.repeat(dataset.pca.reconstruct(np.zeros((1, len(dataset.pca.components)))), len(truth), 0), truth
            ),
        }
        # ridge on +-200 ms of features, alpha from the held-back tail of the training rows
        offsets, train_sections = dataset.section_offsets, np.arange(len(dataset.section_offsets) - 1)
        x = windowed(((dataset.features - dataset.feature_mean) / dataset.feature_std), offsets, train_sections, 20)
        y = dataset.coefficients[rows_of(offsets, train_sections)].astype(np.float64)
        cut = int(0.8 * len(x))
        alpha, _ = choose_alpha(x[:cut], y[:cut], x[cut:], y[cut:])
        ridge = Ridge(x, y, alpha)
        paired = pair_clip(test)
        test_x = windowed(
            ((paired.features - dataset.feature_mean) / dataset.feature_std),
            paired.section_offsets,
            np.arange(len(paired.section_offsets) - 1),
            20,
        )
        ridge_rows = ridge(test_x)
        ridge_frames = np.stack(
            [np.interp(test.timestamps, paired.times, ridge_rows[:, k]) for k in range(ridge_rows.shape[1])], 1
        )
        row["ridge"] = opening_scores(dataset.pca.reconstruct(ridge_frames)[valid], truth)
        energy = np.interp(
            test.timestamps,
            test.feature_start_seconds + np.arange(len(test.features)) / test.feature_rate,
            test.features[:, 13],
        )[valid]
        row["loudness_r"] = float(np.corrcoef(energy, mouth_opening_ratio(truth))[0, 1])
        row["real_sync_offset_s"] = estimate_sync_offset(test).seconds
        predicted_clip = dataclasses.replace(
            test,
            mouth_shapes=dataset.pca.reconstruct(predict_frames(fit.trained.model, norm, test, delay)).astype(
                np.float32
            ),
        )
        row["predicted_sync_offset_s"] = estimate_sync_offset(predicted_clip).seconds
        if free is not None:
            fnorm = ((free.values - dataset.feature_mean) / dataset.feature_std).astype(np.float32)
            times = np.arange(int(len(free.values) / 100 * 25)) / 25.0
            rows = lstm.predict_sequence(fit.trained.model, fnorm, delay=delay)
            shapes = dataset.pca.reconstruct(
                resample(rows, start_seconds=free.start_seconds, rate=free.rate, times=times)
            )
            spoken = ClipTracks(
                "free",
                times,
                shapes.astype(np.float32),
                np.ones(len(times), bool),
                free.values,
                free.start_seconds,
                free.rate,
            )
            row["free_speech"] = {
                "amplitude_vs_real": float(mouth_opening_ratio(shapes).std() / mouth_opening_ratio(truth).std()),
                "sync_offset_s": estimate_sync_offset(spoken).seconds,
            }
        results.append(row)
        ours, r = row["lstm"], row["ridge"]
        line = [
            f"{minutes:5g} min ({row['regime']}, {seconds:.0f} s): LSTM r {ours['r']:.3f} lag {ours['best_lag']}",
            f"amp {ours['amplitude']:.2f} err {ours['landmark_error']:.4f}",
            f"| ridge r {r['r']:.3f} err {r['landmark_error']:.4f} | mean err {row['mean_shape_error']:.4f}",
            f"| loudness r {row['loudness_r']:.3f}",
            f"| sync real {row['real_sync_offset_s']:+.2f} s predicted {row['predicted_sync_offset_s']:+.2f} s",
        ]
        if free is not None:
            speech = row["free_speech"]
            line.append(f"| free speech amp {speech['amplitude_vs_real']:.2f} sync {speech['sync_offset_s']:+.2f} s")
        print(" ".join(line), flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
