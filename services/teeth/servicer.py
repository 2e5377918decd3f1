"""gRPC servicer of the `teeth` stage: choose proxy frames automatically, transfer their teeth detail."""

from __future__ import annotations

import logging
import math

import numpy as np

from audio2video.common.v1 import common_pb2
from audio2video.teeth.v1 import teeth_pb2, teeth_pb2_grpc
from services.runtime.analysis import (
    BoundedCache,
    analysis_sha256,
    load_array,
    load_frames,
    load_geometry,
    load_manifest,
    store_frames,
)
from services.runtime.blobstore import BlobStore
from services.runtime.config import Config
from services.runtime.errors import InvalidInput
from services.runtime.keys import derive_prefix, validate_key
from services.runtime.progress import stream_events
from services.runtime.protos import NO_INPUT, input_sha256, load_result, store_result
from services.runtime.server import ServiceBinding, store_backed_bindings
from services.runtime.status import grpc_errors
from services.teeth import core

log = logging.getLogger(__name__)
RESULT_FORMAT_VERSION = 1
MAX_CHUNK_FRAMES = 5000


def proxies_message(proxies: core.TeethProxies, target: common_pb2.ObjectRef) -> teeth_pb2.TeethProxies:
    return teeth_pb2.TeethProxies(
        target_analysis=target,
        upper_frame=proxies.upper_frame,
        lower_frame=proxies.lower_frame,
        upper_split_row_px=proxies.upper_split_row_px,
        lower_split_row_px=proxies.lower_split_row_px,
        has_visible_teeth=proxies.has_visible_teeth,
        upper_score=proxies.upper_score,
        lower_score=proxies.lower_score,
        median_upper_score=proxies.median_upper_score,
        median_lower_score=proxies.median_lower_score,
        overridden=proxies.overridden,
    )


def proxies_from_message(message: teeth_pb2.TeethProxies) -> core.TeethProxies:
    """The core's proxies from the message (per-frame scores and split polylines are not carried)."""
    nothing = np.full((5, 2), np.nan)
    return core.TeethProxies(
        upper_frame=int(message.upper_frame),
        lower_frame=int(message.lower_frame),
        upper_split_row_px=message.upper_split_row_px,
        lower_split_row_px=message.lower_split_row_px,
        has_visible_teeth=message.has_visible_teeth,
        upper_score=message.upper_score,
        lower_score=message.lower_score,
        median_upper_score=message.median_upper_score,
        median_lower_score=message.median_lower_score,
        overridden=message.overridden,
        min_score=math.nan,
        upper_split_line=nothing,
        lower_split_line=nothing.copy(),
        upper_scores=np.zeros(0),
        lower_scores=np.zeros(0),
    )


class TeethServicer(teeth_pb2_grpc.TeethServiceServicer):
    """SelectProxies and Enhance over the object store."""

    def __init__(self, store: BlobStore, *, cache: BoundedCache | None = None) -> None:
        self.store = store
        self.cache = cache or BoundedCache()

    @grpc_errors
    def SelectProxies(self, request: teeth_pb2.SelectProxiesRequest, context) -> teeth_pb2.SelectProxiesResponse:
        """The frames with the most visible upper and lower teeth (or the user's choice, validated)."""
        manifest = load_manifest(self.store, request.target_analysis)
        options = request.options
        # Kept by content, not by key: a rewritten crop archive is read again (a stat when its reference has no hash).
        crops = self.cache.get(
            input_sha256(self.store, manifest.crops.object, what="crops"),
            lambda: load_frames(self.store, manifest.crops, what="crops"),
            lambda a: a.nbytes,
        )
        masks = self.cache.get(
            input_sha256(self.store, manifest.crop_masks.object, what="crop masks"),
            lambda: load_frames(self.store, manifest.crop_masks, what="crop masks"),
            lambda a: a.nbytes,
        )
        shapes, _ = load_array(self.store, manifest.mouth_shapes, what="mouth shapes")
        valid, _ = load_array(self.store, manifest.face_valid, what="face validity")
        proxies = core.select_proxies(
            crops,
            shapes,
            valid,
            masks=masks,
            geometry=load_geometry(self.store, manifest),
            upper_override=request.upper_frame_override if request.HasField("upper_frame_override") else None,
            lower_override=request.lower_frame_override if request.HasField("lower_frame_override") else None,
            min_score=options.min_score or core.DEFAULT_MIN_SCORE,
            min_value=options.min_value or core.DEFAULT_MIN_VALUE,
            max_saturation=options.max_saturation or core.DEFAULT_MAX_SATURATION,
        )
        log.info(
            "teeth proxies: upper %d, lower %d (visible: %s)",
            proxies.upper_frame,
            proxies.lower_frame,
            proxies.has_visible_teeth,
            extra={"request_id": request.request_id},
        )
        return teeth_pb2.SelectProxiesResponse(proxies=proxies_message(proxies, request.target_analysis))

    @grpc_errors
    def Enhance(self, request: teeth_pb2.EnhanceRequest, context):
        """Stream progress, then the enhanced chunk (or the same textures, passed through, with the reason)."""
        frames = request.frames
        count = frames.stop - frames.start
        if not 0 < count <= MAX_CHUNK_FRAMES or frames.start < 0:
            raise InvalidInput(
                f"frames [{frames.start}, {frames.stop}) must be a non-empty range of at most {MAX_CHUNK_FRAMES} frames"
            )
        settings = self._settings(request.options)
        proxies = proxies_from_message(request.proxies)
        # The proxies' target is read only when it has teeth to transfer: then it is an input like the others.
        manifest = load_manifest(self.store, request.proxies.target_analysis) if proxies.has_visible_teeth else None
        prefix = request.output_prefix.rstrip("/") or derive_prefix(
            "teeth",
            inputs=[
                input_sha256(self.store, request.textures.object, what="textures"),
                input_sha256(self.store, request.mouth_shapes.object, what="mouth shapes"),
                input_sha256(self.store, request.texture_valid.object, what="texture validity", optional=True),
                analysis_sha256(self.store, request.proxies.target_analysis, manifest) if manifest else NO_INPUT,
            ],
            version=RESULT_FORMAT_VERSION,
            params=settings
            | {
                "frames": [frames.start, frames.stop],
                "upper": proxies.upper_frame,
                "lower": proxies.lower_frame,
                "visible": proxies.has_visible_teeth,
            },
        )
        result_key = validate_key(f"{prefix}/result.json")
        cached = load_result(self.store, result_key, teeth_pb2.EnhanceResult)
        if cached is not None:
            cached.cached = True
            yield teeth_pb2.EnhanceEvent(result=cached)
            return

        textures = load_frames(self.store, request.textures, what="textures")
        shapes, _ = load_array(self.store, request.mouth_shapes, what="mouth shapes")
        if len(textures) != count or len(shapes) != count:
            raise InvalidInput(f"the chunk has {count} frames but {len(textures)} textures and {len(shapes)} shapes")
        texture_valid = None
        if request.texture_valid.object.key:
            texture_valid = load_array(self.store, request.texture_valid, what="texture validity")[0]
        images, geometry = None, None
        if manifest is not None:
            geometry = load_geometry(self.store, manifest)
            indices = [proxies.upper_frame, proxies.lower_frame]
            proxy_crops = load_frames(self.store, manifest.crops, what="crops", indices=indices)
            all_shapes, _ = load_array(self.store, manifest.mouth_shapes, what="mouth shapes")
            images = core.ProxyImages(
                proxies.upper_frame,
                proxies.lower_frame,
                proxy_crops[0],
                all_shapes[proxies.upper_frame],
                proxy_crops[1],
                all_shapes[proxies.lower_frame],
            )

        def work(progress, should_stop) -> core.EnhanceOutput:
            extra = {"geometry": geometry} if geometry is not None else {}
            return core.enhance(
                textures,
                shapes,
                proxies,
                images,
                texture_valid=texture_valid,
                progress=progress,
                should_stop=should_stop,
                **settings,
                **extra,
            )

        def finish(output: core.EnhanceOutput):
            if output.passthrough:
                stored = request.textures  # nothing changed: point at the input chunk, store nothing twice
            else:
                stored = store_frames(
                    self.store, f"{prefix}/textures.frames.zip", output.textures, fps=request.textures.meta.fps
                )
            result = teeth_pb2.EnhanceResult(
                frames=frames,
                textures=stored,
                frames_enhanced=output.frames_enhanced,
                passthrough=output.passthrough,
                passthrough_reason=output.passthrough_reason,
            )
            store_result(self.store, result_key, result)
            return result

        yield from stream_events(
            context, work, event=teeth_pb2.EnhanceEvent, finish=finish, stage="teeth", unit="frames"
        )

    @staticmethod
    def _settings(options: teeth_pb2.EnhanceOptions) -> dict:
        return {
            "detail_strength": options.detail_strength if options.HasField("detail_strength") else 1.0,
            "highpass_sigma_px": options.highpass_sigma_px or 3.0,
            "sharpen_amount": options.sharpen_amount if options.HasField("sharpen_amount") else 0.5,
            "sharpen_sigma_px": options.sharpen_sigma_px or 1.0,
            "region_erode_px": options.region_erode_px if options.HasField("region_erode_px") else 1,
        }


def bindings(config: Config) -> list[ServiceBinding]:
    """What `python -m services.teeth` serves."""
    return store_backed_bindings(config, teeth_pb2, teeth_pb2_grpc, "TeethService", TeethServicer)
