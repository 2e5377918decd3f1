"""The sync estimator on real footage: its own lag, known audio shifts, the file API and the command line."""

import json
import re

import numpy as np
import pytest

from evaluation.cli import main
from evaluation.evaluate import evaluate_sync, mouth_opening, sync_of_analysis
from evaluation.sync import shift_samples
from services.audio.core import decode_audio, encode_wav
from services.face.core import LandmarkDetector, analyze_video
from tests.conftest import SHARED_DATA
from tests.face.helpers import encode_clip

OBAMA = SHARED_DATA / "speakers" / "obama" / "obama_clip2.mp4"
FEIFEI = SHARED_DATA / "speakers" / "feifeili" / "feifeili_clip1.mp4"

pytestmark = pytest.mark.skipif(not (OBAMA.is_file() and FEIFEI.is_file()), reason="shared data not present")


@pytest.fixture(scope="module")
def detector() -> LandmarkDetector:
    return LandmarkDetector()


@pytest.fixture(scope="module")
def obama(detector):
    """obama_clip2 (902 frames, 256 x 256, 30 fps) analysed once (~7 s), with its decoded audio."""
    return analyze_video(OBAMA, detector=detector), decode_audio(OBAMA).samples


@pytest.mark.parametrize("shift", [-5, -2, 2, 5])
def test_shifting_the_real_audio_moves_the_measured_lag_by_the_shift(obama, shift):
    analysis, samples = obama
    own, _ = sync_of_analysis(analysis, samples)
    moved, _ = sync_of_analysis(analysis, shift_samples(samples, shift, fps=analysis.info.fps))
    # Delaying the audio by s frames puts the video s frames further ahead of it: the lag drops by s.
    assert moved.lag_frames - own.lag_frames == -shift
    assert moved.lag_refined_frames - own.lag_refined_frames == pytest.approx(-shift, abs=0.1)
    assert moved.peak_correlation == pytest.approx(own.peak_correlation, abs=0.03)


def test_obama_footage_has_a_distinct_peak_with_the_mouth_slightly_ahead(obama):
    analysis, samples = obama
    own, envelope = sync_of_analysis(analysis, samples)
    # Measured -2 frames (-67 ms; refined -2.4), peak r 0.48: the mouth leads this clip's audio, as
    # ../shared/data/PROVENANCE.md notes for the Obama clips (2 to 5 frames in its crude check).
    assert own.lag_frames == -2
    assert own.peak_correlation > 0.4 and own.confidence > 0.4
    assert own.frames_used == 900 and envelope.shape == (902,)  # the audio ends 50 ms before the last 2 frames
    assert np.isfinite(mouth_opening(analysis)).all()


def test_real_footage_with_its_own_audio_is_in_sync_within_a_frame(detector, tmp_path):
    """feifeili_clip1 through the file API, with its own track and with a separate, delayed audio file."""
    own = evaluate_sync(FEIFEI, detector=detector, progress=False)
    assert abs(own.video.sync.lag_frames) <= 1  # measured 0 (refined -0.2), peak r 0.43
    assert own.video.sync.peak_correlation > 0.3
    audio = decode_audio(FEIFEI)
    delayed = type(audio)(
        shift_samples(audio.samples, 3, fps=30.0), 16000, 16000, 1, "pcm_f32le", audio.duration_seconds
    )
    wav = tmp_path / "delayed.wav"
    wav.write_bytes(encode_wav(delayed))
    shifted = evaluate_sync(FEIFEI, audio=wav, detector=detector, progress=False)
    assert shifted.video.sync.lag_frames == own.video.sync.lag_frames - 3
    assert shifted.as_dict()["video"]["audio"] == str(wav)


def test_the_sync_command_writes_json_and_an_html_report_with_its_plots(tmp_path, capsys):
    json_path, html_path = tmp_path / "r.json", tmp_path / "r.html"
    timings = tmp_path / "t.json"
    timings.write_text(json.dumps({"stages": {"face": 7.0, "texture": 12.3}}))
    code = main(["sync", str(FEIFEI), "--json", str(json_path), "--html", str(html_path), "--timings", str(timings)])
    assert code == 0
    captured = capsys.readouterr()
    assert "feifeili_clip1.mp4: lag" in captured.out and "face: 302/302 frames (100 %)" in captured.err
    data = json.loads(json_path.read_text())
    sync = data["video"]["sync"]
    assert abs(sync["lag_frames"]) <= 1 and len(sync["correlation"]) == 31
    assert sync["lag_convention"] == "positive = video behind audio"
    assert data["video"]["frames"] == 302 and data["stage_seconds"] == {"face": 7.0, "texture": 12.3}
    page = html_path.read_text()
    assert len(images_in(page)) == 4  # opening and energy, cross-correlation, frames, stage times
    assert "cross-correlation" in page and "time per stage" in page


def test_bad_input_exits_non_zero_with_one_line(tmp_path, capsys):
    assert main(["sync", str(tmp_path / "missing.mp4")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error: video not found: {tmp_path / 'missing.mp4'}"]
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(encode_clip([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(10)]))
    assert main(["sync", str(noise), "--quiet", "--json", str(tmp_path / "n.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no face found in any of the 10 frames")
    assert not (tmp_path / "n.json").exists()
    katie = SHARED_DATA / "targets" / "hdtf_katiehill_512.mp4"
    assert main(["output", str(FEIFEI), "--target", str(katie), "--quiet"]) == 1  # refused before any analysis
    assert capsys.readouterr().err.strip() == "error: output is 256x256 but the target is 512x512"
    with pytest.raises(SystemExit) as usage:
        main(["output", str(FEIFEI)])  # --target missing
    assert usage.value.code == 2


def test_the_output_command_scores_a_blurred_render_against_its_target(tmp_path, capsys):
    """A stand-in output: feifeili_clip1 blurred (sigma 1.5 px) and re-encoded without audio, played with the clip's
    own audio; the target is the clip itself. Blur must show as lost sharpness, not as a lag."""
    import cv2

    from services.runtime.media import iter_frames

    blurred = tmp_path / "blurred.mp4"
    frames = [cv2.GaussianBlur(frame, (0, 0), 1.5) for _, _, frame in iter_frames(FEIFEI)]
    blurred.write_bytes(encode_clip(frames))
    json_path, html_path = tmp_path / "o.json", tmp_path / "o.html"
    args = ["output", str(blurred), "--target", str(FEIFEI), "--audio", str(FEIFEI), "--quiet"]
    assert main([*args, "--json", str(json_path), "--html", str(html_path), "--strip-frames", "4"]) == 0
    assert "blurred.mp4: lag" in capsys.readouterr().out
    data = json.loads(json_path.read_text())
    relative, output, target = data["relative"], data["output"], data["target"]
    assert relative["mouth_sharpness_ratio"] < 0.5  # measured 0.27
    assert abs(relative["lag_minus_target_lag_frames"]) <= 1
    assert relative["flicker_silent_ratio"] < 1.0  # blur also smooths frame-to-frame noise
    assert 0.5 < relative["seam_energy_ratio"] < 1.5  # blurred everywhere: no seam of its own
    assert 0.8 < relative["mouth_opening_spread_ratio"] < 1.25  # the same mouth, blurred, moves as much
    assert target["mouth_opening"]["frames"] == 302 and 0.02 < target["mouth_opening"]["std"] < 0.2
    assert output["silent_frames"] == target["silent_frames"] == 49
    assert output["flicker_silent"]["pairs"] > 20 and target["frames"] == output["frames"] == 302
    page = html_path.read_text()
    # two opening plots, cross-correlation, target/output strip, artifacts per frame, worst frames
    assert len(images_in(page)) == 6
    assert "frames: target (top) and output (bottom)" in page
    artifacts = data["artifacts"]  # blur brings no foreign colour or edge
    assert artifacts["frames_measured"] == 302 and artifacts["p95"] < 0.05 and artifacts["flagged_frames"] == []


def test_an_output_longer_than_its_target_is_not_scored_for_artifacts_frame_by_frame(tmp_path, capsys):
    """A re-timed render (the demo: 60 s of audio onto a 30 s target) shows other target frames than its own
    index: without the job's retiming map, comparing frame i with target frame i flagged hundreds of clean frames."""
    from services.runtime.media import iter_frames

    frames = [frame for _, _, frame in iter_frames(FEIFEI)]
    longer = tmp_path / "longer.mp4"
    longer.write_bytes(encode_clip(frames + frames[::-1]))  # played forth and back, as a re-timed loop does
    json_path = tmp_path / "o.json"
    args = ["output", str(longer), "--target", str(FEIFEI), "--audio", str(FEIFEI), "--quiet", "--no-html"]
    assert main([*args, "--json", str(json_path)]) == 0
    assert "artifacts not measured: the output has 604 frames and the target 302" in capsys.readouterr().out
    data = json.loads(json_path.read_text())
    assert "artifacts" not in data and "--job" in data["artifacts_skipped"]


def images_in(page: str) -> list[str]:
    return re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)


def test_a_video_without_audio_is_refused_or_measured_without_sync(detector, tmp_path):
    from evaluation.evaluate import measure_video
    from services.runtime.errors import InvalidInput
    from services.runtime.media import iter_frames

    silent_video = tmp_path / "mute.mp4"
    silent_video.write_bytes(encode_clip([frame for _, _, frame in iter_frames(FEIFEI, stop=40)]))
    with pytest.raises(InvalidInput, match="no audio stream"):
        measure_video(silent_video, detector=detector, image_metrics=False, strip_frames=0, progress=False)
    measured = measure_video(
        silent_video, detector=detector, image_metrics=False, strip_frames=0, progress=False, audio_optional=True
    )
    assert measured.sync is None and measured.sync_error.startswith("no audio: no audio stream")
    assert measured.audio is None and not measured.silent.any() and measured.flicker.pairs == 0
    assert measured.as_dict()["audio_seconds"] is None and measured.analysis.frame_count == 40
