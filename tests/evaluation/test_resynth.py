"""The lip meter validated on a real clip, its baselines, and a small resynthesis through the real stack."""

import json
import math
import re

import av
import numpy as np
import pytest

from evaluation import lips
from evaluation.cli import main
from evaluation.evaluate import measure_video
from evaluation.resynth import compare_resynthesis
from services.face.core import LandmarkDetector
from services.runtime.errors import InvalidInput
from tests.conftest import SHARED_DATA

HELD_OUT = SHARED_DATA / "speakers" / "feifeili" / "feifeili_clip1.mp4"  # the e2e speaker trains on clip3
FPS = 30.0

pytestmark = pytest.mark.skipif(not HELD_OUT.is_file(), reason="shared data not present")


@pytest.fixture(scope="module")
def clip():
    """feifeili_clip1 (302 frames, 30 fps) measured once (~5 s): landmarks, its audio, its own sync."""
    return measure_video(HELD_OUT, detector=LandmarkDetector(), image_metrics=False, strip_frames=0, progress=False)


@pytest.fixture(scope="module")
def mouths(clip):
    points = lips.mouth_points(clip.analysis.landmarks).copy()
    points[~clip.analysis.face_valid] = np.nan
    return points


def shifted(mouths: np.ndarray, k: int) -> np.ndarray:
    """out[i] = mouths[i - k] (NaN where that frame does not exist): a mouth k frames behind."""
    out = np.full_like(mouths, np.nan)
    if k > 0:
        out[k:] = mouths[:-k]
    elif k < 0:
        out[:k] = mouths[-k:]
    else:
        out[:] = mouths
    return out


# ---------------------------------------------------------------------------------------------------------
# the meter on a real clip


def test_a_real_clip_against_itself_gives_r_1_lag_0_amplitude_1_and_no_lip_error(clip, mouths):
    assert clip.analysis.valid_frame_count == 302
    result = lips.compare_mouths(mouths, mouths, fps=FPS)
    assert result.opening.r_lag0 == pytest.approx(1.0, abs=1e-12)
    assert result.opening.best_lag_frames == 0 and result.opening.best_r == pytest.approx(1.0, abs=1e-12)
    assert result.opening.amplitude_ratio == pytest.approx(1.0) and result.opening.mean_ratio == pytest.approx(1.0)
    assert result.landmarks.inner == result.landmarks.outer == 0.0 and result.landmarks.frames == 302
    # The file-level comparison (resampling onto the clip's frame times, the strip) gives the same.
    parts = compare_resynthesis(clip, clip, strip_frames=2)
    render = parts["rows"]["render"]
    assert render.opening.r_lag0 == pytest.approx(1.0, abs=1e-12) and render.opening.best_lag_frames == 0
    assert render.landmarks.all == pytest.approx(0.0, abs=1e-12) and parts["times"].size == 302
    real_strip, rendered_strip = parts["strip"]
    assert [i for i, _ in real_strip] == [i for i, _ in rendered_strip] and len(real_strip) == 2


@pytest.mark.parametrize("k", [-5, -2, 2, 5])
def test_the_clip_against_itself_shifted_by_k_frames_gives_lag_k(mouths, k):
    result = lips.compare_mouths(shifted(mouths, k), mouths, fps=FPS)
    assert result.opening.best_lag_frames == k  # > 0: the candidate is behind the real mouth
    assert result.opening.best_r == pytest.approx(1.0, abs=1e-9)
    assert result.opening.r_lag0 < 0.9  # measured 0.77 at +-2 frames, 0.39 at +-5
    assert result.opening.as_dict()["best_lag_ms"] == pytest.approx(k * 1000 / FPS)


def test_a_damped_copy_of_the_clip_has_half_the_amplitude(mouths):
    normalised = lips.normalise_mouths(mouths)
    mean = lips.mean_mouth(normalised)
    damped = mean + 0.5 * (normalised - mean)  # every lip point half as far from the clip's mean mouth
    result = lips.compare_mouths(damped, mouths, fps=FPS)
    assert result.opening.amplitude_ratio == pytest.approx(0.5, abs=0.03)  # measured 0.51
    assert result.opening.r_lag0 > 0.99 and result.opening.best_lag_frames == 0
    # Half the way to the mean shape: half of the mean shape's error.
    base = lips.landmark_errors(mean, normalised)
    assert result.landmarks.inner == pytest.approx(base.inner / 2, rel=0.02)
    assert result.landmarks.outer == pytest.approx(base.outer / 2, rel=0.02)
    # On the opening series alone the ratio is exact.
    real = lips.opening(mouths)
    exact = lips.compare_openings(0.5 * real + 0.1, real, fps=FPS)
    assert exact.amplitude_ratio == pytest.approx(0.5, abs=1e-12) and exact.r_lag0 == pytest.approx(1.0)


def test_alignment_removes_pose_and_size():
    rng = np.random.default_rng(3)
    mouth = rng.normal(size=(1, 20, 2))
    angle, scale, offset = 0.4, 3.7, np.array([120.0, -40.0])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    moved = scale * mouth @ rotation.T + offset
    a, b = lips.normalise_mouths(mouth), lips.normalise_mouths(moved)
    np.testing.assert_allclose(a, b, atol=1e-12)
    corners = a[0, list(lips.CORNERS)]
    assert np.linalg.norm(corners[1] - corners[0]) == pytest.approx(1.0)
    assert corners[1, 1] - corners[0, 1] == pytest.approx(0.0, abs=1e-12) and corners[1, 0] > corners[0, 0]
    assert lips.opening(moved)[0] == pytest.approx(lips.opening(mouth)[0])
    assert np.isnan(lips.normalise_mouths(np.zeros((1, 20, 2)))).all()  # no width: no mouth


def test_resampling_is_exact_on_the_same_frames_and_linear_between():
    times = np.arange(10) / 30.0
    values = np.arange(10, dtype=float) ** 2
    np.testing.assert_array_equal(lips.resample(values, times, times), values)
    between = lips.resample(values, times, np.array([0.5 / 30.0, 9.5 / 30.0, -0.1]))
    assert between[0] == pytest.approx(0.5) and np.isnan(between[1:]).all()  # outside the source: NaN
    values[3] = np.nan
    assert np.isnan(lips.resample(values, times, np.array([2.5 / 30.0]))).all()
    assert lips.resample(values, times, np.array([2.0 / 30.0]))[0] == 4.0  # on a frame: its neighbour is moot


def test_baselines_of_the_real_clip(clip, mouths):
    base = lips.baselines(mouths, clip.audio.samples, clip.analysis.timestamps, fps=FPS)
    floor = base.loudness
    # Loudness alone follows this clip's mouth with r 0.45 at lag 0: a render must beat that.
    assert 0.3 < floor.r_lag0 < 0.6 and abs(floor.best_lag_frames) <= 2 and floor.frames == 301
    assert "amplitude_ratio" not in base.as_dict()["loudness_floor"]  # dB against a ratio: no scale
    # The clip's own mean mouth misses its lips by 0.04 mouth widths on average.
    assert 0.02 < base.mean_shape.inner < 0.08 and 0.02 < base.mean_shape.outer < 0.08
    constant = lips.compare_mouths(np.broadcast_to(mouths[:1], mouths.shape), mouths, fps=FPS)
    assert math.isnan(constant.opening.r_lag0) and constant.opening.best_lag_frames is None
    without_audio = lips.baselines(mouths, None, clip.analysis.timestamps, fps=FPS)
    assert without_audio.loudness is None and without_audio.loudness_error == "no audio"
    assert base.speaker_mean_shape is None and base.as_dict()["speaker_mean_shape"] is None
    # The speaker model's mean mouth, in its own units (here: one of the clip's mouths, moved and scaled), is
    # normalised like the real ones: it scores as that mouth held constant.
    first = next(i for i in range(len(mouths)) if np.isfinite(mouths[i]).all())
    trained = lips.baselines(mouths, None, clip.analysis.timestamps, fps=FPS, speaker_mean=3.0 * mouths[first] + 7.0)
    held = lips.landmark_errors(lips.normalise_mouths(mouths[first : first + 1])[0], lips.normalise_mouths(mouths))
    assert trained.speaker_mean_shape.inner == pytest.approx(held.inner)
    assert trained.speaker_mean_shape.outer == pytest.approx(held.outer)
    assert trained.as_dict()["speaker_mean_shape"]["inner"] == pytest.approx(held.inner)
    degenerate = lips.baselines(mouths, None, clip.analysis.timestamps, fps=FPS, speaker_mean=np.zeros((20, 2)))
    assert degenerate.speaker_mean_shape is None


def test_too_few_common_frames_are_refused(mouths):
    with pytest.raises(InvalidInput, match="only 20 frames have both mouths, need at least 31"):
        lips.compare_mouths(mouths[:20], mouths[:20], fps=FPS)
    with pytest.raises(InvalidInput, match=r"must be float \[F, 20, 2\]"):
        lips.compare_mouths(mouths[:, :10], mouths[:, :10], fps=FPS)


def test_the_command_refuses_incomplete_arguments_before_any_work(tmp_path, capsys):
    assert main(["resynth", "--clip", str(HELD_OUT), "--quiet"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: give --speaker and --target to render, or --rendered OUT.mp4 (or --job ID)"
    )
    missing = tmp_path / "missing.mp4"
    assert main(["resynth", "--clip", str(HELD_OUT), "--speaker", "x", "--target", str(missing), "--quiet"]) == 1
    assert capsys.readouterr().err.strip() == f"error: target video not found: {missing}"
    assert main(["resynth", "--clip", str(HELD_OUT), "--rendered", str(HELD_OUT), "--seconds", "1"]) == 1
    assert capsys.readouterr().err.strip() == "error: seconds must be >= 2, got 1.0"


# ---------------------------------------------------------------------------------------------------------
# a small resynthesis through the real stack


@pytest.mark.integration
def test_a_small_resynthesis_through_the_stack(e2e_stack, tmp_path, monkeypatch, capsys):
    """4 s of the held-out clip's speech rendered onto the e2e speaker's own video, through `a2v eval resynth`."""
    from tests.support.stack import SPEAKER, SPEAKER_VIDEO

    for name, value in e2e_stack.env.items():
        if name.startswith("A2V_"):
            monkeypatch.setenv(name, value)
    json_path, html_path, video = tmp_path / "r.json", tmp_path / "r.html", tmp_path / "render.mp4"
    code = main(
        [
            "resynth",
            "--speaker",
            SPEAKER,
            "--clip",
            str(HELD_OUT),
            "--target",
            str(SPEAKER_VIDEO),
            "--seconds",
            "4",
            "--out-video",
            str(video),
            "--json",
            str(json_path),
            "--html",
            str(html_path),
            "--strip-frames",
            "3",
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith("feifeili_clip1.mp4 resynthesised: opening r ")
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 120  # 4 s at the target's 30 fps

    data = json.loads(json_path.read_text())
    assert data["kind"] == "resynth" and data["compared_frames"] == 120 and data["audio_seconds"] == 4.0
    assert data["job"]["speaker"] == SPEAKER and data["job"]["retimed"] is False
    assert data["job"]["mouth_shapes_frames"] == 120 and data["job"]["stage_seconds"]["texture"] > 0
    assert data["notes"] == []  # clip1 is held out (the model trained on clip3), and the frame rates agree
    assert set(data["rows"]) == {"render", "model"}
    for name, row in data["rows"].items():
        opening, landmarks = row["opening"], row["landmarks"]
        assert -1 <= opening["r_lag0"] <= 1 and -1 <= opening["best_r"] <= 1, name
        assert abs(opening["best_lag_frames"]) <= 15 and len(opening["correlation"]) == 31, name
        assert opening["amplitude_ratio"] > 0 and opening["mean_ratio"] > 0, name
        assert 0 < landmarks["inner"] < 1 and 0 < landmarks["outer"] < 1 and landmarks["frames"] == 120, name
    baselines = data["baselines"]
    assert -1 <= baselines["loudness_floor"]["r_lag0"] <= 1 and baselines["mean_shape"]["inner"] > 0
    assert 0 < baselines["speaker_mean_shape"]["inner"] < 1  # the model's training mean mouth, from its assets
    lag = data["audio_to_mouth_lag"]
    assert abs(lag["real_frames"]) <= 15 and abs(lag["rendered_frames"]) <= 15
    assert lag["rendered_minus_real_frames"] == lag["rendered_frames"] - lag["real_frames"]

    page = html_path.read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 4  # opening curves, lag curves, real/render strip, stage times
    assert "frames at the same times: real clip (top) and render (bottom)" in page
