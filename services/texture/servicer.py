"""gRPC servicer of the `texture` stage: one chunk of output frames per call, any replica, any chunk."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from audio2video.texture.v1 import texture_pb2, texture_pb2_grpc
from services.runtime.analysis import (
    BoundedCache,
    load_array,
    load_frames,
    load_geometry,
    load_manifest,
    store_frames,
)
from services.runtime.blobstore import BlobStore
from services.runtime.config import Config, Env
from services.runtime.errors import InvalidInput
from services.runtime.keys import derive_prefix, validate_key
from services.runtime.progress import stream_events
from services.runtime.protos import array_ref, load_result, store_result
from services.runtime.server import ServiceBinding, store_backed_bindings
from services.runtime.status import grpc_errors
from services.texture import core

log = logging.getLogger(__name__)
RESULT_FORMAT_VERSION = 3  # 2: detail restored over the mouth region; 3: face-only votes, pose-aware, masks
MAX_CHUNK_FRAMES = 5000
MEDIAN_MODES = {
    texture_pb2.MEDIAN_MODE_UNSPECIFIED: "luminance",
    texture_pb2.MEDIAN_MODE_LUMINANCE: "luminance",
    texture_pb2.MEDIAN_MODE_PER_CHANNEL: "per_channel",
}


def texture_options(options: texture_pb2.SynthesizeOptions) -> core.TextureOptions:
    """The proto's options with its defaults applied (the core validates the values)."""
    defaults = core.TextureOptions()

    def optional(name: str):
        return getattr(options, name) if options.HasField(name) else getattr(defaults, name)

    return core.TextureOptions(
        n_candidates=options.n_candidates or defaults.n_candidates,
        mass_share=options.mass_share or defaults.mass_share,
        temporal_coherence_weight=optional("temporal_coherence_weight"),
        shape_smoothing_sigma_frames=optional("shape_smoothing_sigma_frames"),
        warmup_frames=optional("warmup_frames"),
        median_mode=MEDIAN_MODES.get(options.median_mode, "luminance"),
        detail_amount=optional("detail_amount"),
        detail_sigma_px=optional("detail_sigma_px"),
        pose_tolerance_degrees=optional("pose_tolerance_degrees"),
    )


class TextureServicer(texture_pb2_grpc.TextureServiceServicer):
    """Synthesize over the object store, with a bounded per-replica cache of prepared targets."""

    def __init__(self, store: BlobStore, *, cache: BoundedCache | None = None) -> None:
        self.store = store
        self.cache = cache or BoundedCache()

    def _bank(self, target_ref) -> core.TargetBank:
        """The target's candidates, prepared once per replica and kept while the cache has room."""
        manifest = load_manifest(self.store, target_ref)

        def load() -> core.TargetBank:
            shapes, _ = load_array(self.store, manifest.mouth_shapes, what="mouth shapes")
            valid, _ = load_array(self.store, manifest.face_valid, what="face validity")
            jaws = (
                load_array(self.store, manifest.jaw_lines, what="jaw lines")[0]
                if manifest.jaw_lines.object.key
                else None
            )
            # Head poses of analyses before format 2 came from a 2-D heuristic: candidates then ignore pose.
            poses = (
                load_array(self.store, manifest.head_pose, what="head pose")[0]
                if manifest.head_pose.object.key and manifest.format_version >= 2
                else None
            )
            return core.prepare_target(
                shapes,
                valid,
                load_frames(self.store, manifest.crops, what="crops"),
                load_frames(self.store, manifest.crop_masks, what="crop masks"),
                load_geometry(self.store, manifest),
                jaw_lines=jaws,
                head_pose=poses,
            )

        key = f"{manifest.crops.object.sha256}/{manifest.head_pose.object.sha256}/{manifest.format_version}"
        if not manifest.crops.object.sha256:
            key = f"{target_ref.bucket}/{target_ref.key}"
        return self.cache.get(key, load, lambda bank: bank.nbytes)

    @grpc_errors
    def Synthesize(self, request: texture_pb2.SynthesizeRequest, context):
        """Stream progress, then the chunk's textures, validity, mean shapes and jaw lines."""
        start, stop = request.frames.start, request.frames.stop
        if not 0 <= start < stop or stop - start > MAX_CHUNK_FRAMES:
            raise InvalidInput(f"frames [{start}, {stop}) must be a non-empty range of at most {MAX_CHUNK_FRAMES}")
        options = texture_options(request.options)
        inputs = [request.mouth_shapes.object.sha256, request.retiming_map.object.sha256]
        prefix = request.output_prefix.rstrip("/") or derive_prefix(
            "texture",
            inputs=[sha for sha in inputs if sha],
            version=RESULT_FORMAT_VERSION,
            params=dataclasses.asdict(options)
            | {
                "frames": [start, stop],
                "target": request.target_analysis.key,
                "candidates": request.options.write_candidates,
            },
        )
        result_key = validate_key(f"{prefix}/result.json")
        cached = load_result(self.store, result_key, texture_pb2.SynthesizeResult)
        if cached is not None:
            cached.cached = True
            yield texture_pb2.SynthesizeEvent(result=cached)
            return

        shapes, shapes_info = load_array(self.store, request.mouth_shapes, what="mouth shapes")
        if shapes.ndim != 3 or shapes.shape[1:] != (20, 2) or len(shapes) < stop:
            raise InvalidInput(f"mouth shapes of shape {shapes.shape} do not cover output frames [{start}, {stop})")
        retiming = None
        if request.retiming_map.object.key:
            retiming = load_array(self.store, request.retiming_map, what="retiming map")[0]
        bank = self._bank(request.target_analysis)

        def work(progress, should_stop) -> core.TextureChunk:
            return core.synthesize(
                bank,
                shapes,
                start,
                stop,
                options=options,
                retiming_map=retiming,
                progress=progress,
                should_stop=should_stop,
            )

        def finish(chunk: core.TextureChunk):
            fps = shapes_info.fps
            result = texture_pb2.SynthesizeResult(
                frames=request.frames,
                textures=store_frames(self.store, f"{prefix}/textures.frames.zip", chunk.textures, fps=fps),
                texture_valid=self._put(f"{prefix}/texture_valid.npy", chunk.valid.astype(np.uint8), fps),
                texture_masks=store_frames(
                    self.store, f"{prefix}/texture_masks.frames.zip", chunk.texture_masks, fps=fps
                ),
                mean_shapes=self._put(f"{prefix}/mean_shapes.npy", chunk.mean_shapes, fps),
                frames_written=chunk.frames_written,
                frames_skipped=chunk.frames_skipped,
            )
            if chunk.pose_differences is not None:
                result.pose_differences.CopyFrom(
                    self._put(f"{prefix}/pose_differences.npy", chunk.pose_differences.astype(np.float32), fps)
                )
            if chunk.mean_jaw_lines is not None:
                result.mean_jaw_lines.CopyFrom(self._put(f"{prefix}/mean_jaw_lines.npy", chunk.mean_jaw_lines, fps))
            if request.options.write_candidates:
                result.candidates.CopyFrom(self._put(f"{prefix}/candidates.npy", chunk.candidates, fps))
                result.candidate_weights.CopyFrom(
                    self._put(f"{prefix}/candidate_weights.npy", chunk.candidate_weights, fps)
                )
            store_result(self.store, result_key, result)
            log.info(
                "texture chunk [%d, %d): %d written, %d skipped",
                start,
                stop,
                chunk.frames_written,
                chunk.frames_skipped,
                extra={"request_id": request.request_id, "job_id": request.job_id},
            )
            return result

        yield from stream_events(
            context, work, event=texture_pb2.SynthesizeEvent, finish=finish, stage="texture", unit="frames"
        )

    def _put(self, key: str, array: np.ndarray, fps: float):
        return array_ref(*self.store.put_array(key, np.ascontiguousarray(array), fps=fps))


@dataclass(frozen=True)
class TextureSettings:
    """The stage's settings: A2V_TEXTURE_CACHE_BYTES, memory for prepared targets per replica (default 2 GiB)."""

    cache_bytes: int = 2 << 30

    @classmethod
    def read(cls, env: Env) -> TextureSettings:
        """Read the settings from the environment (with the rest of `Config.from_env`)."""
        return cls(cache_bytes=env.get_int("A2V_TEXTURE_CACHE_BYTES", cls.cache_bytes, minimum=0))


def bindings(config: Config[TextureSettings]) -> list[ServiceBinding]:
    """What `python -m services.texture` serves."""
    cache = BoundedCache((config.settings or TextureSettings()).cache_bytes)
    return store_backed_bindings(
        config, texture_pb2, texture_pb2_grpc, "TextureService", lambda store: TextureServicer(store, cache=cache)
    )
