"""``omnistream bench --config features``: log-mel features of one ``--features-seconds`` clip
(60 s), ours vs the reference extractor; and one image as a training set stores it
(``train.data.pack_media``), patched as uint8 pixels vs normalised to float32 and packed back.

The reference is transformers' ``WhisperFeatureExtractor`` as the Qwen2.5-Omni processor
configures it (128 mels, chunk_length 300: every clip padded to 300 s, max_length padding,
attention mask). Both produce the same features (the max abs difference is in the note). Both run
on one thread (the reference is single-threaded NumPy).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from omnistream.bench.common import Bench


def bench_features(b: Bench, name: str) -> None:
    from transformers import WhisperFeatureExtractor

    from omnistream.media.audio import SAMPLE_RATE, log_mel_spectrogram

    seconds = b.args.features_seconds
    rng = np.random.default_rng(0)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    audio = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)
    ref = WhisperFeatureExtractor(feature_size=128, chunk_length=300)

    def run_ref():
        return ref(audio, sampling_rate=SAMPLE_RATE, padding="max_length",
                   return_attention_mask=True, return_tensors="np")

    def run_ours():
        return log_mel_spectrogram(audio)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = run_ref()
        f, n_valid = run_ours()
        if int(r["attention_mask"][0].sum()) != n_valid:
            raise RuntimeError("valid frame counts differ from the reference's")
        diff = float(np.abs(r["input_features"][0][:, :n_valid] - f.numpy()).max())
        t_ref, t_ours = b.time(run_ref), b.time(run_ours)
    finally:
        torch.set_num_threads(threads)
    b.add(config=name, metric=f"log-mel features, {seconds:g} s clip", unit="ms",
          ours=1e3 * t_ours, ref=1e3 * t_ref, higher_is_better=False,
          note=f"1 thread; ref pads to 300 s; max |diff| {diff:.1e}")


def bench_stored_image(b: Bench, name: str) -> None:
    """A 448 x 448 PNG as ``train.data.Dataset`` keeps it: ``process_media(...,
    normalized=False)`` (uint8 patches, wrapped as they are) against the float32 patches that
    ``pack_pixels`` turns back into uint8 and checks bit for bit (the loader until the
    forty-fifth session). Both give the same packed indices."""
    from PIL import Image

    from omnistream.train.data import pack_media, pack_pixels, process_media

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as d:
            path = str(Path(d) / "image.png")
            Image.fromarray(pixels).save(path)

            def run_float():
                return pack_pixels(process_media("image", path).pixel_values)

            def run_uint8():
                return pack_media(process_media("image", path, normalized=False))

            if not torch.equal(run_float().index, run_uint8().pixel_values.index):
                raise RuntimeError("the two stored images differ")
            t_float, t_uint8 = b.time(run_float), b.time(run_uint8)
    finally:
        torch.set_num_threads(threads)
    b.add(config=name, metric="training set: one 448x448 image stored", unit="ms",
          ours=1e3 * t_uint8, ref=1e3 * t_float, higher_is_better=False,
          note="1 thread; ref = float32 patches packed back (the earlier loader)")
