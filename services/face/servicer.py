"""gRPC servicer of the `face` stage: Probe, Analyze (cached by content hash) and BuildSpeakerDataset."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from audio2video.common.v1 import common_pb2
from audio2video.face.v1 import face_pb2, face_pb2_grpc
from services.face import dataset as dataset_core
from services.face.core import VideoAnalysis, analyze_video, smoothing_kernel
from services.face.landmarks import LandmarkDetector
from services.runtime.analysis import load_array, load_manifest
from services.runtime.blobstore import ArrayInfo, BlobRef, BlobStore, wait_for_store
from services.runtime.budget import MIB, Budget
from services.runtime.config import Config, Env, InputLimits
from services.runtime.errors import InvalidInput, TooLarge
from services.runtime.frames import FRAMES_CONTENT_TYPE, FramesWriter
from services.runtime.keys import derive_prefix, sha256_file, validate_key, validate_speaker
from services.runtime.media import VideoInfo, probe_video
from services.runtime.progress import stream_events
from services.runtime.protos import array_ref, blob_ref, input_sha256, load_result, object_ref, store_result
from services.runtime.server import ServiceBinding, binding_for
from services.runtime.status import grpc_errors

log = logging.getLogger(__name__)
ANALYSIS_FORMAT_VERSION = 2  # 2: head pose by solvePnP, landmark jitter
DATASET_FORMAT_VERSION = 1
BASELINE_MEMORY_BYTES = 512 * MIB
"""What a face replica holds besides analyses: the interpreter, OpenCV, dlib and its landmark models, decoders."""
DECODE_QUEUE_FRAMES = 12
"""Decoded frames an analysis holds besides the smoothing delay (half the smoothing kernel, 8 at 30 fps): the
decoder's queue and the working copies of the frame. The crops go to disk as they are made, so the memory an
analysis reserves does not grow with the video's length."""
TRACK_BYTES_PER_FRAME = 32 * 1024
"""Memory per frame of the landmark tracks and what is derived from them at the end of an analysis (measured: a
10-minute 25 fps video peaked 414 MiB above the loaded models, 28 kB a frame; `deploy.bench.face_memory`)."""
CROP_ARCHIVE_SHARE = 0.6
"""Disk bytes per raw crop byte of the PNG archives (crops 30-45 % of raw on the shared clips, masks ~1 %)."""
SCRATCH_SHARE = 0.9
"""Of the scratch folder, what downloads may fill (the rest: temporary files of the decoders and encoders)."""


@dataclass(frozen=True)
class AnalyzeSettings:
    """Analyze's options with every default resolved (part of the cache key)."""

    detection_max_side_px: int = 480
    detection_upsample: int = 1
    min_detection_score: float = 0.0
    redetect_interval_frames: int = 10
    smoothing_cutoff_hz: float = 8.0
    crop_region: tuple[float, float, float, float] = (0.25, 0.5, 0.75, 1.1)
    crop_width_px: int = 150
    crop_height_px: int = 180

    @classmethod
    def from_proto(cls, options: face_pb2.AnalyzeOptions) -> AnalyzeSettings:
        region = options.crop.region
        given_region = (region.left, region.top, region.right, region.bottom)
        settings = cls(
            detection_max_side_px=options.detection_max_side_px or cls.detection_max_side_px,
            detection_upsample=(
                options.detection_upsample if options.HasField("detection_upsample") else cls.detection_upsample
            ),
            min_detection_score=(
                options.min_detection_score if options.HasField("min_detection_score") else cls.min_detection_score
            ),
            redetect_interval_frames=options.redetect_interval_frames or cls.redetect_interval_frames,
            smoothing_cutoff_hz=(
                options.smoothing_cutoff_hz if options.HasField("smoothing_cutoff_hz") else cls.smoothing_cutoff_hz
            ),
            crop_region=given_region if any(given_region) else cls.crop_region,
            crop_width_px=options.crop.width_px or cls.crop_width_px,
            crop_height_px=options.crop.height_px or cls.crop_height_px,
        )
        if not 64 <= settings.detection_max_side_px <= 4096:
            raise InvalidInput(f"detection_max_side_px must be in [64, 4096], got {settings.detection_max_side_px}")
        if not 0 <= settings.detection_upsample <= 3:
            raise InvalidInput(f"detection_upsample must be in [0, 3], got {settings.detection_upsample}")
        if not 1 <= settings.redetect_interval_frames <= 1000:
            raise InvalidInput(
                f"redetect_interval_frames must be in [1, 1000], got {settings.redetect_interval_frames}"
            )
        if not 0 <= settings.smoothing_cutoff_hz <= 60:
            raise InvalidInput(f"smoothing_cutoff_hz must be in [0, 60], got {settings.smoothing_cutoff_hz}")
        return settings

    def detector_key(self) -> tuple:
        return (
            self.detection_max_side_px,
            self.detection_upsample,
            self.min_detection_score,
            self.redetect_interval_frames,
        )

    def to_proto(self) -> face_pb2.AnalyzeOptions:
        left, top, right, bottom = self.crop_region
        return face_pb2.AnalyzeOptions(
            detection_max_side_px=self.detection_max_side_px,
            detection_upsample=self.detection_upsample,
            min_detection_score=self.min_detection_score,
            redetect_interval_frames=self.redetect_interval_frames,
            smoothing_cutoff_hz=self.smoothing_cutoff_hz,
            crop=face_pb2.CropOptions(
                region=face_pb2.CropRegion(left=left, top=top, right=right, bottom=bottom),
                width_px=self.crop_width_px,
                height_px=self.crop_height_px,
            ),
        )


class DetectorPool:
    """Loaded detectors by setting, lent to one analysis at a time (a detector is not thread-safe).

    Loading the 68-point model takes about a second, so detectors are kept and reused; the pool grows
    to the number of concurrent analyses with the same settings.
    """

    def __init__(self) -> None:
        self._free: dict[tuple, list[LandmarkDetector]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def borrow(self, settings: AnalyzeSettings) -> Iterator[LandmarkDetector]:
        key = settings.detector_key()
        with self._lock:
            free = self._free.setdefault(key, [])
            detector = free.pop() if free else None
        if detector is None:
            detector = LandmarkDetector(
                detect_max_side=settings.detection_max_side_px,
                upsample=settings.detection_upsample,
                min_score=settings.min_detection_score,
                redetect_interval=settings.redetect_interval_frames,
            )
        try:
            yield detector
        finally:
            with self._lock:
                self._free[key].append(detector)

    def warm(self, settings: AnalyzeSettings = AnalyzeSettings()) -> None:
        """Load one detector with `settings` (the service is SERVING only after this)."""
        with self.borrow(settings):
            pass


def video_info_message(info: VideoInfo) -> face_pb2.VideoInfo:
    return face_pb2.VideoInfo(
        frame_count=info.frame_count,
        frame_rate=common_pb2.FrameRate(numerator=info.fps_num, denominator=info.fps_den),
        width=info.width,
        height=info.height,
        duration_seconds=info.duration_seconds,
        variable_frame_rate=info.variable_frame_rate,
        codec=info.codec,
        rotation_degrees=info.rotation_degrees,
        has_audio=info.has_audio,
    )


class FaceServicer(face_pb2_grpc.FaceServiceServicer):
    """Video analysis over the object store."""

    def __init__(
        self, store: BlobStore, limits: InputLimits | None = None, *, detectors: DetectorPool | None = None
    ) -> None:
        self.store = store
        limits = limits or InputLimits()
        self.detectors = detectors or DetectorPool()
        self.max_seconds = limits.max_seconds
        resources = limits.resources
        # Videos are downloaded to /tmp and crops are written there as PNG archives until stored; decoding holds a
        # window of frames in memory. All are bounded by the pod, so what cannot fit is refused
        # (RESOURCE_EXHAUSTED) before any work, not killed halfway.
        self.scratch = Budget(
            int(resources.scratch_bytes * SCRATCH_SHARE), what="scratch disk", variable="A2V_SCRATCH_BYTES"
        )
        self.memory = Budget(
            resources.memory_bytes - BASELINE_MEMORY_BYTES, what="memory for decoding", variable="A2V_MEMORY_BYTES"
        )
        self.max_input_bytes = min(limits.max_input_bytes or self.scratch.total, self.scratch.total)

    # -- Probe ---------------------------------------------------------------------------------

    @grpc_errors
    def Probe(self, request: face_pb2.ProbeRequest, context) -> face_pb2.ProbeResponse:
        """Header facts of a video (and a check that its first frame decodes)."""
        source = blob_ref(request.video, default_bucket=self.store.bucket, what="video")
        with self._downloaded(source) as path:
            return face_pb2.ProbeResponse(info=video_info_message(probe_video(path)))

    # -- Analyze -------------------------------------------------------------------------------

    @grpc_errors
    def Analyze(self, request: face_pb2.AnalyzeRequest, context):
        """Stream progress, then the analysis; a finished analysis of the same video and options is reused."""
        source = blob_ref(request.video, default_bucket=self.store.bucket, what="video")
        settings = AnalyzeSettings.from_proto(request.options)
        stored = self.store.stat(source.key, bucket=source.bucket)
        video_sha = source.sha256 or stored.sha256
        if not video_sha:  # written by a foreign tool without our sha256 metadata: hash the content
            with self._downloaded(source) as path:
                video_sha = sha256_file(path)
        prefix = request.output_prefix.rstrip("/") or derive_prefix(
            "analysis/face",
            inputs=[video_sha],
            version=ANALYSIS_FORMAT_VERSION,
            params=dataclasses.asdict(settings),
        )
        manifest_key = validate_key(f"{prefix}/manifest.json")
        log.info("analyze %s -> %s", source.key, prefix, extra={"request_id": request.request_id})
        if not request.force_recompute:
            cached = load_result(self.store, manifest_key, face_pb2.VideoAnalysis)
            if cached is not None:
                manifest = self.store.stat(manifest_key)
                yield face_pb2.AnalyzeEvent(
                    result=face_pb2.AnalyzeResult(manifest=object_ref(manifest), analysis=cached, cached=True)
                )
                return

        with (
            self._downloaded(source) as path,
            self._reserved(path, settings, source.key),
            tempfile.TemporaryDirectory(prefix="a2v-face-crops-") as folder,
            open(Path(folder) / "crops.zip", "wb") as crop_file,
            open(Path(folder) / "crop_masks.zip", "wb") as mask_file,
            FramesWriter(crop_file) as crop_archive,
            FramesWriter(mask_file) as mask_archive,
            self.detectors.borrow(settings) as detector,
        ):

            def keep(crop: np.ndarray, mask: np.ndarray) -> None:
                crop_archive.add(crop)
                mask_archive.add(mask)

            def work(progress, should_stop) -> VideoAnalysis:
                return analyze_video(
                    path,
                    detector=detector,
                    crop_region=settings.crop_region,
                    crop_size=(settings.crop_width_px, settings.crop_height_px),
                    smoothing_cutoff_hz=settings.smoothing_cutoff_hz,
                    max_duration_seconds=self.max_seconds,
                    progress=progress,
                    should_stop=should_stop,
                    crop_sink=keep,
                )

            def finish(value: VideoAnalysis) -> face_pb2.AnalyzeResult:
                h, w = value.geometry.crop_shape
                archives = {
                    "crops": (Path(crop_file.name), crop_archive.finish(empty_shape=(h, w, 3))),
                    "crop_masks": (Path(mask_file.name), mask_archive.finish(empty_shape=(h, w))),
                }
                crop_file.close()
                mask_file.close()
                source_ref = common_pb2.ObjectRef(
                    bucket=source.bucket,
                    key=source.key,
                    sha256=video_sha,
                    content_type=stored.content_type,
                    size_bytes=stored.size_bytes,
                )
                analysis = self._store_analysis(prefix, value, settings, source_ref, archives)
                manifest = store_result(self.store, manifest_key, analysis)  # last: marks it complete
                return face_pb2.AnalyzeResult(manifest=object_ref(manifest), analysis=analysis, cached=False)

            yield from stream_events(
                context, work, event=face_pb2.AnalyzeEvent, finish=finish, stage="face", unit="frames"
            )

    def _store_analysis(
        self,
        prefix: str,
        analysis: VideoAnalysis,
        settings: AnalyzeSettings,
        video: common_pb2.ObjectRef,
        archives: Mapping[str, tuple[Path, tuple[int, ...]]],
    ) -> face_pb2.VideoAnalysis:
        """Store the analysis' arrays and its crop archives (`archives`: name -> (file, stack shape))."""
        fps = analysis.info.fps

        def put(name: str, array: np.ndarray, rate: float = fps) -> common_pb2.ArrayRef:
            return array_ref(*self.store.put_array(f"{prefix}/{name}.npy", np.ascontiguousarray(array), fps=rate))

        def put_frames(name: str) -> common_pb2.ArrayRef:
            path, shape = archives[name]
            blob = self.store.put_file(f"{prefix}/{name}.frames.zip", path, content_type=FRAMES_CONTENT_TYPE)
            return array_ref(blob, ArrayInfo(tuple(shape), "uint8", fps))

        geometry = analysis.geometry
        left, top, right, bottom = geometry.crop_region
        return face_pb2.VideoAnalysis(
            format_version=ANALYSIS_FORMAT_VERSION,
            video=video,
            info=video_info_message(dataclasses.replace(analysis.info, frame_count=analysis.frame_count)),
            options=settings.to_proto(),
            geometry=face_pb2.CanonicalGeometry(
                template_id=geometry.template_id,
                template=put("template", geometry.template, 0.0),
                crop_region=face_pb2.CropRegion(left=left, top=top, right=right, bottom=bottom),
                crop_width_px=geometry.crop_width_px,
                crop_height_px=geometry.crop_height_px,
            ),
            timestamps_seconds=put("timestamps", analysis.timestamps.astype(np.float64)),
            landmarks=put("landmarks", analysis.landmarks.astype(np.float32)),
            face_valid=put("face_valid", analysis.face_valid.astype(np.uint8)),
            detection_scores=put("detection_scores", analysis.detection_scores.astype(np.float32)),
            mouth_shapes=put("mouth_shapes", analysis.canonical_mouth.astype(np.float32)),
            jaw_lines=put("jaw_lines", analysis.jaw.astype(np.float32)),
            head_pose=put("head_pose", analysis.head_pose.astype(np.float32)),
            landmark_jitter=put("landmark_jitter", analysis.landmark_jitter.astype(np.float32)),
            head_motion=put("head_motion", analysis.head_motion.astype(np.float32)),
            eye_openness=put("eye_openness", analysis.eye_openness.astype(np.float32)),
            crops=put_frames("crops"),
            crop_masks=put_frames("crop_masks"),
            valid_frame_count=analysis.valid_frame_count,
        )

    # -- BuildSpeakerDataset ---------------------------------------------------------------------

    @grpc_errors
    def BuildSpeakerDataset(self, request: face_pb2.BuildSpeakerDatasetRequest, context):
        """Pair every clip's features with its mouth shapes, split by clip, fit the PCA, store both."""
        validate_speaker(request.speaker)
        if not request.clips:
            raise InvalidInput("a speaker dataset needs at least one clip")
        manifests = [load_manifest(self.store, clip.analysis_manifest) for clip in request.clips]
        template_ids = {m.geometry.template_id for m in manifests}
        if len(template_ids) != 1:
            raise InvalidInput(f"clips were analysed with different canonical templates {sorted(template_ids)}")
        validation = request.validation
        fraction = validation.validation_fraction if validation.HasField("validation_fraction") else 0.2
        seed = validation.seed if validation.HasField("seed") else 42
        retained = request.options.pca_retained_variance or 0.99
        max_components = request.options.max_components or 40
        inputs = []
        for clip, manifest in zip(request.clips, manifests, strict=True):
            inputs += [
                input_sha256(self.store, manifest.mouth_shapes.object, what="mouth shapes"),
                input_sha256(self.store, clip.features.object, what="features"),
            ]
        clip_ids = [
            clip.clip_id or manifest.video.sha256[:16] for clip, manifest in zip(request.clips, manifests, strict=True)
        ]
        params = {
            "clip_ids": clip_ids,
            "validation": list(validation.validation_clip_ids),
            "fraction": fraction,
            "seed": seed,
            "retained": retained,
            "max_components": max_components,
        }
        prefix = request.output_prefix.rstrip("/") or derive_prefix(
            f"datasets/{request.speaker}", inputs=inputs, params=params, version=DATASET_FORMAT_VERSION
        )
        result_key = validate_key(f"{prefix}/result.json")
        cached = load_result(self.store, result_key, face_pb2.BuildSpeakerDatasetResult)
        if cached is not None:
            yield face_pb2.BuildSpeakerDatasetEvent(result=cached)
            return

        def work(progress, should_stop) -> dataset_core.SpeakerDataset:
            clips = []
            for index, (clip, manifest) in enumerate(zip(request.clips, manifests, strict=True)):
                clips.append(self._clip_tracks(clip_ids[index], clip, manifest))
                progress(index, len(request.clips))
            return dataset_core.build_speaker_dataset(
                clips,
                validation_clip_ids=list(validation.validation_clip_ids),
                validation_fraction=fraction,
                seed=seed,
                retained_variance=retained,
                max_components=max_components,
            )

        def finish(built: dataset_core.SpeakerDataset):
            template_id = template_ids.pop()
            dataset_blob = self.store.put_arrays(f"{prefix}/dataset.npz", built.arrays())
            pca_blob = self.store.put_arrays(
                f"{prefix}/pca.npz", built.pca.arrays() | {"template_id": np.array(template_id)}
            )
            chosen = built.is_validation
            result = face_pb2.BuildSpeakerDatasetResult(
                dataset=object_ref(dataset_blob),
                pca=object_ref(pca_blob),
                retained_variance=built.pca.retained_variance,
                n_components=len(built.pca.components),
                train_frames=built.rows_of(validation=False),
                validation_frames=built.rows_of(validation=True),
                train_clip_ids=[c for c, v in zip(built.clip_ids, chosen, strict=True) if not v],
                validation_clip_ids=[c for c, v in zip(built.clip_ids, chosen, strict=True) if v],
                dropped_frames=built.dropped_rows,
                template_id=template_id,
            )
            store_result(self.store, result_key, result)
            log.info(
                "dataset of %s: %d train / %d validation rows, %d components (%.4f variance)",
                request.speaker,
                result.train_frames,
                result.validation_frames,
                result.n_components,
                result.retained_variance,
            )
            return result

        yield from stream_events(
            context, work, event=face_pb2.BuildSpeakerDatasetEvent, finish=finish, stage="dataset", unit="clips"
        )

    def _clip_tracks(
        self, clip_id: str, clip: face_pb2.SpeakerClip, manifest: face_pb2.VideoAnalysis
    ) -> dataset_core.ClipTracks:
        features, info = load_array(self.store, clip.features)
        if features.ndim != 2:
            raise InvalidInput(f"features of clip {clip_id} must be [T, D], got shape {features.shape}")
        return dataset_core.ClipTracks(
            clip_id=clip_id,
            timestamps=load_array(self.store, manifest.timestamps_seconds)[0],
            mouth_shapes=load_array(self.store, manifest.mouth_shapes)[0],
            face_valid=load_array(self.store, manifest.face_valid)[0].astype(bool),
            features=features,
            feature_start_seconds=info.start_seconds,
            feature_rate=info.fps or 100.0,
        )

    # -- helpers ---------------------------------------------------------------------------------

    @contextmanager
    def _reserved(self, path: Path, settings: AnalyzeSettings, key: str) -> Iterator[None]:
        """Reserve what an analysis of the video at `path` takes, from its header (refused before decoding): memory
        for a window of decoded frames and the landmark tracks, scratch disk for the crop archives until stored."""
        info = probe_video(path)
        frames = info.frame_count or round(info.duration_seconds * info.fps_num / max(1, info.fps_den))
        delay = len(smoothing_kernel(info.fps or 30.0, settings.smoothing_cutoff_hz)) // 2
        memory = (delay + DECODE_QUEUE_FRAMES) * info.width * info.height * 3 + frames * TRACK_BYTES_PER_FRAME
        archives = frames * settings.crop_width_px * settings.crop_height_px * 4 * CROP_ARCHIVE_SHARE
        with (
            self.memory.reserve(int(memory), f"analysing {key}"),
            self.scratch.reserve(int(archives), f"crops of {key}"),
        ):
            yield

    @contextmanager
    def _downloaded(self, source: BlobRef) -> Iterator[Path]:
        """The video in a temporary file (decoders read files without holding the whole video in memory), its
        size reserved in the replica's scratch space meanwhile."""
        stored = self.store.stat(source.key, bucket=source.bucket)
        if stored.size_bytes > self.max_input_bytes:
            raise TooLarge(
                f"video {source.key} is {stored.size_bytes} bytes, over the limit of {self.max_input_bytes} "
                "(A2V_FACE_MAX_INPUT_BYTES, at most what the scratch folder holds: A2V_SCRATCH_BYTES)"
            )
        with (
            self.scratch.reserve(stored.size_bytes, f"downloading {source.key}"),
            tempfile.TemporaryDirectory(prefix="a2v-face-") as folder,
        ):
            path = Path(folder) / "video"
            self.store.get_file(source.key, path, bucket=source.bucket, expected_sha256=source.sha256)
            yield path


def read_settings(env: Env) -> InputLimits:
    """The stage's limits: A2V_FACE_MAX_SECONDS (default 1800 s), A2V_FACE_MAX_INPUT_BYTES (default and at most 90 %
    of A2V_SCRATCH_BYTES), and the replica's A2V_MEMORY_BYTES / A2V_SCRATCH_BYTES (`Resources`)."""
    return InputLimits.read(env, "face")


def bindings(config: Config[InputLimits]) -> list[ServiceBinding]:
    """What `python -m services.face` serves: SERVING once the store answers and the landmark model is loaded."""
    store = BlobStore.from_config(config.store)
    detectors = DetectorPool()
    servicer = FaceServicer(store, config.settings or InputLimits(), detectors=detectors)

    def load() -> None:
        wait_for_store(store)
        detectors.warm()

    return [binding_for(face_pb2, face_pb2_grpc, "FaceService", servicer, load=load)]
