"""Model versions on disk, loaded and unloaded as TF Serving's `latest` version policy does (no gRPC here)."""

from __future__ import annotations

import enum
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf import message, text_format
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from services.runtime.errors import InvalidInput, NotFound, TooLarge, Unavailable

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


@dataclass(eq=False)
class _Version:
    """Mutable record of one tracked version; guarded by ModelManager's lock."""

    path: Path
    state: State = State.START
    model: LoadedModel | None = None
    error: LoadError | None = None
    fingerprint: tuple | None = None
    last_used: float = field(default_factory=time.monotonic)

    def retry_due(self) -> bool:
        """A version that failed to load is tried again only once its SavedModel file has changed."""
        return self.error is None or _fingerprint(self.path) != self.fingerprint


class ModelManager:
    """Serves the SavedModels under `models_dir/<model>/<version>/` as TF Serving's `latest` policy does.

    One background thread does all loading. It scans `models_dir` every `poll_seconds`: every
    sub-folder is a model (named like the folder), every sub-folder of it named by a positive
    integer is a version. For each model it loads the newest version on disk that is newer than the
    newest one already AVAILABLE; if that fails it tries the next older one, so a broken newest
    version never leaves a model without a version to serve. A version that failed is tried again
    only when its saved_model.pb changes. A request without a version gets the newest AVAILABLE one
    (the previous one keeps serving while a new one loads). A request for a specific older version
    that is on disk has it loaded on demand by the same thread; besides the newest, up to
    `cached_versions` versions per model stay loaded, least recently used unloaded first. Versions
    whose folders disappear are unloaded.
    """

    def __init__(
        self,
        models_dir: Path,
        *,
        poll_seconds: float = 2.0,
        cached_versions: int = 2,
        loader: Callable[[Path], LoadedModel] = LoadedModel.load,
    ) -> None:
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        if cached_versions < 1:
            raise ValueError(f"cached_versions must be >= 1, got {cached_versions}")
        self.models_dir = Path(models_dir)
        self.poll_seconds = poll_seconds
        self.cached_versions = cached_versions
        self._loader = loader
        self._lock = threading.Condition()
        self._versions: dict[str, dict[int, _Version]] = {}
        self._on_disk: dict[str, dict[int, Path]] = {}
        self._wanted: set[tuple[str, int]] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._scanned = threading.Event()
        self._thread: threading.Thread | None = None
        self._missing_dir_logged = False

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> None:
        """Start the loading thread and wait until `models_dir` has been scanned (and loaded) once."""
        with self._lock:
            if self._thread is None:
                log.info("serving models from %s (polled every %.1fs)", self.models_dir, self.poll_seconds)
                self._thread = threading.Thread(target=self._run, name="tfserving-loader", daemon=True)
                self._thread.start()
        if not self._scanned.wait(timeout):
            raise TimeoutError(f"{self.models_dir} not scanned within {timeout}s")

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loading thread (a load in progress finishes first) and fail waiting requests."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        next_scan = 0.0
        while not self._stop.is_set():
            try:
                self._load_wanted()
                if time.monotonic() >= next_scan:
                    self.scan()
                    next_scan = time.monotonic() + self.poll_seconds
            except Exception:  # keep polling: one bad folder must not end serving
                log.exception("scanning %s failed", self.models_dir)
                next_scan = time.monotonic() + self.poll_seconds
            finally:
                self._scanned.set()
            self._wake.wait(max(0.0, next_scan - time.monotonic()))
            self._wake.clear()

    # -- the loading thread -------------------------------------------------------------------------
    def scan(self) -> None:
        """List `models_dir`, unload versions that disappeared, load what the version policy wants."""
        listing = self._list()
        plan: dict[str, list[int]] = {}
        with self._lock:
            self._on_disk = listing
            for name, versions in self._versions.items():
                for number, version in versions.items():
                    if version.state is State.AVAILABLE and number not in listing.get(name, {}):
                        self._unload(name, number, version, "its folder was removed")
            for name, paths in listing.items():
                versions = self._versions.setdefault(name, {})
                newest = max((n for n, v in versions.items() if v.state is State.AVAILABLE), default=0)
                candidates = []
                for number in sorted(paths, reverse=True):
                    if number <= newest:
                        break
                    version = versions.get(number)
                    if version is None or version.retry_due():
                        candidates.append(number)
                if candidates:
                    first = versions.setdefault(candidates[0], _Version(paths[candidates[0]]))
                    first.state, first.error = State.START, None
                    plan[name] = candidates
        for name, candidates in plan.items():
            for number in candidates:
                if self._stop.is_set():
                    return
                if self._load(name, number, listing[name][number]):
                    break
            self._evict(name)
            self._load_wanted()

    def _list(self) -> dict[str, dict[int, Path]]:
        try:
            with os.scandir(self.models_dir) as entries:
                models = [entry for entry in entries if entry.is_dir() and not entry.name.startswith(".")]
        except FileNotFoundError:
            if not self._missing_dir_logged:
                log.warning("models folder %s does not exist (yet): serving no models", self.models_dir)
                self._missing_dir_logged = True
            return {}
        self._missing_dir_logged = False
        listing = {}
        for model in models:
            try:
                with os.scandir(model.path) as entries:
                    listing[model.name] = {
                        int(entry.name): Path(entry.path)
                        for entry in entries
                        if _VERSION_NAME.fullmatch(entry.name) and int(entry.name) > 0 and entry.is_dir()
                    }
            except OSError as exc:  # unreadable for a moment: keep what the last scan saw
                log.warning("cannot list model folder %s: %s", model.path, exc)
                listing[model.name] = self._on_disk.get(model.name, {})
        return listing

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
            version.last_used = time.monotonic()
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

    def _load_wanted(self) -> None:
        """Load the specific versions that requests are waiting for."""
        while not self._stop.is_set():
            with self._lock:
                if not self._wanted:
                    return
                name, number = key = next(iter(self._wanted))
                version = self._versions.get(name, {}).get(number)
                path = self.models_dir / name / str(number)
                needed = (version is None or version.state is not State.AVAILABLE) and path.is_dir()
                needed = needed and (version is None or version.retry_due())
            if needed:
                self._load(name, number, path)
                self._evict(name)
            with self._lock:
                self._wanted.discard(key)
                self._lock.notify_all()

    def _evict(self, name: str) -> None:
        """Keep the newest AVAILABLE version and the `cached_versions` most recently used others."""
        with self._lock:
            versions = self._versions.get(name, {})
            available = sorted((n for n, v in versions.items() if v.state is State.AVAILABLE), reverse=True)
            others = sorted(available[1:], key=lambda n: versions[n].last_used, reverse=True)
            for number in others[self.cached_versions :]:
                self._unload(name, number, versions[number], "least recently used")

    def _unload(self, name: str, number: int, version: _Version, why: str) -> None:
        # Calls in flight hold their own reference to the model; memory is freed when they end.
        version.state, version.model, version.error = State.END, None, None
        self._lock.notify_all()
        log.info("model %s version %d unloaded: %s", name, number, why, extra={"model": name, "version": number})

    # -- request threads ----------------------------------------------------------------------------
    def get(self, name: str, version: int | None = None, *, timeout: float = 30.0) -> tuple[int, LoadedModel]:
        """The model version a request runs: `version`, or the newest AVAILABLE one when None.

        A specific version on disk that is not loaded is loaded by the loading thread; this waits for
        it up to `timeout` seconds.

        Raises:
            NotFound: no such model or version on disk, or the version failed to load.
            Unavailable: the model (or the version) is still loading, or the server is stopping.
        """
        with self._lock:
            versions = self._versions.get(name, {})
            if version is None:
                return self._latest(name, versions)
            found = versions.get(version)
            if found is not None and found.state is State.AVAILABLE:
                found.last_used = time.monotonic()
                return version, found.model
            path = self.models_dir / name / str(version)
            if name not in self._on_disk or version <= 0 or not path.is_dir():
                raise NotFound(f"Servable not found for request: Specific({name}, {version})")
            if found is not None and found.error is not None and not found.retry_due():
                raise NotFound(f"version {version} of model {name!r} failed to load: {found.error.message}")
            key = (name, version)
            self._wanted.add(key)
            self._wake.set()
            deadline = time.monotonic() + timeout
            while key in self._wanted:
                remaining = deadline - time.monotonic()
                if self._stop.is_set() or remaining <= 0:
                    raise Unavailable(f"version {version} of model {name!r} is still loading")
                self._lock.wait(remaining)
            found = self._versions.get(name, {}).get(version)
            if found is not None and found.state is State.AVAILABLE:
                found.last_used = time.monotonic()
                return version, found.model
            if found is not None and found.error is not None:
                raise NotFound(f"version {version} of model {name!r} failed to load: {found.error.message}")
            raise Unavailable(f"version {version} of model {name!r} was unloaded before use; retry")

    def _latest(self, name: str, versions: dict[int, _Version]) -> tuple[int, LoadedModel]:
        available = [n for n, v in versions.items() if v.state is State.AVAILABLE]
        if available:
            number = max(available)
            versions[number].last_used = time.monotonic()
            return number, versions[number].model
        on_disk = self._on_disk.get(name)
        if on_disk is None:
            raise NotFound(f"Servable not found for request: Latest({name}) (no folder {name!r} in the models folder)")
        if not on_disk:
            raise NotFound(f"Servable not found for request: Latest({name}) (the model folder has no version folders)")
        # Not yet tried, loading now, unloaded (a scan reloads it) or changed since it failed.
        pending = any(
            number not in versions or versions[number].state is not State.END or versions[number].retry_due()
            for number in on_disk
        )
        if pending:
            raise Unavailable(f"model {name!r} is loading; no version is available yet")
        failures = "; ".join(
            f"version {n}: {versions[n].error.message}" for n in sorted(on_disk, reverse=True) if versions[n].error
        )
        raise NotFound(f"Servable not found for request: Latest({name}) (no version could be loaded: {failures})")

    def status(self, name: str, version: int | None = None) -> list[VersionStatus]:
        """The tracked versions of `name` (newest first), or only `version`; NotFound when untracked.

        Tracked are the versions the policy has loaded or tried to, and those loaded on demand;
        older versions on disk that were never wanted are not listed (as in TF Serving).
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
