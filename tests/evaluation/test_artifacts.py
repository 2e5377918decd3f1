"""The artifact measure of `a2v eval output` (issue 14): background pasted into a few frames of a clean render is
flagged in exactly those frames; the clean render in none."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from deploy.samples import SAMPLE_DATA
from evaluation.evaluate import ARTIFACT_FLAG, measure_artifacts
from evaluation.image import frame_artifacts
from services.composite.artifacts import artifact_maps, artifact_score
from services.composite.core import RenderOptions, render_segment
from services.face.core import analyze_video
from services.face.landmarks import LandmarkDetector
from services.runtime.canonical import interocular_distance
from services.runtime.errors import InvalidInput
from services.runtime.media import iter_frames
from tests.face.helpers import encode_clip

CLIP = SAMPLE_DATA / "targets" / "hdtf_katiehill_512.mp4"
N = 30
PASTED = (4, 11, 23)

pytestmark = pytest.mark.skipif(not CLIP.is_file(), reason="shared data not present")


def paste_background(frame: np.ndarray, landmarks: np.ndarray, where: str) -> np.ndarray:
    """A square of the frame's own background (its top-left corner), a fifth of the face wide, on the chin or a
    cheek."""
    side = int(0.45 * interocular_distance(landmarks))
    patch = frame[4 : 4 + side, 4 : 4 + side].copy()
    centre = (landmarks[57] + landmarks[8]) / 2 if where == "chin" else (landmarks[4] + landmarks[48]) / 2
    x0, y0 = (centre - side / 2).astype(int)
    out = frame.copy()
    out[y0 : y0 + side, x0 : x0 + side] = patch
    return out


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    """A target clip, a clean render of it (other frames' lower faces composited in), and the same render with
    background pasted into frames PASTED; their analyses."""
    folder = tmp_path_factory.mktemp("artifacts")
    frames = [f for _, _, f in iter_frames(CLIP, stop=N)]
    target = folder / "target.mp4"
    target.write_bytes(encode_clip(frames))
    detector = LandmarkDetector()
    a = analyze_video(target, detector=detector)
    assert a.face_valid.all()
    other = (np.arange(N) + 7) % N
    clean = folder / "clean.mp4"
    render_segment(
        str(target),
        np.arange(N),
        a.landmarks,
        a.face_valid,
        a.crops[other],
        a.canonical_mouth[other],
        str(clean),
        width=a.info.width,
        height=a.info.height,
        fps=Fraction(25),
        texture_masks=a.crop_masks[other],
        geometry=a.geometry,
        options=RenderOptions(crf=16),
    )
    rendered = [f for _, _, f in iter_frames(clean)]
    for i in PASTED:
        rendered[i] = paste_background(rendered[i], a.landmarks[i], "chin" if i % 2 else "cheek")
    broken = folder / "broken.mp4"
    broken.write_bytes(encode_clip(rendered))
    return target, a, clean, analyze_video(clean, detector=detector), broken, analyze_video(broken, detector=detector)


def test_pasted_background_is_flagged_in_exactly_those_frames(renders):
    target, a, clean, a_clean, broken, a_broken = renders
    report = measure_artifacts(broken, target, a_broken, a)
    assert report.flagged == list(PASTED), report.total.round(3).tolist()
    total = report.total
    assert np.isfinite(total).all() and total.shape == (N,)
    others = np.delete(total, PASTED)
    assert total[list(PASTED)].min() > 4 * max(others.max(), ARTIFACT_FLAG / 4)
    assert [i for i, _ in report.worst[:3]] == sorted(PASTED, key=lambda i: -total[i])
    assert report.worst[0][1].ndim == 3  # the crop: target | output | marked
    data = report.as_dict()
    assert data["flagged_frames"] == list(PASTED) and data["frames_measured"] == N
    assert data["worst_frames"][0]["frame"] in PASTED

    plain = measure_artifacts(clean, target, a_clean, a)
    assert plain.flagged == [] and np.nanpercentile(plain.total, 95) < 0.2 * ARTIFACT_FLAG


def test_artifact_maps_properties():
    rng = np.random.default_rng(1)
    image = rng.integers(60, 200, (40, 50, 3), dtype=np.uint8)
    colour, edges = artifact_maps(image, image, radius_px=3)
    assert colour.max() == 0 and edges.max() == 0  # an image explains itself
    odd = image.copy()
    odd[10:20, 10:20] = (0, 255, 0)  # a colour found nowhere in the reference
    colour, edges = artifact_maps(odd, image, radius_px=3)
    assert colour[12:18, 12:18].min() > 30 and colour[30:, 30:].max() == 0 and edges.max() > 0
    score = artifact_score(odd, image, np.ones((40, 50), bool), radius_px=3)
    assert score.colour > 1 and score.pixels == 2000
    empty = artifact_score(odd, image, np.zeros((40, 50), bool), radius_px=3)
    assert empty.pixels == 0 and np.isnan(empty.total)
    with pytest.raises(InvalidInput):
        artifact_maps(image, image[:10], radius_px=3)
    with pytest.raises(InvalidInput):
        artifact_maps(image, image, radius_px=0.5)


def test_frame_artifacts_of_a_frame_with_itself_is_zero(renders):
    target, a, *_ = renders
    frame = next(f for _, _, f in iter_frames(target, stop=1))
    score = frame_artifacts(frame, frame, a.landmarks[0], output_landmarks=a.landmarks[0])
    assert score.total == 0 and score.pixels > 1000
    with pytest.raises(InvalidInput):
        frame_artifacts(frame, frame[:100], a.landmarks[0])
