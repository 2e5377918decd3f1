"""Unit tests of the pure audio core on real clips from ../shared/data and signals synthesised here."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import warnings
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import scipy.signal
import soundfile

from deploy.samples import SAMPLE_DATA
from services.audio import core
from services.runtime.errors import Cancelled, InvalidInput, NotFound, TooLarge

REPO = Path(__file__).resolve().parents[2]
DATA = SAMPLE_DATA
AUDIO = DATA / "audio"
NTSC = Fraction(30000, 1001)


def data_file(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data missing: {path}")
    return path


def encode(signal: np.ndarray, *, rate: int, fmt: str, codec: str, layout: str, options: dict | None = None) -> bytes:
    """Encodes float32 [channels, S] with PyAV into an in-memory file; skips when the encoder is missing."""
    try:
        av.codec.Codec(codec, "w")
    except Exception as exc:  # any lookup failure means "not built in"
        pytest.skip(f"PyAV's FFmpeg has no {codec} encoder: {exc}")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout, options=options or {})
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(signal, dtype=np.float32), format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    """16-bit mono WAV of float samples in [-1, 1]."""
    pcm = np.clip(np.rint(samples * 32768), -32768, 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(pcm.tobytes())
    return buffer.getvalue()


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    """Frequency of the strongest spectral peak, refined by parabolic interpolation."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    k = int(np.argmax(spectrum[1:-1])) + 1
    a, b, c = np.log(spectrum[k - 1 : k + 2])
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * rate / samples.size


def onset_seconds(samples: np.ndarray, rate: int = 16000, level: float = 0.05) -> float:
    return float(np.flatnonzero(np.abs(samples) > level)[0]) / rate


def tone_burst(*, seconds: float = 3.0, start: float = 1.30, stop: float = 2.0, noise: float = 1e-3) -> np.ndarray:
    """Low white noise with a 440 Hz tone (amplitude 0.3) on [start, stop) s, 16 kHz float32."""
    t = np.arange(round(seconds * 16000)) / 16000
    rng = np.random.default_rng(7)
    signal = noise * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * 440 * t) * ((t >= start) & (t < stop))
    return signal.astype(np.float32)


@pytest.fixture(scope="module")
def commentary() -> core.DecodedAudio:
    return core.decode_audio(data_file("audio", "commentary_60s.wav"))


# ------------------------------------------------------------------------------------------------
# decoding real files


def test_decode_wav_16k_mono_is_bit_exact():
    path = data_file("audio", "arctic_sentence_4s.wav")
    audio = core.decode_audio(path)
    reference, rate = soundfile.read(path, dtype="int16")
    assert (audio.sample_rate, audio.source_sample_rate, audio.source_channels) == (16000, 16000, 1)
    assert audio.source_codec == "pcm_s16le"
    assert audio.duration_seconds == 4.0
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    np.testing.assert_array_equal(audio.samples, reference / np.float32(32768))
    assert not audio.samples.flags.writeable


def test_decode_from_bytes_equals_decode_from_path():
    path = data_file("audio", "arctic_sentence_4s.wav")
    np.testing.assert_array_equal(core.decode_audio(path.read_bytes()).samples, core.decode_audio(path).samples)


def test_decode_wav_16k_stereo_averages_channels():
    path = data_file("audio", "political_address_8s.wav")
    audio = core.decode_audio(path)
    reference, _ = soundfile.read(path, dtype="float32")
    assert (audio.source_sample_rate, audio.source_channels, audio.duration_seconds) == (16000, 2, 8.0)
    np.testing.assert_allclose(audio.samples, reference.mean(axis=1), atol=1e-6)


def test_decode_wav_48k_stereo_resamples_without_shift():
    path = data_file("audio", "finance_news_5s.wav")
    audio = core.decode_audio(path)
    source, rate = soundfile.read(path, dtype="float64")
    assert (rate, audio.source_sample_rate, audio.source_channels) == (48000, 48000, 2)
    assert abs(audio.samples.size - source.shape[0] / 3) <= 1
    reference = scipy.signal.resample_poly(source.mean(axis=1), 1, 3)[: audio.samples.size]
    ours = audio.samples.astype(np.float64)

    def corr(lag: int) -> float:
        a, b = (ours[lag:], reference[: reference.size - lag]) if lag >= 0 else (ours[:lag], reference[-lag:])
        return float(np.corrcoef(a, b)[0, 1])

    assert corr(0) > 0.99
    assert corr(0) > max(corr(-1), corr(1))  # best aligned at lag 0: the resampler does not shift time


def test_decode_mp3():
    audio = core.decode_audio(data_file("audio", "woman_1080p_own_audio.mp3"))
    assert (audio.source_codec, audio.source_sample_rate, audio.source_channels) == ("mp3", 44100, 2)
    assert audio.sample_rate == 16000
    assert audio.duration_seconds == pytest.approx(7.407, abs=0.03)
    assert audio.leading_silence_seconds == 0.0
    assert 0.01 < float(np.sqrt(np.mean(audio.samples**2))) < 0.5


def test_decode_aac_track_of_mp4():
    path = data_file("speakers", "obama", "obama_clip1.mp4")
    audio = core.decode_audio(path)
    assert (audio.source_codec, audio.source_sample_rate, audio.source_channels) == ("aac", 16000, 1)
    with av.open(str(path)) as container:
        video_seconds = container.duration / 1e6
    assert audio.duration_seconds == pytest.approx(video_seconds, abs=0.1)
    activity = core.detect_speech(audio.samples, output_fps=NTSC)
    assert 0.3 < activity.speech_fraction < 1.0


# ------------------------------------------------------------------------------------------------
# decoding synthesised formats: a 440 Hz tone from 1.0 s to 2.0 s in the first channel only

FORMATS = [
    # id, container, codec, rate, layout, encoder options, lossless
    ("wav-int24", "wav", "pcm_s24le", 44100, "stereo", None, True),
    ("wav-float32", "wav", "pcm_f32le", 48000, "stereo", None, True),
    ("wav-int16-8k", "wav", "pcm_s16le", 8000, "mono", None, True),
    ("wav-int16-5.1", "wav", "pcm_s16le", 22050, "5.1", None, True),
    ("flac", "flac", "flac", 44100, "stereo", None, True),
    ("ogg-vorbis", "ogg", "vorbis", 44100, "stereo", {"strict": "experimental"}, False),
    ("ogg-opus", "ogg", "libopus", 48000, "stereo", None, False),
    ("mpg-mp2", "mpeg", "mp2", 48000, "stereo", None, False),
    ("mp3", "mp3", "libmp3lame", 44100, "stereo", None, False),
    ("m4a-aac", "ipod", "aac", 44100, "stereo", None, False),
]


@pytest.mark.parametrize(
    ("fmt", "codec", "rate", "layout", "options", "lossless"), [f[1:] for f in FORMATS], ids=[f[0] for f in FORMATS]
)
def test_decode_synthesised_format(fmt, codec, rate, layout, options, lossless):
    channels = av.AudioLayout(layout).nb_channels
    t = np.arange(2 * rate) / rate
    signal = np.zeros((channels, t.size))
    signal[0] = 0.3 * np.sin(2 * np.pi * 440 * t) * (t >= 1.0)
    audio = core.decode_audio(encode(signal, rate=rate, fmt=fmt, codec=codec, layout=layout, options=options))

    expected_codec = {"libmp3lame": "mp3", "libopus": "opus"}.get(codec, codec)
    assert (audio.source_codec, audio.source_sample_rate, audio.source_channels) == (expected_codec, rate, channels)
    assert audio.sample_rate == 16000 and audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert audio.duration_seconds == pytest.approx(2.0, abs=1e-4 if lossless else 0.03)
    # MP2 has no gapless signalling in MPEG-PS: its decoder delay (~10 ms) stays, as with the ffmpeg CLI.
    assert onset_seconds(audio.samples, level=0.05 / channels) == pytest.approx(1.0, abs=5e-4 if lossless else 0.015)
    tone = audio.samples[round(1.1 * 16000) : round(1.9 * 16000)]
    assert dominant_hz(tone, 16000) == pytest.approx(440.0, abs=1.0)
    # the average of the channels keeps the tone at 1 / channels of its amplitude
    assert np.max(np.abs(tone)) == pytest.approx(0.3 / channels, rel=0.01 if lossless else 0.1)
    assert np.max(np.abs(audio.samples[: round(0.9 * 16000)])) < 0.01


def test_decode_puts_time_zero_at_the_container_start():
    """An mkv whose audio starts 0.5 s after its video: silence is prepended, the tone stays at 0.5 s."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        video = container.add_stream("mpeg4", rate=25)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        audio_stream = container.add_stream("pcm_s16le", rate=16000, layout="mono")
        for i in range(25):
            picture = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 8 * i, np.uint8), format="rgb24")
            picture.pts, picture.time_base = i, Fraction(1, 25)
            for packet in video.encode(picture):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(tone, format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 16000, 8000, Fraction(1, 16000)
        for packet in audio_stream.encode(frame):
            container.mux(packet)
        for packet in audio_stream.encode(None):
            container.mux(packet)
    audio = core.decode_audio(buffer.getvalue())
    assert audio.leading_silence_seconds == pytest.approx(0.5, abs=1e-3)
    assert audio.duration_seconds == pytest.approx(1.5, abs=1e-3)
    assert onset_seconds(audio.samples) == pytest.approx(0.5, abs=5e-4)


# ------------------------------------------------------------------------------------------------
# bad input


def test_empty_bytes_are_invalid():
    with pytest.raises(InvalidInput, match=r"audio is empty \(0 bytes\)"):
        core.decode_audio(b"")


def test_random_bytes_are_undecodable():
    with pytest.raises(InvalidInput, match="cannot decode audio.*Invalid data"):
        core.decode_audio(np.random.default_rng(1).bytes(4096))


def test_header_only_wav_is_empty():
    with pytest.raises(InvalidInput, match=r"audio is empty \(0 samples\)"):
        core.decode_audio(wav_bytes(np.zeros(0)))


def test_video_without_audio_is_invalid():
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        video = container.add_stream("mpeg4", rate=25)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        for i in range(5):
            for packet in video.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
                container.mux(packet)
            del i
        for packet in video.encode(None):
            container.mux(packet)
    with pytest.raises(InvalidInput, match="no audio stream.*video mpeg4"):
        core.decode_audio(buffer.getvalue())


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="audio file not found"):
        core.decode_audio(tmp_path / "nope.wav")


def test_too_long_is_refused_from_the_header():
    with pytest.raises(TooLarge, match=r"audio lasts 60\.0 s, over the limit of 10 s"):
        core.decode_audio(data_file("audio", "commentary_60s.wav"), max_seconds=10)


def test_too_long_is_refused_while_decoding_when_the_header_understates():
    """A chained Ogg (30 s then 1 s) declares 1 s: decoding stops at the limit."""
    parts = []
    for seconds in (30, 1):
        noise = 0.1 * np.random.default_rng(seconds).standard_normal((1, 16000 * seconds))
        parts.append(encode(noise, rate=16000, fmt="ogg", codec="flac", layout="mono"))
    with pytest.raises(TooLarge, match=r"over the limit of 10 s \(decoding stopped at 10\.\d s"):
        core.decode_audio(b"".join(parts), max_seconds=10)


def test_slightly_over_the_limit_is_refused_after_decoding():
    with pytest.raises(TooLarge, match="over the limit of 50 s.*declares 60.0 s"):
        core.decode_audio(data_file("audio", "commentary_60s.wav"), max_seconds=50)


def test_bad_max_seconds_is_invalid():
    with pytest.raises(InvalidInput, match="max_seconds"):
        core.decode_audio(b"x", max_seconds=0)


def test_progress_is_reported_and_can_cancel():
    seen: list[tuple[float, float]] = []

    def stop(done: float, total: float) -> None:
        seen.append((done, total))
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        core.decode_audio(data_file("audio", "commentary_60s.wav"), progress=stop)
    assert len(seen) == 1 and 10.0 <= seen[0][0] < 11.0 and seen[0][1] == 60.0


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        (np.zeros(0, np.float32), r"audio is empty \(0 samples"),
        (np.zeros((2, 100), np.float32), r"1-D mono \[S\], got shape \(2, 100\)"),
        (np.zeros(100, np.int16), "floating point.*int16"),
        (np.array([0.0, np.nan, 0.0], np.float32), "1 non-finite"),
    ],
)
def test_bad_samples_are_invalid(samples, message):
    with pytest.raises(InvalidInput, match=message):
        core.extract_features(samples)
    with pytest.raises(InvalidInput, match=message):
        core.detect_speech(samples, output_fps=30.0)


def test_bad_knobs_are_invalid():
    samples = np.zeros(1600, np.float32)
    with pytest.raises(InvalidInput, match=r"hop_seconds=0\.0101 at 16000 Hz is 161\.6 samples"):
        core.extract_features(samples, hop_seconds=0.0101)  # not a whole number of samples: inexact rate
    with pytest.raises(InvalidInput, match="output_fps"):
        core.detect_speech(samples, output_fps=0.0)
    with pytest.raises(InvalidInput, match="delta_width"):
        core.extract_features(samples, delta_width=4)


# ------------------------------------------------------------------------------------------------
# silence is valid


def test_digital_silence_is_valid_input():
    audio = core.decode_audio(wav_bytes(np.zeros(32000)))
    assert audio.duration_seconds == 2.0 and not np.any(audio.samples)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        features = core.extract_features(audio.samples)
        activity = core.detect_speech(audio.samples, output_fps=NTSC)
    assert np.all(np.isfinite(features.values))
    np.testing.assert_allclose(features.values[:, 13], np.log(1e-10), rtol=1e-6)
    assert not np.any(features.values[:, 14:])
    assert not np.any(activity.per_feature_frame) and activity.per_feature_frame.size == features.values.shape[0]
    assert activity.per_output_frame.shape == (60,) and not np.any(activity.per_output_frame)
    assert activity.noise_floor_db == -100.0 and activity.speech_fraction == 0.0


def test_steady_noise_and_steady_tone_are_not_speech():
    rng = np.random.default_rng(3)
    t = np.arange(48000) / 16000
    for signal in (0.01 * rng.standard_normal(t.size), 0.3 * np.sin(2 * np.pi * 440 * t)):
        activity = core.detect_speech(signal.astype(np.float32), output_fps=30.0)
        assert not np.any(activity.per_feature_frame)


# ------------------------------------------------------------------------------------------------
# features


@pytest.mark.parametrize("n_samples", [1, 159, 160, 161, 400, 15999, 16000, 16001])
def test_feature_shape_rate_and_times(n_samples):
    samples = 0.1 * np.random.default_rng(n_samples).standard_normal(n_samples).astype(np.float32)
    features = core.extract_features(samples)
    frames = math.ceil(n_samples / 160)
    assert features.values.shape == (frames, core.FEATURE_DIM) and features.values.dtype == np.float32
    assert features.times.shape == (frames,) and features.times.dtype == np.float64
    assert features.rate == core.FEATURE_RATE == 100.0 and features.start_seconds == 0.0125
    np.testing.assert_allclose(features.times, 0.0125 + np.arange(frames) / 100, atol=1e-12)
    assert np.all(np.isfinite(features.values))
    assert abs(frames - n_samples / 16000 * 100) < 1


def test_features_of_real_speech(commentary):
    features = core.extract_features(commentary.samples)
    assert abs(features.values.shape[0] - commentary.duration_seconds * 100) <= 1
    assert np.all(np.isfinite(features.values))
    assert np.std(features.values[:, :14], axis=0).min() > 0.05  # every static column varies with speech


def test_delta_columns_are_centred_derivatives(commentary):
    samples = commentary.samples[: 10 * 16000]
    values = core.extract_features(samples).values
    static, delta = values[:, :14].astype(np.float64), values[:, 14:].astype(np.float64)
    np.testing.assert_allclose(delta[1:-1], np.gradient(static, axis=0)[1:-1], atol=1e-4)
    np.testing.assert_allclose(delta[0], (static[1] - static[0]) / 2, atol=1e-4)  # ends repeat the edge frame

    import librosa  # reference: Savitzky-Golay first derivative over 5 frames = regression delta, width 5

    wide = core.extract_features(samples, delta_width=5).values[:, 14:]
    reference = librosa.feature.delta(static.T, width=5, order=1).T
    np.testing.assert_allclose(wide[2:-2], reference[2:-2], atol=1e-3)


def test_mel_filterbank_matches_librosa():
    import librosa

    ours = core.mel_filterbank(sample_rate=16000, n_fft=512, n_mels=40, fmin_hz=133.3333, fmax_hz=6855.4976)
    reference = librosa.filters.mel(
        sr=16000, n_fft=512, n_mels=40, fmin=133.3333, fmax=6855.4976, htk=True, norm="slaney"
    )
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-8)


def test_gain_moves_only_c0_and_energy(commentary):
    """A gain g adds ln(g^2) to every log filter energy: c0 moves by sqrt(40) ln(g^2), c1..c12 do not."""
    samples = commentary.samples[: 5 * 16000]
    loud, quiet = core.extract_features(samples).values, core.extract_features(samples * np.float32(0.5)).values
    shift = np.log(0.25)
    np.testing.assert_allclose(quiet[:, 1:13], loud[:, 1:13], atol=2e-3)
    np.testing.assert_allclose(quiet[:, 0] - loud[:, 0], shift * np.sqrt(40), atol=2e-3)
    np.testing.assert_allclose(quiet[:, 13] - loud[:, 13], shift, atol=1e-3)


def test_tone_burst_appears_at_its_time_in_the_features():
    features = core.extract_features(tone_burst(start=1.30, stop=2.0))
    energy = features.values[:, 13]
    quiet = np.median(energy[:100])
    first = int(np.flatnonzero(energy > quiet + 3.0)[0])
    assert abs(features.times[first] - 1.30) <= 0.01
    rise = int(np.argmax(features.values[:, 27]))  # d(log energy)/dt peaks at the onset
    assert abs(features.times[rise] - 1.30) <= 0.01
    last = int(np.flatnonzero(energy > quiet + 3.0)[-1])
    assert abs(features.times[last] - 2.0) <= 0.01


# ------------------------------------------------------------------------------------------------
# speech activity


def test_tone_burst_appears_at_its_time_in_speech_activity():
    activity = core.detect_speech(tone_burst(start=1.30, stop=2.0), output_fps=NTSC)
    active = np.flatnonzero(activity.per_feature_frame)
    times = 0.0125 + np.arange(activity.per_feature_frame.size) / 100
    assert abs(times[active[0]] - 1.30) <= 0.02 and abs(times[active[-1]] - 2.0) <= 0.02
    assert np.all(activity.per_feature_frame[active[0] : active[-1] + 1])  # one run

    per_output = activity.per_output_frame
    assert per_output.shape == (math.ceil(3.0 * 30000 / 1001),) == (90,)
    onset_frame = math.floor(1.30 * NTSC)  # output frame i covers [i / fps, (i + 1) / fps): 38 holds 1.30 s
    assert np.flatnonzero(per_output > 0)[0] == onset_frame == 38
    assert 0 < per_output[onset_frame] < 1 and per_output[onset_frame + 1] == 1.0
    # the end (2.0 s, in output frame 59) lands within a feature frame (10 ms) of the truth
    offset_frame = math.floor(2.0 * NTSC)
    assert per_output[offset_frame] == 1.0 and per_output[offset_frame + 1] < 0.5
    assert not np.any(per_output[offset_frame + 2 :])
    assert activity.threshold_db > activity.noise_floor_db
    assert activity.output_fps == pytest.approx(29.97002997)


def test_output_frames_float_fps_and_explicit_count():
    samples = tone_burst()
    by_float = core.detect_speech(samples, output_fps=29.97).per_output_frame
    assert by_float.shape == (90,)
    padded = core.detect_speech(samples, output_fps=NTSC, n_output_frames=100).per_output_frame
    assert padded.shape == (100,) and not np.any(padded[90:])
    assert core.detect_speech(samples, output_fps=None).per_output_frame.shape == (0,)


def test_output_frame_count_is_exact():
    assert core.output_frame_count(16000, 30.0) == 30  # not 31 from float round-off
    assert core.output_frame_count(48000, NTSC) == 90
    assert core.output_frame_count(48000, 30000 / 1001) == 90
    assert core.output_frame_count(16000 * 1001, NTSC) == 30000
    assert core.output_frame_count(16000 * 1001 + 1, 30000 / 1001) == 30001


def test_short_pauses_are_bridged_and_clicks_dropped():
    t = np.arange(48000) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    on = ((t >= 0.5) & (t < 1.0)) | ((t >= 1.1) & (t < 1.6)) | ((t >= 2.0) & (t < 2.5)) | ((t >= 2.8) & (t < 2.81))
    signal = (1e-3 * np.random.default_rng(5).standard_normal(t.size) + tone * on).astype(np.float32)
    activity = core.detect_speech(signal, output_fps=100.0, min_pause_seconds=0.2, min_speech_seconds=0.05)
    mask = activity.per_feature_frame
    frame_time = 0.0125 + np.arange(mask.size) / 100
    assert np.all(mask[(frame_time > 0.52) & (frame_time < 1.58)])  # the 0.1 s gap is bridged
    assert not np.any(mask[(frame_time > 1.64) & (frame_time < 1.96)])  # the 0.4 s gap is kept
    assert not np.any(mask[frame_time > 2.55])  # the 10 ms click is dropped
    unbridged = core.detect_speech(signal, output_fps=100.0, min_pause_seconds=0.0).per_feature_frame
    assert not np.any(unbridged[(frame_time > 1.03) & (frame_time < 1.07)])


def test_speech_activity_of_real_speech_is_loudness_invariant(commentary):
    loud = core.detect_speech(commentary.samples, output_fps=NTSC)
    assert 0.5 < loud.speech_fraction < 0.98
    quiet = core.detect_speech(commentary.samples * np.float32(0.05), output_fps=NTSC)
    assert np.mean(loud.per_feature_frame == quiet.per_feature_frame) > 0.995
    assert np.mean(np.abs(loud.per_output_frame - quiet.per_output_frame)) < 0.01
    assert quiet.noise_floor_db - loud.noise_floor_db == pytest.approx(20 * np.log10(0.05), abs=0.1)

    # the same through a 16-bit WAV of the quiet version (quantisation and all)
    requantised = core.decode_audio(wav_bytes(commentary.samples * 0.05)).samples
    through_wav = core.detect_speech(requantised, output_fps=NTSC)
    assert np.mean(loud.per_feature_frame == through_wav.per_feature_frame) > 0.98


def test_digital_silence_around_speech_does_not_lower_the_floor(commentary):
    speech = commentary.samples[: 8 * 16000]
    padded = np.concatenate([np.zeros(4 * 16000, np.float32), speech, np.zeros(4 * 16000, np.float32)])
    plain = core.detect_speech(speech, output_fps=30.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        around = core.detect_speech(padded, output_fps=30.0)
    assert not np.any(around.per_feature_frame[:390]) and not np.any(around.per_feature_frame[-390:])
    assert around.noise_floor_db == pytest.approx(plain.noise_floor_db, abs=1.0)
    assert np.mean(around.per_feature_frame[400:1200] == plain.per_feature_frame) > 0.98


def test_activity_frames_align_with_feature_frames(commentary):
    samples = commentary.samples[: 3 * 16000 + 77]
    assert (
        core.detect_speech(samples, output_fps=None).per_feature_frame.shape[0]
        == (core.extract_features(samples).values.shape[0])
    )


# ------------------------------------------------------------------------------------------------
# WAV for the mux, loudness


def test_encode_wav_round_trip_is_exact_for_16_bit_sources():
    audio = core.decode_audio(data_file("audio", "arctic_sentence_4s.wav"))
    again = core.decode_audio(core.encode_wav(audio))
    assert (again.source_codec, again.source_sample_rate, again.source_channels) == ("pcm_s16le", 16000, 1)
    np.testing.assert_array_equal(again.samples, audio.samples)


def test_encode_wav_round_trip_of_resampled_audio():
    audio = core.decode_audio(data_file("audio", "woman_1080p_own_audio.mp3"))
    again = core.decode_audio(core.encode_wav(audio))
    assert again.duration_seconds == audio.duration_seconds
    np.testing.assert_allclose(again.samples, audio.samples, atol=1 / 32768 + 1e-7)


def test_normalize_loudness(commentary):
    normalised = core.normalize_loudness(commentary, target_rms_dbfs=-23.0)
    rms_db = 20 * np.log10(np.sqrt(np.mean(normalised.samples.astype(np.float64) ** 2)))
    assert rms_db == pytest.approx(-23.0, abs=0.05) or np.max(np.abs(normalised.samples)) == pytest.approx(0.99)
    assert np.max(np.abs(normalised.samples)) <= 0.99 + 1e-6
    quiet = core.DecodedAudio(
        samples=commentary.samples * np.float32(0.05),
        sample_rate=16000,
        source_sample_rate=16000,
        source_channels=1,
        source_codec="pcm_s16le",
        duration_seconds=commentary.duration_seconds,
    )
    np.testing.assert_allclose(core.normalize_loudness(quiet).samples, normalised.samples, atol=1e-4)
    silent = core.decode_audio(wav_bytes(np.zeros(1600)))
    assert core.normalize_loudness(silent) is silent


# ------------------------------------------------------------------------------------------------
# module hygiene


def test_core_imports_no_grpc_and_no_stubs():
    code = (
        "import sys, services.audio.core; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('grpc', 'audio2video', 'minio')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
