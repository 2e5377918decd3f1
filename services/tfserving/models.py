"""Model versions on disk, loaded and unloaded as TF Serving does for its model list and version policies (no gRPC)."""

from __future__ import annotations

import enum
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf import message, text_format
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.config import model_server_config_pb2

from services.runtime.errors import InvalidInput, NotFound, TooLarge

log = logging.getLogger(__name__)

SERVE_TAG = "serve"
"""The MetaGraph tag TF Serving loads (`--saved_model_tags` default)."""
DEFAULT_SIGNATURE = "serving_default"
"""The signature a request without `signature_name` runs."""

_VERSION_NAME = re.compile(r"[0-9]+")
_ERROR_CODES = {
    getattr(tf.errors, name): name
    for name in (
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
    )
}


class State(enum.IntEnum):
    """Where a model version is in its life; the numbers are TF Serving's `ModelVersionStatus.State`."""

    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclass(frozen=True)
class LoadError:
    """Why a version could not be loaded: a TensorFlow error code name (e.g. "DATA_LOSS") and a message."""

    code: str
    message: str


@dataclass(frozen=True)
class VersionStatus:
    """One version as `GetModelStatus` reports it; `error` is set only for a version that failed to load."""

    version: int
    state: State
    error: LoadError | None = None


class LoadFailure(Exception):
    """A SavedModel version folder could not be loaded; `code` names the TensorFlow error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LoadedModel:
    """One SavedModel version in memory; `predict` may be called from many threads at once.

    The loaded object is kept alive with its signatures: the signatures' variables belong to it.
    """

    def __init__(
        self,
        path: Path,
        saved_object: object,
        signatures: Mapping[str, Callable],
        signature_defs: Mapping[str, meta_graph_pb2.SignatureDef],
    ) -> None:
        self.path = path
        self._saved_object = saved_object
        self._signatures = dict(signatures)
        self.signature_defs = dict(signature_defs)
        """Every SignatureDef of the `serve` MetaGraph, as stored in saved_model.pb (what TF Serving reports)."""

    @classmethod
    def load(cls, path: Path) -> LoadedModel:
        """Load the `serve` MetaGraph of the SavedModel in `path`; raises LoadFailure naming the cause."""
        meta_graph = _read_serve_meta_graph(path)
        try:
            saved_object = tf.saved_model.load(str(path), tags=[SERVE_TAG])
        except tf.errors.OpError as exc:
            raise LoadFailure(_ERROR_CODES.get(exc.error_code, "UNKNOWN"), exc.message) from exc
        except Exception as exc:
            raise LoadFailure("UNKNOWN", f"{type(exc).__name__}: {exc}") from exc
        return cls(path, saved_object, dict(saved_object.signatures), dict(meta_graph.signature_def))

    @property
    def signature_names(self) -> list[str]:
        return sorted(self._signatures)

    def predict(
        self, signature_name: str, inputs: Mapping[str, np.ndarray], output_filter: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        """Run one signature.

        Args:
            signature_name: a key of the SavedModel's signatures (e.g. "serving_default").
            inputs: every input of the signature by key, each with the signature's dtype and a
                shape compatible with its (partly unknown) shape, e.g. `features` float32 [batch, time, 28].
            output_filter: output keys to return; empty returns every output.

        Returns:
            The outputs by key, e.g. `coefficients` float32 [batch, time, K].

        Raises:
            InvalidInput: unknown signature or output key, missing or extra input key, wrong dtype or
                shape, or TensorFlow rejecting the values while running.
            TooLarge: TensorFlow ran out of memory for this request.
        """
        function = self._signatures.get(signature_name)
        if function is None:
            raise InvalidInput(
                f'Serving signature key "{signature_name}" not found; the model has {self.signature_names}'
            )
        specs: dict[str, tf.TensorSpec] = function.structured_input_signature[1]
        extra, missing = sorted(inputs.keys() - specs.keys()), sorted(specs.keys() - inputs.keys())
        if extra or missing:
            raise InvalidInput(
                f'inputs do not match signature "{signature_name}" (inputs {sorted(specs)}): '
                f"sent extra {extra}, missing {missing}"
            )
        tensors = {}
        for key, spec in specs.items():
            array = inputs[key]
            dtype = _dtype_of(array)
            if dtype != spec.dtype:
                raise InvalidInput(
                    f"input {key!r} of signature {signature_name!r} expects {spec.dtype.name} "
                    f"but {dtype.name if dtype else array.dtype} is provided"
                )
            if not spec.shape.is_compatible_with(array.shape):
                raise InvalidInput(
                    f"input {key!r} of signature {signature_name!r} has shape {list(array.shape)}, "
                    f"expected {_shape_text(spec.shape)}"
                )
            tensors[key] = tf.constant(array, dtype=spec.dtype)
        output_keys = list(function.structured_outputs)
        unknown = sorted(set(output_filter) - set(output_keys))
        if unknown:
            raise InvalidInput(f"output tensor alias not found in signature {signature_name!r}: {unknown}")
        try:
            result = function(**tensors)
        except tf.errors.ResourceExhaustedError as exc:
            raise TooLarge(f"signature {signature_name!r}: {exc.message}") from exc
        except (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as exc:
            raise InvalidInput(f"signature {signature_name!r} rejected the inputs: {exc.message}") from exc
        wanted = list(dict.fromkeys(output_filter)) or output_keys
        return {key: result[key].numpy() for key in wanted}


def _dtype_of(array: np.ndarray) -> tf.DType | None:
    try:
        return tf.as_dtype(array.dtype)
    except TypeError:
        return None


def _shape_text(shape: tf.TensorShape) -> str:
    if shape.rank is None:
        return "any shape"
    return "[" + ", ".join("?" if size is None else str(size) for size in shape.as_list()) + "]"


def _read_serve_meta_graph(path: Path) -> meta_graph_pb2.MetaGraphDef:
    """The `serve` MetaGraph of saved_model.pb (or .pbtxt) in `path`; raises LoadFailure as TF does."""
    saved_model = saved_model_pb2.SavedModel()
    binary, text = path / "saved_model.pb", path / "saved_model.pbtxt"
    try:
        if binary.is_file():
            saved_model.ParseFromString(binary.read_bytes())
        elif text.is_file():
            text_format.Parse(text.read_text(encoding="utf-8"), saved_model)
        else:
            missing = f"{path}/{{saved_model.pbtxt|saved_model.pb}}"
            raise LoadFailure("NOT_FOUND", f"SavedModel file does not exist at: {missing}")
    except (message.DecodeError, text_format.ParseError, UnicodeDecodeError) as exc:
        raise LoadFailure("DATA_LOSS", f"cannot parse the SavedModel in {path}: {exc}") from exc
    except OSError as exc:
        raise LoadFailure("UNKNOWN", f"cannot read the SavedModel in {path}: {exc}") from exc
    for meta_graph in saved_model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return meta_graph
    raise LoadFailure("NOT_FOUND", f"Could not find meta graph def matching supplied tags: {{ {SERVE_TAG} }} in {path}")


def _fingerprint(path: Path) -> tuple | None:
    """Identity of a version folder's SavedModel file: a failed version is retried only when it changes."""
    for name in ("saved_model.pb", "saved_model.pbtxt"):
        try:
            stat = (path / name).stat()
        except OSError:
            continue
        return name, stat.st_ino, stat.st_size, stat.st_mtime_ns
    return None


@dataclass(frozen=True)
class ModelConfig:
    """One model of the server's list (TF Serving's `ModelConfig`): its name, base path and version policy.

    Policies as TF Serving's `ServableVersionPolicy`: "latest" serves the `num_versions` newest versions on
    disk (default 1), "all" every version, "specific" the listed `versions` (those on disk).
    """

    name: str
    base_path: Path
    policy: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def aspired(self, on_disk: Iterable[int]) -> set[int]:
        """The versions this policy wants loaded among those on disk."""
        numbers = sorted(set(on_disk), reverse=True)
        if self.policy == "all":
            return set(numbers)
        if self.policy == "specific":
            return set(numbers) & set(self.versions)
        return set(numbers[: max(1, self.num_versions)])


def model_configs(config: model_server_config_pb2.ModelServerConfig) -> list[ModelConfig]:
    """The models of a `ModelServerConfig` (what --model_config_file and HandleReloadConfigRequest carry).

    Raises:
        InvalidInput: a custom model config, a platform other than tensorflow, a duplicate name, a base path
            that is not a local absolute folder (the tensorflow/serving images have no s3:// filesystem since 2.7).
    """
    if config.WhichOneof("config") == "custom_model_config":
        raise InvalidInput("custom_model_config is not supported; send a model_config_list")
    models: list[ModelConfig] = []
    for entry in config.model_config_list.config:
        if not entry.name or not entry.base_path:
            raise InvalidInput(f"model config {entry.name!r} needs a name and a base_path")
        if entry.model_platform not in ("", "tensorflow"):
            raise InvalidInput(f"model {entry.name!r}: platform {entry.model_platform!r} is not supported")
        if "://" in entry.base_path or not entry.base_path.startswith("/"):
            raise InvalidInput(f"model {entry.name!r}: base_path {entry.base_path!r} must be an absolute local path")
        if any(model.name == entry.name for model in models):
            raise InvalidInput(f"model {entry.name!r} is listed twice")
        policy = entry.model_version_policy
        kind = policy.WhichOneof("policy_choice") or "latest"
        models.append(
            ModelConfig(
                name=entry.name,
                base_path=Path(entry.base_path),
                policy=kind,
                num_versions=policy.latest.num_versions or 1,
                versions=tuple(policy.specific.versions),
            )
        )
    return models


def read_model_config_file(path: Path) -> list[ModelConfig]:
    """The models of a ModelServerConfig text file (TF Serving's --model_config_file)."""
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(Path(path).read_text(encoding="utf-8"), config)
    except (OSError, text_format.ParseError) as exc:
        raise InvalidInput(f"model config file {path} cannot be read: {exc}") from exc
    return model_configs(config)


@dataclass(eq=False)
class _Version:
    """Mutable record of one tracked version; guarded by ModelManager's lock."""

    path: Path
    state: State = State.START
    model: LoadedModel | None = None
    error: LoadError | None = None
    fingerprint: tuple | None = None

    def retry_due(self) -> bool:
        """A version that failed to load is tried again only once its SavedModel file has changed."""
        return self.error is None or _fingerprint(self.path) != self.fingerprint


class ModelManager:
    """Serves the models of a model list as TF Serving does: each from `<base_path>/<version>/`, by its policy.

    With `config` (a list of `ModelConfig`, from --model_config_file or HandleReloadConfigRequest) only the
    listed models are served; without one, every folder of `models_dir` is a model with the default policy
    (a convenience of this stand-in: the real server needs a model list). One background thread does all
    loading; it scans every `poll_seconds`. Per model it loads the versions its policy wants (newest first)
    and unloads the others once one wanted version is AVAILABLE, so the previous version keeps serving while
    a new one loads, or when the new one fails; a version whose folder disappears is unloaded at once. A
    version that failed is tried again only when its saved_model.pb changes. Requests get an AVAILABLE
    version or NOT_FOUND ("Servable not found"), also while the version is loading, as from TF Serving.
    """

    def __init__(
        self,
        models_dir: Path | None = None,
        *,
        config: Sequence[ModelConfig] | None = None,
        poll_seconds: float = 2.0,
        loader: Callable[[Path], LoadedModel] = LoadedModel.load,
    ) -> None:
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        if models_dir is None and config is None:
            raise ValueError("a models folder or a model list is needed")
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.poll_seconds = poll_seconds
        self._loader = loader
        self._config = None if config is None else {model.name: model for model in config}
        self._lock = threading.Condition()
        self._versions: dict[str, dict[int, _Version]] = {}
        self._on_disk: dict[str, dict[int, Path]] = {}
        self._scans = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._scanned = threading.Event()
        self._thread: threading.Thread | None = None
        self._missing_logged: set[Path] = set()

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> None:
        """Start the loading thread and wait until the models have been scanned (and loaded) once."""
        with self._lock:
            if self._thread is None:
                where = self.models_dir if self._config is None else f"a list of {len(self._config)} models"
                log.info("serving models from %s (polled every %.1fs)", where, self.poll_seconds)
                self._thread = threading.Thread(target=self._run, name="tfserving-loader", daemon=True)
                self._thread.start()
        if not self._scanned.wait(timeout):
            raise TimeoutError(f"models not scanned within {timeout}s")

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until every listed model has an AVAILABLE version, as TF Serving does before it opens its ports.

        A listed model without a version to load keeps the server from becoming ready; True once ready, False
        after `timeout` seconds (None: no limit) or when stopping.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._stop.is_set():
                waiting = self._not_ready()
                if not waiting:
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                if not self._lock.wait(min(5.0, remaining) if remaining is not None else 5.0):
                    log.info("waiting for models to load: %s", ", ".join(sorted(waiting)))
        return False

    def _not_ready(self) -> list[str]:
        """Listed models without an AVAILABLE version (lock held); none without a list (folders come and go)."""
        if self._config is None:
            return []
        return [
            name
            for name in self._models()
            if not any(v.state is State.AVAILABLE for v in self._versions.get(name, {}).values())
        ]

    def reload(self, config: Sequence[ModelConfig], *, timeout: float = 30.0) -> list[str]:
        """Serve exactly the models of `config` from now on (HandleReloadConfigRequest).

        Models no longer listed are unloaded; new ones are loaded by the next scan, which this waits for, and then
        up to `timeout` seconds for every listed model to have an AVAILABLE version. Returns the models that have
        none (empty when all are served).
        """
        with self._lock:
            self._config = {model.name: model for model in config}
            for name in [n for n in self._versions if n not in self._config]:
                for number, version in self._versions[name].items():
                    if version.state is State.AVAILABLE:
                        self._unload(name, number, version, "no longer in the model list")
                del self._versions[name]
            target = self._scans + 2  # a scan that started after this change has ended
            self._wake.set()
            deadline = time.monotonic() + timeout
            while self._scans < target and not self._stop.is_set() and time.monotonic() < deadline:
                self._lock.wait(deadline - time.monotonic())
        self.wait_ready(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return self._not_ready()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loading thread (a load in progress finishes first) and fail waiting requests."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:  # keep polling: one bad folder must not end serving
                log.exception("scanning the models failed")
            finally:
                with self._lock:
                    self._scans += 1
                    self._lock.notify_all()
                self._scanned.set()
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    # -- the loading thread -------------------------------------------------------------------------
    def _models(self) -> dict[str, ModelConfig]:
        if self._config is not None:
            return dict(self._config)
        try:
            with os.scandir(self.models_dir) as entries:
                names = [entry.name for entry in entries if entry.is_dir() and not entry.name.startswith(".")]
        except FileNotFoundError:
            self._log_missing(self.models_dir, "models folder")
            return {}
        return {name: ModelConfig(name, self.models_dir / name) for name in names}

    def _log_missing(self, path: Path, what: str) -> None:
        if path not in self._missing_logged:
            log.warning("%s %s does not exist (yet): no versions of it to serve", what, path)
            self._missing_logged.add(path)

    def scan(self) -> None:
        """List every model's versions, unload what disappeared, load what the policies want, retire the rest."""
        with self._lock:
            models = self._models()
        listing = {name: self._list(model) for name, model in models.items()}
        plan: dict[str, list[int]] = {}
        with self._lock:
            self._on_disk = listing
            for name, versions in self._versions.items():
                for number, version in versions.items():
                    if version.state is State.AVAILABLE and number not in listing.get(name, {}):
                        self._unload(name, number, version, "its folder was removed")
            for name, paths in listing.items():
                versions = self._versions.setdefault(name, {})
                wanted = []
                for number in sorted(models[name].aspired(paths), reverse=True):
                    version = versions.get(number)
                    if version is None or (version.state is not State.AVAILABLE and version.retry_due()):
                        wanted.append(number)
                if wanted:
                    plan[name] = wanted
        for name, numbers in plan.items():
            for number in numbers:
                if self._stop.is_set():
                    return
                self._load(name, number, listing[name][number])
        with self._lock:
            for name, paths in listing.items():
                self._retire(name, models[name].aspired(paths))

    def _list(self, model: ModelConfig) -> dict[int, Path]:
        try:
            with os.scandir(model.base_path) as entries:
                found = {
                    int(entry.name): Path(entry.path)
                    for entry in entries
                    if _VERSION_NAME.fullmatch(entry.name) and int(entry.name) > 0 and entry.is_dir()
                }
        except FileNotFoundError:
            self._log_missing(model.base_path, f"base path of model {model.name!r}")
            return {}
        except OSError as exc:  # unreadable for a moment: keep what the last scan saw
            log.warning("cannot list model folder %s: %s", model.base_path, exc)
            return self._on_disk.get(model.name, {})
        self._missing_logged.discard(model.base_path)
        return found

    def _retire(self, name: str, aspired: set[int]) -> None:
        """Unload the versions the policy no longer wants, once a wanted one serves (lock held)."""
        versions = self._versions.get(name, {})
        if not any(versions[n].state is State.AVAILABLE for n in aspired if n in versions):
            return
        for number, version in versions.items():
            if version.state is State.AVAILABLE and number not in aspired:
                self._unload(name, number, version, "the version policy no longer wants it")

    def _load(self, name: str, number: int, path: Path) -> bool:
        """Load one version (on this thread, outside the lock); True when it became AVAILABLE."""
        with self._lock:
            version = self._versions.setdefault(name, {}).get(number)
            if version is None or version.path != path:
                version = self._versions[name][number] = _Version(path)
            version.state, version.error = State.LOADING, None
            self._lock.notify_all()
        fingerprint = _fingerprint(path)
        started = time.monotonic()
        try:
            model, error = self._loader(path), None
        except LoadFailure as exc:
            model, error = None, LoadError(exc.code, str(exc))
        except Exception as exc:
            log.exception("loading %s version %d failed unexpectedly", name, number)
            model, error = None, LoadError("UNKNOWN", f"{type(exc).__name__}: {exc}")
        with self._lock:
            version.fingerprint, version.model, version.error = fingerprint, model, error
            version.state = State.AVAILABLE if model is not None else State.END
            self._lock.notify_all()
        if model is not None:
            log.info(
                "model %s version %d AVAILABLE (%.2fs)",
                name,
                number,
                time.monotonic() - started,
                extra={"model": name, "version": number, "path": str(path)},
            )
        else:
            log.warning(
                "model %s version %d failed to load: %s %s",
                name,
                number,
                error.code,
                error.message,
                extra={"model": name, "version": number, "path": str(path)},
            )
        return model is not None

    def _unload(self, name: str, number: int, version: _Version, why: str) -> None:
        # Calls in flight hold their own reference to the model; memory is freed when they end.
        version.state, version.model, version.error = State.END, None, None
        self._lock.notify_all()
        log.info("model %s version %d unloaded: %s", name, number, why, extra={"model": name, "version": number})

    # -- request threads ----------------------------------------------------------------------------
    def get(self, name: str, version: int | None = None, *, timeout: float = 0.0) -> tuple[int, LoadedModel]:
        """The model version a request runs: `version`, or the newest AVAILABLE one when None.

        Only what is loaded serves, as in TF Serving: a version that is loading, failed, is not wanted by the
        policy or belongs to a model not in the list is NOT_FOUND. (`timeout` is accepted for compatibility.)
        """
        with self._lock:
            versions = self._versions.get(name, {})
            if version is None:
                available = [n for n, v in versions.items() if v.state is State.AVAILABLE]
                if available:
                    return max(available), versions[max(available)].model
                raise NotFound(f"Servable not found for request: Latest({name}){self._why_not(name)}")
            found = versions.get(version)
            if found is not None and found.state is State.AVAILABLE:
                return version, found.model
            if found is not None and found.error is not None:
                raise NotFound(
                    f"Servable not found for request: Specific({name}, {version}): "
                    f"version {version} of model {name!r} failed to load: {found.error.message}"
                )
            raise NotFound(f"Servable not found for request: Specific({name}, {version}){self._why_not(name)}")

    def _why_not(self, name: str) -> str:
        """Why a model has nothing to serve, for the message (lock held)."""
        if name not in self._models():
            return " (not in the model list)"
        if not self._on_disk.get(name):
            return " (no version folders under its base path)"
        if any(v.state in (State.START, State.LOADING) for v in self._versions.get(name, {}).values()):
            return " (loading)"
        failures = "; ".join(
            f"version {n}: {v.error.message}" for n, v in sorted(self._versions.get(name, {}).items()) if v.error
        )
        return f" ({failures})" if failures else ""

    def status(self, name: str, version: int | None = None) -> list[VersionStatus]:
        """The tracked versions of `name` (newest first), or only `version`; NotFound when untracked.

        Tracked are the versions the policy has loaded or tried to; versions on disk that the policy does not
        want are not listed (as in TF Serving).
        """
        with self._lock:
            versions = self._versions.get(name)
            if not versions:
                raise NotFound(f"Could not find any versions of model {name}")
            if version is not None:
                if version not in versions:
                    raise NotFound(f"Could not find version {version} of model {name}")
                numbers = [version]
            else:
                numbers = sorted(versions, reverse=True)
            return [VersionStatus(n, versions[n].state, versions[n].error) for n in numbers]
