"""`a2v bench`: seconds of compute per second of output, per stage and end to end, through a real local stack.

Starts a private local stack on free ports (state in a temporary folder, always torn down), trains a
throw-away speaker for a few epochs, and renders real speech onto real targets through the orchestrator:
per target a warm-up job (its face analysis is the one-off cost of a new target), then one job per audio
duration with the analysis cached. Every measured job gets audio no earlier job saw, so nothing after the
analysis comes from a cache. Then texture synthesis with 1 and 2 fresh replicas, the peak memory of every
stack process, and the fast cores against their naive reference implementations (`deploy.bench.micro`).

Real-time factor (RTF) = seconds spent per second of output video; <= 1 renders as fast as the audio plays.
Prints a table, writes JSON (`--json`) and a `{"stages": {stage: seconds}}` file that the evaluation report
reads (`--timings`). Numbers never fail it: the exit status is 0 whenever it ran, 1 with a one-line reason
when it could not (the stack did not start, data missing, training failed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import wave
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np

from deploy.local import REPO, LocalStack, stack_environment
from deploy.ports import isolated_stack_env
from deploy.samples import SAMPLE_DATA

OUT_DIR = REPO / "out" / "bench"
DEFAULT_AUDIO = SAMPLE_DATA / "audio" / "commentary_60s.wav"
DEFAULT_TARGETS = (
    SAMPLE_DATA / "targets" / "kristinoem_256.mp4",
    SAMPLE_DATA / "targets" / "hdtf_katiehill_512.mp4",
)
DEFAULT_SPEAKER_VIDEO = SAMPLE_DATA / "speakers" / "feifeili" / "feifeili_clip3.mp4"
DEFAULT_DURATIONS = (10.0, 60.0)
SPEAKER = "bench"
RENDER_STAGES = ("audio", "face", "lipsync", "retiming", "texture", "teeth", "composite", "finalize")
FRESH_STAGES = ("texture", "teeth", "composite")
"""Stages whose calls must all do real work in a measured job (their inputs are new audio's)."""
CPU_COLUMNS = (
    "audio",
    "face",
    "tfserving",
    "lipsync",
    "retiming",
    "texture",
    "teeth",
    "composite",
    "orchestrator",
    "s3",
)
WARMUP_SECONDS = 4.0
WARMUP_CHUNK_FRAMES = 30  # several chunks even for 4 s, so every texture replica loads the target once
QUICK_SECONDS = 4.0
REPLICA_FRAMES = 240
MODEL_WAIT_SECONDS = 120.0
JOB_TIMEOUT_SECONDS = 3600.0
PROGRESS_EVERY_SECONDS = 15.0
MICRO_TIMEOUT_SECONDS = 600.0
MIB = 2**20
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class BenchError(Exception):
    """The benchmark cannot run (no stack, no data, no model): one line, exit status 1."""


# -- pure helpers ---------------------------------------------------------------------------------


def timestamp_seconds(stamp) -> float | None:
    """A protobuf Timestamp as seconds since the epoch; None when unset."""
    if stamp.seconds == 0 and stamp.nanos == 0:
        return None
    return stamp.seconds + stamp.nanos / 1e9


def stage_key(stage: int) -> str:
    """'texture' for orchestrator.v1 STAGE_TEXTURE."""
    from audio2video.orchestrator.v1 import orchestrator_pb2 as pb

    return pb.Stage.Name(stage).removeprefix("STAGE_").lower()


def job_timing(job, output_seconds: float | None = None) -> dict:
    """Real-time factors of a finished render job.

    Args:
        job: orchestrator.v1.Job, SUCCEEDED (started, finished and every stage's status set).
        output_seconds: Seconds of output video; default the job's render_result.duration_seconds.

    Returns:
        dict: output_seconds, frames, wall_seconds (job started -> finished), rtf_wall (wall / output s),
        queue_seconds (created -> started), rtf_busy_sum (every stage's busy seconds / output s) and stages:
        {name: {busy_seconds, rtf, wall_seconds (stage started -> finished), attempts, cached, cached_calls}}.

    Raises:
        ValueError: no output seconds, or the job lacks its start or end time.
    """
    seconds = job.render_result.duration_seconds if output_seconds is None else output_seconds
    if not seconds or seconds <= 0:
        raise ValueError(f"job {job.id} has no output duration (got {seconds!r})")
    started, finished = timestamp_seconds(job.started), timestamp_seconds(job.finished)
    if started is None or finished is None:
        raise ValueError(f"job {job.id} has no start or end time")
    created = timestamp_seconds(job.created)
    stages = {}
    for status in job.stages:
        begin, end = timestamp_seconds(status.started), timestamp_seconds(status.finished)
        stages[stage_key(status.stage)] = {
            "busy_seconds": status.busy_seconds,
            "rtf": status.busy_seconds / seconds,
            "wall_seconds": end - begin if begin is not None and end is not None else 0.0,
            "attempts": status.attempts,
            "cached": status.cached,
            "cached_calls": status.cached_calls,
        }
    return {
        "output_seconds": seconds,
        "frames": job.render_result.frame_count,
        "wall_seconds": finished - started,
        "rtf_wall": (finished - started) / seconds,
        "queue_seconds": started - created if created is not None else 0.0,
        "rtf_busy_sum": sum(s["busy_seconds"] for s in stages.values()) / seconds,
        "stages": stages,
    }


def slice_wav(source: Path, dest: Path, *, start_seconds: float, seconds: float, salt: int = 0) -> float:
    """Write `seconds` of a 16-bit PCM WAV from `start_seconds` on, wrapping around at its end.

    Args:
        source: 16-bit PCM WAV, any rate and channel count.
        dest: Where to write the slice (same rate and channels).
        start_seconds: Offset into `source` (taken modulo its duration).
        seconds: Duration of the slice, > 0; longer than `source` repeats it.
        salt: Written into the first 4 samples as small values (|x| <= 128 of 32768: inaudible), so slices
            with the same audio but another salt have other bytes, hence other cache keys downstream.

    Returns:
        The duration written, seconds.

    Raises:
        BenchError: not a 16-bit PCM WAV, empty, or seconds <= 0.
    """
    if seconds <= 0:
        raise BenchError(f"audio slice of {seconds} s: needs > 0 s")
    try:
        with wave.open(str(source), "rb") as reader:
            params = reader.getparams()
            raw = reader.readframes(params.nframes)
    except (wave.Error, EOFError, OSError) as exc:
        raise BenchError(f"{source} is not a readable PCM WAV: {exc}") from exc
    if params.sampwidth != 2 or params.comptype != "NONE":
        raise BenchError(f"{source}: only 16-bit PCM WAV is supported (sample width {params.sampwidth})")
    samples = np.frombuffer(raw, dtype="<i2").reshape(-1, params.nchannels)
    if len(samples) == 0:
        raise BenchError(f"{source} holds no audio")
    count = round(seconds * params.framerate)
    first = round(start_seconds * params.framerate) % len(samples)
    out = samples[(first + np.arange(count)) % len(samples)].copy()
    if salt:
        marks = np.array([(salt >> (8 * i)) & 0xFF for i in range(4)], dtype=np.int16) - 128
        out[: len(marks), :] = marks[: len(out), None]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(dest), "wb") as writer:
        writer.setnchannels(params.nchannels)
        writer.setsampwidth(2)
        writer.setframerate(params.framerate)
        writer.writeframes(out.astype("<i2").tobytes())
    return count / params.framerate


def wav_seconds(path: Path) -> float:
    """Duration of a PCM WAV, seconds."""
    with wave.open(str(path), "rb") as reader:
        return reader.getnframes() / reader.getframerate()


def parse_proc_status(text: str) -> dict[str, int]:
    """Memory lines of a Linux /proc/<pid>/status ('VmHWM:   123 kB') as bytes, by name (VmHWM, VmRSS, ...)."""
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if name.startswith("Vm") and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            values[name] = int(parts[0]) * 1024
    return values


def process_memory(pid: int) -> dict:
    """Peak and current resident memory of a process: VmHWM from /proc, else psutil's current RSS.

    Returns:
        dict: peak_rss_bytes, rss_bytes and source ("VmHWM" or "psutil rss (current)"); {} when gone.
    """
    try:
        status = parse_proc_status(Path(f"/proc/{pid}/status").read_text())
    except OSError:
        status = {}
    if "VmHWM" in status:
        return {"peak_rss_bytes": status["VmHWM"], "rss_bytes": status.get("VmRSS", 0), "source": "VmHWM"}
    import psutil

    try:
        rss = psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return {}
    return {"peak_rss_bytes": rss, "rss_bytes": rss, "source": "psutil rss (current)"}


def cpu_seconds(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds (user + system, reaped children included) each process has used so far."""
    import psutil

    used = {}
    for name, pid in pids.items():
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        used[name] = times.user + times.system + times.children_user + times.children_system
    return used


def cpu_by_service(cpu: Mapping[str, float]) -> dict[str, float]:
    """CPU seconds per service, replicas ('texture-2') added to their service ('texture')."""
    merged: dict[str, float] = {}
    for name, seconds in cpu.items():
        service = name.split("-")[0]
        merged[service] = merged.get(service, 0.0) + seconds
    return merged


def stack_processes(stack: LocalStack) -> dict[str, int]:
    """name -> pid of every process of a local stack (from its state file)."""
    if not stack.state_file.exists():
        return {}
    return {entry["name"]: entry["pid"] for entry in json.loads(stack.state_file.read_text())}


def pick_headline(cases: list[dict]) -> dict | None:
    """The case the project's aim is judged on: the largest target with cached analysis, longest audio."""
    usable = [c for c in cases if c.get("analysis_cached")] or list(cases)
    if not usable:
        return None
    best = max(usable, key=lambda c: (c["width"] * c["height"], c["audio_seconds"]))
    return {
        "target": best["target"],
        "file": best["file"],
        "audio_seconds": best["audio_seconds"],
        "wall_seconds": best["wall_seconds"],
        "rtf": best["rtf_wall"],
        "real_time": best["rtf_wall"] <= 1.0,
        "analysis_cached": bool(best.get("analysis_cached")),
    }


def stage_timings(case: Mapping) -> dict:
    """{"stages": {stage: busy seconds}} of one case (what `python -m evaluation ... --timings` reads)."""
    return {
        "stages": {name: round(s["busy_seconds"], 4) for name, s in case["stages"].items()},
        "target": case["target"],
        "audio_seconds": case["audio_seconds"],
        "output_seconds": case["output_seconds"],
        "wall_seconds": case["wall_seconds"],
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def _f(value: float | None, digits: int = 2, width: int = 0) -> str:
    text = "-" if value is None else f"{value:.{digits}f}"
    return f"{text:>{width}}" if width else text


def format_table(report: Mapping) -> str:
    """The report as the text `a2v bench` prints: cases, analysis, headline, replicas, memory, references."""
    lines = []
    settings = report.get("settings", {})
    host = report.get("host", {})
    lines.append(
        f"audio2video benchmark: {host.get('cpus', '?')} CPU cores, texture replicas {settings.get('replicas', '?')}, "
        f"speaker {settings.get('speaker', SPEAKER)!r}"
        + (f", BLAS threads {settings['blas_threads']}" if settings.get("blas_threads") else "")
    )
    lines.append("RTF = seconds per second of output (<= 1: as fast as the audio plays).")
    lines.append(
        "  wall: job start to end / output s; cpu: CPU seconds of all stack processes / output s;"
        " stage columns: the stage's busy seconds / output s"
    )
    lines.append("  (chunked stages run chunks in parallel, so stage RTFs can add up to more than the wall RTF)")
    cases = report.get("cases", [])
    stages = [s for s in RENDER_STAGES if any(s in c["stages"] for c in cases)]
    header = f"{'target':<10} {'audio':>6} {'frames':>6} {'wall s':>7} {'RTF wall':>8} {'RTF cpu':>7} |"
    header += "".join(f" {name[:9]:>9}" for name in stages)
    lines += ["", header, "-" * len(header)]
    for case in cases:
        row = (
            f"{case['target']:<10} {case['audio_seconds']:>4.0f} s {case['frames']:>6} "
            f"{case['wall_seconds']:>7.1f} {case['rtf_wall']:>8.2f} {_f(case.get('rtf_cpu'), 2, 7)} |"
        )
        row += "".join(f" {_f(case['stages'].get(name, {}).get('rtf'), 3, 9)}" for name in stages)
        notes = []
        if not case.get("analysis_cached"):
            notes.append("analysis not cached")
        if not case.get("fresh", True):
            notes.append("some chunks came from a cache")
        lines.append(row + (f"   ({'; '.join(notes)})" if notes else ""))
    for failure in report.get("failed_cases", []):
        lines.append(f"{failure['target']:<10} {failure['audio_seconds']:>4.0f} s  FAILED: {failure['reason']}")

    measured = [c for c in cases if c.get("cpu_seconds")]
    if measured:
        by_case = [cpu_by_service(c["cpu_seconds"]) for c in measured]
        services = [s for s in CPU_COLUMNS if any(s in cpu for cpu in by_case)]
        services += sorted({s for cpu in by_case for s in cpu} - set(services))
        header = f"{'target':<10} {'audio':>6} {'cpu/s':>6} |" + "".join(f" {name[:9]:>9}" for name in services)
        lines += ["", "CPU seconds per output second by service (replicas added up; contention-free compute):"]
        lines += [header, "-" * len(header)]
        for case, cpu in zip(measured, by_case, strict=True):
            seconds = case["output_seconds"]
            row = f"{case['target']:<10} {case['audio_seconds']:>4.0f} s {sum(cpu.values()) / seconds:>6.2f} |"
            lines.append(row + "".join(f" {cpu.get(name, 0.0) / seconds:>9.3f}" for name in services))

    analyses = report.get("targets", {})
    if any(t.get("analysis") for t in analyses.values()):
        lines += ["", "Target analysis (face stage; once per target, later jobs reuse it):"]
        for label, target in analyses.items():
            analysis = target.get("analysis")
            if not analysis:
                continue
            rate = target["frames"] / analysis["busy_seconds"] if analysis["busy_seconds"] > 0 else None
            cached = " (was already cached)" if analysis.get("cached") else ""
            lines.append(
                f"  {label:<10} {target['file']}: {target['frames']} frames analysed in "
                f"{analysis['busy_seconds']:.1f} s ({_f(rate, 0)} frames/s){cached}; first job "
                f"({analysis['warmup_audio_seconds']:.0f} s audio) {analysis['warmup_wall_seconds']:.1f} s wall,"
                f" RTF {analysis['warmup_rtf_wall']:.2f}"
            )

    headline = report.get("headline")
    if headline:
        verdict = "MEETS real time" if headline["real_time"] else "does NOT meet real time"
        cached = "cached analysis" if headline["analysis_cached"] else "analysis NOT cached"
        lines += [
            "",
            f">>> {headline['target']} target ({cached}), {headline['audio_seconds']:.0f} s of audio: "
            f"end-to-end RTF {headline['rtf']:.2f} ({headline['wall_seconds']:.1f} s wall) -> {verdict} "
            f"(RTF <= 1) on {host.get('cpus', '?')} cores",
        ]

    replicas = report.get("texture_replicas")
    if replicas:
        lines += [
            "",
            f"Texture synthesis throughput ({replicas['frames']} frames of {replicas.get('target', '?')}, "
            f"chunks of {replicas['chunk']}, fresh replicas, one BLAS thread each):",
        ]
        for count, rate in replicas["frames_per_second"].items():
            lines.append(
                f"  {count} replica{'s' if count != '1' else ' '} {rate:7.1f} frames/s  "
                f"({replicas['speedup'][count]:.2f}x)"
            )

    memory = report.get("memory", {})
    if memory:
        source = {m.get("source", "") for m in memory.values()}
        lines += ["", f"Peak memory per service ({', '.join(sorted(source))}, at the end of the render cases):"]
        for name, values in memory.items():
            lines.append(f"  {name:<14} {values['peak_rss_bytes'] / MIB:8.0f} MiB")

    references = report.get("naive_references", {})
    if references:
        lines += ["", "Fast cores against their naive reference implementations (one core each):"]
        texture = references.get("texture")
        if texture and "error" not in texture:
            lines.append(
                f"  texture synthesis ({texture['candidates']} candidates, {texture['clip']}): "
                f"{texture['fast_fps']:.1f} frames/s vs naive {texture['reference_fps']:.1f} frames/s "
                f"({texture['speedup']:.1f}x); weighted-median kernel {texture['kernel_fast_ms']:.1f} ms vs "
                f"{texture['kernel_reference_ms']:.1f} ms; identical textures: {_yes(texture['identical'])}"
            )
        retiming = references.get("retiming")
        if retiming and "error" not in retiming:
            lines.append(
                f"  re-timing DP ({retiming['audio_seconds']:.0f} s audio x {retiming['target_seconds']:.0f} s target):"
                f" {retiming['fast_seconds'] * 1000:.0f} ms vs naive ~{retiming['naive_extrapolated_seconds']:.0f} s"
                f" (extrapolated from N = {retiming['naive_n']}; {retiming['speedup']:.0f}x);"
                f" same cost: {_yes(retiming['same_cost'])}"
            )
        for name, numbers in references.items():
            if "error" in numbers:
                lines.append(f"  {name}: could not run ({numbers['error']})")

    errors = report.get("errors", [])
    if errors:
        lines += ["", "Parts that did not run:"] + [f"  - {error}" for error in errors]
    return "\n".join(lines)


# -- the run --------------------------------------------------------------------------------------


class Progress:
    """Progress lines with the time since the start: '[  42 s] message'."""

    def __init__(self, out=None) -> None:
        self.out = out
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:5.0f} s] {message}", file=self.out or sys.stdout, flush=True)


@dataclass(frozen=True)
class Target:
    """A target video as probed: file, label 'WxH', size, frame rate and frame count."""

    path: Path
    width: int
    height: int
    fps: float
    frames: int

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"

    @classmethod
    def probe(cls, path: Path) -> Target:
        import av

        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
                return cls(path, stream.width, stream.height, float(stream.average_rate or 0), int(frames))
        except (OSError, IndexError, av.FFmpegError) as exc:
            raise BenchError(f"{path} is not a readable video: {exc}") from exc


@contextlib.contextmanager
def private_stack(
    replicas: int, progress: Progress, *, blas_threads: int | None = None
) -> Iterator[tuple[dict[str, str], LocalStack]]:
    """A local stack on free ports with state in a temporary folder; stopped and removed whatever happens."""
    root = Path(tempfile.mkdtemp(prefix="a2v-bench-"))
    env = isolated_stack_env(root / "stack", replicas=replicas)
    if blas_threads:
        env |= dict.fromkeys(BLAS_THREAD_VARIABLES, str(blas_threads))
    stack = LocalStack(env)
    progress(f"starting a private stack ({replicas} texture replica{'s' if replicas > 1 else ''}) in {root}")
    keep = False
    try:
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured):
                code = stack.up()
        except SystemExit as exc:  # the ports check exits with its reason
            code, captured = 1, io.StringIO(str(exc))
        if code != 0:
            keep = True
            said = captured.getvalue().strip().splitlines()
            raise BenchError(f"the local stack did not start (logs in {stack.logs}){': ' + said[-1] if said else ''}")
        yield env, stack
    finally:
        progress("stopping the private stack")
        with contextlib.redirect_stdout(io.StringIO()):
            stack.down(quiet=True)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def running_stack(progress: Progress) -> Iterator[tuple[dict[str, str], LocalStack]]:
    """The stack already running with the addresses of deploy/.env and the environment (left running)."""
    env = stack_environment()
    stack = LocalStack(env)
    with contextlib.redirect_stdout(io.StringIO()):
        healthy = stack.status() == 0
    if not healthy:
        raise BenchError("--running-stack: no healthy stack runs with these addresses (`a2v up` first)")
    progress(f"using the running stack (state in {stack.dir})")
    yield env, stack


class Bench:
    """One benchmark run against a stack: training, render cases, replicas, memory, references."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str], stack: LocalStack, progress: Progress) -> None:
        from client.jobs import Connection

        self.args = args
        self.stack = stack
        self.progress = progress
        self.env = {**env, **stack.client_environment()}
        self.connection = Connection(self.env)
        self.workdir = Path(tempfile.mkdtemp(prefix="a2v-bench-audio-"))
        self.nonce = secrets.randbits(24)
        self.slices = 0
        self.current_job = ""
        self.errors: list[str] = []

    # -- stack processes ---------------------------------------------------------------------------

    def memory(self) -> dict[str, dict]:
        memory = {}
        for name, pid in stack_processes(self.stack).items():
            if values := process_memory(pid):
                memory[name] = {"pid": pid, **values}
        return memory

    # -- jobs ----------------------------------------------------------------------------------------

    def wait(self, job_id: str, what: str):
        """Poll the job until it ends (a progress line every PROGRESS_EVERY_SECONDS); the final Job."""
        from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
        from client.jobs import TERMINAL

        self.current_job = job_id
        deadline = time.monotonic() + JOB_TIMEOUT_SECONDS
        last = time.monotonic()
        while True:
            job = self.connection.orchestrator.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30).job
            if job.state in TERMINAL:
                self.current_job = ""
                return job
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: job {job_id} did not end within {JOB_TIMEOUT_SECONDS:.0f} s")
            if time.monotonic() - last >= PROGRESS_EVERY_SECONDS:
                last = time.monotonic()
                running = [stage_key(s.stage) for s in job.stages if s.state == pb.STAGE_STATE_RUNNING]
                eta = f", ETA {job.eta_seconds:.0f} s" if job.eta_seconds >= 0 else ""
                self.progress(f"  {what}: {job.fraction_done:.0%} ({', '.join(running) or 'starting'}{eta})")
            time.sleep(0.5)

    def cancel_current(self) -> None:
        """Cancel the job in flight (an interrupted run on a stack that stays up)."""
        from audio2video.orchestrator.v1 import orchestrator_pb2 as pb

        if self.current_job:
            with contextlib.suppress(Exception):
                self.connection.orchestrator.CancelJob(
                    pb.CancelJobRequest(job_id=self.current_job, reason="a2v bench interrupted"), timeout=10
                )

    def train(self) -> dict:
        from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
        from client.jobs import job_outcome
        from deploy.demo import speaker_has_model

        if speaker_has_model(self.env, SPEAKER):
            self.progress(f"speaker {SPEAKER!r} already has a model: no training")
            return {"trained": False}
        video = self.args.speaker_video
        self.progress(f"training speaker {SPEAKER!r} on {video.name} ({self.args.epochs} epochs)")
        options = pb.TrainOptions()
        options.training.max_epochs = self.args.epochs
        started = time.monotonic()
        try:
            job = self.wait(self.connection.train(SPEAKER, [video], options).id, "training")
        except grpc.RpcError as exc:
            raise BenchError(f"training: orchestrator: {exc.code().name}: {exc.details()}") from exc
        if reason := job_outcome(job):
            raise BenchError(f"training failed: {reason}")
        deadline = time.monotonic() + MODEL_WAIT_SECONDS
        while not speaker_has_model(self.env, SPEAKER):
            if time.monotonic() > deadline:
                raise BenchError(f"the trained model did not become available within {MODEL_WAIT_SECONDS:.0f} s")
            time.sleep(0.5)
        seconds = time.monotonic() - started
        self.progress(f"speaker model ready after {seconds:.0f} s")
        return {"trained": True, "seconds": seconds, "epochs": self.args.epochs, "video": video.name}

    def audio(self, seconds: float, tag: str) -> Path:
        """A slice of the benchmark audio no earlier job of any run has seen (own offset and salt)."""
        self.slices += 1
        source = self.args.audio
        start = (self.slices * 7.3) % wav_seconds(source)
        path = self.workdir / f"{tag}-{self.slices}.wav"
        slice_wav(source, path, start_seconds=start, seconds=seconds, salt=(self.nonce << 8) + self.slices)
        return path

    def render(self, target: Target, seconds: float, what: str, **options) -> tuple[object, dict]:
        """Render `seconds` of fresh audio onto `target`; (the finished Job, CPU seconds per process)."""
        from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
        from client.jobs import job_outcome

        audio = self.audio(seconds, f"{target.label}-{seconds:g}s")
        pids = stack_processes(self.stack)
        before = cpu_seconds(pids)
        try:
            job = self.connection.render(SPEAKER, audio, target.path, pb.JobOptions(**options))
            job = self.wait(job.id, what)
        except grpc.RpcError as exc:
            raise BenchError(f"orchestrator: {exc.code().name}: {exc.details()}") from exc
        after = cpu_seconds(pids)
        if reason := job_outcome(job):
            raise BenchError(reason)
        used = {name: after[name] - before[name] for name in after if name in before}
        return job, used

    def warm_up(self, target: Target) -> dict:
        """The target's first job: its face analysis (once per target) and the cold first-job RTF."""
        self.progress(f"{target.label} {target.path.name}: warm-up job ({WARMUP_SECONDS:.0f} s audio, analysis)")
        job, _ = self.render(target, WARMUP_SECONDS, f"{target.label} warm-up", chunk_frames=WARMUP_CHUNK_FRAMES)
        timing = job_timing(job)
        face = timing["stages"]["face"]
        self.progress(
            f"  analysis {face['busy_seconds']:.1f} s; first job {timing['wall_seconds']:.1f} s wall, "
            f"RTF {timing['rtf_wall']:.2f}"
        )
        return {
            "busy_seconds": face["busy_seconds"],
            "cached": face["cached"],
            "warmup_audio_seconds": WARMUP_SECONDS,
            "warmup_wall_seconds": timing["wall_seconds"],
            "warmup_rtf_wall": timing["rtf_wall"],
            "job_id": job.id,
        }

    def case(self, target: Target, seconds: float) -> tuple[dict, object]:
        what = f"{target.label} {seconds:g} s"
        self.progress(f"{what}: rendering {seconds:g} s of audio onto {target.path.name}")
        job, used = self.render(target, seconds, what)
        timing = job_timing(job)
        stages = timing["stages"]
        fresh = all(stages[name]["cached_calls"] == 0 for name in FRESH_STAGES if name in stages)
        case = {
            "target": target.label,
            "file": target.path.name,
            "width": target.width,
            "height": target.height,
            "fps": target.fps,
            "audio_seconds": seconds,
            **timing,
            "rtf_cpu": sum(used.values()) / timing["output_seconds"],
            "cpu_seconds": {name: round(value, 3) for name, value in used.items()},
            "analysis_cached": bool(stages.get("face", {}).get("cached")),
            "fresh": fresh,
            "job_id": job.id,
        }
        slowest = max(stages, key=lambda name: stages[name]["busy_seconds"])
        self.progress(
            f"  {timing['wall_seconds']:.1f} s wall: RTF {timing['rtf_wall']:.2f} (cpu {case['rtf_cpu']:.2f}); "
            f"busiest stage {slowest} {stages[slowest]['rtf']:.2f}"
        )
        return case, job

    def replica_scaling(self, target: Target, job) -> dict:
        """Texture synthesis frames/s with 1 and 2 fresh replicas on `job`'s target analysis and mouth shapes."""
        from audio2video.common.v1 import common_pb2
        from deploy.bench import texture_replicas as bench_replicas

        outputs = {stage_key(s.stage): s.outputs for s in job.stages}
        manifest = outputs["face"]["manifest"]
        shapes = common_pb2.ArrayRef(object=outputs["lipsync"]["mouth_shapes"])
        frames = min(REPLICA_FRAMES, job.render_result.frame_count)
        counts = tuple(sorted({1, 2, self.args.replicas}))
        self.progress(f"texture throughput with {' and '.join(map(str, counts))} fresh replicas ({frames} frames)")
        numbers = bench_replicas.measure(self.env, manifest, shapes, frames, replica_counts=counts)
        rates = ", ".join(f"{n}: {r:.1f} frames/s" for n, r in numbers["frames_per_second"].items())
        self.progress(f"  {rates}")
        return {"target": target.label, **numbers}

    def references(self) -> dict:
        """Each `deploy.bench.micro` in a process of its own (the stack idles meanwhile)."""
        from deploy.bench.micro import BENCHMARKS

        results = {}
        for name in BENCHMARKS:
            self.progress(f"fast {name} core against its naive reference (one core)")
            path = self.workdir / f"micro-{name}.json"
            try:
                done = subprocess.run(
                    [sys.executable, "-m", "deploy.bench.micro", name, "--json", str(path)],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    timeout=MICRO_TIMEOUT_SECONDS,
                )
            except subprocess.TimeoutExpired:
                results[name] = {"error": f"took more than {MICRO_TIMEOUT_SECONDS:.0f} s"}
                continue
            if done.returncode != 0 or not path.exists():
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                results[name] = {"error": f"exit status {done.returncode}: {tail}"}
                continue
            results[name] = json.loads(path.read_text())
        return results

    def run(self, targets: list[Target]) -> dict:
        args = self.args
        report: dict = {"training": self.train(), "targets": {}, "cases": [], "failed_cases": []}
        longest: dict[str, tuple[Target, float, object]] = {}  # per target: its longest measured job
        for target in targets:
            entry = {"file": target.path.name, "width": target.width, "height": target.height}
            entry |= {"fps": target.fps, "frames": target.frames}
            report["targets"][target.label] = entry
            if not args.no_warmup:
                try:
                    entry["analysis"] = self.warm_up(target)
                except BenchError as exc:
                    self.errors.append(f"{target.label} warm-up: {exc}")
                    self.progress(f"  warm-up failed: {exc}")
            for seconds in args.durations:
                try:
                    case, job = self.case(target, seconds)
                except BenchError as exc:
                    report["failed_cases"].append(
                        {"target": target.label, "audio_seconds": seconds, "reason": str(exc)}
                    )
                    self.progress(f"  failed: {exc}")
                    continue
                report["cases"].append(case)
                if target.label not in longest or seconds >= longest[target.label][1]:
                    longest[target.label] = (target, seconds, job)
        report["memory"] = self.memory()
        if not args.no_replicas and longest:
            target, _, job = max(longest.values(), key=lambda entry: entry[0].width * entry[0].height)
            try:
                report["texture_replicas"] = self.replica_scaling(target, job)
            except Exception as exc:  # a part that fails is reported; the rest of the numbers still count
                self.errors.append(f"texture replica scaling: {type(exc).__name__}: {exc}")
        if not args.no_micro:
            report["naive_references"] = self.references()
        report["errors"] = self.errors
        return report

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


# -- the command line -----------------------------------------------------------------------------


def build_parser(prog: str = "a2v bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.splitlines()[0],
        epilog="The default run (two targets x 10 s and 60 s, replicas, references) takes about 10 minutes on 2 cores.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"one short case: {QUICK_SECONDS:.0f} s of audio onto the training clip (256x256, analysed while "
        "training), no warm-up, replica scaling or references (about a minute)",
    )
    parser.add_argument("--targets", type=Path, nargs="+", help="target videos (default: a 256x256 and a 512x512 clip)")
    parser.add_argument("--durations", type=float, nargs="+", help="seconds of audio per measured job (default: 10 60)")
    parser.add_argument("--audio", type=Path, default=DEFAULT_AUDIO, help="16-bit PCM WAV the audio is cut from")
    parser.add_argument("--speaker-video", type=Path, default=DEFAULT_SPEAKER_VIDEO, help="video to train on")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the throw-away speaker model")
    parser.add_argument("--replicas", type=int, default=2, help="texture replicas of the private stack")
    parser.add_argument(
        "--blas-threads",
        type=int,
        help="OPENBLAS/OMP/MKL_NUM_THREADS of every service of the private stack (default: deploy/.env, 1)",
    )
    parser.add_argument("--no-warmup", action="store_true", help="no warm-up job per target (analysis not timed)")
    parser.add_argument("--no-replicas", action="store_true", help="skip texture synthesis with 1 and 2 replicas")
    parser.add_argument("--no-micro", action="store_true", help="skip the fast-vs-naive core benchmarks")
    parser.add_argument(
        "--running-stack",
        action="store_true",
        help="use the stack already running with the addresses of deploy/.env (default: a private one on free "
        "ports, always torn down)",
    )
    parser.add_argument("--json", type=Path, default=OUT_DIR / "bench.json", help="where to write the numbers")
    parser.add_argument(
        "--timings",
        type=Path,
        help='stage seconds of the headline case, {"stages": {...}}, for `a2v eval output --timings` '
        "(default: timings.json beside --json)",
    )
    return parser


def resolve(args: argparse.Namespace) -> list[Target]:
    """Settle the defaults --quick changes; check every input exists; probe the targets."""
    if args.quick:
        args.targets = args.targets or [args.speaker_video]
        args.durations = args.durations or [QUICK_SECONDS]
        args.no_warmup = args.no_replicas = args.no_micro = True
    args.targets = args.targets or list(DEFAULT_TARGETS)
    args.durations = args.durations or list(DEFAULT_DURATIONS)
    if any(d <= 0 for d in args.durations):
        raise BenchError(f"--durations must be > 0, got {args.durations}")
    if args.replicas < 1 or args.epochs < 1 or (args.blas_threads is not None and args.blas_threads < 1):
        raise BenchError("--replicas, --epochs and --blas-threads must be >= 1")
    if args.running_stack and args.blas_threads:
        raise BenchError("--blas-threads applies to the private stack only (not with --running-stack)")
    for path in [args.audio, args.speaker_video, *args.targets]:
        if not path.is_file():
            raise BenchError(f"missing input {path} (sample data: {SAMPLE_DATA}, or set A2V_SAMPLE_DATA)")
    args.audio, args.speaker_video = args.audio.resolve(), args.speaker_video.resolve()
    try:
        if wav_seconds(args.audio) <= 0:
            raise BenchError(f"{args.audio} holds no audio")
    except (wave.Error, EOFError, ZeroDivisionError) as exc:
        raise BenchError(f"{args.audio} is not a PCM WAV: {exc}") from exc
    return [Target.probe(path.resolve()) for path in args.targets]


def write_json(data: Mapping, path: Path) -> None:
    """Indented strict JSON (no NaN), folders created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.timings = args.timings or args.json.with_name("timings.json")
    progress = Progress()
    started = time.monotonic()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)  # teardown runs on `kill` as on Ctrl-C
    bench = None
    try:
        targets = resolve(args)
        report: dict = {
            "version": 1,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": {
                "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                "machine": platform.machine(),
                "python": platform.python_version(),
            },
            "settings": {
                "quick": args.quick,
                "targets": [str(t.path) for t in targets],
                "durations": args.durations,
                "audio": str(args.audio),
                "speaker": SPEAKER,
                "speaker_video": str(args.speaker_video),
                "epochs": args.epochs,
                "replicas": args.replicas,
                "blas_threads": args.blas_threads,
                "stack": "running" if args.running_stack else "private",
            },
        }
        if args.running_stack:
            opened = running_stack(progress)
        else:
            opened = private_stack(args.replicas, progress, blas_threads=args.blas_threads)
        with opened as (env, stack):
            if args.running_stack:
                report["settings"]["replicas"] = sum(name.startswith("texture") for name in stack_processes(stack))
            bench = Bench(args, env, stack, progress)
            try:
                report |= bench.run(targets)
            except BaseException:
                if args.running_stack:
                    bench.cancel_current()
                raise
            finally:
                bench.close()
    except BenchError as exc:
        print(f"a2v bench: could not run: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"a2v bench: could not run: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("a2v bench: interrupted (the stack was stopped)", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not report["cases"]:
        reasons = "; ".join(f["reason"] for f in report["failed_cases"]) or "no case ran"
        print(f"a2v bench: could not run: every render job failed: {reasons}", file=sys.stderr)
        return 1
    headline = report["headline"] = pick_headline(report["cases"])
    timings = stage_timings(next(c for c in report["cases"] if _is_headline(c, headline)))
    report["stages"] = timings["stages"]  # so `--timings bench.json` works as well
    report["seconds"] = time.monotonic() - started
    write_json(report, args.json)
    write_json(timings, args.timings)
    print()
    print(format_table(report))
    print(f"\nwrote {args.json} and {args.timings} ({report['seconds'] / 60:.1f} min in all)")
    return 0


def _is_headline(case: Mapping, headline: Mapping | None) -> bool:
    return (
        bool(headline) and case["target"] == headline["target"] and case["audio_seconds"] == headline["audio_seconds"]
    )


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
