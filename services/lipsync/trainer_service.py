"""The LSTM trainer as a gRPC service (lipsync.v1.TrainerService): `python -m services.lipsync.trainer_service`.

The same training as `python -m services.lipsync.trainer` (`train_speaker`), for stacks whose orchestrator cannot
start the trainer itself (docker compose: A2V_TRAINER=grpc). It runs in the trainer image, the only one with
TensorFlow besides lipsync's client, and writes new versions to the object store and to A2V_MODELS_DIR, the folder
TF Serving polls. One training runs at a time; calls made meanwhile wait their turn.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from audio2video.common.v1 import common_pb2
from audio2video.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc
from services.lipsync import trainer
from services.lipsync.versions import version_message
from services.runtime.blobstore import BlobStore, wait_for_store
from services.runtime.config import Config, ConfigError, Env
from services.runtime.errors import Cancelled, InvalidInput
from services.runtime.keys import validate_key, validate_speaker
from services.runtime.progress import stream_events
from services.runtime.protos import blob_ref
from services.runtime.server import ServiceBinding, binding_for, run_service
from services.runtime.status import grpc_errors

log = logging.getLogger(__name__)
SERVICE = "trainer"
WAIT_POLL_SECONDS = 0.5
# A training call lasts as long as the training (hours on real data). The runtime ages connections out after a
# minute and then gives in-flight calls A2V_MAX_CONNECTION_AGE_GRACE_SECONDS to finish; here that must cover a
# whole training run, so its default is the most the runtime accepts (one day).
LONG_CALL_DEFAULTS = {"A2V_MAX_CONNECTION_AGE_GRACE_SECONDS": "86400"}


class TrainerServicer(lipsync_pb2_grpc.TrainerServiceServicer):
    """Train over the object store: checks the request, runs `train_speaker` one at a time, streams epochs."""

    def __init__(self, store: BlobStore, *, models_dir: str | os.PathLike | None = None) -> None:
        self.store = store
        self.models_dir = models_dir
        self._one_at_a_time = threading.Lock()

    def _key(self, ref: common_pb2.ObjectRef, what: str) -> str:
        blob = blob_ref(ref, default_bucket=self.store.bucket, what=what)
        if blob.bucket != self.store.bucket:
            raise InvalidInput(f"{what} is in bucket {blob.bucket!r}; the trainer reads {self.store.bucket!r}")
        return validate_key(blob.key)

    @grpc_errors
    def Train(self, request: lipsync_pb2.TrainRequest, context):
        """Stream epoch progress, then the stored version."""
        validate_speaker(request.speaker)
        dataset_key = self._key(request.dataset, "dataset")
        pca_key = self._key(request.pca, "PCA")
        overrides = trainer.overrides_from_proto(request.options)
        trainer.settings_from_proto(request.options)  # out-of-range values fail here, before waiting for the trainer
        log.info("train %s on %s (request %s): %s", request.speaker, dataset_key, request.request_id or "-", overrides)

        def work(progress, should_stop) -> dict:
            while not self._one_at_a_time.acquire(timeout=WAIT_POLL_SECONDS):
                if should_stop():
                    raise Cancelled("training was cancelled while waiting for the trainer")
            try:
                return trainer.train_speaker(
                    self.store,
                    speaker=request.speaker,
                    dataset_key=dataset_key,
                    pca_key=pca_key,
                    overrides=overrides,
                    models_dir=self.models_dir,
                    progress=progress,
                    should_stop=should_stop,
                )
            finally:
                self._one_at_a_time.release()

        def finish(card: dict) -> lipsync_pb2.TrainResult:
            return lipsync_pb2.TrainResult(
                model=version_message(self.store, request.speaker, int(card["version"]), card),
                summary=trainer.summary_line(card),
                best_epoch=int(card.get("best_epoch", 0)),
                stopped_early=bool(card.get("stopped_early", False)),
                training_seconds=float(card.get("training_seconds", 0.0)),
            )

        yield from stream_events(
            context, work, event=lipsync_pb2.TrainEvent, finish=finish, stage="train", unit="epochs"
        )


@dataclass(frozen=True)
class TrainerSettings:
    """The trainer service's settings.

    Attributes:
        models_dir: A2V_MODELS_DIR, where new versions are also written (the folder TF Serving polls); None (unset)
            = the store only.
    """

    models_dir: Path | None = None

    @classmethod
    def read(cls, env: Env) -> TrainerSettings:
        """Read the settings from the environment (with the rest of `Config.from_env`)."""
        folder = env.get_str(trainer.MODELS_DIR_VARIABLE, "")
        return cls(models_dir=Path(folder) if folder else None)


def check_models_dir(folder: Path | None) -> None:
    """Fail at start, not after hours of training, when the models folder cannot be written."""
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{trainer.MODELS_DIR_VARIABLE}={folder} cannot be created: {exc}") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{trainer.MODELS_DIR_VARIABLE}={folder} is not writable by uid {os.getuid()}")


def bindings(config: Config[TrainerSettings]) -> list[ServiceBinding]:
    """What `python -m services.lipsync.trainer_service` serves: SERVING once the models folder is writable and
    the object store answers."""
    store = BlobStore.from_config(config.store)
    models_dir = (config.settings or TrainerSettings()).models_dir
    servicer = TrainerServicer(store, models_dir=models_dir)

    def load() -> None:
        check_models_dir(models_dir)
        wait_for_store(store)

    return [binding_for(lipsync_pb2, lipsync_pb2_grpc, "TrainerService", servicer, load=load)]


def main() -> None:
    for name, value in LONG_CALL_DEFAULTS.items():
        os.environ.setdefault(name, value)
    run_service(SERVICE, bindings, TrainerSettings.read)


if __name__ == "__main__":
    main()
