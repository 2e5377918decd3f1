"""Issue 18's acceptance: one real job on the local stack, seen in every service's metrics, in one trace and in the
logs of every service that handled it."""

import json
import wave
from pathlib import Path
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from services.runtime.telemetry import read_call_counts
from tests.conftest import SHARED_DATA, wait_until
from tests.support.stack import a2v

pytestmark = pytest.mark.integration

# The calls a render makes of each process (its metrics must show them).
CALLED = {
    "orchestrator": ["audio2video.orchestrator.v1.OrchestratorService/SubmitJob"],
    "audio": ["audio2video.audio.v1.AudioService/Extract"],
    "face": ["audio2video.face.v1.FaceService/Probe", "audio2video.face.v1.FaceService/Analyze"],
    "lipsync": ["audio2video.lipsync.v1.LipsyncService/Predict"],
    "tfserving": ["tensorflow.serving.PredictionService/Predict"],
    "retiming": ["audio2video.retiming.v1.RetimingService/Retime"],
    "teeth": ["audio2video.teeth.v1.TeethService/SelectProxies", "audio2video.teeth.v1.TeethService/Enhance"],
    "texture": ["audio2video.texture.v1.TextureService/Synthesize"],
    "composite": [
        "audio2video.composite.v1.CompositeService/Render",
        "audio2video.composite.v1.CompositeService/Finalize",
    ],
}
STAGE_SERVICES = ("audio", "face", "lipsync", "retiming", "teeth", "texture", "composite")
STAGES = ("audio", "face", "lipsync", "retiming", "texture", "teeth", "composite", "finalize")


def short_audio(path: Path, seconds: float = 2.0) -> Path:
    """The start of a real sentence: audio no other test renders, so every stage computes (nothing cached)."""
    with wave.open(str(SHARED_DATA / "audio" / "arctic_sentence_4s.wav")) as source:
        params = source.getparams()
        frames = source.readframes(int(params.framerate * seconds))
    with wave.open(str(path), "wb") as out:
        out.setparams(params)
        out.writeframes(frames)
    return path


def processes(stack) -> list[dict]:
    state = json.loads((Path(stack.env["A2V_STACK_DIR"]) / "state.json").read_text())
    return [entry for entry in state if entry["name"] != "s3"]


def calls_by_component(stack) -> dict[str, dict[str, int]]:
    """Calls per method of each component, its replicas added up, from their metrics endpoints."""
    totals: dict[str, dict[str, int]] = {}
    for entry in processes(stack):
        counts = read_call_counts("127.0.0.1", entry["metrics_port"])
        component = totals.setdefault(entry["name"].split("-")[0], {})
        for method, count in counts.by_method.items():
            component[method] = component.get(method, 0) + count
    return totals


def frames_by_method(stack) -> dict[str, float]:
    """a2v_stage_units_processed_total{unit="frames"} per method, every process added up."""
    totals: dict[str, float] = {}
    for entry in processes(stack):
        with urlopen(f"http://127.0.0.1:{entry['metrics_port']}/metrics", timeout=5) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "a2v_stage_units_processed_total" and sample.labels["unit"] == "frames":
                    method = sample.labels["grpc_method"]
                    totals[method] = totals.get(method, 0.0) + sample.value
    return totals


def test_a_job_shows_in_every_services_metrics_in_one_trace_and_in_every_services_logs(e2e_stack, tmp_path):
    stack = e2e_stack
    before, frames_before = calls_by_component(stack), frames_by_method(stack)
    job = stack.submit(short_audio(tmp_path / "short.wav"), chunk_frames=30)
    done = stack.wait(job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason

    # Metrics: every process answers on its port, and each shows the calls of this job it served.
    after = calls_by_component(stack)
    assert set(after) >= set(CALLED) | {"modelsync"}
    for component, methods in CALLED.items():
        for method in methods:
            served = after[component].get(method, 0) - before.get(component, {}).get(method, 0)
            assert served >= 1, f"{component} shows no call of {method}"

    # Stage counters: the frames each per-frame stage made for the job (60 output frames).
    frames = frames_by_method(stack)
    for method in ("Synthesize", "Enhance", "Render"):
        assert frames.get(method, 0) - frames_before.get(method, 0) >= 60, (method, frames)

    # `a2v status` shows each process's calls, errors and calls in flight from the same endpoints.
    status = a2v(stack.env, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:] if line.strip()}
    assert status.stdout.splitlines()[0].split()[-4:] == ["calls", "errors", "in", "flight"]
    for component in CALLED:
        calls, errors, in_flight = (int(value) for value in rows[component][-3:])
        assert calls >= 1 and 0 <= errors <= calls and in_flight >= 0, rows[component]

    # Traces: one trace holds the job's span, a span per stage call and per chunk, and the server span of each
    # stage service (the context crossed gRPC), all with the job id.
    wanted = {f"a2v-{name}" for name in (*STAGE_SERVICES, "tfserving", "orchestrator")}

    def job_trace():
        spans = stack.spans.snapshot()
        roots = [s for s in spans if s.name == "job render" and s.attributes.get("a2v.job_id") == job.id]
        return [s for s in spans if roots and s.trace_id == roots[0].trace_id]

    wait_until(lambda: wanted <= {s.service for s in job_trace()}, timeout=30, interval=0.5)
    trace = job_trace()
    spans = stack.spans.snapshot()
    assert trace, f"no 'job render' span of the job among {len(spans)}: {sorted({(s.service, s.name) for s in spans})}"
    assert wanted <= {s.service for s in trace}, sorted({(s.service, s.name, s.trace_id[:8]) for s in spans})
    names = {s.name for s in trace}
    assert {f"stage {stage}" for stage in STAGES} <= names
    assert {"chunk 0-30 texture", "chunk 30-60 texture", "chunk 0-30 composite", "chunk 30-60 composite"} <= names
    # Only the calls about the job (WatchJob, GetJob: the client's own traces) are elsewhere.
    elsewhere = {
        s.name
        for s in stack.spans.snapshot()
        if s.attributes.get("a2v.job_id") == job.id and s.trace_id != trace[0].trace_id
    }
    assert all(name.startswith("/audio2video.orchestrator.v1.OrchestratorService/") for name in elsewhere), elsewhere
    for span in trace:
        if span.service != "a2v-tfserving":  # TF Serving's calls carry no request id of ours
            assert span.attributes.get("a2v.job_id") == job.id, (span.service, span.name)

    # Logs: every service that handled the job's calls wrote lines with its id (and the request's and trace's).
    logs = Path(stack.env["A2V_STACK_DIR"]) / "logs"
    seen: dict[str, list[dict]] = {}
    for path in logs.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if job.id not in line:
                continue
            entry = json.loads(line)
            seen.setdefault(path.stem.split("-")[0], []).append(entry)
    assert set(seen) >= {*STAGE_SERVICES, "orchestrator"}
    for component, entries in seen.items():
        for entry in entries:
            assert entry.get("job_id") == job.id, (component, entry)
            if component in STAGE_SERVICES:  # the job's calls: inside the job's trace
                assert entry.get("trace_id") == trace[0].trace_id, (component, entry)
