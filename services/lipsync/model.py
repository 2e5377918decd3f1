"""The speaker LSTM (no I/O): delayed training windows, the Keras model, its training loop, SavedModel export."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.lipsync.core import MOUTH_POINTS, shapes_from_coefficients
from services.runtime.canonical import MOUTH_CORNERS, inner_lip_gap, mouth_opening_ratio
from services.runtime.errors import Cancelled, InvalidInput

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported (lazily, below)

FEATURE_DIM = 28
FEATURE_RATE_HZ = 100.0
DEFAULT_DELAY_STEPS = 20
SIGNATURE_KEY = "serving_default"
INPUT_KEY = "features"
OUTPUT_KEY = "coefficients"


@dataclass(frozen=True)
class TrainingSettings:
    """LSTM hyper-parameters; the defaults are the paper's / seed's (lipsync.v1.TrainingOptions).

    Attributes:
        hidden_units: LSTM units per layer, 1..4096 (60).
        layers: stacked LSTM layers, 1..8 (1).
        delay_steps: d, feature steps the mouth lags the audio it is predicted from: the output at input step
            t is the mouth at step t - d, so the model hears d steps (10 ms each) of future audio, 0..1000 (20).
        sequence_length: supervised steps per training window, 1..100000 (100 = 1 s); a window feeds
            sequence_length + d input steps, the first d of which only warm the state up (see `make_sequences`).
        batch_size: windows per gradient step, >= 1 (100).
        max_epochs: most passes over the training windows, >= 1 (300).
        learning_rate: Adam step size, > 0 (1e-3).
        learning_rate_decay: factor applied to the learning rate after every epoch, in (0, 1] (0.99).
        gradient_clip_norm: gradients are scaled down to this global norm, > 0 (10).
        dropout: drop rate on the LSTM inputs and outputs while training, in [0, 1) (0.2; seed keep_prob 0.8).
        early_stopping_patience: epochs without a better validation loss before stopping, >= 0; 0 = never stop
            early (20). Ignored without validation windows.
        seed: seeds weight initialisation, dropout and window sampling, >= 0 (42).
        ensemble: models trained from different seeds (seed, seed + 1, ...) and averaged in one graph,
            1..16 (1). On 50 s of Obama, 3-4 members raised held-out mouth-opening r from 0.39 to 0.45: small
            data leaves each model's answer partly to chance, and the average keeps what they agree on.
        tempo_augmentation: s in [0, 0.5) (0 = none, the paper's training): the training sections are also
            replayed at tempi 1 - s and 1 + s (features and mouth stretched alike in time, `stretch_sections`),
            so a model trained on a minute of speech meets the same sounds at other speaking rates. Measured on
            Obama (trained on clip1 + clip2 as `a2v train` does, held-out weekly address, 2 seeds), s = 0.15
            gave mouth-opening r 0.394 against 0.418 without, at three times the training time, so no regime
            turns it on; it stays a selectable option for the comparison.
    """

    hidden_units: int = 60
    layers: int = 1
    delay_steps: int = DEFAULT_DELAY_STEPS
    sequence_length: int = 100
    batch_size: int = 100
    max_epochs: int = 300
    learning_rate: float = 1e-3
    learning_rate_decay: float = 0.99
    gradient_clip_norm: float = 10.0
    dropout: float = 0.2
    early_stopping_patience: int = 20
    seed: int = 42
    ensemble: int = 1
    tempo_augmentation: float = 0.0

    def __post_init__(self) -> None:
        checks = (
            ("hidden_units", 1 <= self.hidden_units <= 4096, "in 1..4096"),
            ("layers", 1 <= self.layers <= 8, "in 1..8"),
            ("delay_steps", 0 <= self.delay_steps <= 1000, "in 0..1000"),
            ("sequence_length", 1 <= self.sequence_length <= 100_000, "in 1..100000"),
            ("batch_size", 1 <= self.batch_size <= 100_000, "in 1..100000"),
            ("max_epochs", 1 <= self.max_epochs <= 100_000, "in 1..100000"),
            ("learning_rate", math.isfinite(self.learning_rate) and self.learning_rate > 0, "> 0"),
            ("learning_rate_decay", 0 < self.learning_rate_decay <= 1, "in (0, 1]"),
            ("gradient_clip_norm", math.isfinite(self.gradient_clip_norm) and self.gradient_clip_norm > 0, "> 0"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("early_stopping_patience", self.early_stopping_patience >= 0, ">= 0"),
            ("seed", 0 <= self.seed < 2**63 - 16, "in [0, 2^63 - 16)"),
            ("ensemble", 1 <= self.ensemble <= 16, "in 1..16"),
            ("tempo_augmentation", 0 <= self.tempo_augmentation < 0.5, "in [0, 0.5)"),
        )
        for name, ok, wanted in checks:
            if not ok:
                raise InvalidInput(f"training option {name} must be {wanted}, got {getattr(self, name)!r}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Training defaults by the amount of training speech (seconds -> overrides of TrainingSettings), so `a2v train`
# needs no hyper-parameter from a user. Up to a few minutes (what a user usually has, 20 s to 2 min) an epoch
# holds only tens of windows: small batches (several steps per epoch), short windows, a higher learning rate,
# and heavy dropout on a 2-layer model (chosen on the held-back end of obama_clip1; evaluation/quality.py).
# With tens of minutes (the paper's regime) the paper's batch and window apply with a wider 2-layer model.
DATA_SIZE_REGIMES: tuple[tuple[str, float, dict[str, Any]], ...] = (
    (
        "small",
        180.0,
        {
            "batch_size": 10,
            "learning_rate": 3e-3,
            "sequence_length": 50,
            "dropout": 0.5,
            "layers": 2,
            "ensemble": 4,
        },
    ),
    (
        "medium",
        900.0,
        {"batch_size": 50, "learning_rate": 2e-3, "sequence_length": 100, "dropout": 0.3, "layers": 2, "ensemble": 2},
    ),
    (
        "large",
        math.inf,
        {
            "batch_size": 100,
            "sequence_length": 100,
            "dropout": 0.2,
            "layers": 2,
            "hidden_units": 128,
            "max_epochs": 100,
            "early_stopping_patience": 10,
        },
    ),
)


# Predict's largest amplitude gain by regime (the model card's `max_amplitude_gain`; a request may ask for another).
# Predict lifts a prediction whose opening spreads less than the speaker's real opening. Trained on minutes, the
# model answers its own speaker's held-out speech with about the real spread (GRID, reference / prediction over all
# frames: 1.03 with 30 min, gain 1.00 with 5 min), so a low spread marks an unfamiliar voice answered with a
# hesitant mouth (1.37-2.0 for the shared speech files). A high cap lifts that and leaves the speaker's own speech
# alone. Through the stack, commentary_60s onto grid_s1_00 (opening spread against the target's): 30 min of
# training 0.78x at cap 1.15 -> 0.90x at 1.5; 5 min 0.83x at 1.3 -> 0.92x at 1.5; held-out grid_s1_06 kept its
# amplitude (1.05x and 1.04x). Trained on a minute, the model reads hesitant on its own speaker's held-out speech
# too (obama: 1.38), so the cap stays at 1.15 there (held-out amplitude 1.14x; more would pass 1.15x).
PREDICT_GAIN_CAPS: dict[str, float] = {"small": 1.15, "medium": 1.5, "large": 1.5}
DEFAULT_PREDICT_GAIN_CAP = 1.15


def predict_gain_cap(regime: str | None) -> float:
    """Predict's default largest amplitude gain for a model trained in `regime` (1.15 for an unknown one)."""
    return PREDICT_GAIN_CAPS.get(str(regime), DEFAULT_PREDICT_GAIN_CAP)


DELTA_COLUMNS = slice(FEATURE_DIM // 2, FEATURE_DIM)
"""The first derivatives in the 28-D features (13 MFCCs and log energy, then their deltas per 10 ms row)."""


def stretch_sections(
    features: np.ndarray,
    coefficients: np.ndarray,
    section_offsets: np.ndarray,
    sections: Sequence[int],
    factors: Sequence[float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Copies of `sections` at other tempi, appended after the original rows (whose offsets stay valid).

    A factor f > 1 is slower speech: a section of n rows becomes round(f n) rows, features and mouth coefficients
    interpolated linearly in time alike; derivatives (`DELTA_COLUMNS`, of raw features) are divided by f, as a
    slower sound changes less per row.

    Returns:
        (features, coefficients, section_offsets, indices of the new sections in those offsets, int64 [M, 2] the
        (factor index, original section) of each new section). A section too short to stretch (fewer than 2 rows
        before or after) gets no copy.
    """
    features = np.asarray(features, np.float32)
    coefficients = np.asarray(coefficients, np.float32)
    offsets = [int(v) for v in section_offsets]
    if offsets[-1] != len(features):
        raise InvalidInput(f"section offsets end at row {offsets[-1]}, the features have {len(features)} rows")
    feature_parts, coefficient_parts, new_sections, origins = [features], [coefficients], [], []
    for factor_index, factor in enumerate(factors):
        if not factor > 0:
            raise InvalidInput(f"tempo factors must be > 0, got {factor}")
        for section in sections:
            a, b = int(section_offsets[section]), int(section_offsets[section + 1])
            n, m = b - a, int(round((b - a) * factor))
            if n < 2 or m < 2:
                continue
            position = np.linspace(0, n - 1, m)
            low = np.minimum(np.floor(position).astype(np.int64), n - 2)
            weight = (position - low)[:, None].astype(np.float32)
            stretched_features = features[a + low] * (1 - weight) + features[a + low + 1] * weight
            stretched_features[:, DELTA_COLUMNS] /= factor
            coefficient_parts.append(coefficients[a + low] * (1 - weight) + coefficients[a + low + 1] * weight)
            feature_parts.append(stretched_features)
            new_sections.append(len(offsets) - 1)
            origins.append((factor_index, int(section)))
            offsets.append(offsets[-1] + m)
    return (
        np.concatenate(feature_parts).astype(np.float32),
        np.concatenate(coefficient_parts).astype(np.float32),
        np.asarray(offsets, np.int64),
        np.asarray(new_sections, np.int64),
        np.asarray(origins, np.int64).reshape(-1, 2),
    )


def data_size_regime(train_seconds: float) -> tuple[str, dict[str, Any]]:
    """(name, TrainingSettings overrides) of the regime that `train_seconds` of training speech falls in."""
    if not train_seconds >= 0:
        raise InvalidInput(f"train_seconds must be >= 0, got {train_seconds}")
    for name, upto, overrides in DATA_SIZE_REGIMES:
        if train_seconds < upto:
            return name, dict(overrides)
    raise AssertionError("the last regime is unbounded")  # pragma: no cover


def settings_for_data(train_seconds: float, overrides: dict[str, Any] | None = None) -> TrainingSettings:
    """TrainingSettings for `train_seconds` of training speech; `overrides` (fields a user set) win."""
    _, chosen = data_size_regime(train_seconds)
    return TrainingSettings(**(chosen | dict(overrides or {})))


@dataclass(frozen=True, eq=False)
class Sequences:
    """Training windows: input step t of window i is a feature row r, its target the mouth of row r - delay.

    Attributes:
        inputs: float32 [N, W, F] normalised features (zero after the end of a short window's section).
        targets: float32 [N, W, K] PCA coefficients (zero where `mask` is 0).
        mask: float32 [N, W], 1 where the step has a target: t >= delay and the step lies inside the section.
    """

    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass(frozen=True)
class EpochResult:
    """What one epoch did; losses are mean squared errors per coefficient (PCA units squared)."""

    epoch: int  # 1-based
    max_epochs: int
    train_loss: float  # mean over the epoch's batches, dropout on
    validation_loss: float | None  # dropout off; None without validation windows
    learning_rate: float
    best_epoch: int
    seconds: float


@dataclass(frozen=True, eq=False)
class TrainingResult:
    """A trained model and its history. `model` holds the weights of `best_epoch`."""

    model: Any  # keras.Model
    train_losses: list[float] = field(default_factory=list)
    validation_losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    best_epoch: int = 0  # 1-based; the last epoch without validation
    best_validation_loss: float | None = None
    final_train_loss: float = math.nan  # the kept weights, dropout off, over the training windows
    stopped_early: bool = False
    seconds: float = 0.0

    @property
    def epochs(self) -> int:
        return len(self.train_losses)


def _tf():
    import tensorflow as tf

    return tf


def _keras():
    import keras

    return keras


# ----------------------------------------------------------------------------------------------------------
# windows


def _check_sections(section_offsets: np.ndarray, sections: Sequence[int], n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.asarray(section_offsets, np.int64)
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != n_rows:
        raise InvalidInput(f"section_offsets must run from 0 to the row count {n_rows}, got {offsets[:3]}...")
    if np.any(np.diff(offsets) < 0):
        raise InvalidInput("section_offsets must not decrease")
    chosen = np.asarray(sections, np.int64).reshape(-1)
    if chosen.size and (chosen.min() < 0 or chosen.max() >= len(offsets) - 1):
        raise InvalidInput(f"section indices must be in [0, {len(offsets) - 1}), got {chosen.min()}..{chosen.max()}")
    return offsets[chosen], offsets[chosen + 1]


def plan_windows(
    section_offsets: np.ndarray,
    sections: Sequence[int],
    *,
    delay: int,
    length: int,
    n_rows: int,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Start rows and section ends of the windows over `sections` (int64 [N] each).

    A section of L rows has L - delay supervised mouth rows (the last `delay` rows have no future audio
    inside the section); it gets ceil((L - delay) / length) windows. Without `rng` they tile the section
    (window k starts at row k * length, so every supervised row is a target exactly once); with `rng` each
    window starts at a random row within its share of the section (stratified), which varies the windows
    from epoch to epoch. Sections with no supervised row get none.
    """
    starts_of, ends_of = _check_sections(section_offsets, sections, n_rows)
    width = length + delay
    starts, ends = [], []
    for a, b in zip(starts_of.tolist(), ends_of.tolist(), strict=True):
        supervised = b - a - delay
        if supervised <= 0:
            continue
        count = -(-supervised // length)
        if rng is None:
            first = a + length * np.arange(count)
        else:
            span = max(0, b - width - a)  # last start that keeps the whole window inside the section
            first = a + np.floor((np.arange(count) + rng.random(count)) / count * (span + 1)).astype(np.int64)
        starts.append(first)
        ends.append(np.full(count, b))
    if not starts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(starts).astype(np.int64), np.concatenate(ends).astype(np.int64)


def gather_windows(
    features_norm: np.ndarray,
    coefficients: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    *,
    delay: int,
    length: int,
) -> Sequences:
    """The windows that start at `starts` (each cut at its section's end `ends`); see `Sequences`."""
    width = length + delay
    rows = np.asarray(starts, np.int64)[:, None] + np.arange(width)[None, :]
    inside = rows < np.asarray(ends, np.int64)[:, None]
    supervised = inside & (np.arange(width) >= delay)[None, :]
    inputs = np.where(inside[..., None], features_norm[np.where(inside, rows, 0)], 0).astype(np.float32)
    targets = np.where(supervised[..., None], coefficients[np.where(supervised, rows - delay, 0)], 0)
    return Sequences(inputs, targets.astype(np.float32), supervised.astype(np.float32))


def make_sequences(
    features_norm: np.ndarray,
    coefficients: np.ndarray,
    section_offsets: np.ndarray,
    sections: Sequence[int],
    *,
    delay: int,
    length: int,
    rng: np.random.Generator | None = None,
) -> Sequences:
    """(input, target, mask) windows inside the given sections, never across a section boundary.

    Window i starting at row s feeds input rows s .. s + length + delay - 1 (W = length + delay steps). The
    target of step t is the mouth of row s + t - delay, as at inference (`predict_sequence`): the model
    answers for the mouth `delay` steps after it has heard its audio. Steps t < delay have no target (their
    mouth row lies before the window) and only warm the LSTM state up; they, and steps past the end of a
    section shorter than the window (zero inputs there), carry mask 0 and are left out of the loss. So every
    mouth row except each section's last `delay` rows can be a target, and each is learnt with `delay` steps
    of audio before it in the window and `delay` after it.

    Args:
        features_norm: float [R, F] normalised features of all rows.
        coefficients: float [R, K] PCA coefficients of the mouth at each row.
        section_offsets: int [S + 1], row range of each section (0 .. R).
        sections: which sections to cut windows from.
        delay: d >= 0.
        length: supervised steps per window, >= 1.
        rng: None = fixed tiling (validation); a generator = stratified random starts (training epochs).

    Returns:
        `Sequences` with N windows of W steps.

    Raises:
        InvalidInput: mismatched row counts or malformed sections.
    """
    features_norm = np.asarray(features_norm, np.float32)
    coefficients = np.asarray(coefficients, np.float32)
    if features_norm.ndim != 2 or coefficients.ndim != 2 or len(features_norm) != len(coefficients):
        raise InvalidInput(
            f"features {features_norm.shape} and coefficients {coefficients.shape} must be [R, F] and [R, K]"
        )
    if delay < 0 or length < 1:
        raise InvalidInput(f"delay must be >= 0 and length >= 1, got {delay} and {length}")
    starts, ends = plan_windows(
        section_offsets, sections, delay=delay, length=length, n_rows=len(features_norm), rng=rng
    )
    return gather_windows(features_norm, coefficients, starts, ends, delay=delay, length=length)


# ----------------------------------------------------------------------------------------------------------
# the model


def build_model(n_features: int, n_outputs: int, settings: TrainingSettings, *, use_cudnn: bool | str = "auto"):
    """Dropout -> [LSTM -> dropout] x layers -> dense to the PCA dimension, at every step (keras.Model).

    Input float32 [batch, time, n_features] (normalised features), output float32 [batch, time, n_outputs].
    Dropout draws a new mask per step and unit (the seed's DropoutWrapper) and is active only in training.
    The LSTM keeps Keras defaults (tanh, sigmoid gates, forget-gate bias 1, zero initial state), as the
    seed's TF LSTMCell.
    """
    if n_features < 1 or n_outputs < 1:
        raise InvalidInput(f"the model needs >= 1 input and output dimension, got {n_features} and {n_outputs}")
    keras = _keras()
    seed = settings.seed
    inputs = keras.Input(shape=(None, n_features), name=INPUT_KEY)
    x = keras.layers.Dropout(settings.dropout, seed=seed, name="input_dropout")(inputs)
    for layer in range(settings.layers):
        x = keras.layers.LSTM(
            settings.hidden_units,
            return_sequences=True,
            use_cudnn=use_cudnn,
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 10 * layer + 1),
            recurrent_initializer=keras.initializers.Orthogonal(seed=seed + 10 * layer + 2),
            name=f"lstm_{layer}",
        )(x)
        x = keras.layers.Dropout(settings.dropout, seed=seed + 10 * layer + 3, name=f"lstm_{layer}_dropout")(x)
    outputs = keras.layers.Dense(
        n_outputs, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 7), name=OUTPUT_KEY
    )(x)
    return keras.Model(inputs, outputs, name="lipsync_lstm")


def average_models(models: Sequence[Any]):
    """One keras.Model that runs every member on its input and averages their outputs (weights copied).

    Each member's layers are rebuilt at the top level of the new graph (not nested), so the export's
    cuDNN-free copy and `scale_output` see every LSTM and output layer; a single member is returned as is.
    """
    if not models:
        raise InvalidInput("an ensemble needs at least one model")
    if len(models) == 1:
        return models[0]
    keras = _keras()
    n_features = models[0].input_shape[-1]
    inputs = keras.Input(shape=(None, n_features), name=INPUT_KEY)
    outputs = []
    for index, member in enumerate(models):
        x = inputs
        for layer in member.layers[1:]:  # [0] is the InputLayer
            config = layer.get_config() | {"name": f"m{index}_{layer.name}"}
            if layer.name == OUTPUT_KEY:
                config["name"] = f"{OUTPUT_KEY}_{index}"
            copy = layer.__class__.from_config(config)
            x = copy(x)
            copy.set_weights(layer.get_weights())
        outputs.append(x)
    averaged = keras.layers.Average(name="ensemble_average")(outputs)
    return keras.Model(inputs, averaged, name="lipsync_lstm_ensemble")


def _masked_squared_error(tf, targets, outputs, mask):
    """(sum of squared errors over supervised steps and coefficients, number of supervised steps)."""
    squared = tf.reduce_sum(tf.square(outputs - targets), axis=-1)
    return tf.reduce_sum(squared * mask), tf.reduce_sum(mask)


def train_model(
    features_norm: np.ndarray,
    coefficients: np.ndarray,
    section_offsets: np.ndarray,
    train_sections: Sequence[int],
    validation_sections: Sequence[int] = (),
    *,
    settings: TrainingSettings = TrainingSettings(),
    on_epoch: Callable[[EpochResult], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    initial_weights: Sequence[np.ndarray] | None = None,
) -> TrainingResult:
    """Train the LSTM on windows of the training sections; early-stop on the validation sections.

    Per epoch: fresh stratified random windows over the training sections (`make_sequences` with an rng),
    shuffled and cut into batches of `batch_size` (the last batch may be smaller, so tiny datasets still
    take a step); each batch takes one Adam step on the masked mean squared error (mean over supervised
    steps and coefficients, the seed's L2 loss) with gradients clipped to `gradient_clip_norm` by global
    norm and dropout on. The learning rate of epoch e (0-based) is learning_rate * learning_rate_decay^e.
    After each epoch the validation loss (same error, dropout off, fixed tiling) decides early stopping;
    the weights of the best validation epoch are restored at the end. Weight initialisation, dropout and
    window sampling follow `seed`, so a run repeats exactly on the same machine.

    Args:
        features_norm: float32 [R, F] normalised features.
        coefficients: float32 [R, K] PCA coefficients.
        section_offsets: int64 [S + 1] row ranges of the sections.
        train_sections, validation_sections: indices of the sections of each split.
        settings: hyper-parameters.
        on_epoch: called after every epoch.
        should_stop: polled before every batch; True raises Cancelled.

    Raises:
        InvalidInput: no training window (every training section is at most `delay_steps` rows long), or the
            loss became NaN / infinite.
        Cancelled: should_stop returned True.
    """
    tf, keras = _tf(), _keras()
    features_norm = np.ascontiguousarray(features_norm, np.float32)
    coefficients = np.ascontiguousarray(coefficients, np.float32)
    d, length = settings.delay_steps, settings.sequence_length
    n_rows = len(features_norm)
    if len(coefficients) != n_rows:
        raise InvalidInput(f"{n_rows} feature rows but {len(coefficients)} coefficient rows")
    probe, _ = plan_windows(section_offsets, train_sections, delay=d, length=length, n_rows=n_rows)
    if len(probe) == 0:
        raise InvalidInput(
            f"no training window: every training section is at most delay_steps = {d} rows long "
            f"({len(train_sections)} training sections)"
        )
    started = time.monotonic()
    keras.utils.set_random_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model = build_model(features_norm.shape[1], coefficients.shape[1], settings)
    if initial_weights is not None:
        model.set_weights([np.asarray(w) for w in initial_weights])
    optimizer = keras.optimizers.Adam(learning_rate=settings.learning_rate, global_clipnorm=settings.gradient_clip_norm)
    optimizer.build(model.trainable_variables)
    # Fixed tilings for the losses, gathered batch by batch (a long dataset's windows need not fit in memory).
    validation = plan_windows(section_offsets, validation_sections, delay=d, length=length, n_rows=n_rows)
    train_fixed = plan_windows(section_offsets, train_sections, delay=d, length=length, n_rows=n_rows)

    specs = (
        tf.TensorSpec([None, None, features_norm.shape[1]], tf.float32),
        tf.TensorSpec([None, None, coefficients.shape[1]], tf.float32),
        tf.TensorSpec([None, None], tf.float32),
    )

    @tf.function(input_signature=specs)
    def train_step(x, y, mask):
        with tf.GradientTape() as tape:
            total, count = _masked_squared_error(tf, y, model(x, training=True), mask)
            loss = total / tf.maximum(count * coefficients.shape[1], 1.0)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return total, count

    @tf.function(input_signature=specs)
    def eval_step(x, y, mask):
        return _masked_squared_error(tf, y, model(x, training=False), mask)

    def evaluate(windows: tuple[np.ndarray, np.ndarray]) -> float:
        starts, ends = windows
        total = count = 0.0
        for lo in range(0, len(starts), settings.batch_size):
            pick = slice(lo, lo + settings.batch_size)
            batch = gather_windows(features_norm, coefficients, starts[pick], ends[pick], delay=d, length=length)
            t, c = eval_step(batch.inputs, batch.targets, batch.mask)
            total, count = total + float(t), count + float(c)
        return total / max(count * coefficients.shape[1], 1.0)

    result = TrainingResult(model=model)
    best_loss, best_weights, best_epoch, waited, stopped_early = math.inf, None, 0, 0, False
    has_validation = len(validation[0]) > 0
    patience = settings.early_stopping_patience if has_validation else 0
    for epoch in range(settings.max_epochs):
        epoch_started = time.monotonic()
        rate = settings.learning_rate * settings.learning_rate_decay**epoch
        optimizer.learning_rate.assign(rate)
        starts, ends = plan_windows(section_offsets, train_sections, delay=d, length=length, n_rows=n_rows, rng=rng)
        order = rng.permutation(len(starts))
        total = count = 0.0
        for lo in range(0, len(order), settings.batch_size):
            if should_stop is not None and should_stop():
                raise Cancelled(f"training cancelled in epoch {epoch + 1}")
            pick = order[lo : lo + settings.batch_size]
            batch = gather_windows(features_norm, coefficients, starts[pick], ends[pick], delay=d, length=length)
            t, c = train_step(batch.inputs, batch.targets, batch.mask)
            total, count = total + float(t), count + float(c)
        train_loss = total / max(count * coefficients.shape[1], 1.0)
        if not math.isfinite(train_loss):
            raise InvalidInput(
                f"training diverged in epoch {epoch + 1} (loss {train_loss}): lower learning_rate "
                f"({settings.learning_rate:g}) or gradient_clip_norm ({settings.gradient_clip_norm:g})"
            )
        validation_loss = evaluate(validation) if has_validation else None
        result.train_losses.append(train_loss)
        result.learning_rates.append(rate)
        if validation_loss is not None:
            result.validation_losses.append(validation_loss)
            if validation_loss < best_loss:
                best_loss, best_epoch, waited = validation_loss, epoch + 1, 0
                best_weights = [np.array(w) for w in model.get_weights()]
            else:
                waited += 1
        else:
            best_epoch = epoch + 1
        if on_epoch is not None:
            on_epoch(
                EpochResult(
                    epoch + 1,
                    settings.max_epochs,
                    train_loss,
                    validation_loss,
                    rate,
                    best_epoch,
                    time.monotonic() - epoch_started,
                )
            )
        if patience and waited >= patience:
            stopped_early = True
            break
    if best_weights is not None:
        model.set_weights(best_weights)
    return dataclasses.replace(
        result,
        best_epoch=best_epoch,
        best_validation_loss=best_loss if best_weights is not None else None,
        final_train_loss=evaluate(train_fixed),
        stopped_early=stopped_early,
        seconds=time.monotonic() - started,
    )


# ----------------------------------------------------------------------------------------------------------
# export and inference


def _without_cudnn(model):
    """A copy of `model` whose LSTMs use the generic kernel, so the exported graph has no cuDNN-only op.

    Keras picks the cuDNN kernel when a GPU is visible at tracing time; a SavedModel exported on a GPU node
    would then not run on a CPU TF Serving. The copy shares nothing and carries the same weights.
    """
    keras = _keras()

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.LSTM):
            config["use_cudnn"] = False
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def export_saved_model(model, path: str | os.PathLike, *, n_features: int = FEATURE_DIM) -> Path:
    """Write `model` as a TensorFlow SavedModel that TF Serving and `tf.saved_model.load` both serve.

    Signature "serving_default": input `features` float32 [batch, time, n_features] (normalised), output
    `coefficients` float32 [batch, time, K]; stateless (zero initial state per call), dropout off; output
    step t is the mouth at input step t - delay.

    Returns:
        The folder written (saved_model.pb, variables/, fingerprint.pb, assets/).
    """
    tf = _tf()
    serving_model = _without_cudnn(model)

    class _Serving(tf.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.model = inner

        @tf.function(input_signature=[tf.TensorSpec([None, None, n_features], tf.float32, name=INPUT_KEY)])
        def serve(self, features):
            return {OUTPUT_KEY: self.model(features, training=False)}

    module = _Serving(serving_model)
    path = Path(path)
    tf.saved_model.save(module, str(path), signatures={SIGNATURE_KEY: module.serve})
    return path


def runner(model_or_signature) -> Callable[[np.ndarray], np.ndarray]:
    """float32 [1, t, F] -> float32 [1, t, K] for a Keras model, a loaded signature, a SavedModel path or a callable."""
    if isinstance(model_or_signature, str | os.PathLike):
        tf = _tf()
        model_or_signature = tf.saved_model.load(str(model_or_signature)).signatures[SIGNATURE_KEY]
    try:
        keras = _keras()
        is_keras = isinstance(model_or_signature, keras.Model)
    except ImportError:  # pragma: no cover - keras ships with tensorflow here
        is_keras = False
    if is_keras:
        # predict_on_batch runs a compiled (graph) function: eager LSTM steps are ~50x slower on long inputs.
        return lambda x: np.asarray(model_or_signature.predict_on_batch(x))
    structured = getattr(model_or_signature, "structured_input_signature", None)
    if structured is not None:  # a ConcreteFunction (a loaded signature): keyword inputs, dict outputs
        tf = _tf()
        return lambda x: model_or_signature(**{INPUT_KEY: tf.constant(x)})[OUTPUT_KEY].numpy()

    def call(x: np.ndarray) -> np.ndarray:
        output = model_or_signature(x)
        if isinstance(output, dict):
            output = output[OUTPUT_KEY]
        return np.asarray(output)

    return call


def predict_sequence(model_or_signature, features_norm: np.ndarray, *, delay: int = DEFAULT_DELAY_STEPS) -> np.ndarray:
    """Reference inference: mouth coefficients aligned to the features, in one stateless call.

    The input gets `delay` rows of zeros appended (the training mean in normalised space, i.e. average
    audio) so the last rows have their look-ahead; the model runs once from the zero state; the first
    `delay` outputs (warm-up, mouths before row 0) are dropped. Row t of the result is the mouth at
    feature time t: the delay is removed here, once.

    Args:
        model_or_signature: a keras.Model, a loaded `serving_default` signature, a SavedModel folder, or a
            callable float32 [1, t, F] -> [1, t, K] (or a dict holding `coefficients`).
        features_norm: float32 [T, F] normalised features, T >= 1.
        delay: the model's delay in steps (its model card's delay_steps).

    Returns:
        float32 [T, K].
    """
    features_norm = np.asarray(features_norm, np.float32)
    if features_norm.ndim != 2 or len(features_norm) == 0:
        raise InvalidInput(f"features must be [T, F] with T >= 1, got shape {features_norm.shape}")
    if not np.isfinite(features_norm).all():
        raise InvalidInput("features contain NaN or infinite values")
    if delay < 0:
        raise InvalidInput(f"delay must be >= 0, got {delay}")
    padded = np.concatenate([features_norm, np.zeros((delay, features_norm.shape[1]), np.float32)])
    output = runner(model_or_signature)(padded[None])
    if output.ndim != 3 or output.shape[:2] != (1, len(padded)):
        raise InvalidInput(f"model returned shape {output.shape} for input of shape {(1, *padded.shape)}")
    return np.ascontiguousarray(output[0, delay:], np.float32)


# ----------------------------------------------------------------------------------------------------------
# metrics


def mouth_width(shapes: np.ndarray) -> np.ndarray:
    """float64 [N]: distance between the mouth corners (dlib 48 and 54) of float [N, 20, 2] shapes."""
    shapes = np.asarray(shapes, np.float64)
    return np.linalg.norm(shapes[:, MOUTH_CORNERS[0]] - shapes[:, MOUTH_CORNERS[1]], axis=-1)


def landmark_error(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean over frames and the 20 points of |predicted - truth| / mouth width of the true shape (unitless)."""
    predicted, truth = np.asarray(predicted, np.float64), np.asarray(truth, np.float64)
    if predicted.shape != truth.shape or predicted.ndim != 3 or predicted.shape[1:] != (MOUTH_POINTS, 2):
        raise InvalidInput(f"shapes must both be [N, {MOUTH_POINTS}, 2], got {predicted.shape} and {truth.shape}")
    if len(truth) == 0:
        raise InvalidInput("no frames to compare")
    width = np.maximum(mouth_width(truth), 1e-12)
    return float((np.linalg.norm(predicted - truth, axis=-1).mean(axis=1) / width).mean())


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two series; NaN when either is constant."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise InvalidInput(f"series of different lengths {a.shape} and {b.shape}")
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else math.nan


def mouth_metrics(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(landmark_error, mouth_open_correlation) of predicted vs true float [N, 20, 2] shapes."""
    return landmark_error(predicted, truth), pearson(inner_lip_gap(predicted), inner_lip_gap(truth))


# ----------------------------------------------------------------------------------------------------------
# amplitude calibration

MAX_AMPLITUDE_GAIN = 3.0


def amplitude_gain(
    predicted: np.ndarray,
    truth: np.ndarray,
    pca_mean: np.ndarray,
    pca_components: np.ndarray,
    *,
    max_gain: float = MAX_AMPLITUDE_GAIN,
) -> float:
    """Gain on predicted coefficients that gives held-out predictions the true spread of mouth opening.

    A model trained on little speech regresses to the mean: on held-out Obama speech its mouth opened with
    0.4-0.6x the real standard deviation, a mumbling mouth. Squared-error training makes that the optimal
    answer for the loss, not for a viewer, so the output is scaled back up by one factor measured on held-out
    rows: std(real opening) / std(predicted opening), opening = inner-lip gap / mouth width. Correlation is
    unchanged by a gain; the amplitude is what the rendered mouth needs.

    Args:
        predicted: float [N, K] predicted PCA coefficients of held-out rows.
        truth: float [N, K] their true coefficients.
        pca_mean: float [40] and pca_components: float [K, 40], the mouth PCA.
        max_gain: upper bound (>= 1); the gain is never below 1 (a model that over-shoots is left alone).

    Returns:
        The gain in [1, max_gain]; 1 when either opening series is constant or N < 2.
    """
    predicted, truth = np.asarray(predicted, np.float64), np.asarray(truth, np.float64)
    if predicted.shape != truth.shape or predicted.ndim != 2:
        raise InvalidInput(f"predicted {predicted.shape} and true {truth.shape} coefficients must both be [N, K]")
    if not max_gain >= 1:
        raise InvalidInput(f"max_gain must be >= 1, got {max_gain}")
    if len(predicted) < 2:
        return 1.0

    def spread(coefficients: np.ndarray) -> float:
        return float(np.nanstd(mouth_opening_ratio(shapes_from_coefficients(coefficients, pca_mean, pca_components))))

    predicted_spread, true_spread = spread(predicted), spread(truth)
    if true_spread <= 0 or predicted_spread <= 1e-6 * true_spread:  # constant (up to rounding): nothing to scale
        return 1.0
    return float(np.clip(true_spread / predicted_spread, 1.0, max_gain))


def scale_output(model, gain: float, centre: np.ndarray) -> None:
    """Scale the model's output about `centre` (float [K]) by `gain`, in its last Dense layer, in place.

    y' = centre + gain (y - centre) = (gain W) x + gain b + (1 - gain) centre, so the exported SavedModel
    carries the calibration and TF Serving needs nothing else.
    """
    layers = [layer for layer in model.layers if layer.name == OUTPUT_KEY or layer.name.startswith(f"{OUTPUT_KEY}_")]
    centre = np.asarray(centre, np.float32).reshape(-1)
    for layer in layers:  # an ensemble averages its members' output layers: scaling each scales the average
        kernel, bias = layer.get_weights()
        if centre.shape != bias.shape:
            raise InvalidInput(f"centre must have {bias.shape[0]} values, got {centre.shape[0]}")
        layer.set_weights([kernel * np.float32(gain), bias * np.float32(gain) + np.float32(1 - gain) * centre])
