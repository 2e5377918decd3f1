"""The trainer against a real S3 server: versioned SavedModel trees, model card last, local copy, bad inputs."""

import dataclasses
import json
import uuid

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d

from audio2video.lipsync.v1 import lipsync_pb2
from services.face.dataset import ClipTracks, build_speaker_dataset
from services.lipsync import model as lstm
from services.lipsync import trainer
from services.runtime.blobstore import BlobStore
from services.runtime.errors import InvalidInput, NotFound

pytestmark = pytest.mark.integration

FPS = 30000 / 1001
TINY = lstm.TrainingSettings(hidden_units=6, delay_steps=5, sequence_length=40, batch_size=16, max_epochs=2)
SAVED_MODEL_FILES = {"saved_model.pb", "fingerprint.pb", "variables/variables.index"}
EXTRA_FILES = {"assets.extra/pca.npz", "assets.extra/normalization.npz", "assets.extra/model_card.json"}


def clip(clip_id: str, seconds: float, seed: int, gap: range = range(0)) -> ClipTracks:
    """A speaker clip whose mouth opening follows the first feature (delayed by nothing: same instant)."""
    rng = np.random.default_rng(seed)
    frames = int(seconds * FPS)
    timestamps = np.arange(frames) / FPS
    features = gaussian_filter1d(rng.standard_normal((int(seconds * 100), 28)), 2.0, axis=0).astype(np.float32)
    drive = np.interp(timestamps, 0.0125 + np.arange(len(features)) / 100, features[:, 0])
    shapes = np.tile(np.stack([np.linspace(0.35, 0.65, 20), np.full(20, 0.85)], axis=1), (frames, 1, 1))
    shapes[:, 13:20, 1] += 0.02 * drive[:, None] * np.linspace(-1, 1, 7)
    shapes[:, :, 0] += 0.003 * rng.standard_normal((frames, 1))
    valid = np.ones(frames, bool)
    valid[list(gap)] = False
    shapes[~valid] = np.nan
    return ClipTracks(clip_id, timestamps, shapes.astype(np.float32), valid, features)


@pytest.fixture(scope="module")
def built():
    return build_speaker_dataset(
        [clip("train_a", 8.0, 1, gap=range(100, 110)), clip("held_out", 4.0, 2)], validation_clip_ids=["held_out"]
    )


def upload(store: BlobStore, prefix: str, dataset_arrays: dict, pca_arrays: dict) -> tuple[str, str]:
    store.put_arrays(f"{prefix}/dataset.npz", dataset_arrays)
    store.put_arrays(f"{prefix}/pca.npz", pca_arrays)
    return f"{prefix}/dataset.npz", f"{prefix}/pca.npz"


@pytest.fixture()
def stored(store, key_prefix, built):
    pca = built.pca.arrays() | {"template_id": np.array("test-template")}
    return upload(store, key_prefix, built.arrays(), pca)


@pytest.fixture()
def speaker() -> str:
    return f"spk-{uuid.uuid4().hex[:10]}"


class RecordingStore(BlobStore):
    """The real store, remembering the order of uploads."""

    def __init__(self, store: BlobStore) -> None:
        super().__init__(store.client, store.bucket, endpoint=store.endpoint)
        self.uploaded: list[str] = []

    def put_file(self, key, path, **kwargs):
        self.uploaded.append(key)
        return super().put_file(key, path, **kwargs)


def test_versions_are_stored_complete_with_the_card_last_and_copied_to_the_models_dir(
    store, stored, speaker, built, tmp_path
):
    dataset_key, pca_key = stored
    recording = RecordingStore(store)
    epochs = []
    card = trainer.train_speaker(
        recording,
        speaker=speaker,
        dataset_key=dataset_key,
        pca_key=pca_key,
        settings=TINY,
        models_dir=tmp_path,
        progress=lambda done, total: epochs.append((done, total)),
    )
    prefix = f"models/{speaker}/1/"
    keys = {k[len(prefix) :] for k in store.list_keys(prefix)}
    assert keys >= SAVED_MODEL_FILES | EXTRA_FILES
    assert recording.uploaded[-1] == prefix + "assets.extra/model_card.json"
    assert epochs == [(1, 2), (2, 2)]

    stored_card = json.loads(store.get_bytes(prefix + "assets.extra/model_card.json"))
    assert stored_card == card
    assert card["speaker"] == speaker and card["version"] == 1 and card["prefix"] == prefix
    assert card["created"].endswith("Z") and card["delay_steps"] == 5
    assert (card["feature_dim"], card["feature_rate_hz"]) == (28, 100.0)
    assert card["pca_components"] == len(built.pca.components) and card["template_id"] == "test-template"
    assert card["dataset"]["key"] == dataset_key
    assert card["dataset"]["train_clip_ids"] == ["train_a"] and card["dataset"]["validation_clip_ids"] == ["held_out"]
    assert card["training"] == TINY.as_dict() and card["epochs"] == 2
    assert len(card["history"]["train_loss"]) == len(card["history"]["validation_loss"]) == 2
    metrics = card["metrics"]
    assert metrics["epochs"] == 2 and metrics["train_loss"] > 0 and metrics["validation_loss"] > 0
    assert 0 < metrics["landmark_error"] < 10 and -1 <= metrics["mouth_open_correlation"] <= 1
    # The proto side reads the card as the lipsync servicer does.
    assert trainer.metrics_to_proto(card).validation_loss == pytest.approx(metrics["validation_loss"])

    assert store.get_bytes(prefix + "assets.extra/pca.npz") == store.get_bytes(pca_key)  # the PCA as is
    normalization = store.get_arrays(prefix + "assets.extra/normalization.npz")
    np.testing.assert_array_equal(normalization["feature_mean"], built.feature_mean)
    np.testing.assert_array_equal(normalization["feature_std"], built.feature_std)

    # The same tree on disk, and no partial folder left beside it.
    local = tmp_path / speaker / "1"
    on_disk = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert on_disk == keys
    assert sorted(p.name for p in (tmp_path / speaker).iterdir()) == ["1"]
    import tensorflow as tf

    signature = tf.saved_model.load(str(local)).signatures[lstm.SIGNATURE_KEY]
    out = signature(features=tf.zeros([1, 30, 28]))[lstm.OUTPUT_KEY]
    assert out.shape == (1, 30, len(built.pca.components))

    # An attempt that died before its card leaves version 2 incomplete: the next run takes 2 and cleans it.
    store.put_bytes(f"models/{speaker}/2/variables/stale.bin", b"left over")
    second = trainer.train_speaker(store, speaker=speaker, dataset_key=dataset_key, pca_key=pca_key, settings=TINY)
    assert second["version"] == 2
    assert not store.exists(f"models/{speaker}/2/variables/stale.bin")
    assert trainer.stored_versions(store, speaker) == [1, 2]
    third = trainer.train_speaker(
        store, speaker=speaker, dataset_key=dataset_key, pca_key=pca_key, settings=TINY, models_dir=tmp_path
    )
    assert third["version"] == 3
    assert sorted(p.name for p in (tmp_path / speaker).iterdir()) == ["1", "3"]


def test_without_validation_clips_the_metrics_are_null(store, key_prefix, speaker):
    single = build_speaker_dataset([clip("only", 4.0, 3)])
    dataset_key, pca_key = upload(store, key_prefix, single.arrays(), single.pca.arrays())
    card = trainer.train_speaker(store, speaker=speaker, dataset_key=dataset_key, pca_key=pca_key, settings=TINY)
    assert card["dataset"]["validation_clip_ids"] == [] and card["history"]["validation_loss"] == []
    metrics = card["metrics"]
    assert metrics["validation_loss"] is None and metrics["landmark_error"] is None and metrics["train_loss"] > 0
    assert card["template_id"] == ""
    assert trainer.metrics_to_proto(card).epochs == 2


def test_missing_dataset_is_not_found(store, key_prefix, stored, speaker):
    with pytest.raises(NotFound, match="not found"):
        trainer.train_speaker(
            store, speaker=speaker, dataset_key=f"{key_prefix}/nothing.npz", pca_key=stored[1], settings=TINY
        )
    with pytest.raises(NotFound):
        trainer.train_speaker(
            store, speaker=speaker, dataset_key=stored[0], pca_key=f"{key_prefix}/nothing.npz", settings=TINY
        )


def test_a_dataset_without_training_rows_is_refused(store, key_prefix, built, speaker):
    arrays = built.arrays() | {"is_validation": np.ones(2, np.uint8)}
    dataset_key, pca_key = upload(store, key_prefix, arrays, built.pca.arrays())
    with pytest.raises(InvalidInput, match="no training rows"):
        trainer.train_speaker(store, speaker=speaker, dataset_key=dataset_key, pca_key=pca_key, settings=TINY)


def test_a_pca_of_another_dimension_is_refused(store, key_prefix, built, speaker):
    pca = built.pca.arrays()
    pca["components"] = np.concatenate([pca["components"], np.eye(1, 40, dtype=np.float32)])
    dataset_key, pca_key = upload(store, key_prefix, built.arrays(), pca)
    with pytest.raises(InvalidInput, match="PCA dimension mismatch"):
        trainer.train_speaker(store, speaker=speaker, dataset_key=dataset_key, pca_key=pca_key, settings=TINY)


def test_malformed_inputs_are_refused(store, key_prefix, built, stored, speaker):
    arrays = built.arrays()
    del arrays["section_offsets"]
    dataset_key, _ = upload(store, f"{key_prefix}/b", arrays, built.pca.arrays())
    with pytest.raises(InvalidInput, match="section_offsets"):
        trainer.train_speaker(store, speaker=speaker, dataset_key=dataset_key, pca_key=stored[1], settings=TINY)
    with pytest.raises(InvalidInput, match="speaker name"):
        trainer.train_speaker(store, speaker="Obama!", dataset_key=stored[0], pca_key=stored[1], settings=TINY)


def test_command_line(s3_server, stored, speaker, tmp_path, capsys):
    environ = s3_server.env() | {trainer.TRAIN_SPEAKER_VARIABLE: speaker, trainer.MODELS_DIR_VARIABLE: str(tmp_path)}
    args = ["--dataset", stored[0], "--pca", stored[1], "--epochs", "2", "--hidden-units", "4", "--delay-steps", "3"]
    assert trainer.main(args, environ) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "epoch 2/2" in out and f"stored models/{speaker}/1/" in out
    assert "landmark_error" in out and (tmp_path / speaker / "1" / "saved_model.pb").is_file()

    assert trainer.main(["--dataset", "nothing/here.npz", "--pca", stored[1], "--epochs", "1"], environ) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trainer: error:") and "not found" in err[0]


def test_training_options_convert_to_and_from_the_proto():
    assert trainer.settings_from_proto(lipsync_pb2.TrainingOptions()) == lstm.TrainingSettings()
    options = lipsync_pb2.TrainingOptions(delay_steps=0, dropout=0.0, early_stopping_patience=0, hidden_units=8)
    settings = trainer.settings_from_proto(options)
    assert (settings.delay_steps, settings.dropout, settings.early_stopping_patience) == (0, 0.0, 0)
    assert settings.hidden_units == 8 and settings.learning_rate_decay == 0.99
    assert trainer.settings_from_proto(trainer.settings_to_proto(settings)) == settings
    with pytest.raises(InvalidInput, match="dropout"):
        trainer.settings_from_proto(lipsync_pb2.TrainingOptions(dropout=1.5))


def test_hold_back_tails_splits_the_end_of_each_long_enough_section():
    offsets = np.array([0, 1000, 1050, 2000])
    new, training, validation = trainer.hold_back_tails(offsets, np.array([0, 1, 2]), share=0.2, min_rows=100)
    assert new.tolist() == [0, 800, 1000, 1050, 1810, 2000]
    assert training.tolist() == [0, 2, 3] and validation.tolist() == [1, 4]  # the 50-row section keeps its rows
    unchanged, kept, none = trainer.hold_back_tails(offsets, np.array([1]), share=0.2, min_rows=100)
    assert unchanged.tolist() == offsets.tolist() and kept.tolist() == [1] and none.size == 0


def test_a_single_clip_holds_back_its_end_picks_defaults_by_size_and_calibrates(store, key_prefix, speaker):
    single = build_speaker_dataset([clip("only", 14.0, 4)])
    dataset_key, pca_key = upload(store, key_prefix, single.arrays(), single.pca.arrays())
    overrides = {"max_epochs": 2, "hidden_units": 6, "delay_steps": 5, "ensemble": 2}
    card = trainer.train_speaker(store, speaker=speaker, dataset_key=dataset_key, pca_key=pca_key, overrides=overrides)
    assert card["regime"] == {"name": "small", "train_seconds": pytest.approx(14.0, abs=0.2), "overrides": overrides}
    assert card["training"]["batch_size"] == 10 and card["training"]["hidden_units"] == 6  # regime + user's values
    held = card["dataset"]["held_back_frames"]
    assert 200 < held < 320 and card["dataset"]["validation_frames"] == held
    assert card["metrics"]["landmark_error"] is not None and len(card["history"]["validation_loss"]) == 2
    assert 1.0 <= card["amplitude_gain"] <= lstm.MAX_AMPLITUDE_GAIN
    assert card["max_amplitude_gain"] == lstm.predict_gain_cap("small")  # Predict's cap, by the regime
    assert set(card["dataset"]["sync"]) == {"only"}
    assert [member["seed"] for member in card["ensemble"]] == [42, 43]


def test_only_the_options_a_caller_set_override_the_defaults():
    options = lipsync_pb2.TrainingOptions(max_epochs=5, dropout=0.0)
    assert trainer.overrides_from_proto(options) == {"max_epochs": 5, "dropout": 0.0}
    assert trainer.overrides_from_proto(None) == {}


def test_the_version_is_reserved_before_training_starts(store, stored, speaker):
    """Two trainings started together know their numbers from the first epoch on; a cancelled one leaves a gap."""
    dataset_key, pca_key = stored
    reserved_at_first_epoch = []

    def first_epoch(_result) -> None:
        reserved_at_first_epoch.append(sorted(store.list_keys(f"models/{speaker}/reserved/")))

    with pytest.raises(Exception, match="(?i)cancel"):
        trainer.train_speaker(
            store,
            speaker=speaker,
            dataset_key=dataset_key,
            pca_key=pca_key,
            settings=TINY,
            on_epoch=first_epoch,
            should_stop=lambda: bool(reserved_at_first_epoch),  # cancelled after its first epoch
        )
    assert reserved_at_first_epoch == [[f"models/{speaker}/reserved/1.json"]]
    card = trainer.train_speaker(store, speaker=speaker, dataset_key=dataset_key, pca_key=pca_key, settings=TINY)
    assert card["version"] == 2 and not list(store.list_keys(f"models/{speaker}/1/"))


def test_tempo_augmentation_adds_stretched_training_clips_and_their_statistics(built):
    arrays = built.arrays()
    augmented = trainer.tempo_augmented(arrays, 0.2)
    assert list(augmented["clip_ids"]) == ["train_a", "held_out", "train_a@0.8", "train_a@1.2"]
    assert augmented["is_validation"].tolist() == [0, 1, 0, 0]  # the copies train; only held_out validates
    offsets, section_clip = augmented["section_offsets"], augmented["section_clip"]
    assert offsets[-1] == len(augmented["features"]) == len(augmented["shapes"]) == len(augmented["coefficients"])
    np.testing.assert_array_equal(augmented["features"][: len(arrays["features"])], arrays["features"])
    copies = {2: 0, 3: 0}
    for a, b, c in zip(offsets[:-1], offsets[1:], section_clip, strict=True):
        if c >= 2:
            copies[int(c)] += int(b - a)
    trained = sum(int(b - a) for a, b, c in zip(arrays["section_offsets"][:-1], arrays["section_offsets"][1:],
                                                 arrays["section_clip"], strict=True) if c == 0)  # fmt: skip
    assert abs(copies[2] - 0.8 * trained) <= 2 and abs(copies[3] - 1.2 * trained) <= 2
    # The statistics the model is fed are those of every training row, stretched ones included.
    rows = np.concatenate([np.arange(a, b) for a, b, c in zip(offsets[:-1], offsets[1:], section_clip, strict=True)
                           if not augmented["is_validation"][c]])  # fmt: skip
    np.testing.assert_allclose(augmented["feature_mean"], augmented["features"][rows].mean(axis=0), atol=1e-5)
    assert len(augmented["clip_sync_offset_seconds"]) == 4


def test_a_model_trained_with_tempo_augmentation_says_so_and_normalises_as_it_was_fed(store, stored, speaker):
    dataset_key, pca_key = stored
    settings = dataclasses.replace(TINY, tempo_augmentation=0.2)
    card = trainer.train_speaker(store, speaker=speaker, dataset_key=dataset_key, pca_key=pca_key, settings=settings)
    assert card["training"]["tempo_augmentation"] == 0.2
    assert card["dataset"]["train_clip_ids"] == ["train_a", "train_a@0.8", "train_a@1.2"]
    assert card["dataset"]["validation_clip_ids"] == ["held_out"]
    normalization = store.get_arrays(f"models/{speaker}/{card['version']}/assets.extra/normalization.npz")
    augmented = trainer.tempo_augmented(store.get_arrays(dataset_key), 0.2)
    np.testing.assert_allclose(normalization["feature_mean"], augmented["feature_mean"])
