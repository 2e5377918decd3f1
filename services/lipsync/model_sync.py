"""TF Serving's models from the object store: mirror every stored version, write the model list, send it.

`python -m services.lipsync.model_sync` runs beside TF Serving (a sidecar in its pod, a process of the local
stack). Every A2V_MODEL_SYNC_SECONDS (default 5) it copies each complete version `models/<speaker>/<version>/` of
the store (one with its model card) into A2V_TFSERVING_MODELS_DIR/<speaker>/<version>/ (into a hidden folder
first, renamed in place, so TF Serving never sees half a version), writes the model list of every speaker that
has one to A2V_TFSERVING_MODELS_DIR/models.config (TF Serving's --model_config_file) and, when that list changed
or TF Serving restarted, sends it to TF Serving at A2V_TFSERVING_ADDR with ModelService/HandleReloadConfigRequest.
The folder mirrors the store both ways: once TF Serving has the new list, versions and speakers that are gone from
the store (deleted there) are removed from the folder too, so the disk does not grow with every model ever trained
and a deleted model cannot come back after a restart.

`--once` copies and writes the list, then exits: the init step before TF Serving starts, so a restarted TF Serving
starts with the list as it was (the store is its source), and a fresh one with an empty list (it opens its ports
at once, instead of waiting for speakers that are not trained yet). The tensorflow/serving images read no s3://
paths (tensorflow/serving#1963), hence the copy; no volume is shared with the trainer.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.lipsync.versions import stored_speakers, stored_versions, version_prefix
from services.runtime.blobstore import BlobStore, wait_for_store
from services.runtime.clients import create_channel, rpc_failure
from services.runtime.config import Config, ConfigError, Env, parse_address
from services.runtime.errors import A2VError
from services.runtime.logs import configure_logging
from services.runtime.server import create_server
from services.runtime.telemetry import start_metrics_server

log = logging.getLogger(__name__)
SERVICE = "model-sync"
HEALTH_NAME = "audio2video.lipsync.v1.ModelSync"
"""Health entry that turns SERVING after the first pass (the list is written): TF Serving may start then."""
CONFIG_NAME = "models.config"
SPEAKER = re.compile(r"[a-z0-9_-]{1,64}")


@dataclass(frozen=True)
class SyncConfig:
    """Settings of the model sync, from the environment."""

    folder: Path
    serving_address: str
    interval_seconds: float = 5.0
    base_path: str = ""
    """Where TF Serving sees `folder` (its mount, e.g. /models); empty = the same path."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SyncConfig:
        """A2V_TFSERVING_MODELS_DIR (required), A2V_TFSERVING_ADDR (default 127.0.0.1:8500),
        A2V_MODEL_SYNC_SECONDS (default 5), A2V_TFSERVING_BASE_PATH (default: the folder)."""
        env = Env(environ)
        config = cls(
            folder=Path(env.get_str("A2V_TFSERVING_MODELS_DIR")).expanduser().resolve(),
            serving_address=env.get_str("A2V_TFSERVING_ADDR", "127.0.0.1:8500"),
            interval_seconds=env.get_float("A2V_MODEL_SYNC_SECONDS", cls.interval_seconds, minimum=0.1, maximum=3600),
            base_path=env.get_str("A2V_TFSERVING_BASE_PATH", ""),
        )
        env.check()
        return config


def model_list(speakers: list[str], base_path: str) -> str:
    """TF Serving's model list (ModelServerConfig, text format): one model per speaker, named after it, the newest
    version served. Written as text here, so `--once` starts without TensorFlow's protobuf modules (seconds)."""
    entries = "".join(
        f'  config {{\n    name: "{speaker}"\n    base_path: "{base_path.rstrip("/")}/{speaker}"\n'
        f'    model_platform: "tensorflow"\n  }}\n'
        for speaker in sorted(speakers)
    )
    return f"model_config_list {{\n{entries}}}\n"


class ModelSync:
    """One mirror of the store's models for one TF Serving."""

    def __init__(self, store: BlobStore, config: SyncConfig) -> None:
        self.store = store
        self.config = config
        self.sent: str | None = None  # the list TF Serving was last given
        self.channel = create_channel(config.serving_address, ["tensorflow.serving.ModelService"], timeout_seconds=60)
        self._models = None  # TF Serving's ModelService stub, made when first needed (it imports TensorFlow's protos)

    def copy_versions(self) -> dict[str, set[int]]:
        """Copy every complete stored version that the folder lacks; speaker -> its complete stored versions."""
        stored = {}
        for speaker in stored_speakers(self.store):
            versions = stored_versions(self.store, speaker)
            if not versions:
                continue
            stored[speaker] = set(versions)
            for version in versions:
                target = self.config.folder / speaker / str(version)
                if not target.exists():
                    self._copy(speaker, version, target)
        return stored

    def _copy(self, speaker: str, version: int, target: Path) -> None:
        staging = target.parent / f".incoming-{version}"
        shutil.rmtree(staging, ignore_errors=True)
        prefix = version_prefix(speaker, version)
        for key in self.store.list_keys(prefix):
            self.store.get_file(key, staging / key[len(prefix) :])
        os.rename(staging, target)
        log.info("copied model %s version %d from the store", speaker, version)

    def write_list(self, speakers: list[str]) -> str:
        """Write the model list (text, as --model_config_file reads it) if it changed; returns it."""
        text = model_list(speakers, self.config.base_path or str(self.config.folder))
        path = self.config.folder / CONFIG_NAME
        if not path.exists() or path.read_text() != text:
            self.config.folder.mkdir(parents=True, exist_ok=True)
            temp = path.with_suffix(".tmp")
            temp.write_text(text)
            os.replace(temp, path)
            log.info("model list: %s", ", ".join(speakers) or "(none)")
        return text

    def send(self, text: str) -> bool:
        """Give TF Serving the list (HandleReloadConfigRequest) unless it has it; True once it has.

        TF Serving that restarted read the list from the file; sending it again is harmless, so a list is sent
        whenever it changed or the last attempt failed.
        """
        if text == self.sent:
            return True
        from google.protobuf import text_format
        from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc

        if self._models is None:
            self._models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        request = model_management_pb2.ReloadConfigRequest()
        text_format.Parse(text, request.config)
        try:
            response = self._models.HandleReloadConfigRequest(request)
        except grpc.RpcError as exc:
            code, detail = rpc_failure(exc)
            log.warning(
                "TF Serving at %s did not take the model list: %s %s", self.config.serving_address, code, detail
            )
            return False
        if response.status.error_code:  # a model that did not load: try again next pass, prune nothing meanwhile
            log.warning("TF Serving refused the model list: %s", response.status.error_message)
            return False
        self.sent = text
        log.info("TF Serving serves the model list")
        return True

    def prune(self, stored: dict[str, set[int]]) -> list[str]:
        """Remove the folder's versions and speakers that are not in `stored` (what `copy_versions` found).

        Only what this sync writes is touched: numbered version folders under speaker-named folders, and the
        hidden staging folders of copies that were cut short. Returns what was removed, as "<speaker>/<version>".
        """
        removed = []
        if not self.config.folder.is_dir():
            return removed
        for speaker_dir in sorted(p for p in self.config.folder.iterdir() if p.is_dir() and SPEAKER.fullmatch(p.name)):
            kept = stored.get(speaker_dir.name, set())
            mine = False
            for entry in sorted(speaker_dir.iterdir()):
                stale_copy = entry.name.startswith(".incoming-")
                gone = entry.name.isdigit() and int(entry.name) not in kept
                if entry.is_dir() and (stale_copy or gone):
                    mine = True
                    shutil.rmtree(entry, ignore_errors=True)
                    if gone:
                        removed.append(f"{speaker_dir.name}/{entry.name}")
            if mine and not kept and not any(speaker_dir.iterdir()):
                speaker_dir.rmdir()
        if removed:
            log.info("removed models no longer in the store: %s", ", ".join(removed))
        return removed

    def once(self, *, send: bool = True) -> None:
        """One pass: copy, write the list, send it; prune only once TF Serving has the list without the pruned
        models (or when not sending: the init step, before TF Serving starts), so it never loses files it serves."""
        stored = self.copy_versions()
        text = self.write_list(list(stored))
        if not send or self.send(text):
            self.prune(stored)

    def run(self, stop: threading.Event, first_pass: threading.Event | None = None) -> None:
        """Sync until `stop`; a pass that fails (the store or TF Serving down) is tried again next time."""
        while not stop.is_set():
            try:
                self.once()
            except (A2VError, OSError) as exc:
                log.warning("model sync pass failed: %s", exc)
            if first_pass is not None:
                first_pass.set()
            stop.wait(self.config.interval_seconds)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.lipsync.model_sync", description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="copy the models and write the list, then exit")
    args = parser.parse_args(argv)
    try:
        config = Config.from_env(SERVICE, environ)
        sync_config = SyncConfig.from_env(environ)
    except ConfigError as exc:
        configure_logging(SERVICE)
        log.error("%s", exc)
        return 2
    configure_logging(SERVICE, config.server.log_level)
    store = BlobStore.from_config(config.store)
    wait_for_store(store, timeout_seconds=120)
    sync = ModelSync(store, sync_config)
    if args.once:
        sync.once(send=False)
        return 0
    server, port = create_server(config.server, [])  # health only (A2V_LISTEN; locally A2V_MODELSYNC_ADDR)
    server.set_serving(HEALTH_NAME, False)  # until the first pass wrote the list
    server.start()
    start_metrics_server(parse_address(config.server.listen)[0], config.server.metrics_port)
    stop, first_pass = threading.Event(), threading.Event()
    worker = threading.Thread(target=sync.run, args=(stop, first_pass), name="model-sync", daemon=True)
    worker.start()
    first_pass.wait()
    server.set_serving(HEALTH_NAME)
    log.info("syncing models every %.1fs (health on port %d)", sync_config.interval_seconds, port)

    def on_signal(signum, _frame) -> None:
        stop.set()
        server.stop(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(1.0):
        pass
    worker.join(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
