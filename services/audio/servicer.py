"""gRPC servicer of the `audio` stage: fetch the audio blob, run the core, store features and activity."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from audio2video.audio.v1 import audio_pb2, audio_pb2_grpc
from audio2video.common.v1 import common_pb2
from services.audio import core
from services.runtime.blobstore import BlobStore
from services.runtime.budget import MIB, Budget
from services.runtime.config import Config, Env, InputLimits
from services.runtime.errors import TooLarge
from services.runtime.keys import derive_prefix, sha256_bytes, validate_key
from services.runtime.progress import stream_events
from services.runtime.protos import (
    array_ref,
    blob_ref,
    frame_rate,
    frame_rate_message,
    load_result,
    object_ref,
    store_result,
)
from services.runtime.server import ServiceBinding, store_backed_bindings
from services.runtime.status import grpc_errors

log = logging.getLogger(__name__)
RESULT_FORMAT_VERSION = 1
BASELINE_MEMORY_BYTES = 256 * MIB
"""What an audio replica holds besides its calls (the interpreter, numpy, scipy, the decoders)."""
INPUT_MEMORY_FACTOR = 4
"""Peak bytes per input byte of one call: the encoded bytes, the decoded samples, the resampled copy."""


@dataclass(frozen=True)
class ExtractSettings:
    """Extract's options with every default resolved (what the output key is derived from)."""

    normalize_loudness: bool = True
    target_rms_dbfs: float = -23.0
    threshold_db: float = 12.0
    noise_floor_percentile: float = 10.0
    bridge_gap_seconds: float = 0.5
    min_speech_seconds: float = 0.05

    @classmethod
    def from_proto(cls, options: audio_pb2.ExtractOptions) -> ExtractSettings:
        activity = options.activity
        return cls(
            normalize_loudness=options.normalize_loudness if options.HasField("normalize_loudness") else True,
            target_rms_dbfs=options.target_rms_dbfs or cls.target_rms_dbfs,
            threshold_db=activity.threshold_db if activity.HasField("threshold_db") else cls.threshold_db,
            noise_floor_percentile=activity.noise_floor_percentile or cls.noise_floor_percentile,
            bridge_gap_seconds=(
                activity.bridge_gap_seconds if activity.HasField("bridge_gap_seconds") else cls.bridge_gap_seconds
            ),
            min_speech_seconds=(
                activity.min_speech_seconds if activity.HasField("min_speech_seconds") else cls.min_speech_seconds
            ),
        )


@dataclass(frozen=True)
class AudioOutputs:
    """What the core produced for one request (the servicer stores it)."""

    audio: core.DecodedAudio
    features: core.AudioFeatures
    activity: core.SpeechActivity
    output_frame_count: int


def analyse(
    data: bytes, settings: ExtractSettings, output_fps: Fraction | None, *, max_seconds: float, progress, should_stop
) -> AudioOutputs:
    """Decode, normalise, featurise and mark speech: the whole stage on bytes, no I/O."""
    audio = core.decode_audio(
        data, max_seconds=max_seconds, progress=lambda done, total: progress(int(done), int(total))
    )
    if settings.normalize_loudness:
        audio = core.normalize_loudness(audio, target_rms_dbfs=settings.target_rms_dbfs)
    features = core.extract_features(audio.samples, sample_rate=audio.sample_rate)
    n_output = core.output_frame_count(audio.samples.size, output_fps) if output_fps else 0
    activity = core.detect_speech(
        audio.samples,
        sample_rate=audio.sample_rate,
        output_fps=output_fps,
        n_output_frames=n_output if output_fps else None,
        margin_db=settings.threshold_db,
        noise_floor_percentile=settings.noise_floor_percentile,
        min_pause_seconds=settings.bridge_gap_seconds,
        min_speech_seconds=settings.min_speech_seconds,
    )
    duration = int(audio.duration_seconds)
    progress(duration, duration)
    return AudioOutputs(audio, features, activity, n_output)


class AudioServicer(audio_pb2_grpc.AudioServiceServicer):
    """Extract: any audio (or video) blob -> features, speech activity and normalised WAV blobs."""

    def __init__(self, store: BlobStore, limits: InputLimits | None = None) -> None:
        self.store = store
        limits = limits or InputLimits()
        self.max_seconds = limits.max_seconds
        resources = limits.resources
        # The input is read into memory and decoded there: a call holds about INPUT_MEMORY_FACTOR times its size.
        self.memory = Budget(resources.memory_bytes - BASELINE_MEMORY_BYTES, what="memory", variable="A2V_MEMORY_BYTES")
        largest = self.memory.total // INPUT_MEMORY_FACTOR
        self.max_input_bytes = min(limits.max_input_bytes or largest, largest)

    @grpc_errors
    def Extract(self, request: audio_pb2.ExtractRequest, context):
        """Stream progress, then one result; reuse a finished earlier result for the same input and options."""
        source = blob_ref(request.audio, default_bucket=self.store.bucket, what="audio")
        output_fps = frame_rate(request.output_frame_rate, what="output_frame_rate")
        max_seconds = self.max_seconds
        if request.max_duration_seconds > 0:
            max_seconds = min(request.max_duration_seconds, self.max_seconds)
        settings = ExtractSettings.from_proto(request.options)
        stored = self.store.stat(source.key, bucket=source.bucket)
        input_sha = source.sha256 or stored.sha256
        data = None
        if not input_sha:  # written by a foreign tool without our sha256 metadata: hash the content
            data = self._read(source, stored.size_bytes)
            input_sha = sha256_bytes(data)
        prefix = request.output_prefix.rstrip("/") or derive_prefix(
            "audio",
            inputs=[input_sha],
            version=RESULT_FORMAT_VERSION,
            params=dataclasses.asdict(settings) | {"output_fps": str(output_fps or "")},
        )
        validate_key(f"{prefix}/result.json")
        log.info("extract %s -> %s", source.key, prefix, extra={"request_id": request.request_id})

        cached = load_result(self.store, f"{prefix}/result.json", audio_pb2.ExtractResult)
        if cached is not None:
            if cached.duration_seconds > max_seconds:
                raise TooLarge(f"audio lasts {cached.duration_seconds:.1f} s, over the limit of {max_seconds:.0f} s")
            cached.cached = True
            yield audio_pb2.ExtractEvent(result=cached)
            return

        with self.memory.reserve(stored.size_bytes * INPUT_MEMORY_FACTOR, f"extracting {source.key}"):
            if data is None:
                data = self._read(source, stored.size_bytes)
            work = lambda progress, should_stop: analyse(  # noqa: E731
                data, settings, output_fps, max_seconds=max_seconds, progress=progress, should_stop=should_stop
            )
            yield from stream_events(
                context,
                work,
                event=audio_pb2.ExtractEvent,
                stage="audio",
                unit="seconds",
                finish=lambda outputs: self._store_outputs(prefix, outputs, output_fps),
            )

    def _read(self, source, size_bytes: int) -> bytes:
        if size_bytes > self.max_input_bytes:
            raise TooLarge(
                f"audio object {source.key} is {size_bytes} bytes, over the limit of {self.max_input_bytes} "
                "(A2V_AUDIO_MAX_INPUT_BYTES, at most a quarter of what A2V_MEMORY_BYTES leaves)"
            )
        return self.store.get_bytes(
            source.key, bucket=source.bucket, expected_sha256=source.sha256, max_bytes=self.max_input_bytes
        )

    def _store_outputs(self, prefix: str, out: AudioOutputs, output_fps: Fraction | None) -> audio_pb2.ExtractResult:
        features_blob, features_info = self.store.put_array(
            f"{prefix}/features.npy",
            out.features.values,
            fps=out.features.rate,
            start_seconds=out.features.start_seconds,
        )
        feature_activity = self.store.put_array(
            f"{prefix}/feature_activity.npy",
            out.activity.per_feature_frame.astype(np.uint8),
            fps=out.features.rate,
            start_seconds=out.features.start_seconds,
        )
        result = audio_pb2.ExtractResult(
            features=array_ref(features_blob, features_info),
            feature_frame_rate=common_pb2.FrameRate(numerator=int(out.features.rate), denominator=1),
            feature_speech_activity=array_ref(*feature_activity),
            duration_seconds=out.audio.duration_seconds,
            output_frame_rate=frame_rate_message(output_fps),
            output_frame_count=out.output_frame_count,
            source_sample_rate_hz=out.audio.source_sample_rate,
            source_channels=out.audio.source_channels,
            source_codec=out.audio.source_codec,
            speech_fraction=out.activity.speech_fraction,
            noise_floor_dbfs=out.activity.noise_floor_db,
        )
        if output_fps:
            # An output frame shows an open mouth when most of its interval is speech.
            per_frame = (out.activity.per_output_frame >= 0.5).astype(np.uint8)
            result.speech_activity.CopyFrom(
                array_ref(*self.store.put_array(f"{prefix}/speech_activity.npy", per_frame, fps=float(output_fps)))
            )
        wav = self.store.put_bytes(f"{prefix}/normalized.wav", core.encode_wav(out.audio), content_type="audio/wav")
        result.normalized_audio.CopyFrom(object_ref(wav))
        store_result(self.store, f"{prefix}/result.json", result)  # last: marks the outputs complete
        return result


def read_settings(env: Env) -> InputLimits:
    """The stage's limits: A2V_AUDIO_MAX_SECONDS (default 1800 = 30 min), A2V_AUDIO_MAX_INPUT_BYTES (default and at
    most a quarter of the memory the replica has for calls), A2V_MEMORY_BYTES (`Resources`)."""
    return InputLimits.read(env, "audio")


def bindings(config: Config[InputLimits]) -> list[ServiceBinding]:
    """What `python -m services.audio` serves: SERVING once the object store answers."""
    limits = config.settings or InputLimits()
    return store_backed_bindings(
        config, audio_pb2, audio_pb2_grpc, "AudioService", lambda store: AudioServicer(store, limits)
    )
