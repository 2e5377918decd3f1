"""The job itself: the stages of PIPELINE.md called in order over gRPC, independent work concurrently.

Both the orchestrator service and the command line drive jobs through `Pipeline`. Every stage output has a
deterministic key, so running a job again (or resuming one) reuses whatever the stages already finished.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from audio2video.audio.v1 import audio_pb2, audio_pb2_grpc
from audio2video.common.v1 import common_pb2
from audio2video.composite.v1 import composite_pb2, composite_pb2_grpc
from audio2video.face.v1 import face_pb2, face_pb2_grpc
from audio2video.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc
from audio2video.orchestrator.v1 import orchestrator_pb2
from audio2video.retiming.v1 import retiming_pb2, retiming_pb2_grpc
from audio2video.teeth.v1 import teeth_pb2, teeth_pb2_grpc
from audio2video.texture.v1 import texture_pb2, texture_pb2_grpc
from services.runtime.clients import create_channel
from services.runtime.config import service_address
from services.runtime.errors import Cancelled, FailedPrecondition, InvalidInput

log = logging.getLogger(__name__)
Stage = orchestrator_pb2.Stage
Progress = Callable[[int, int, int, str], None]
"""progress(stage, done, total, unit)."""
DEFAULT_CHUNK_FRAMES = 150
REPO = Path(__file__).resolve().parent.parent

# Training settings for a speaker with only a few minutes of video (the paper's batch of 100 windows
# of 1 s needs hours of data: on 20 s it takes one step per epoch and never leaves the mean shape).
SMALL_DATA_TRAINING = {"batch_size": 10, "learning_rate": 3e-3, "sequence_length": 50, "dropout": 0.5, "layers": 2}


@dataclass
class StageClients:
    """One stub per stage; channels come from the runtime's factory (deadlines, retries, round-robin)."""

    audio: audio_pb2_grpc.AudioServiceStub
    face: face_pb2_grpc.FaceServiceStub
    lipsync: lipsync_pb2_grpc.LipsyncServiceStub
    retiming: retiming_pb2_grpc.RetimingServiceStub
    texture: texture_pb2_grpc.TextureServiceStub
    teeth: teeth_pb2_grpc.TeethServiceStub
    composite: composite_pb2_grpc.CompositeServiceStub

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, timeout_seconds: float = 3600.0) -> StageClients:
        def stub(name: str, module, service: str):
            address = service_address(name, environ)
            channel = create_channel(address, [f"audio2video.{name}.v1.{service}"], timeout_seconds=timeout_seconds)
            return getattr(module, f"{service}Stub")(channel)

        return cls(
            audio=stub("audio", audio_pb2_grpc, "AudioService"),
            face=stub("face", face_pb2_grpc, "FaceService"),
            lipsync=stub("lipsync", lipsync_pb2_grpc, "LipsyncService"),
            retiming=stub("retiming", retiming_pb2_grpc, "RetimingService"),
            texture=stub("texture", texture_pb2_grpc, "TextureService"),
            teeth=stub("teeth", teeth_pb2_grpc, "TeethService"),
            composite=stub("composite", composite_pb2_grpc, "CompositeService"),
        )


def final_result(events: Iterable, stage: int, progress: Progress | None, stop: threading.Event | None = None):
    """Follow a stage's progress stream; return its result message."""
    for event in events:
        if stop is not None and stop.is_set():
            events.cancel()
            raise Cancelled("the job was cancelled")
        if event.HasField("progress"):
            if progress:
                progress(stage, event.progress.done, event.progress.total, event.progress.unit)
        else:
            return event.result
    raise FailedPrecondition(f"stage {Stage.Name(stage)} ended its stream without a result")


class Pipeline:
    """Runs render and training jobs against the stage services."""

    def __init__(self, clients: StageClients, *, models_dir: str | None = None) -> None:
        self.clients = clients
        self.models_dir = models_dir

    # -- render ----------------------------------------------------------------------------------

    def render(
        self,
        spec: orchestrator_pb2.RenderJobSpec,
        *,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> orchestrator_pb2.RenderJobResult:
        """Audio + target video + speaker model -> the lip-synced mp4."""
        c, options = self.clients, spec.options
        retime = options.retiming if options.HasField("retiming") else True
        use_teeth = options.teeth if options.HasField("teeth") else True
        chunk = options.chunk_frames or DEFAULT_CHUNK_FRAMES
        parallel = options.max_parallel_chunks or 2
        if chunk < 1 or parallel < 1:
            raise InvalidInput("chunk_frames and max_parallel_chunks must be >= 1")

        info = c.face.Probe(face_pb2.ProbeRequest(video=spec.target_video)).info
        rate = info.frame_rate
        with ThreadPoolExecutor(max_workers=2) as pool:  # audio and face analysis are independent
            audio_future = pool.submit(
                final_result,
                c.audio.Extract(
                    audio_pb2.ExtractRequest(audio=spec.audio, output_frame_rate=rate, options=options.audio)
                ),
                Stage.STAGE_AUDIO,
                progress,
                stop,
            )
            face_future = pool.submit(
                final_result,
                c.face.Analyze(face_pb2.AnalyzeRequest(video=spec.target_video, options=options.face)),
                Stage.STAGE_FACE,
                progress,
                stop,
            )
            audio, analysis = audio_future.result(), face_future.result()
        frames = audio.output_frame_count
        if frames <= 0:
            raise InvalidInput("the audio gives no output frame")

        if progress:
            progress(Stage.STAGE_LIPSYNC, 0, 1, "calls")
        predicted = c.lipsync.Predict(
            lipsync_pb2.PredictRequest(
                model=spec.model,
                features=audio.features,
                output_frame_rate=rate,
                output_frame_count=frames,
                speech_activity=audio.speech_activity,
                options=options.lipsync,
            )
        )
        if progress:
            progress(Stage.STAGE_LIPSYNC, 1, 1, "calls")
        retimed = c.retiming.Retime(
            retiming_pb2.RetimeRequest(
                speech_activity=audio.speech_activity,
                target_analysis=analysis.manifest,
                output_frame_count=frames,
                enabled=retime,
                options=options.retiming_options,
            )
        )
        if progress:
            progress(Stage.STAGE_RETIMING, 1, 1, "calls")
        proxies = None
        if use_teeth:
            selection = teeth_pb2.SelectProxiesRequest(
                target_analysis=analysis.manifest, options=options.teeth_selection
            )
            if options.HasField("teeth_upper_frame"):
                selection.upper_frame_override = options.teeth_upper_frame
            if options.HasField("teeth_lower_frame"):
                selection.lower_frame_override = options.teeth_lower_frame
            proxies = c.teeth.SelectProxies(selection).proxies

        ranges = [(a, min(a + chunk, frames)) for a in range(0, frames, chunk)]
        done = [0]
        lock = threading.Lock()

        def one_chunk(bounds: tuple[int, int]) -> composite_pb2.Segment:
            frame_range = common_pb2.FrameRange(start=bounds[0], stop=bounds[1])
            synthesized = final_result(
                c.texture.Synthesize(
                    texture_pb2.SynthesizeRequest(
                        frames=frame_range,
                        mouth_shapes=predicted.mouth_shapes,
                        target_analysis=analysis.manifest,
                        retiming_map=retimed.retiming_map,
                        options=options.texture,
                    )
                ),
                Stage.STAGE_TEXTURE,
                None,
                stop,
            )
            textures = synthesized.textures
            if proxies is not None:
                enhanced = final_result(
                    c.teeth.Enhance(
                        teeth_pb2.EnhanceRequest(
                            textures=textures,
                            frames=frame_range,
                            proxies=proxies,
                            mouth_shapes=synthesized.mean_shapes,
                            texture_valid=synthesized.texture_valid,
                            options=options.teeth_enhance,
                        )
                    ),
                    Stage.STAGE_TEETH,
                    None,
                    stop,
                )
                textures = enhanced.textures
            rendered = final_result(
                c.composite.Render(
                    composite_pb2.RenderRequest(
                        frames=frame_range,
                        target_video=spec.target_video,
                        target_analysis=analysis.manifest,
                        textures=[
                            composite_pb2.TextureChunk(
                                frames=frame_range, textures=textures, mean_jaw_lines=synthesized.mean_jaw_lines
                            )
                        ],
                        retiming_map=retimed.retiming_map,
                        mouth_shapes=predicted.mouth_shapes,
                        options=options.composite,
                    )
                ),
                Stage.STAGE_COMPOSITE,
                None,
                stop,
            )
            with lock:
                done[0] += bounds[1] - bounds[0]
                if progress:
                    progress(Stage.STAGE_COMPOSITE, done[0], frames, "frames")
            return composite_pb2.Segment(frames=frame_range, segment=rendered.segment)

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            segments = list(pool.map(one_chunk, ranges))
        finalized = final_result(
            c.composite.Finalize(
                composite_pb2.FinalizeRequest(
                    segments=segments,
                    audio=audio.normalized_audio,
                    output_key=options.output_key,
                    options=options.finalize,
                    frame_rate=rate,
                )
            ),
            Stage.STAGE_FINALIZE,
            progress,
            stop,
        )
        return orchestrator_pb2.RenderJobResult(
            video=finalized.video,
            duration_seconds=finalized.duration_seconds,
            frame_count=finalized.frame_count,
            width=finalized.width,
            height=finalized.height,
            frame_rate=finalized.frame_rate,
            model_version=predicted.model.version,
            retimed=retimed.enabled,
            teeth_enhanced=bool(proxies is not None and proxies.has_visible_teeth),
        )

    # -- training --------------------------------------------------------------------------------

    def train(
        self,
        spec: orchestrator_pb2.TrainJobSpec,
        *,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        store_env: Mapping[str, str] | None = None,
    ) -> dict:
        """Analyse the speaker's videos, build the dataset, train and export the LSTM; returns the model card."""
        c, options = self.clients, spec.options
        if not spec.videos:
            raise InvalidInput("training needs at least one video")

        def analyse(video: orchestrator_pb2.TrainingVideo) -> face_pb2.SpeakerClip:
            extracted = final_result(
                c.audio.Extract(audio_pb2.ExtractRequest(audio=video.video, options=options.audio)),
                Stage.STAGE_AUDIO,
                None,
                stop,
            )
            analysed = final_result(
                c.face.Analyze(face_pb2.AnalyzeRequest(video=video.video, options=options.face)),
                Stage.STAGE_FACE,
                None,
                stop,
            )
            return face_pb2.SpeakerClip(
                clip_id=video.clip_id, analysis_manifest=analysed.manifest, features=extracted.features
            )

        clips = []
        for index, video in enumerate(spec.videos):
            clips.append(analyse(video))
            if progress:
                progress(Stage.STAGE_FACE, index + 1, len(spec.videos), "videos")
        dataset = final_result(
            c.face.BuildSpeakerDataset(
                face_pb2.BuildSpeakerDatasetRequest(
                    speaker=spec.speaker, clips=clips, validation=spec.validation, options=options.dataset
                )
            ),
            Stage.STAGE_DATASET,
            progress,
            stop,
        )
        return self._run_trainer(
            spec.speaker, dataset, options.training, progress=progress, stop=stop, store_env=store_env
        )

    def _run_trainer(
        self,
        speaker: str,
        dataset: face_pb2.BuildSpeakerDatasetResult,
        training,
        *,
        progress: Progress | None,
        stop: threading.Event | None,
        store_env: Mapping[str, str] | None,
    ) -> dict:
        """The trainer as a process of its own (in Kubernetes: a Job on a GPU node)."""
        command = [
            sys.executable,
            "-m",
            "services.lipsync.trainer",
            "--speaker",
            speaker,
            "--dataset",
            dataset.dataset.key,
            "--pca",
            dataset.pca.key,
        ]
        if self.models_dir:
            command += ["--models-dir", self.models_dir]
        settings = dict(SMALL_DATA_TRAINING)
        for field, value in training.ListFields():
            settings[field.name] = value
        for name, value in settings.items():
            flag = {"max_epochs": "epochs", "early_stopping_patience": "patience"}.get(name, name)
            command += [f"--{flag.replace('_', '-')}", str(value)]
        env = {**os.environ, **(store_env or {}), "TF_CPP_MIN_LOG_LEVEL": "2"}
        if progress:
            progress(Stage.STAGE_TRAIN, 0, 0, "epochs")
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines = []
        for line in process.stdout:
            lines.append(line.rstrip())
            if stop is not None and stop.is_set():
                process.terminate()
            if progress and line.startswith("epoch"):
                parts = line.split()
                if len(parts) > 1 and "/" in parts[1]:
                    done, total = parts[1].split("/")
                    if done.isdigit() and total.isdigit():
                        progress(Stage.STAGE_TRAIN, int(done), int(total), "epochs")
        if process.wait() != 0:
            if stop is not None and stop.is_set():
                raise Cancelled("training was cancelled")
            reason = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
            raise FailedPrecondition(f"training failed: {reason}")
        summary = next((line for line in reversed(lines) if line.startswith("stored ")), "")
        if not summary:
            raise FailedPrecondition(f"the trainer ended without storing a model: {lines[-1] if lines else ''}")
        return {"prefix": summary.split()[1], "summary": summary}
