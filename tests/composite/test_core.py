"""Composite core on real clips: re-compositing fidelity, seams, pass-through, jaw correction, encode + finalize."""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from deploy.samples import SAMPLE_DATA
from services.composite.core import (
    RenderOptions,
    TargetFrames,
    encode_segment,
    finalize,
    render_frames,
    render_segment,
    target_color,
)
from services.composite.render import (
    BlendSettings,
    composite_frame,
    correct_jaw,
    inner_opening,
    jaw_displacement,
    jaw_taper,
    match_colors,
    pyramid_blend,
)
from services.face.core import analyze_video
from services.face.landmarks import LandmarkDetector
from services.runtime.canonical import LowerFaceWarp
from services.runtime.errors import InvalidInput

OBAMA = SAMPLE_DATA / "speakers" / "obama" / "obama_clip1.mp4"
KATIE = SAMPLE_DATA / "targets" / "hdtf_katiehill_512.mp4"
CHECK_OUTPUT = SAMPLE_DATA.parent / "tools" / "check-output"
NO_FACE = (12, 13)  # flat grey and noise frames put into the obama clip

pytestmark = pytest.mark.skipif(not (OBAMA.is_file() and KATIE.is_file()), reason="shared data not present")


# ---------------------------------------------------------------------- fixtures
def _decode(source, stop: int | None = None) -> list[np.ndarray]:
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
        frames = []
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="bgr24"))
            if stop is not None and len(frames) == stop:
                break
        return frames


def _encode(frames: list[np.ndarray], rate: Fraction) -> bytes:
    """A near-lossless H.264 clip in memory (the test's target video)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10", "preset": "veryfast"}
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buffer.getvalue()


def _wav(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(round(seconds * rate))) / rate
    samples = (np.sin(2 * np.pi * 220 * t) * 8000).astype(np.int16)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buffer.getvalue()


class Target:
    """A clip with its analysis and its decoded frames."""

    def __init__(self, data: bytes, detector: LandmarkDetector) -> None:
        self.data = data
        self.analysis = analyze_video(data, detector=detector)
        self.frames = _decode(data)
        self.rate = self.analysis.info.frame_rate


@pytest.fixture(scope="module")
def detector() -> LandmarkDetector:
    return LandmarkDetector()


@pytest.fixture(scope="module")
def obama(detector) -> Target:
    frames = _decode(OBAMA, stop=30)
    frames[NO_FACE[0]] = np.full_like(frames[0], 128)
    frames[NO_FACE[1]] = np.random.default_rng(3).integers(0, 256, frames[0].shape, dtype=np.uint8)
    return Target(_encode(frames, Fraction(30)), detector)


@pytest.fixture(scope="module")
def katie(detector) -> Target:
    return Target(_encode(_decode(KATIE, stop=6), Fraction(25)), detector)


def _psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    diff = a.astype(np.float64)[where] - b.astype(np.float64)[where]
    return float(10 * np.log10(255.0**2 / max(float((diff**2).mean()), 1e-10)))


def _frame_mask(result, shape) -> np.ndarray:
    """The blend's soft mask placed in the frame."""
    x0, y0, x1, y1 = result.box
    mask = np.zeros(shape[:2], np.float32)
    mask[y0:y1, x0:x1] = result.mask
    return mask


def _gradient_energy(image: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    return gx * gx + gy * gy


def _own(t: Target):
    a = t.analysis
    return dict(geometry=a.geometry, texture_masks=a.crop_masks)


# ---------------------------------------------------------------------- fidelity
@pytest.mark.parametrize("name", ["obama", "katie"])
def test_recompositing_own_crop_changes_little(name, request):
    t: Target = request.getfixturevalue(name)
    a = t.analysis
    n = a.frame_count
    rendered = list(
        render_frames(t.data, np.arange(n), a.landmarks, a.face_valid, a.crops, a.canonical_mouth, **_own(t))
    )
    assert len(rendered) == n
    checked = 0
    for i, out in enumerate(rendered):
        assert out.image.shape == t.frames[i].shape and out.target_index == i
        if not a.face_valid[i]:
            continue
        assert out.composited and out.jaw_shift_px == 0.0
        result = composite_frame(
            t.frames[i], a.landmarks[i], a.crops[i], geometry=a.geometry, synth_mouth=a.canonical_mouth[i]
        )
        inside = _frame_mask(result, t.frames[i].shape) > 0
        assert inside.sum() > 500
        assert _psnr(out.image, t.frames[i], inside) > 30
        assert _psnr(out.image, t.frames[i], ~inside) > 40
        checked += 1
    assert checked >= min(n - len(NO_FACE), 5)


def test_no_face_frames_pass_through_byte_identical(obama):
    a = obama.analysis
    assert not a.face_valid[list(NO_FACE)].any()
    frame_map = np.array([NO_FACE[0], 5, NO_FACE[1], 6])
    textures = a.crops[[5, 5, 6, 6]]  # any texture: the frame has no face
    texture_valid = np.array([True, True, True, False])
    out = list(
        render_frames(
            obama.data,
            frame_map,
            a.landmarks,
            a.face_valid,
            textures,
            None,
            texture_valid=texture_valid,
            texture_masks=a.crop_masks[[5, 5, 6, 6]],
            geometry=a.geometry,
        )
    )
    assert [o.composited for o in out] == [False, True, False, False]
    for o, k in zip(out, frame_map, strict=True):
        if not o.composited:
            assert o.image.dtype == np.uint8 and np.array_equal(o.image, obama.frames[k])


# ---------------------------------------------------------------------- seams and colour
def test_seams_are_as_quiet_as_the_real_frame(obama):
    """Gradient energy along the mask boundary, texture from another frame 25 grey levels brighter.

    Two measures, each against the untouched frame at the same pixels: the boundary band's energy (a seamless
    composite keeps the frame's own edges there: ratio ~1; a hard paste of the same texture measures 5-15x), and
    the band's energy relative to its neighbourhood 5-12 px to either side (the issue's "comparable to the
    interior"; the chin contour runs along the band, so the real frame's own ratio is the reference). The bound
    1.5 sits well above the 0.7-1.1 of good composites and well below the hard paste, which the test also checks.
    """
    a = obama.analysis
    checked = 0
    for i in range(0, 30, 4):
        j = (i + 13) % 30
        if not (a.face_valid[i] and a.face_valid[j]):
            continue
        texture = cv2.convertScaleAbs(a.crops[j], alpha=1.0, beta=25)
        frame = obama.frames[i]
        result = composite_frame(frame, a.landmarks[i], texture, geometry=a.geometry, synth_mouth=a.canonical_mouth[j])
        hard = (_frame_mask(result, frame.shape) > 0).astype(np.uint8)
        inside = cv2.distanceTransform(hard, cv2.DIST_L2, 3)
        outside = cv2.distanceTransform(1 - hard, cv2.DIST_L2, 3)
        signed = np.where(hard > 0, inside, -outside)
        band = np.abs(signed) <= 2
        neighbourhood = (np.abs(signed) >= 5) & (np.abs(signed) <= 12)

        warp = LowerFaceWarp(a.landmarks[i], a.geometry)
        patch = warp.to_frame(texture, frame.shape)
        ph, pw = patch.mask.shape
        pasted = patch.paste(frame)
        region = pasted[patch.y0 : patch.y0 + ph, patch.x0 : patch.x0 + pw]
        keep = ~hard[patch.y0 : patch.y0 + ph, patch.x0 : patch.x0 + pw].astype(bool)
        region[keep] = frame[patch.y0 : patch.y0 + ph, patch.x0 : patch.x0 + pw][keep]  # hard paste inside the mask

        e_orig, e_comp, e_hard = (_gradient_energy(x) for x in (frame, result.image, pasted))
        assert e_comp[band].mean() / e_orig[band].mean() < 1.5
        assert e_hard[band].mean() / e_orig[band].mean() > 3.0
        rel = {name: e[band].mean() / e[neighbourhood].mean() for name, e in [("orig", e_orig), ("comp", e_comp)]}
        assert rel["comp"] < 1.5 * rel["orig"]
        checked += 1
    assert checked >= 5


def test_color_matching_removes_a_brightness_offset(obama):
    a = obama.analysis
    i = 3
    frame = obama.frames[i]
    texture = cv2.convertScaleAbs(a.crops[i], alpha=1.0, beta=30)
    errors = {}
    for mode in ("none", "mean_std", "histogram"):
        result = composite_frame(
            frame,
            a.landmarks[i],
            texture,
            geometry=a.geometry,
            synth_mouth=a.canonical_mouth[i],
            settings=BlendSettings(color_match=mode),
        )
        inside = _frame_mask(result, frame.shape) > 0.99
        errors[mode] = abs(float(result.image[inside].mean()) - float(frame[inside].mean()))
    assert errors["none"] > 20
    assert errors["mean_std"] < 3 and errors["histogram"] < 4


def test_match_colors_and_pyramid_blend_properties():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 255, (40, 52, 3)).astype(np.float32)
    overlay = rng.uniform(0, 255, (40, 52, 3)).astype(np.float32)
    assert np.array_equal(pyramid_blend(base, overlay, np.zeros((40, 52), np.float32), 4), base)
    np.testing.assert_allclose(pyramid_blend(base, overlay, np.ones((40, 52), np.float32), 4), overlay, atol=1e-3)
    texture = rng.integers(60, 200, (30, 30, 3), dtype=np.uint8)
    region = np.ones((30, 30), bool)
    assert np.array_equal(match_colors(texture, texture, region, "none"), texture.astype(np.float32))
    same = match_colors(texture, texture, region, "mean_std")
    assert np.abs(same - texture).max() < 1.0
    with pytest.raises(InvalidInput):
        match_colors(texture, texture, region, "bogus")


# ---------------------------------------------------------------------- jaw correction
def _chin_shift(before: np.ndarray, after: np.ndarray, chin: np.ndarray, size: int) -> float:
    """Vertical shift (pixels, > 0 = down) of the image around the chin, by phase correlation."""
    x, y = int(round(chin[0])), int(round(chin[1]))
    half = size // 2
    crop = (slice(y - half, y + half), slice(x - half, x + half))
    a = cv2.cvtColor(before[crop], cv2.COLOR_BGR2GRAY).astype(np.float32)
    b = cv2.cvtColor(after[crop], cv2.COLOR_BGR2GRAY).astype(np.float32)
    window = cv2.createHanningWindow((a.shape[1], a.shape[0]), cv2.CV_32F)
    (dx, dy), _ = cv2.phaseCorrelate(a, b, window)
    return dy


def test_jaw_correction_moves_the_chin_with_the_mouth_opening(katie):
    a = katie.analysis
    i = int(np.flatnonzero(a.face_valid)[0])
    frame, landmarks = katie.frames[i], a.landmarks[i]
    warp = LowerFaceWarp(landmarks, a.geometry)
    own = warp.canonical[48:68]
    opened = own.copy()
    opened[[17, 18, 19, 7, 8, 9], 1] += 0.06  # inner and outer lower lip 0.06 face-box widths lower
    assert inner_opening(opened) - inner_opening(own) == pytest.approx(0.06)

    delta = jaw_displacement(warp.canonical, a.geometry.template, synth_mouth=opened)
    assert delta[5, 1] == pytest.approx(0.6 * 0.06)  # the chin (point 8) moves gain x extra opening
    assert delta[0, 1] == pytest.approx(0.0) and delta[-1, 1] == pytest.approx(0.0)  # jaw angles stay
    assert np.all(delta[:, 1] >= 0) and np.all(delta[:, 0] == 0)
    assert np.abs(jaw_displacement(warp.canonical, a.geometry.template, synth_mouth=own)).max() == 0

    corrected, jaw, shift = correct_jaw(frame, landmarks, warp, delta)
    expected = 0.036 / abs(warp.similarity[0])  # canonical units -> pixels
    assert shift == pytest.approx(expected, rel=1e-6) and expected > 5
    measured = _chin_shift(frame, corrected, landmarks[8], size=int(expected * 8) // 2 * 2)
    assert 0.6 * expected < measured < 1.3 * expected
    eyes = int(landmarks[36:48, 1].max())
    assert np.array_equal(corrected[:eyes], frame[:eyes])  # the upper face does not move

    same, _, zero = correct_jaw(frame, landmarks, warp, jaw_displacement(warp.canonical, a.geometry.template))
    assert same is frame and zero == 0.0
    equal = composite_frame(frame, landmarks, a.crops[i], geometry=a.geometry, synth_mouth=own)
    assert equal.jaw_shift_px == 0.0
    moved = composite_frame(frame, landmarks, a.crops[i], geometry=a.geometry, synth_mouth=opened)
    assert moved.jaw_shift_px == pytest.approx(expected, rel=1e-6)
    off = composite_frame(
        frame,
        landmarks,
        a.crops[i],
        geometry=a.geometry,
        synth_mouth=opened,
        settings=BlendSettings(jaw_correction=False),
    )
    assert off.jaw_shift_px == 0.0


def test_mean_jaw_lines_set_the_jaw_directly(obama):
    a = obama.analysis
    warp = LowerFaceWarp(a.landmarks[0], a.geometry)
    wanted = warp.canonical[:17] + [0.02, 0.03]  # lower, and shifted sideways
    delta = jaw_displacement(warp.canonical, a.geometry.template, synth_mouth=warp.canonical[48:68], mean_jaw=wanted)
    np.testing.assert_allclose(delta[:, 0], 0.0, atol=1e-12)  # never sideways: that tears the cheek contour
    np.testing.assert_allclose(delta[:, 1], 0.03 * jaw_taper(a.geometry.template), atol=1e-9)
    assert delta[5, 1] == pytest.approx(0.03)  # the chin (point 8) moves fully
    huge = jaw_displacement(warp.canonical, a.geometry.template, mean_jaw=warp.canonical[:17] + [0.0, 1.0])
    assert np.linalg.norm(huge, axis=1).max() == pytest.approx(0.2)  # clipped to MAX_JAW_SHIFT


# ---------------------------------------------------------------------- target decoding
def test_target_frames_follow_any_map(obama):
    times = obama.analysis.timestamps
    for frame_map in ([3, 3, 3, 4, 4, 5], [20, 21, 5, 6, 25, 1], list(range(29, 9, -1)), [0, 29, 0]):
        reader = TargetFrames(obama.data, np.array(frame_map), timestamps=times)
        got = list(reader)
        assert [k for k, _ in got] == frame_map
        assert all(np.array_equal(f, obama.frames[k]) for k, f in got)
    held = TargetFrames(obama.data, np.array([7] * 10))
    list(held)
    assert held.decoded == 8  # frames 0..7 once, the held frame comes from the cache


# ---------------------------------------------------------------------- encode + finalize
def _probe(path: Path) -> dict:
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        info = dict(
            vcodec=video.codec_context.name,
            acodec=audio.codec_context.name,
            size=(video.codec_context.width, video.codec_context.height),
            rate=video.average_rate,
            colorspace=video.codec_context.colorspace,
            duration=float(container.duration / 1e6),
            video_duration=float(video.duration * video.time_base),
        )
        info["frames"] = [f.to_ndarray(format="bgr24") for f in container.decode(video)]
    return info


@pytest.mark.parametrize("rate", [Fraction(30), Fraction(30000, 1001)])
def test_render_segments_and_finalize(obama, tmp_path, rate):
    a = obama.analysis
    n = a.frame_count
    chunks = [(0, 11), (11, 12), (12, n)]
    rendered = [o.image for o in render_frames(obama.data, np.arange(n), a.landmarks, a.face_valid, a.crops, None)]
    paths = []
    for start, stop in chunks:
        path = tmp_path / f"seg{start}.mp4"
        calls: list[tuple[int, int]] = []
        summary = render_segment(
            obama.data,
            np.arange(start, stop),
            a.landmarks,
            a.face_valid,
            a.crops[start:stop],
            None,
            path,
            width=256,
            height=256,
            fps=rate,
            geometry=a.geometry,
            start_frame=start,
            progress=lambda d, t, c=calls: c.append((d, t)),
        )
        assert summary.frames_written == stop - start and calls[-1] == (stop - start, stop - start)
        assert summary.frames_passthrough == sum(1 for k in range(start, stop) if k in NO_FACE)
        assert summary.color.matrix == "bt601"
        paths.append(path)
    audio = _wav(n / rate + 0.4 / rate)  # within one frame of the video
    out = tmp_path / "out.mp4"
    info = finalize(paths, audio, out, fps=rate)
    assert (info.frame_count, info.frames_added, info.frames_dropped) == (n, 0, 0)
    probe = _probe(out)
    assert probe["vcodec"] == "h264" and probe["acodec"] == "aac"
    assert probe["size"] == (256, 256) and probe["rate"] == rate
    assert probe["colorspace"] == 6  # tagged BT.601 (SMPTE 170M), the matrix the untagged target decodes with
    assert abs(probe["duration"] - info.audio_duration_seconds) <= 1 / rate
    assert abs(probe["video_duration"] - n / rate) < 1e-3
    assert len(probe["frames"]) == n  # no frame lost at the joins
    for i in range(n):  # every frame where it belongs (the noise frame does not compress)
        if i != NO_FACE[1]:
            assert _psnr(probe["frames"][i], rendered[i], np.ones((256, 256), bool)) > 33
    if CHECK_OUTPUT.is_file() and shutil.which("ffprobe"):
        target = tmp_path / "target.mp4"
        target.write_bytes(obama.data)
        wav = tmp_path / "audio.wav"
        wav.write_bytes(audio)
        if rate == Fraction(30):
            check = subprocess.run([str(CHECK_OUTPUT), str(out), str(target), str(wav)], capture_output=True, text=True)
            assert check.returncode == 0, check.stdout + check.stderr


def test_finalize_pads_or_trims_to_the_audio(obama, tmp_path):
    rate = Fraction(30000, 1001)
    frames = obama.frames[:20]
    segments = []
    for start, stop in [(0, 8), (8, 20)]:
        buffer = io.BytesIO()
        encode_segment(iter(frames[start:stop]), width=256, height=256, fps=rate, path_or_buffer=buffer)
        segments.append(buffer.getvalue())
    for audio_frames, added, dropped in [(23.2, 3, 0), (15, 0, 5), (5, 0, 15)]:
        out = tmp_path / f"out{audio_frames}.mp4"
        info = finalize(segments, _wav(audio_frames / rate), out, fps=rate, faststart=False)
        assert (info.frames_added, info.frames_dropped) == (added, dropped)
        probe = _probe(out)
        assert len(probe["frames"]) == info.frame_count == round(audio_frames)
        assert abs(probe["duration"] - float(audio_frames / rate)) <= 1 / rate
        assert probe["rate"] == rate
    with pytest.raises(InvalidInput, match="crf / preset"):
        finalize(segments, _wav(25 / rate), tmp_path / "x.mp4", fps=rate, crf=30)


def test_finalize_to_a_buffer_with_faststart_and_resampled_audio(obama):
    buffer = io.BytesIO()
    encode_segment(iter(obama.frames[:6]), width=256, height=256, fps=Fraction(30), path_or_buffer=buffer)
    out = io.BytesIO()
    calls: list[tuple[int, int]] = []
    info = finalize(
        [buffer.getvalue()],
        _wav(0.2),
        out,
        fps=Fraction(30),
        audio_sample_rate_hz=48000,
        audio_bitrate_kbps=96,
        progress=lambda d, t: calls.append((d, t)),
    )
    data = out.getvalue()
    assert 0 <= data.find(b"moov") < data.find(b"mdat")  # index first: playback starts before the download ends
    assert calls[-1] == (1, 1) and info.audio_sample_rate_hz == 48000 and info.frame_count == 6
    with av.open(io.BytesIO(data)) as container:
        audio = container.streams.audio[0]
        assert audio.codec_context.sample_rate == 48000
        assert abs(container.duration / 1e6 - 0.2) <= 1 / 30


def test_katie_segment_keeps_native_size_and_rate(katie, tmp_path):
    a = katie.analysis
    buffer = io.BytesIO()
    summary = render_segment(
        katie.data,
        np.array([0, 1, 1, 2, 3, 5]),
        a.landmarks,
        a.face_valid,
        a.crops[[0, 1, 1, 2, 3, 5]],
        a.canonical_mouth[[0, 1, 1, 2, 3, 5]],
        buffer,
        width=512,
        height=512,
        fps=katie.rate,
        timestamps=a.timestamps,
        geometry=a.geometry,
        options=RenderOptions(crf=23, x264_preset="ultrafast"),
    )
    assert (summary.width, summary.height, summary.fps) == (512, 512, Fraction(25))
    assert summary.frames_composited == 6
    with av.open(io.BytesIO(buffer.getvalue())) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height, stream.average_rate) == (512, 512, 25)
        assert sum(1 for _ in container.decode(stream)) == 6
    assert target_color(katie.data).matrix == "bt601"


def test_color_round_trip_through_a_bt709_segment(obama):
    from services.composite.core import ColorSpec

    frames = obama.frames[:3]
    for spec in (ColorSpec.from_decoded(2), ColorSpec.from_decoded(1)):
        buffer = io.BytesIO()
        encode_segment(iter(frames), width=256, height=256, fps=Fraction(30), path_or_buffer=buffer, crf=4, color=spec)
        decoded = _decode(buffer.getvalue())
        assert _psnr(decoded[1], frames[1], np.ones((256, 256), bool)) > 38
        assert target_color(buffer.getvalue()) == spec


# ---------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_invalid_input(obama, tmp_path):
    a = obama.analysis
    lms, valid, crops = a.landmarks, a.face_valid, a.crops
    good = dict(geometry=a.geometry)
    cases = [
        lambda: render_frames(obama.data, np.array([], int), lms, valid, crops[:0], None, **good),  # empty chunk
        lambda: render_frames(obama.data, np.array([0, 1]), lms, valid, crops[:3], None, **good),  # textures != n
        lambda: render_frames(obama.data, np.array([0, 1]), lms, valid[:5], crops[:2], None, **good),
        lambda: render_frames(obama.data, np.array([0, 1]), lms, valid, crops[:2], a.canonical_mouth[:3], **good),
        lambda: render_frames(obama.data, np.array([0, 1]), lms, valid, crops[:2, :10], None, **good),
        lambda: render_frames(obama.data, np.array([0, 30]), lms, valid, crops[:2], None, **good),  # out of range
        lambda: render_frames(obama.data, np.array([-1, 0]), lms, valid, crops[:2], None, **good),
        lambda: render_frames(obama.data, np.array([0.5, 1.0]), lms, valid, crops[:2], None, **good),
        lambda: render_frames(b"", np.array([0, 1]), lms, valid, crops[:2], None, **good).__next__(),
        lambda: render_frames(b"not a video", np.array([0]), lms, valid, crops[:1], None, **good).__next__(),
        lambda: finalize([], _wav(1.0), tmp_path / "a.mp4", fps=Fraction(30)),  # no segments
        lambda: finalize([b"not a video"], _wav(1.0), tmp_path / "b.mp4", fps=Fraction(30)),
        lambda: encode_segment(iter([crops[0]]), width=256, height=256, fps=Fraction(30), path_or_buffer=io.BytesIO()),
        lambda: encode_segment(iter([]), width=256, height=256, fps=Fraction(30), path_or_buffer=io.BytesIO()),
        lambda: encode_segment(iter([]), width=255, height=256, fps=Fraction(30), path_or_buffer=io.BytesIO()),
        lambda: RenderOptions(pyramid_levels=0),
        lambda: RenderOptions(color_match="sepia"),
        lambda: RenderOptions(x264_preset="warp9"),
        lambda: RenderOptions(crf=60),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(InvalidInput):
            case()
            pytest.fail(f"case {i} did not raise")
    # A video shorter than its analysis claims: the missing frame is out of range while rendering.
    short = _encode(obama.frames[:5], Fraction(30))
    with pytest.raises(InvalidInput, match="out of range"):
        list(render_frames(short, np.array([4, 6]), lms, valid, crops[:2], None, **good))
    # Segments of different sizes, and audio that is not audio.
    small = io.BytesIO()
    encode_segment(iter([obama.frames[0][:128, :128]]), width=128, height=128, fps=Fraction(30), path_or_buffer=small)
    big = io.BytesIO()
    encode_segment(iter([obama.frames[0]]), width=256, height=256, fps=Fraction(30), path_or_buffer=big)
    with pytest.raises(InvalidInput, match="128x128"):
        finalize([big.getvalue(), small.getvalue()], _wav(2 / 30), tmp_path / "c.mp4", fps=Fraction(30))
    with pytest.raises(InvalidInput):
        finalize([big.getvalue()], big.getvalue(), tmp_path / "d.mp4", fps=Fraction(30))  # no audio stream
    two = io.BytesIO()
    encode_segment(iter(obama.frames[:2]), width=256, height=256, fps=Fraction(30), path_or_buffer=two)
    with pytest.raises(InvalidInput, match="fps"):
        finalize([two.getvalue()], _wav(2 / 25), tmp_path / "e.mp4", fps=Fraction(25))
