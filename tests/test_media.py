"""Media decoding and features against the references (see media_helpers for the stand-ins)."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from media_helpers import qwen_omni_utils, tone, write_audio, write_video
from PIL import Image

from omnistream.media import MediaError
from omnistream.media.audio import (
    N_FRAMES,
    StreamingLogMel,
    decode_audio,
    load_audio,
    log_mel_spectrogram,
    normalize_log_mel,
    raw_log_mel,
)
from omnistream.media.image import process_image
from omnistream.media.video import decode_video, load_video_audio, process_video


@pytest.fixture(scope="module")
def whisper():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128, chunk_length=300, return_attention_mask=True)


def _ref_features(fe, x):
    r = fe(
        x,
        sampling_rate=16000,
        padding="max_length",
        return_attention_mask=True,
        return_tensors="np",
    )
    return r["input_features"][0], r["attention_mask"][0]


# --- audio features ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 201, 16000 * 3 + 37])
def test_log_mel_equals_reference(whisper, n):
    x = tone(n / 16000 + 1e-6, 16000)[0][:n] if n > 1 else np.array([0.3], np.float32)
    x[: n // 3] *= 1e-3  # a quiet start: the floor at max-8 matters
    ref, mask = _ref_features(whisper, x)
    ours, n_valid = log_mel_spectrogram(x, pad_to=N_FRAMES)
    assert n_valid == mask.sum()
    assert np.abs(ours.numpy() - ref).max() < 1e-4
    short, _ = log_mel_spectrogram(x)
    assert short.shape == (128, n_valid)
    assert torch.equal(short, ours[:, :n_valid])


def test_streaming_log_mel_equals_offline():
    x = tone(2.3, 16000)[0]
    s = StreamingLogMel()
    pieces = [s.push(x[i : i + 1234]) for i in range(0, x.size, 1234)]
    assert pieces[0].shape[1] == 0 or pieces[0].shape[1] <= (1234 - 200) // 160 + 1
    pieces.append(s.flush())
    stream = torch.cat(pieces, 1)
    raw, n_valid = raw_log_mel(x)
    assert stream.shape == (128, n_valid)
    assert (stream - raw[:, :n_valid]).abs().max() < 1e-5
    assert abs(s.running_max - float(raw.max())) < 1e-5  # == offline clip max after flush
    offline, _ = log_mel_spectrogram(x)
    assert (normalize_log_mel(stream, s.running_max) - offline).abs().max() < 1e-5


def test_resampled_stereo_vs_librosa(tmp_path, whisper):
    """44.1 kHz stereo: ours vs qwen-omni-utils' librosa.load (soxr_hq). Printed, loosely bound."""
    import librosa

    x = tone(2.0, 44100, channels=2)
    path = write_audio(tmp_path / "st.wav", x, 44100)
    ours = load_audio(str(path))
    ref = librosa.load(str(path), sr=16000)[0]
    assert ours.shape == ref.shape
    d = np.abs(ours - ref)[200:-200]  # edges: filter transients differ by design
    rel = float(np.sqrt(np.mean((ours - ref) ** 2) / np.mean(ref**2)))
    f_ours, _ = log_mel_spectrogram(ours)
    f_ref, m = _ref_features(whisper, ref)
    fd = np.abs(f_ours.numpy() - f_ref[:, : int(m.sum())])
    print(
        f"\nresample 44.1k stereo -> 16k vs librosa: max|d| {d.max():.2e}, rel rms {rel:.2e}; "
        f"features max|d| {fd.max():.3e}, mean|d| {fd.mean():.2e}"
    )
    assert d.max() < 2e-2 and rel < 1e-2 and fd.mean() < 1e-2


@pytest.mark.parametrize("ext", [".wav", ".flac", ".mp3", ".ogg", ".m4a", ".webm"])
def test_audio_formats(tmp_path, ext):
    sr = 48000 if ext in (".ogg", ".webm") else 44100
    path = write_audio(tmp_path / f"a{ext}", tone(1.0, sr, channels=2), sr)
    x = load_audio(str(path))
    assert x.dtype == np.float32 and abs(x.size - 16000) < 800  # codec padding
    assert 0.05 < np.abs(x).max() <= 1.5


@pytest.mark.parametrize("codec,channels,sr", [("pcm_s16le", 1, 24000), ("pcm_s16le", 2, 44100),
                                               ("pcm_s24le", 1, 16000), ("pcm_f32le", 2, 48000)])
def test_wav_opens_without_probing_and_decodes_the_same(tmp_path, monkeypatch, codec, channels,
                                                        sr):
    """A WAV header states every stream parameter, so WAV files skip ffmpeg's probing of their
    data: the samples and rate are those of a probed open, from a path or from bytes."""
    import av

    from omnistream.media import _io

    path = write_audio(tmp_path / "a.wav", tone(0.5, sr, channels=channels), sr, codec=codec)
    real_open, opened = av.open, []
    monkeypatch.setattr(av, "open", lambda *a, **k: opened.append(k) or real_open(*a, **k))
    fast = decode_audio(str(path)), decode_audio(path.read_bytes())
    assert [k.get("format") for k in opened] == ["wav", "wav"]  # both took the fast open
    monkeypatch.setattr(_io, "_is_wav", lambda src: False)
    probed = decode_audio(str(path))
    for x, rate in fast:
        assert rate == probed[1] == sr and np.array_equal(x, probed[0]) and x.size == sr // 2
    monkeypatch.undo()
    torn = tmp_path / "torn.wav"  # a WAV header and a few bytes of its data chunk
    torn.write_bytes(path.read_bytes()[:50])
    _raises(lambda: load_audio(str(torn)), "torn.wav")


def test_audio_sources_and_trim(tmp_path):
    x = tone(2.0, 16000)[0]
    path = write_audio(tmp_path / "m.wav", x[None], 16000)
    a = load_audio(str(path))
    assert np.abs(a - x).max() < 1e-3  # 16-bit PCM
    url = "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode()
    assert np.array_equal(load_audio(url), a)
    assert np.array_equal(load_audio("file://" + str(path)), a)
    assert np.array_equal(load_audio(path.read_bytes()), a)
    assert np.array_equal(load_audio(x), x)  # arrays default to 16 kHz
    np.testing.assert_allclose(load_audio((np.stack([x, x]), 16000)), x, atol=1e-7)
    t = load_audio(str(path), start=0.5, end=1.25)
    assert t.size == 12000 and np.array_equal(t, a[8000:20000])
    assert load_audio({"array": x, "sampling_rate": 8000}).size == 2 * x.size


# --- images ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)


def _img(mode: str, w: int, h: int, seed: int = 0) -> Image.Image:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    im = Image.fromarray(a, "RGBA")
    return im if mode == "RGBA" else im.convert(mode)


@pytest.mark.parametrize(
    "mode,w,h",
    [
        ("RGB", 64, 48),
        ("RGBA", 100, 37),
        ("L", 300, 200),
        ("P", 57, 91),
        ("LA", 40, 30),
        ("CMYK", 123, 77),
        ("RGB", 1000, 30),
    ],
)
def test_image_equals_reference(image_processor, mode, w, h):
    im = _img(mode, w, h)
    ref = image_processor(images=[im], return_tensors="pt")
    ours = process_image(im)
    assert list(ours.grid_thw) == ref["image_grid_thw"][0].tolist()
    assert ours.pixel_values.shape[1] == 1176
    assert (ours.pixel_values - ref["pixel_values"]).abs().max() < 1e-5


def test_image_pixel_bounds_and_sources(image_processor, tmp_path):
    im = _img("RGB", 640, 480)
    ref = image_processor(
        images=[im], size={"shortest_edge": 3136, "longest_edge": 64 * 784}, return_tensors="pt"
    )
    ours = process_image(im, max_pixels=64 * 784)
    assert list(ours.grid_thw) == ref["image_grid_thw"][0].tolist()
    assert (ours.pixel_values - ref["pixel_values"]).abs().max() < 1e-5
    big = process_image(_img("RGB", 20, 20), min_pixels=100 * 784)
    assert big.grid_thw[1] * big.grid_thw[2] * 196 >= 100 * 784
    p = tmp_path / "x.png"
    im.save(p)
    url = "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()
    for src in (str(p), "file://" + str(p), url, p.read_bytes(), np.asarray(im)):
        assert torch.equal(process_image(src, max_pixels=64 * 784).pixel_values, ours.pixel_values)


# --- video -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qou():
    return qwen_omni_utils()


@pytest.mark.parametrize(
    "n,fps,size,ele",
    [
        (30, 10, (96, 128), {}),
        (25, 25, (64, 200), {"video_start": 0.2, "video_end": 0.9}),
        (40, 10, (120, 90), {"nframes": 8}),
        (12, 4, (480, 640), {"fps": 1.0, "min_frames": 2}),
    ],
)
def test_video_sampling_vs_qwen_omni_utils(tmp_path, qou, n, fps, size, ele):
    path = str(write_video(tmp_path / "v.mp4", n, fps=fps, size=size))
    ref, ref_fps = qou.fetch_video({"video": path, **ele}, return_video_sample_fps=True)
    kw = {k: ele[k] for k in ("nframes", "min_frames") if k in ele}
    ours = process_video(
        path, fps=ele.get("fps"), start=ele.get("video_start"), end=ele.get("video_end"), **kw
    )
    assert ours.n_frames == ref.shape[0]
    assert ours.frame_size == tuple(ref.shape[2:])
    assert abs(ours.sample_fps - ref_fps) < 1e-6
    # the same decoded frames and the same resize: equal pixels up to one uint8 step
    dec = decode_video(
        path, fps=ele.get("fps"), start=ele.get("video_start"), end=ele.get("video_end"), **kw
    )
    from omnistream.media.video import resize_frames

    mine = resize_frames(dec.frames, *ours.frame_size).float()
    assert (mine - ref).abs().max() <= 1.0
    print(
        f"\nvideo {n}f@{fps} {size} {ele}: {ref.shape[0]} frames {tuple(ref.shape[2:])}, "
        f"sample_fps {ref_fps:.3f}"
    )


def test_video_variable_frame_rate(tmp_path):
    # frames at irregular times (units of 1/100 s): dense first second, sparse after
    pts = [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 100, 200, 300, 400]
    path = str(write_video(tmp_path / "vfr.mp4", len(pts), fps=10, pts=pts))
    dec = decode_video(path, fps=2.0)
    ts = np.asarray(dec.timestamps)
    assert ts[0] == 0.0 and abs(ts[-1] - 4.0) < 1e-6
    want = np.linspace(0, 4.0, len(ts))
    # index-based sampling would put most samples in the dense first 0.5 s; time-based does not
    assert np.abs(ts - want).max() <= 0.5 + 1e-6


def test_video_audio_track(tmp_path):
    a = tone(2.0, 16000)
    path = str(write_video(tmp_path / "va.mp4", 20, audio=(a, 16000)))
    x = load_video_audio(path)
    assert abs(x.size - a.shape[1]) < 2048
    y = load_video_audio(path, start=0.5, end=1.5)
    assert abs(y.size - 16000) < 10


# --- bad input -------------------------------------------------------------------------------


def _raises(fn, *needles):
    with pytest.raises(MediaError) as e:
        fn()
    msg = str(e.value)
    for s in needles:
        assert s in msg, msg
    return msg


def test_errors_name_file_and_problem(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    _raises(lambda: load_audio(str(empty)), "empty.wav", "empty file")
    bad = tmp_path / "corrupt.mp3"
    bad.write_bytes(b"\x00garbage" * 100)
    _raises(lambda: load_audio(str(bad)), "corrupt.mp3", "corrupt")
    _raises(lambda: load_audio(str(tmp_path / "missing.wav")), "missing.wav", "not found")
    badimg = tmp_path / "corrupt.png"
    badimg.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _raises(lambda: process_image(str(badimg)), "corrupt.png", "cannot decode image")
    badvid = tmp_path / "corrupt.mp4"
    badvid.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 500)
    _raises(lambda: process_video(str(badvid)), "corrupt.mp4")


def test_error_zero_length_audio(tmp_path):
    import wave

    path = tmp_path / "zero.wav"
    with wave.open(str(path), "wb") as w:  # a valid header, no samples
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    _raises(lambda: load_audio(str(path)), "zero.wav", "zero-length audio")
    _raises(lambda: load_audio(np.zeros(0, np.float32)), "zero-length audio")
    ok = write_audio(tmp_path / "one.wav", tone(1.0, 16000), 16000)
    _raises(lambda: load_audio(str(ok), start=2.0), "one.wav", "zero-length audio")


def test_error_aspect_ratio(tmp_path):
    p = tmp_path / "thin.png"
    Image.new("RGB", (2010, 10)).save(p)
    _raises(lambda: process_image(str(p)), "thin.png", "aspect ratio", "200")


def test_error_video_without_frames(tmp_path):
    import av

    path = tmp_path / "noframes.mp4"
    with av.open(str(path), "w") as c:  # a header with a video track, no frame
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        c.start_encoding()
    msg = _raises(lambda: process_video(str(path)), "noframes.mp4")
    assert "no video stream" in msg or "no frames" in msg, msg
    _raises(lambda: process_video([]), "no frames")
    audio_only = write_audio(tmp_path / "audio_only.m4a", tone(0.5, 16000), 16000)
    _raises(lambda: process_video(str(audio_only)), "audio_only.m4a", "no video stream")


def test_error_too_long(tmp_path):
    path = write_audio(tmp_path / "long.wav", tone(2.0, 16000), 16000)
    _raises(lambda: load_audio(str(path), max_seconds=1.0), "long.wav", "longer than the maximum")
    vid = write_video(tmp_path / "long.mp4", 30, fps=10)
    _raises(lambda: process_video(str(vid), max_seconds=2.0), "long.mp4", "longer than the max")


def test_error_video_without_audio_track(tmp_path):
    vid = write_video(tmp_path / "silent.mp4", 10)
    _raises(lambda: load_video_audio(str(vid)), "silent.mp4", "no audio track")
