"""Composite, issue 14: per-frame confidence, and the fallback to the target's own mouth, cross-faded."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import pytest

from deploy.samples import SAMPLE_DATA
from services.composite.core import (
    RenderOptions,
    factor_score,
    fade_weights,
    frame_confidence,
    render_frames,
    render_segment,
)
from services.composite.render import composite_frame
from services.face.core import analyze_video
from services.face.landmarks import LandmarkDetector
from services.runtime.media import iter_frames
from tests.face.helpers import encode_clip

OBAMA = SAMPLE_DATA / "speakers" / "obama" / "obama_clip1.mp4"
N = 40
TURNED = range(15, 25)  # frames whose head turns past the limit

pytestmark = pytest.mark.skipif(not OBAMA.is_file(), reason="shared data not present")


@pytest.fixture(scope="module")
def clip():
    """40 real frames, their analysis and decoded frames; textures are other frames' crops (other mouths)."""
    data = encode_clip([f for _, _, f in iter_frames(OBAMA, stop=N)])
    analysis = analyze_video(data, detector=LandmarkDetector())
    assert analysis.face_valid.all()
    frames = [f for _, _, f in iter_frames(data)]
    other = (np.arange(N) + 13) % N
    return data, analysis, frames, other


def turned_poses(analysis) -> np.ndarray:
    poses = analysis.head_pose.copy()
    poses[list(TURNED), 0] = np.radians(45.0)  # past max_yaw_degrees (35)
    return poses


def render(clip, **kwargs):
    data, a, _, other = clip
    n = kwargs.pop("n", N)
    start = kwargs.pop("start", 0)
    rows = slice(start, start + n)
    return list(
        render_frames(
            data,
            np.arange(N)[rows],
            a.landmarks,
            a.face_valid,
            a.crops[other][rows],
            a.canonical_mouth[other][rows],
            texture_masks=a.crop_masks[other][rows],
            geometry=a.geometry,
            head_pose=turned_poses(a),
            landmark_jitter=a.landmark_jitter,
            **kwargs,
        )
    )


def test_scores_and_fades():
    assert factor_score(10.0, 40.0) == 1.0 and factor_score(30.0, 40.0) == 1.0  # full up to 3/4 of the limit
    assert factor_score(35.0, 40.0) == pytest.approx(0.5) and factor_score(40.0, 40.0) == 0.0
    assert factor_score(float("nan"), 40.0) == 1.0  # unknown: no objection
    confidence, reason = frame_confidence({"yaw": 33.0, "pitch": 29.0}, {"yaw": 40.0, "pitch": 30.0})
    assert reason == "pitch" and confidence == pytest.approx(4 * (1 - 29 / 30))
    assert frame_confidence({"yaw": 1.0}, {"yaw": 40.0}) == (1.0, "")
    own = np.zeros(12, bool)
    own[6] = True
    np.testing.assert_allclose(fade_weights(own, 2), [1, 1, 1, 1, 2 / 3, 1 / 3, 0, 1 / 3, 2 / 3, 1, 1, 1])
    assert (fade_weights(own, 0) == ~own).all()
    with pytest.raises(Exception, match="fade_frames"):
        RenderOptions(fade_frames=-1)
    with pytest.raises(Exception, match="max_yaw_degrees"):
        RenderOptions(max_yaw_degrees=0.0)


def test_a_face_turned_past_the_limit_keeps_its_own_mouth_cross_faded(clip):
    _, _, frames, _ = clip
    out = render(clip, options=RenderOptions(fade_frames=4))
    assert len(out) == N
    blend = np.array([o.blend for o in out])
    expected = fade_weights(np.isin(np.arange(N), TURNED), 4)
    np.testing.assert_allclose(blend, expected, atol=1e-12)
    for i in TURNED:  # the target's own frame, byte for byte
        assert not out[i].composited and out[i].reason == "yaw" and out[i].confidence == 0.0
        assert np.array_equal(out[i].image, frames[i])
    assert all(out[i].composited and out[i].blend == 1.0 for i in (0, 5, 35))
    # The fade: a faded frame differs from its own by about its blend's share of what the full blend changes.
    data, a, frames, other = clip
    for i in (11, 12, 13, 14, 25, 26, 27, 28):
        full = composite_frame(
            frames[i],
            a.landmarks[i],
            a.crops[other[i]],
            geometry=a.geometry,
            synth_mouth=a.canonical_mouth[other[i]],
            texture_mask=a.crop_masks[other[i]],
        )
        share = np.abs(out[i].image.astype(int) - frames[i]).sum() / np.abs(full.image.astype(int) - frames[i]).sum()
        assert 0 < out[i].blend < 1 and abs(share - out[i].blend) < 0.1, (i, share, out[i].blend)
    # The faded frames are the blends of their strength, jaw correction included.
    i = 13
    faded = composite_frame(
        frames[i],
        a.landmarks[i],
        a.crops[other[i]],
        geometry=a.geometry,
        synth_mouth=a.canonical_mouth[other[i]],
        mean_jaw=None,
        texture_mask=a.crop_masks[other[i]],
        strength=0.4,
    )
    assert np.array_equal(out[i].image, faded.image)


def test_fades_run_across_chunk_seams(clip):
    """Two chunks split inside a fade, each given 4 frames of context, equal one run over the whole clip."""
    options = RenderOptions(fade_frames=4)
    whole = render(clip, options=options)
    first = render(clip, n=12 + 4, options=options, context=(0, 4))  # frames 0-11, judged up to 15
    second = render(clip, start=12 - 4, n=N - 8, options=options, context=(4, 0))  # frames 12-39
    assert len(first) == 12 and len(second) == N - 12
    for a, b in zip(whole, first + second, strict=True):
        assert a.blend == b.blend and np.array_equal(a.image, b.image)
    # Without the context, the first chunk cannot see the turn coming: frame 11 would pop.
    blind = render(clip, n=12, options=options)
    assert blind[11].blend == 1.0 and whole[11].blend < 1.0


def test_segment_summary_counts_the_fallback(clip, tmp_path):
    data, a, _, other = clip
    summary = render_segment(
        data,
        np.arange(N),
        a.landmarks,
        a.face_valid,
        a.crops[other],
        a.canonical_mouth[other],
        io.BytesIO(),
        width=a.info.width,
        height=a.info.height,
        fps=Fraction(30),
        texture_masks=a.crop_masks[other],
        geometry=a.geometry,
        options=RenderOptions(fade_frames=4),
        head_pose=turned_poses(a),
        landmark_jitter=a.landmark_jitter,
    )
    assert summary.frames_written == N
    assert summary.frames_low_confidence == len(TURNED) and summary.frames_passthrough == len(TURNED)
    assert summary.frames_faded == 8 and summary.frames_synthesized == N - len(TURNED) - 8
    assert summary.frames_composited == summary.frames_synthesized + summary.frames_faded
    assert summary.reasons[20] == "yaw" and summary.values[20] == pytest.approx(45.0, abs=1e-3)
    assert (summary.confidence[list(TURNED)] == 0).all() and summary.blend.shape == (N,)
