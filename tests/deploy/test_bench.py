"""`a2v bench`: real-time factors from job records, audio slices, memory readings, the table; one quick real run."""

import json
import os
import subprocess
import sys
import wave

import numpy as np
import pytest

from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from deploy.bench import end_to_end as bench
from deploy.local import EXTRA_REPLICA_PORT_STEP, STACK_COMPONENTS, _alive, read_env_file
from deploy.ports import isolated_stack_env, ports_free
from services.runtime.config import parse_address
from tests.conftest import REPO

PROC_STATUS = """Name:\tpython
Umask:\t0022
State:\tS (sleeping)
VmPeak:\t 2345676 kB
VmSize:\t 2345000 kB
VmHWM:\t  716800 kB
VmRSS:\t  512000 kB
RssAnon:\t  400000 kB
Threads:\t17
"""


def stamp(message, seconds: float) -> None:
    message.seconds, message.nanos = int(seconds), round((seconds - int(seconds)) * 1e9)


def finished_job(output_seconds=10.0) -> pb.Job:
    """A render job as GetJob returns it: ran from t = 1000.5 to 1012.5 (12 s), texture in two parallel chunks."""
    job = pb.Job(id="job1", kind=pb.JOB_KIND_RENDER, state=pb.JOB_STATE_SUCCEEDED)
    stamp(job.created, 1000.0)
    stamp(job.started, 1000.5)
    stamp(job.finished, 1012.5)
    job.render_result.duration_seconds = output_seconds
    job.render_result.frame_count = round(output_seconds * 25)
    for stage, busy, begin, end, cached, cached_calls in (
        (pb.STAGE_FACE, 0.25, 1000.5, 1000.75, True, 1),
        (pb.STAGE_AUDIO, 0.5, 1000.5, 1001.0, False, 0),
        (pb.STAGE_TEXTURE, 14.0, 1001.0, 1009.0, False, 0),  # 2 chunks of 7 s side by side
        (pb.STAGE_COMPOSITE, 6.0, 1001.0, 1011.0, False, 0),
    ):
        status = job.stages.add(stage=stage, state=pb.STAGE_STATE_SUCCEEDED, busy_seconds=busy, attempts=2)
        status.cached, status.cached_calls = cached, cached_calls
        stamp(status.started, begin)
        stamp(status.finished, end)
    return job


# -- real-time factors from a job ------------------------------------------------------------------


def test_job_timing_gives_wall_and_per_stage_real_time_factors():
    timing = bench.job_timing(finished_job(10.0))
    assert timing["wall_seconds"] == pytest.approx(12.0)
    assert timing["rtf_wall"] == pytest.approx(1.2)
    assert timing["queue_seconds"] == pytest.approx(0.5)
    assert timing["frames"] == 250
    texture = timing["stages"]["texture"]
    assert texture["busy_seconds"] == pytest.approx(14.0)
    assert texture["rtf"] == pytest.approx(1.4)  # busy over output: more than the wall RTF (parallel chunks)
    assert texture["wall_seconds"] == pytest.approx(8.0)
    assert texture["attempts"] == 2 and texture["cached_calls"] == 0 and not texture["cached"]
    assert timing["stages"]["face"]["cached"] and timing["stages"]["face"]["cached_calls"] == 1
    assert timing["rtf_busy_sum"] == pytest.approx((0.25 + 0.5 + 14.0 + 6.0) / 10.0)
    assert list(timing["stages"]) == ["face", "audio", "texture", "composite"]


def test_job_timing_uses_the_given_output_seconds():
    timing = bench.job_timing(finished_job(10.0), output_seconds=24.0)
    assert timing["rtf_wall"] == pytest.approx(0.5)
    assert timing["stages"]["composite"]["rtf"] == pytest.approx(0.25)


def test_job_timing_refuses_a_job_without_output_or_times():
    with pytest.raises(ValueError, match="no output duration"):
        bench.job_timing(finished_job(0.0))
    unfinished = finished_job()
    unfinished.ClearField("finished")
    with pytest.raises(ValueError, match="no start or end time"):
        bench.job_timing(unfinished)


def test_headline_is_the_largest_target_with_cached_analysis_and_the_longest_audio():
    def case(target, width, seconds, rtf, cached=True):
        return {"target": target, "file": f"{target}.mp4", "width": width, "height": width, "audio_seconds": seconds,
                "wall_seconds": rtf * seconds, "rtf_wall": rtf, "analysis_cached": cached}  # fmt: skip

    cases = [case("256x256", 256, 60, 0.5), case("512x512", 512, 10, 0.9), case("512x512", 512, 60, 1.25)]
    cases.append(case("1920x1080", 1920, 60, 3.0, cached=False))
    headline = bench.pick_headline(cases)
    assert headline["target"] == "512x512" and headline["audio_seconds"] == 60
    assert headline["rtf"] == pytest.approx(1.25) and headline["real_time"] is False
    assert headline["wall_seconds"] == pytest.approx(75.0)
    assert bench.pick_headline([case("256x256", 256, 4, 0.8, cached=False)])["real_time"] is True
    assert bench.pick_headline([]) is None


def test_stage_timings_are_what_the_evaluation_report_reads():
    from evaluation.report import load_stage_timings

    case = {"target": "512x512", "audio_seconds": 10.0, **bench.job_timing(finished_job(10.0))}
    timings = bench.stage_timings(case)
    assert load_stage_timings(timings) == {"face": 0.25, "audio": 0.5, "texture": 14.0, "composite": 6.0}
    assert timings["wall_seconds"] == pytest.approx(12.0)


# -- audio slices -----------------------------------------------------------------------------------


def write_wav(path, samples: np.ndarray, rate: int = 1000) -> None:
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(samples.shape[1])
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(samples.astype("<i2").tobytes())


def read_wav(path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as reader:
        data = np.frombuffer(reader.readframes(reader.getnframes()), "<i2").reshape(-1, reader.getnchannels())
        return data, reader.getframerate()


def test_slice_wav_cuts_from_an_offset_and_wraps_around(tmp_path):
    source = tmp_path / "ramp.wav"
    ramp = np.stack([np.arange(2000), -np.arange(2000)], axis=1)  # 2 s stereo at 1 kHz
    write_wav(source, ramp)
    seconds = bench.slice_wav(source, tmp_path / "out.wav", start_seconds=1.5, seconds=1.0)
    out, rate = read_wav(tmp_path / "out.wav")
    assert seconds == 1.0 and rate == 1000 and out.shape == (1000, 2)
    expected = np.r_[np.arange(1500, 2000), np.arange(0, 500)]
    assert np.array_equal(out[:, 0], expected) and np.array_equal(out[:, 1], -expected)
    # Longer than the source: it repeats; the offset is taken modulo the duration.
    bench.slice_wav(source, tmp_path / "long.wav", start_seconds=4.25, seconds=5.0)
    long, _ = read_wav(tmp_path / "long.wav")
    assert len(long) == 5000 and np.array_equal(long[:, 0], (250 + np.arange(5000)) % 2000)


def test_slice_wav_salt_changes_only_the_first_samples_slightly(tmp_path):
    source = tmp_path / "tone.wav"
    write_wav(source, (8000 * np.sin(np.arange(3000) / 5.0))[:, None])
    plain = tmp_path / "plain.wav"
    bench.slice_wav(source, plain, start_seconds=0.0, seconds=2.0)
    salted = [tmp_path / f"salt{salt}.wav" for salt in (1, 2, 0x10203)]
    for path, salt in zip(salted, (1, 2, 0x10203), strict=True):
        bench.slice_wav(source, path, start_seconds=0.0, seconds=2.0, salt=salt)
    blobs = {plain.read_bytes(), *(p.read_bytes() for p in salted)}
    assert len(blobs) == 4  # every salt gives other bytes, hence other cache keys
    a, _ = read_wav(plain)
    b, _ = read_wav(salted[2])
    assert np.array_equal(a[4:], b[4:])
    assert np.abs(b[:4].astype(int)).max() <= 128
    assert b[:4, 0].tolist() == [3 - 128, 2 - 128, 1 - 128, -128]


def test_slice_wav_refuses_what_it_cannot_cut(tmp_path):
    source = tmp_path / "eight_bit.wav"
    with wave.open(str(source), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(1)
        writer.setframerate(8000)
        writer.writeframes(bytes(800))
    with pytest.raises(bench.BenchError, match="16-bit"):
        bench.slice_wav(source, tmp_path / "out.wav", start_seconds=0, seconds=0.05)
    with pytest.raises(bench.BenchError, match="> 0 s"):
        bench.slice_wav(source, tmp_path / "out.wav", start_seconds=0, seconds=0)
    text = tmp_path / "text.wav"
    text.write_text("not audio")
    with pytest.raises(bench.BenchError, match="not a readable PCM WAV"):
        bench.slice_wav(text, tmp_path / "out.wav", start_seconds=0, seconds=1)


# -- memory and CPU --------------------------------------------------------------------------------


def test_parse_proc_status_reads_peak_and_current_resident_memory():
    values = bench.parse_proc_status(PROC_STATUS)
    assert values["VmHWM"] == 716800 * 1024 and values["VmRSS"] == 512000 * 1024
    assert values["VmPeak"] == 2345676 * 1024
    assert "Threads" not in values and "RssAnon" not in values
    assert bench.parse_proc_status("") == {}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc")
def test_process_memory_and_cpu_of_this_process():
    memory = bench.process_memory(os.getpid())
    assert memory["source"] == "VmHWM"
    assert memory["peak_rss_bytes"] >= memory["rss_bytes"] > 10 * 2**20
    assert bench.cpu_seconds({"me": os.getpid()})["me"] > 0
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert bench.process_memory(gone.pid) == {} and bench.cpu_seconds({"gone": gone.pid}) == {}


# -- the table -------------------------------------------------------------------------------------


def sample_report(rtf_512: float) -> dict:
    cases = []
    for target, width, seconds, rtf in (("256x256", 256, 10.0, 0.61), ("512x512", 512, 60.0, rtf_512)):
        timing = bench.job_timing(finished_job(10.0))
        timing |= {"audio_seconds": seconds, "rtf_wall": rtf, "wall_seconds": rtf * seconds, "rtf_cpu": 1.7}
        timing |= {"output_seconds": seconds, "cpu_seconds": {"texture": 30.0, "texture-2": 24.0, "composite": 12.0}}
        cases.append(
            {
                "target": target,
                "file": "x.mp4",
                "width": width,
                "height": width,
                "analysis_cached": True,
                "fresh": True,
                **timing,
            }  # fmt: skip
        )
    report = {
        "host": {"cpus": 2},
        "settings": {"replicas": 2, "speaker": "bench"},
        "cases": cases,
        "targets": {
            "512x512": {
                "file": "katie.mp4",
                "frames": 200,
                "analysis": {
                    "busy_seconds": 4.0,
                    "cached": False,
                    "warmup_audio_seconds": 4.0,
                    "warmup_wall_seconds": 9.0,
                    "warmup_rtf_wall": 2.25,
                },
            },  # fmt: skip
        },
        "texture_replicas": {
            "target": "512x512",
            "frames": 240,
            "chunk": 30,
            "frames_per_second": {"1": 20.0, "2": 38.0},
            "speedup": {"1": 1.0, "2": 1.9},
        },  # fmt: skip
        "memory": {"texture": {"peak_rss_bytes": 300 * 2**20, "source": "VmHWM"}},
        "naive_references": {"retiming": {"error": "exit status 1: boom"}},
        "errors": ["texture replica scaling: RuntimeError: x"],
    }
    report["headline"] = bench.pick_headline(cases)
    return report


def test_table_shows_cases_headline_replicas_memory_and_what_failed():
    text = bench.format_table(sample_report(0.84))
    rows = [line for line in text.splitlines() if line.startswith(("256x256", "512x512 "))]
    assert len(rows) == 4  # the RTF table, then the CPU table
    assert rows[1].split()[:7] == ["512x512", "60", "s", "250", "50.4", "0.84", "1.70"]
    assert "1.400" in rows[1] and "0.600" in rows[1]  # texture and composite busy RTFs
    assert ">>> 512x512 target (cached analysis), 60 s of audio: end-to-end RTF 0.84" in text
    assert "MEETS real time" in text
    assert "200 frames analysed in 4.0 s (50 frames/s)" in text
    assert "2 replicas    38.0 frames/s  (1.90x)" in text
    assert "texture             300 MiB" in text
    assert "retiming: could not run (exit status 1: boom)" in text
    assert "  - texture replica scaling: RuntimeError: x" in text
    assert rows[3].split() == ["512x512", "60", "s", "1.10", "|", "0.900", "0.200"]  # texture (2 replicas), composite
    assert "does NOT meet real time" in bench.format_table(sample_report(1.3))


def test_cpu_by_service_adds_replicas_up():
    merged = bench.cpu_by_service({"texture": 2.0, "texture-2": 1.5, "texture-3": 0.5, "s3": 0.25})
    assert merged == {"texture": 4.0, "s3": 0.25}


# -- the private stack's environment and the command line -------------------------------------------


def test_isolated_stack_env_uses_free_ports_of_its_own(tmp_path):
    environ = {"PATH": os.environ["PATH"], "MAKEFLAGS": "s", "A2V_OTHER_ADDR": "127.0.0.1:50050"}
    env = isolated_stack_env(tmp_path / "stack", replicas=3, environ=environ)
    assert env["A2V_OTHER_ADDR"] != "127.0.0.1:50050"  # an address this stack does not start is not shared either
    developer = read_env_file()
    assert env["A2V_STACK_DIR"] == str(tmp_path / "stack") and env["A2V_TEXTURE_REPLICAS"] == "3"
    assert env["A2V_S3_ACCESS_KEY"] == developer["A2V_S3_ACCESS_KEY"] and "MAKEFLAGS" not in env
    ports = [parse_address(env["A2V_S3_ENDPOINT"])[1]]
    for component in STACK_COMPONENTS:
        address = env[f"A2V_{component.name.upper()}_ADDR"]
        assert address != developer.get(f"A2V_{component.name.upper()}_ADDR")
        ports.append(parse_address(address)[1])
    texture = parse_address(env["A2V_TEXTURE_ADDR"])[1]
    replicas = [texture + i * EXTRA_REPLICA_PORT_STEP for i in range(3)]
    assert len(set(ports)) == len(ports)
    assert ports_free(sorted(set(replicas + ports)))


def test_missing_data_is_one_line_and_status_1(tmp_path, capsys):
    status = bench.main(["--quick", "--targets", str(tmp_path / "none.mp4"), "--json", str(tmp_path / "b.json")])
    err = capsys.readouterr().err.strip()
    assert status == 1
    assert err.startswith("a2v bench: could not run: missing input") and "none.mp4" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "b.json").exists()


def test_bad_settings_are_refused(tmp_path, capsys):
    assert bench.main(["--durations", "0", "--json", str(tmp_path / "b.json")]) == 1
    assert "--durations must be > 0" in capsys.readouterr().err
    assert bench.main(["--running-stack", "--blas-threads", "1", "--json", str(tmp_path / "b.json")]) == 1
    assert "private stack only" in capsys.readouterr().err


def test_retiming_against_its_naive_reference_in_a_process_of_its_own(tmp_path):
    out = tmp_path / "retiming.json"
    done = subprocess.run(
        [sys.executable, "-m", "deploy.bench.micro", "retiming", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    numbers = json.loads(out.read_text())
    assert numbers["same_cost"] is True and numbers["n"] == 1800 and numbers["m"] == 9000
    assert numbers["fast_seconds"] > 0 and numbers["naive_extrapolated_seconds"] > 0
    assert numbers["speedup"] == pytest.approx(numbers["naive_extrapolated_seconds"] / numbers["fast_seconds"])


# -- one real run ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_quick_run_measures_a_real_job_and_tears_its_stack_down(tmp_path, capsys):
    out, timings = tmp_path / "bench.json", tmp_path / "timings.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0  # the timings go beside the JSON
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    assert {"host", "settings", "training", "cases", "headline", "memory", "stages", "errors"} <= set(report)
    assert report["errors"] == [] and report["failed_cases"] == []
    (case,) = report["cases"]
    assert case["target"] == "256x256" and case["frames"] == 120
    assert case["output_seconds"] == pytest.approx(4.0)
    assert case["wall_seconds"] > 0 and case["rtf_wall"] == pytest.approx(case["wall_seconds"] / 4.0)
    assert case["rtf_cpu"] > 0 and sum(case["cpu_seconds"].values()) > 0
    assert set(case["stages"]) == set(bench.RENDER_STAGES)
    for name in ("texture", "teeth", "composite"):  # real work, not a cache
        assert case["stages"][name]["busy_seconds"] > 0 and case["stages"][name]["cached_calls"] == 0, name
    assert case["fresh"] and case["analysis_cached"]  # the training clip was analysed while training
    assert report["headline"]["target"] == "256x256" and report["headline"]["rtf"] == case["rtf_wall"]
    assert json.loads(timings.read_text())["stages"] == report["stages"]
    assert report["stages"]["texture"] > 0

    names = {"s3", "orchestrator", "texture", "texture-2"} | {c.name for c in STACK_COMPONENTS}
    assert set(report["memory"]) == names
    assert all(m["peak_rss_bytes"] > 10 * 2**20 for m in report["memory"].values())
    assert not any(_alive(m["pid"]) for m in report["memory"].values())  # the private stack is gone
    assert ">>> 256x256 target (cached analysis), 4 s of audio: end-to-end RTF" in printed
