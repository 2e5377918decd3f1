"""gRPC servicer of the `retiming` stage: which target frame each output frame shows."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from audio2video.retiming.v1 import retiming_pb2, retiming_pb2_grpc
from services.retiming import core
from services.runtime.analysis import analysis_sha256, load_array, load_manifest
from services.runtime.blobstore import BlobStore
from services.runtime.config import Config
from services.runtime.errors import InvalidInput
from services.runtime.keys import derive_prefix, validate_key
from services.runtime.protos import array_ref, frame_rate, input_sha256, load_result, store_result
from services.runtime.server import ServiceBinding, store_backed_bindings
from services.runtime.status import grpc_errors

log = logging.getLogger(__name__)
RESULT_FORMAT_VERSION = 1
MAX_OUTPUT_FRAMES = 24 * 3600 * 60  # a day of 60 fps video


def resolve_options(options: retiming_pb2.RetimeOptions) -> core.RetimeOptions:
    """The proto's options with its "unset / zero = default" rules applied."""
    defaults = core.RetimeOptions()

    def optional(name: str):
        return getattr(options, name) if options.HasField(name) else getattr(defaults, name)

    resolved = core.RetimeOptions(
        silence_motion_weight=optional("silence_motion_weight"),
        onset_reward_weight=optional("onset_reward_weight"),
        onset_delay_frames=optional("onset_delay_frames"),
        hold_penalty_weight=optional("hold_penalty_weight"),
        blink_weight=optional("blink_weight"),
        blink_threshold=options.blink_threshold or defaults.blink_threshold,
        max_hold_frames=options.max_hold_frames or defaults.max_hold_frames,
        loop_mode=_loop_mode(options.loop_mode) if options.loop_mode else defaults.loop_mode,
    )
    resolved.validate()
    return resolved


def _loop_mode(value: int) -> core.LoopMode:
    try:
        return core.LoopMode(value)
    except ValueError:
        raise InvalidInput(f"loop_mode {value} is not one of {[mode.value for mode in core.LoopMode]}") from None


class RetimingServicer(retiming_pb2_grpc.RetimingServiceServicer):
    """Retime over the object store."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store

    @grpc_errors
    def Retime(self, request: retiming_pb2.RetimeRequest, context) -> retiming_pb2.RetimeResponse:
        """Dynamic-programming re-timing (or plain playback); a finished identical request is reused."""
        count = request.output_frame_count
        if not 0 < count <= MAX_OUTPUT_FRAMES:
            raise InvalidInput(f"output_frame_count must be in [1, {MAX_OUTPUT_FRAMES}], got {count}")
        options = resolve_options(request.options)
        manifest = load_manifest(self.store, request.target_analysis)
        if not request.speech_activity.object.key:
            raise InvalidInput("speech_activity reference has no key")
        fps = frame_rate(manifest.info.frame_rate, what="target frame rate")
        # The result is reused by its inputs' content (a reference without a hash is looked up, `input_sha256`), so
        # two different speech activities or targets never share a cached answer.
        prefix = request.output_prefix.rstrip("/") or derive_prefix(
            "retiming",
            inputs=[
                analysis_sha256(self.store, request.target_analysis, manifest),
                input_sha256(self.store, request.speech_activity.object, what="speech activity"),
            ],
            version=RESULT_FORMAT_VERSION,
            params={
                "frames": count,
                "enabled": request.enabled,
                "options": {
                    k: (v.name if isinstance(v, core.LoopMode) else v) for k, v in dataclasses.asdict(options).items()
                },
            },
        )
        result_key = validate_key(f"{prefix}/result.json")
        cached = load_result(self.store, result_key, retiming_pb2.RetimeResponse)
        if cached is not None:
            cached.cached = True
            return cached

        activity, activity_info = load_array(self.store, request.speech_activity, what="speech activity")
        if activity.ndim != 1:
            raise InvalidInput(f"speech activity must be 1-D, got shape {activity.shape}")
        if activity_info.fps and abs(activity_info.fps - float(fps)) > 1e-3:
            activity = core.resample_activity(activity, rate=activity_info.fps, fps=float(fps), frame_count=count)
        else:  # already per output frame: pad with silence or cut to N
            activity = _fit(activity, count)
        motion, _ = load_array(self.store, manifest.head_motion, what="head motion")
        eyes, _ = load_array(self.store, manifest.eye_openness, what="eye openness")
        valid, _ = load_array(self.store, manifest.face_valid, what="face validity")
        result = core.retime(activity, motion, eyes, valid.astype(bool), enabled=request.enabled, options=options)

        blob, info = self.store.put_array(f"{prefix}/retiming_map.npy", result.frames, fps=float(fps))
        response = retiming_pb2.RetimeResponse(
            retiming_map=array_ref(blob, info),
            output_frame_count=count,
            target_frame_count=result.target_frame_count,
            output_frame_rate=manifest.info.frame_rate,
            enabled=result.enabled,
            hold_frames=result.hold_frames,
            wraps=result.wraps,
            total_cost=result.total_cost,
        )
        store_result(self.store, result_key, response)
        log.info(
            "retimed %d output frames onto %d target frames (%d held, %d wraps)",
            count,
            result.target_frame_count,
            result.hold_frames,
            result.wraps,
            extra={"request_id": request.request_id},
        )
        return response


def _fit(activity: np.ndarray, count: int) -> np.ndarray:
    """Per-output-frame activity cut to, or padded with silence to, `count` frames."""
    fitted = np.zeros(count, np.uint8)
    n = min(count, len(activity))
    fitted[:n] = np.asarray(activity[:n]) > 0
    return fitted


def bindings(config: Config) -> list[ServiceBinding]:
    """What `python -m services.retiming` serves."""
    return store_backed_bindings(config, retiming_pb2, retiming_pb2_grpc, "RetimingService", RetimingServicer)
