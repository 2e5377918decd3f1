"""gRPC servicer of the `texture` stage: one chunk of output frames per call, any replica, any chunk."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from audio2video.texture.v1 import texture_pb2, texture_pb2_grpc
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
from services.runtime.budget import MIB, Budget, mib
from services.runtime.config import Config, Env, Resources
from services.runtime.errors import InvalidInput, TooLarge
from services.runtime.frames import FramesReader
from services.runtime.keys import derive_prefix, validate_key
from services.runtime.progress import stream_events
from services.runtime.protos import array_ref, blob_ref, input_sha256, load_result, store_result
from services.runtime.server import ServiceBinding, store_backed_bindings
from services.runtime.status import grpc_errors
from services.texture import core
from services.texture.spill import DEFAULT_RESIDENT_ROWS, PUNCH_STEP, can_punch_holes, consumed, record_bytes

log = logging.getLogger(__name__)
RESULT_FORMAT_VERSION = 3  # 2: detail restored over the mouth region; 3: face-only votes, pose-aware, masks
MAX_CHUNK_FRAMES = 5000
BANK_BYTES_PER_PIXEL = 5.3
"""Memory of a target prepared in memory per crop pixel of each frame: BGR crop, luminance, voting mask, and the
mask's holes (int32, ~7 % of the pixels outside the face outline)."""
SCRATCH_SHARE = 0.9
"""Of the scratch folder, what spilled targets and their downloads may fill (the rest: temporary files)."""
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
        max_candidate_share=optional("max_candidate_share"),
    )


class TextureServicer(texture_pb2_grpc.TextureServiceServicer):
    """Synthesize over the object store, with a bounded per-replica cache of prepared targets."""

    def __init__(
        self, store: BlobStore, *, cache: BoundedCache | None = None, settings: TextureSettings | None = None
    ) -> None:
        self.store = store
        self.settings = settings or TextureSettings()
        self.cache = cache or BoundedCache(self.settings.memory_cache_bytes)
        resources = self.settings.resources
        # A long target's crops are spilled to the scratch folder (`prepare_spilled_target`) instead of being held
        # in memory: what it takes there is reserved from the header sizes and refused (RESOURCE_EXHAUSTED) before
        # any download when it cannot fit.
        self.scratch = Budget(
            int(resources.scratch_bytes * SCRATCH_SHARE), what="scratch disk", variable="A2V_SCRATCH_BYTES"
        )
        # The crop archive is freed behind the conversion as it is read where the scratch folder allows it: the
        # spill file and the archive then need not both fit whole.
        self.punch_holes = can_punch_holes()
        # Spilled targets kept for their jobs' next chunks, least recently used first: one gives way (its file goes
        # once the calls reading it are done) when a new one needs its scratch.
        self.spilled: OrderedDict[str, core.TargetBank] = OrderedDict()
        self._spill_lock = threading.Lock()
        self._spill_loading: dict[str, threading.Lock] = {}

    def _bank(self, manifest, identity: str) -> core.TargetBank:
        """The target's candidates, prepared once per replica and kept while the cache has room.

        Kept under the analysis's content identity (`analysis_sha256`), so a target rewritten under the same key is
        prepared again. A target whose prepared crops would take more than `TextureSettings.in_memory_bytes` is
        spilled to the scratch folder: its bank holds its shapes in memory and reads candidate rows from disk, so the
        memory of a call does not grow with the target's length.
        """
        geometry_message = manifest.geometry
        pixels = geometry_message.crop_width_px * geometry_message.crop_height_px
        frames = manifest.info.frame_count

        def arrays():
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
            return shapes, valid, jaws, poses

        def load() -> core.TargetBank:
            shapes, valid, jaws, poses = arrays()
            return core.prepare_target(
                shapes,
                valid,
                load_frames(self.store, manifest.crops, what="crops"),
                load_frames(self.store, manifest.crop_masks, what="crop masks"),
                load_geometry(self.store, manifest),
                jaw_lines=jaws,
                head_pose=poses,
            )

        def load_spilled() -> core.TargetBank:
            shapes, valid, jaws, poses = arrays()
            return self._spill(manifest, shapes, valid, jaws, poses, frames * record_bytes(pixels))

        if frames * pixels * BANK_BYTES_PER_PIXEL <= self.settings.in_memory_bytes:
            return self.cache.get(identity, load, lambda bank: bank.nbytes)
        return self._spilled_bank(identity, load_spilled)

    def _spilled_bank(self, key: str, load) -> core.TargetBank:
        """The spilled target under `key`, kept while the scratch folder has room for the others' spills."""
        with self._spill_lock:
            if key in self.spilled:
                self.spilled.move_to_end(key)
                return self.spilled[key]
            key_lock = self._spill_loading.setdefault(key, threading.Lock())
        with key_lock:  # one spill per target even when several chunks of one job arrive at once
            with self._spill_lock:
                if key in self.spilled:
                    return self.spilled[key]
            bank = load()
            with self._spill_lock:
                self.spilled[key] = bank
                self._spill_loading.pop(key, None)
            return bank

    def _make_room(self, amount: int) -> None:
        """Let kept spilled targets go, oldest first, until `amount` bytes of scratch are free (or none is kept).

        A target still read by a call keeps its file (and its reservation) until that call ends.
        """
        while True:
            with self._spill_lock:
                if self.scratch.total - self.scratch.used >= amount or not self.spilled:
                    return
                _, bank = self.spilled.popitem(last=False)
            del bank  # its spill file goes (and its scratch is released) here unless a call holds it

    def _spill(self, manifest, shapes, valid, jaws, poses, spill_bytes: int) -> core.TargetBank:
        """Download the target's crop archives to scratch and spill them into a record file, one frame at a time.

        Scratch for the spill file is reserved for as long as the bank lives; the archives' for the conversion (where
        holes can be punched, only what the archives take beyond the spill file, as the crop archive is freed while
        it is read). What cannot fit the scratch folder is refused before anything is downloaded.
        """
        sources = [(manifest.crops, "crops"), (manifest.crop_masks, "crop masks")]
        refs = [blob_ref(ref.object, default_bucket=self.store.bucket, what=what) for ref, what in sources]
        archive_bytes = sum(self.store.stat(ref.key, bucket=ref.bucket).size_bytes for ref in refs)
        purpose = f"the crops of target {refs[0].key}"
        # While converting: the archives whole (downloaded), then the spill file growing as the archive shrinks.
        converting = max(archive_bytes - spill_bytes, 0) + PUNCH_STEP if self.punch_holes else archive_bytes
        if spill_bytes + converting > self.scratch.total:
            raise TooLarge(
                f"{purpose} need {mib(spill_bytes + converting)} of scratch disk to spill "
                f"({mib(archive_bytes)} of archives, {mib(spill_bytes)} of records), more than this replica has "
                f"({mib(self.scratch.total)}, A2V_SCRATCH_BYTES)"
            )
        self._make_room(spill_bytes + converting)
        held = self.scratch.reserve(spill_bytes, f"spilling {purpose}")
        held.__enter__()  # released when the bank's spill file is removed
        folder = tempfile.mkdtemp(prefix="a2v-texture-spill-")
        try:
            with (
                self.scratch.reserve(converting, f"downloading {purpose}"),
                tempfile.TemporaryDirectory(prefix="a2v-texture-") as downloads,
            ):
                paths = [Path(downloads) / "crops.zip", Path(downloads) / "masks.zip"]
                for ref, path in zip(refs, paths, strict=True):
                    self.store.get_file(ref.key, path, bucket=ref.bucket, expected_sha256=ref.sha256)
                with contextlib.ExitStack() as readers:
                    masks = readers.enter_context(FramesReader(str(paths[1])))
                    if self.punch_holes:  # the crop archive is freed behind the conversion as it is read
                        crops = readers.enter_context(contextlib.closing(consumed(str(paths[0]))))
                    else:
                        crops = readers.enter_context(FramesReader(str(paths[0])))
                    bank = core.prepare_spilled_target(
                        shapes,
                        valid,
                        crops,
                        masks,
                        load_geometry(self.store, manifest),
                        folder,
                        jaw_lines=jaws,
                        head_pose=poses,
                    )
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            held.__exit__(None, None, None)
            raise
        bank.spill.on_close(lambda: _release(self.scratch, held))
        log.info("target %s spilled to scratch: %d frames, %s", refs[0].key, bank.frame_count, mib(spill_bytes))
        return bank

    @grpc_errors
    def Synthesize(self, request: texture_pb2.SynthesizeRequest, context):
        """Stream progress, then the chunk's textures, validity, mean shapes and jaw lines."""
        start, stop = request.frames.start, request.frames.stop
        if not 0 <= start < stop or stop - start > MAX_CHUNK_FRAMES:
            raise InvalidInput(f"frames [{start}, {stop}) must be a non-empty range of at most {MAX_CHUNK_FRAMES}")
        options = texture_options(request.options)
        manifest = load_manifest(self.store, request.target_analysis)
        target = analysis_sha256(self.store, request.target_analysis, manifest)
        prefix = request.output_prefix.rstrip("/") or derive_prefix(
            "texture",
            inputs=[
                input_sha256(self.store, request.mouth_shapes.object, what="mouth shapes"),
                input_sha256(self.store, request.retiming_map.object, what="retiming map", optional=True),
                target,
            ],
            version=RESULT_FORMAT_VERSION,
            params=dataclasses.asdict(options)
            | {"frames": [start, stop], "candidates": request.options.write_candidates},
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
        bank = self._bank(manifest, target)

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
                resident_rows=self.settings.resident_rows,
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


def _release(budget: Budget, held) -> None:
    """Exit a reservation from a finalizer, which may run wherever the garbage collector does.

    Even in a thread that holds the budget's lock: the release then happens in a thread of its own.
    """
    if budget.lock.acquire(blocking=False):
        budget.lock.release()
        held.__exit__(None, None, None)
    else:
        threading.Thread(target=held.__exit__, args=(None, None, None), daemon=True).start()


@dataclass(frozen=True)
class TextureSettings:
    """The stage's settings.

    Attributes:
        cache_bytes: A2V_TEXTURE_CACHE_BYTES, memory for prepared targets per replica (default 2 GiB; at most half
            the replica's memory is used, the rest is the calls' working memory).
        in_memory_bytes: A2V_TEXTURE_IN_MEMORY_BYTES, the largest target prepared in memory (default 256 MiB, about
            1,900 frames of 150x180 crops: a minute at 30 fps); a longer one is spilled to the scratch folder and
            read a bounded number of rows at a time, so memory does not grow with the target's length.
        resident_rows: A2V_TEXTURE_RESIDENT_ROWS, rows of a spilled target one call holds (default 128, 5 bytes a
            crop pixel each: 17 MiB at 150x180).
        resources: The replica's A2V_MEMORY_BYTES and A2V_SCRATCH_BYTES.
    """

    cache_bytes: int = 2 << 30
    in_memory_bytes: int = 256 * MIB
    resident_rows: int = DEFAULT_RESIDENT_ROWS
    resources: Resources = field(default_factory=Resources)

    @property
    def memory_cache_bytes(self) -> int:
        """What the cache of prepared targets may hold: `cache_bytes`, at most half the replica's memory."""
        return min(self.cache_bytes, self.resources.memory_bytes // 2)

    @classmethod
    def read(cls, env: Env) -> TextureSettings:
        """Read the settings from the environment (with the rest of `Config.from_env`)."""
        return cls(
            cache_bytes=env.get_int("A2V_TEXTURE_CACHE_BYTES", cls.cache_bytes, minimum=0),
            in_memory_bytes=env.get_int("A2V_TEXTURE_IN_MEMORY_BYTES", cls.in_memory_bytes, minimum=0),
            resident_rows=env.get_int("A2V_TEXTURE_RESIDENT_ROWS", cls.resident_rows, minimum=1),
            resources=Resources.read(env),
        )


def bindings(config: Config[TextureSettings]) -> list[ServiceBinding]:
    """What `python -m services.texture` serves."""
    settings = config.settings or TextureSettings()
    cache = BoundedCache(settings.memory_cache_bytes)
    return store_backed_bindings(
        config,
        texture_pb2,
        texture_pb2_grpc,
        "TextureService",
        lambda store: TextureServicer(store, cache=cache, settings=settings),
    )
