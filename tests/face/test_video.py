"""Video decoding: exact rates, container timestamps (CFR, NTSC, VFR), portrait and rotation, codecs, bad input."""

from __future__ import annotations

import io
import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest

from services.runtime.errors import InvalidInput, TooLarge
from services.runtime.media import iter_frames, probe_video
from tests.face.helpers import OBAMA, SHARED_DATA, encode_clip

pytestmark = pytest.mark.skipif(not OBAMA.is_file(), reason="shared data not present")


@pytest.mark.parametrize(
    ("rel", "size", "rate", "frames", "codec"),
    [
        ("speakers/obama/obama_clip1.mp4", (256, 256), Fraction(30), 602, "h264"),
        ("targets/hdtf_katiehill_512.mp4", (512, 512), Fraction(25), 200, "mpeg4"),
        ("targets/news_man_844.mp4", (844, 844), Fraction(25), 125, "h264"),
        ("targets/woman_1080p.mp4", (1920, 1080), Fraction(30), 223, "h264"),
    ],
)
def test_probe_real_clips(rel, size, rate, frames, codec):
    info = probe_video(SHARED_DATA / rel)
    assert (info.width, info.height) == size
    assert info.frame_rate == rate and isinstance(info.fps_num, int) and isinstance(info.fps_den, int)
    assert info.frame_count == frames
    assert info.codec == codec
    assert info.duration_seconds == pytest.approx(frames / float(rate), abs=0.08)
    assert info.has_audio and info.rotation_degrees == 0 and not info.variable_frame_rate


def test_timestamps_match_container_pts():
    with av.open(str(OBAMA)) as container:
        stream = container.streams.video[0]
        expected = [float(f.pts * stream.time_base) for _, f in zip(range(40), container.decode(stream), strict=False)]
    got = [(i, t) for i, t, _ in iter_frames(OBAMA, stop=40)]
    assert [i for i, _ in got] == list(range(40))
    times = np.array([t for _, t in got])
    assert np.all(np.diff(times) > 0)
    np.testing.assert_allclose(times, expected, atol=1e-9)
    np.testing.assert_allclose(times, np.arange(40) / 30, atol=1e-9)


def test_bytes_and_path_sources_agree_and_range():
    data = OBAMA.read_bytes()
    a = [(i, t, f) for i, t, f in iter_frames(data, start=5, stop=9)]
    b = [(i, t, f) for i, t, f in iter_frames(OBAMA, start=5, stop=9)]
    assert [x[0] for x in a] == [5, 6, 7, 8]
    for (ia, ta, fa), (ib, tb, fb) in zip(a, b, strict=True):
        assert ia == ib and ta == tb and np.array_equal(fa, fb)
        assert fa.dtype == np.uint8 and fa.shape == (256, 256, 3)


def test_ntsc_rate_is_exact_rational():
    data = encode_clip([np.full((96, 128, 3), 10 * i, np.uint8) for i in range(12)], rate=Fraction(30000, 1001))
    info = probe_video(data)
    assert (info.fps_num, info.fps_den) == (30000, 1001)
    assert info.fps != 30
    times = np.array([t for _, t, _ in iter_frames(data)])
    np.testing.assert_allclose(times, np.arange(12) * 1001 / 30000, atol=1e-9)


def test_variable_frame_rate_timestamps():
    pts_ms = [0, 33, 50, 100, 133, 250, 283, 300, 400, 433]
    frames = [np.full((96, 128, 3), 20 * i, np.uint8) for i in range(len(pts_ms))]
    data = encode_clip(frames, rate=Fraction(30), time_base=Fraction(1, 1000), pts=pts_ms)
    decoded = list(iter_frames(data))
    assert len(decoded) == len(pts_ms)
    assert probe_video(data).variable_frame_rate
    np.testing.assert_allclose([t for _, t, _ in decoded], np.array(pts_ms) / 1000, atol=1e-9)
    # Frame content follows its timestamp (no reordering or duplication).
    means = [float(f.mean()) for _, _, f in decoded]
    assert np.all(np.diff(means) > 0)


def test_portrait_clip_keeps_its_shape():
    frames = [np.full((320, 176, 3), 30 + 5 * i, np.uint8) for i in range(6)]
    data = encode_clip(frames)
    info = probe_video(data)
    assert (info.width, info.height) == (176, 320)
    shapes = {f.shape for _, _, f in iter_frames(data)}
    assert shapes == {(320, 176, 3)}


def test_display_rotation_is_applied():
    frame = np.zeros((176, 320, 3), np.uint8)
    frame[:40, :40] = 255  # marker in the coded top-left corner
    data = encode_clip([frame] * 4, display_rotation_ccw=90)
    info = probe_video(data)
    assert (info.width, info.height, info.rotation_degrees) == (176, 320, 270)
    assert (info.coded_width, info.coded_height) == (320, 176)
    out = next(iter_frames(data))[2]
    assert out.shape == (320, 176, 3)
    # Rotating 90 degrees counter-clockwise moves the top-left corner to the bottom-left.
    assert out[-10, 10].mean() > 200 and out[10, 10].mean() < 50


@pytest.mark.parametrize(
    ("fmt", "codec", "name"),
    [("mpeg", "mpeg2video", "mpeg2video"), ("mpeg", "mpeg1video", "mpeg1video"), ("mp4", "libx265", "hevc")],
)
def test_other_codecs_decode_from_container_start(fmt, codec, name):
    frames = [np.full((120, 160, 3), 8 * i, np.uint8) for i in range(10)]
    data = encode_clip(frames, rate=Fraction(25), fmt=fmt, codec=codec)
    info = probe_video(data)
    assert info.codec == name and (info.width, info.height) == (160, 120) and info.frame_rate == 25
    times = np.array([t for _, t, _ in iter_frames(data)])
    assert len(times) == 10 and times[0] == pytest.approx(0.0, abs=1e-9) and np.all(np.diff(times) > 0)
    # MPEG program streams start at ~0.5 s; timestamps count from the container start, at the pts.
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        origin = container.start_time / 1e6
        expected = [float(f.pts * stream.time_base) - origin for f in container.decode(stream)]
    np.testing.assert_allclose(times, expected, atol=1e-9)
    assert np.median(np.diff(times)) == pytest.approx(1 / 25, abs=1e-6)


def test_bad_inputs_raise_invalid_input(tmp_path):
    with pytest.raises(InvalidInput, match="empty"):
        probe_video(b"")
    with pytest.raises(InvalidInput, match="cannot decode video"):
        probe_video(b"this is not a video at all" * 50)
    rng = np.random.default_rng(1)
    with pytest.raises(InvalidInput):
        list(iter_frames(rng.integers(0, 256, 20000, dtype=np.uint8).tobytes()))
    with pytest.raises(InvalidInput, match="video file not found"):
        probe_video(tmp_path / "missing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("hello")
    with pytest.raises(InvalidInput):
        probe_video(text)
    with pytest.raises(InvalidInput, match="range"):
        list(iter_frames(OBAMA, start=5, stop=2))
    with pytest.raises(InvalidInput, match="bytes or a path"):
        probe_video(12345)


def test_audio_only_file_has_no_video_stream():
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), np.float32)
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = 16000
            frame.pts = i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    with pytest.raises(InvalidInput, match="no video stream"):
        probe_video(buffer.getvalue())


def test_frame_size_limit():
    with pytest.raises(TooLarge, match="pixels"):
        probe_video(OBAMA, max_pixels=200 * 200)


def test_core_modules_do_not_import_grpc():
    code = (
        "import sys, services.face.core, deploy.bench.face; "
        "bad = [m for m in sys.modules if m.startswith(('grpc', 'audio2video', 'minio'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
