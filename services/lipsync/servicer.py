"""gRPC servicer of the `lipsync` stage: features -> TF Serving -> mouth shapes at the output frame times."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from audio2video.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc
from services.lipsync import core
from services.lipsync import model as lstm
from services.lipsync.serving import ServingClient
from services.lipsync.versions import extra_key, stored_versions, version_message
from services.runtime.blobstore import BlobRef, BlobStore, wait_for_store
from services.runtime.config import Config, Env
from services.runtime.errors import FailedPrecondition, InvalidInput, NotFound
from services.runtime.keys import derive_prefix, validate_key, validate_speaker
from services.runtime.protos import (
    array_ref,
    blob_ref,
    frame_rate,
    frame_rate_message,
    input_sha256,
    load_result,
    store_result,
)
from services.runtime.server import ServiceBinding, binding_for
from services.runtime.status import grpc_errors

log = logging.getLogger(__name__)
MAX_OUTPUT_FRAMES = 24 * 3600 * 60
"""A day of 60 fps video, as retiming: a count of 2^62 failed (INTERNAL), billions asked for gigabytes per array."""
MAX_START_SECONDS = 24 * 3600.0
"""Audio time of output frame 0 at most a day: at 2^49 s, frame times 1/30 s apart were all equal (INTERNAL)."""
RESULT_FORMAT_VERSION = 5  # 2: amplitude normalisation, 3: crossed lips closed, 4: gain about the closed mouth,
# 5: gain measured over all frames, capped by the model's regime
MODEL_STATES = {
    "AVAILABLE": lipsync_pb2.MODEL_STATE_AVAILABLE,
    "START": lipsync_pb2.MODEL_STATE_LOADING,
    "LOADING": lipsync_pb2.MODEL_STATE_LOADING,
    "UNLOADING": lipsync_pb2.MODEL_STATE_NOT_LOADED,
}


@dataclass(frozen=True)
class SpeakerModel:
    """What a stored model version brings besides the network: its PCA, normalisation and card."""

    speaker: str
    version: int
    card: dict
    pca_mean: np.ndarray
    pca_components: np.ndarray
    feature_mean: np.ndarray
    feature_std: np.ndarray

    @property
    def delay(self) -> int:
        return int(self.card.get("delay_steps", 20))

    @property
    def max_amplitude_gain(self) -> float:
        """Predict's default gain cap for this model: its card's, else its training regime's (older cards)."""
        recorded = self.card.get("max_amplitude_gain")
        if recorded is not None:
            return float(recorded)
        return lstm.predict_gain_cap((self.card.get("regime") or {}).get("name"))

    @property
    def rest_shape(self) -> np.ndarray:
        return self.pca_mean.reshape(core.MOUTH_POINTS, 2)


@dataclass(frozen=True)
class PredictSettings:
    """Predict's options with defaults resolved (part of the output key)."""

    chunk_seconds: float = 30.0
    overlap_seconds: float = 2.0
    silence_enabled: bool = False
    ramp_seconds: float = 0.1
    smoothing_sigma_frames: float = 0.0
    max_amplitude_gain: float | None = None  # None: the model's own (`SpeakerModel.max_amplitude_gain`)

    @classmethod
    def from_proto(cls, options: lipsync_pb2.PredictOptions) -> PredictSettings:
        silence = options.silence
        return cls(
            chunk_seconds=options.chunking.chunk_seconds or cls.chunk_seconds,
            overlap_seconds=options.chunking.overlap_seconds or cls.overlap_seconds,
            silence_enabled=silence.enabled if silence.HasField("enabled") else cls.silence_enabled,
            ramp_seconds=silence.ramp_seconds if silence.HasField("ramp_seconds") else cls.ramp_seconds,
            smoothing_sigma_frames=(
                options.smoothing_sigma_frames if options.HasField("smoothing_sigma_frames") else 0.0
            ),
            max_amplitude_gain=(options.max_amplitude_gain if options.HasField("max_amplitude_gain") else None),
        )

    def check(self) -> PredictSettings:
        """Refuse values no caller means (INVALID_ARGUMENT): a smoothing sigma or ramp of 10^9 frames asked for a
        filter kernel of gigabytes (the server was killed for memory), NaN for an exception."""
        bounds = {
            "chunking.chunk_seconds": (self.chunk_seconds, 0.0, 3600.0),
            "chunking.overlap_seconds": (self.overlap_seconds, 0.0, 3600.0),
            "silence.ramp_seconds": (self.ramp_seconds, 0.0, 10.0),
            "smoothing_sigma_frames": (self.smoothing_sigma_frames, 0.0, 1000.0),
        }
        if self.max_amplitude_gain is not None:
            bounds["max_amplitude_gain"] = (self.max_amplitude_gain, 0.0, 100.0)
        for name, (value, low, high) in bounds.items():
            if not low <= value <= high:  # NaN too
                raise InvalidInput(f"option {name} must be in [{low:g}, {high:g}], got {value}")
        return self


class LipsyncServicer(lipsync_pb2_grpc.LipsyncServiceServicer):
    """Predict and DescribeModel over the object store and TF Serving."""

    def __init__(self, store: BlobStore, serving: ServingClient) -> None:
        self.store = store
        self.serving = serving

    # -- models ----------------------------------------------------------------------------------

    def _card(self, speaker: str, version: int) -> dict | None:
        key = extra_key(speaker, version, "model_card.json")
        if not self.store.exists(key):
            return None
        return json.loads(self.store.get_bytes(key))

    def load_model(self, speaker: str, version: int) -> SpeakerModel:
        card = self._card(speaker, version)
        if card is None:
            raise NotFound(
                f"model {speaker} version {version} is not in the object store "
                f"({extra_key(speaker, version, 'model_card.json')})"
            )
        pca = self.store.get_arrays(extra_key(speaker, version, "pca.npz"))
        normalization = self.store.get_arrays(extra_key(speaker, version, "normalization.npz"))
        return SpeakerModel(
            speaker,
            version,
            card,
            pca["mean"],
            pca["components"],
            normalization["feature_mean"],
            normalization["feature_std"],
        )

    def _resolve_version(self, spec: lipsync_pb2.ModelSpec) -> int:
        validate_speaker(spec.speaker)
        if spec.version < 0:
            raise InvalidInput(f"model version must be >= 0, got {spec.version}")
        return spec.version or self.serving.latest_available(spec.speaker)

    # -- Predict ---------------------------------------------------------------------------------

    @grpc_errors
    def Predict(self, request: lipsync_pb2.PredictRequest, context) -> lipsync_pb2.PredictResponse:
        """Mouth shapes for every output frame; a finished earlier result for the same inputs is reused."""
        fps = frame_rate(request.output_frame_rate, what="output_frame_rate")
        if fps is None:
            raise InvalidInput("output_frame_rate is required")
        source = blob_ref(request.features.object, default_bucket=self.store.bucket, what="features")
        settings = PredictSettings.from_proto(request.options).check()
        if not 0 <= request.output_frame_count <= MAX_OUTPUT_FRAMES:
            raise InvalidInput(
                f"output_frame_count must be in [0, {MAX_OUTPUT_FRAMES}], got {request.output_frame_count}"
            )
        if not abs(request.start_seconds) <= MAX_START_SECONDS:  # NaN too
            raise InvalidInput(f"start_seconds must be within a day, got {request.start_seconds}")
        version = self._resolve_version(request.model)
        prefix = request.output_prefix.rstrip("/") or self._prefix(request, source, settings, version, fps)
        result_key = validate_key(f"{prefix}/result.json")
        cached = load_result(self.store, result_key, lipsync_pb2.PredictResponse)
        if cached is not None:
            cached.cached = True
            return cached

        model = self.load_model(request.model.speaker, version)
        features, info = self.store.get_array(source.key, bucket=source.bucket, expected_sha256=source.sha256)
        if features.ndim != 2 or features.shape[1] != core.FEATURE_DIM:
            raise InvalidInput(f"features must be [T, {core.FEATURE_DIM}], got shape {features.shape}")
        rate = info.fps or 100.0
        if abs(rate - float(model.card.get("feature_rate_hz", 100.0))) > 1e-6:
            raise InvalidInput(f"features are at {rate} Hz, the model expects {model.card.get('feature_rate_hz')} Hz")
        start = info.start_seconds

        normalised = (features - model.feature_mean) / model.feature_std
        rows = core.predict_rows(
            normalised,
            lambda window: self.serving.predict(model.speaker, version, window),
            delay=model.delay,
            chunk_rows=round(settings.chunk_seconds * rate),
            overlap_rows=round(settings.overlap_seconds * rate),
        )
        if rows.shape[1] != model.pca_components.shape[0]:
            raise FailedPrecondition(
                f"model output has {rows.shape[1]} coefficients, its PCA has {model.pca_components.shape[0]}"
            )
        count = request.output_frame_count or core.default_frame_count(len(features), rate, fps)
        times = core.output_frame_times(count, fps, request.start_seconds)
        coefficients = core.resample(rows, start_seconds=start, rate=rate, times=times)
        weights = None
        if request.HasField("speech_activity"):
            activity, activity_info = self._activity(request)
            weights = core.silence_weights(
                activity, activity_rate=activity_info.fps, times=times, ramp_seconds=settings.ramp_seconds
            )
        gain_cap = model.max_amplitude_gain if settings.max_amplitude_gain is None else settings.max_amplitude_gain
        coefficients, gain = core.normalise_amplitude(
            coefficients,
            model.pca_mean,
            model.pca_components,
            reference_std=float(model.card.get("opening_std") or 0.0),
            max_gain=gain_cap,
        )
        shapes = core.shapes_from_coefficients(coefficients, model.pca_mean, model.pca_components)
        if gain > 1:  # scaled past closed: crossed inner lips meet halfway
            shapes = core.uncross_lips(shapes)
        if weights is not None and settings.silence_enabled:
            shapes = core.blend_silence(shapes, weights, model.rest_shape)
        shapes = core.smooth_track(shapes, settings.smoothing_sigma_frames)

        response = lipsync_pb2.PredictResponse(
            mouth_shapes=self._put(f"{prefix}/mouth_shapes.npy", shapes, fps, request.start_seconds),
            coefficients=self._put(f"{prefix}/coefficients.npy", coefficients, fps, request.start_seconds),
            feature_coefficients=self._put(f"{prefix}/feature_coefficients.npy", rows, rate, start),
            model=self._version_message(model.speaker, version, model.card, states={}),
            output_frame_rate=frame_rate_message(fps),
            output_frame_count=count,
        )
        store_result(self.store, result_key, response)
        log.info(
            "predicted %d frames with %s v%d (amplitude gain %.2f, cap %.2f)",
            count,
            model.speaker,
            version,
            gain,
            gain_cap,
            extra={"request_id": request.request_id},
        )
        return response

    def _prefix(
        self,
        request: lipsync_pb2.PredictRequest,
        features: BlobRef,
        settings: PredictSettings,
        version: int,
        fps: Fraction,
    ) -> str:
        """The derived key prefix of a Predict call: its inputs' hashes, the model version and the settings."""
        inputs = [self.store.content_sha256(features)]
        if request.HasField("speech_activity"):  # by content, also when the reference carries no sha256
            inputs.append(input_sha256(self.store, request.speech_activity.object, what="speech activity"))
        return derive_prefix(
            "lipsync",
            inputs=inputs,
            version=RESULT_FORMAT_VERSION,
            params=dataclasses.asdict(settings)
            | {
                "speaker": request.model.speaker,
                "model_version": version,
                "fps": str(fps),
                "frames": request.output_frame_count,
                "start": request.start_seconds,
            },
        )

    def _put(self, key: str, values: np.ndarray, fps: float | Fraction, start_seconds: float):
        """Store an array per frame (its rate and start time in its metadata); its ArrayRef."""
        return array_ref(*self.store.put_array(key, values, fps=float(fps), start_seconds=start_seconds))

    def _activity(self, request: lipsync_pb2.PredictRequest):
        ref = blob_ref(request.speech_activity.object, default_bucket=self.store.bucket, what="speech activity")
        activity, info = self.store.get_array(ref.key, bucket=ref.bucket, expected_sha256=ref.sha256)
        if activity.ndim != 1 or info.fps <= 0:
            raise InvalidInput(f"speech activity must be [N] with a frame rate, got {activity.shape} at {info.fps}")
        return activity, info

    # -- DescribeModel ---------------------------------------------------------------------------

    @grpc_errors
    def DescribeModel(self, request: lipsync_pb2.DescribeModelRequest, context) -> lipsync_pb2.DescribeModelResponse:
        """Stored versions with their serving state, newest first."""
        validate_speaker(request.speaker)
        versions = sorted(stored_versions(self.store, request.speaker), reverse=True)
        if request.version:
            versions = [v for v in versions if v == request.version]
        if not versions:
            what = f"version {request.version}" if request.version else "any model"
            raise NotFound(f"speaker {request.speaker!r} has no stored {what}")
        states = {s.version: s for s in self.serving.versions(request.speaker)}
        described = [
            self._version_message(request.speaker, v, self._card(request.speaker, v) or {}, states) for v in versions
        ]
        available = [m.version for m in described if m.state == lipsync_pb2.MODEL_STATE_AVAILABLE]
        return lipsync_pb2.DescribeModelResponse(
            speaker=request.speaker, versions=described, latest_available_version=max(available, default=0)
        )

    def _version_message(self, speaker: str, version: int, card: Mapping, states: Mapping) -> lipsync_pb2.ModelVersion:
        status = states.get(version)
        if status is None:  # stored, but TF Serving has not loaded it (yet): Predict would not find it
            state = lipsync_pb2.MODEL_STATE_NOT_LOADED
        elif status.state == "END":
            state = lipsync_pb2.MODEL_STATE_FAILED if status.error else lipsync_pb2.MODEL_STATE_NOT_LOADED
        else:
            state = MODEL_STATES.get(status.state, lipsync_pb2.MODEL_STATE_UNSPECIFIED)
        message = version_message(self.store, speaker, version, card, state)
        message.serving_note = serving_note(speaker, version, states)
        return message


def serving_note(speaker: str, version: int, states: Mapping) -> str:
    """Why TF Serving does not serve `version` of `speaker` (empty when it does), from its GetModelStatus."""
    status = states.get(version)
    if status is not None and status.state == "AVAILABLE":
        return ""
    if not states:
        return (
            f"TF Serving does not list speaker {speaker!r}: the model sync adds a trained speaker to its model "
            "list within seconds (is it running beside TF Serving?)"
        )
    if status is None:
        served = [v for v, s in states.items() if s.state == "AVAILABLE"]
        if served and version < max(served):
            return f"older than version {max(served)}, which TF Serving serves (its policy serves the newest only)"
        return "TF Serving has not picked this version up yet"
    if status.state in ("START", "LOADING"):
        return "TF Serving is loading it"
    if status.error:
        return f"TF Serving failed to load it: {status.error}"
    return "TF Serving unloaded it (a newer version serves)"


@dataclass(frozen=True)
class LipsyncSettings:
    """The stage's settings: A2V_TFSERVING_ADDR, TF Serving's gRPC address (default the local stand-in)."""

    serving_address: str = "127.0.0.1:8500"

    @classmethod
    def read(cls, env: Env) -> LipsyncSettings:
        """Read the settings from the environment (with the rest of `Config.from_env`)."""
        return cls(serving_address=env.get_str("A2V_TFSERVING_ADDR", cls.serving_address))


def bindings(config: Config[LipsyncSettings]) -> list[ServiceBinding]:
    """What `python -m services.lipsync` serves: SERVING once the object store answers.

    TF Serving may come up later or have no model yet: Predict then answers UNAVAILABLE or NOT_FOUND.
    """
    store = BlobStore.from_config(config.store)
    settings = config.settings or LipsyncSettings()
    servicer = LipsyncServicer(
        store, ServingClient(settings.serving_address, timeout_seconds=config.rpc_timeout_seconds)
    )
    return [binding_for(lipsync_pb2, lipsync_pb2_grpc, "LipsyncService", servicer, load=lambda: wait_for_store(store))]
