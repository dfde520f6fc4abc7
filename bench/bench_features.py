"""Log-mel feature extraction for one 60 s clip: omnistream vs the reference extractor.

    python bench/bench_features.py [--seconds 60] [--repeats 5]

The reference is transformers' WhisperFeatureExtractor as the Qwen2.5-Omni processor configures it
(128 mels, chunk_length 300: every clip padded to 300 s, max_length padding, attention mask).
Both produce the same features (max abs difference printed); timings are the median of repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import WhisperFeatureExtractor

    from omnistream.media.audio import log_mel_spectrogram

    rng = np.random.default_rng(0)
    n = int(args.seconds * 16000)
    t = np.arange(n) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)

    ref = WhisperFeatureExtractor(feature_size=128, chunk_length=300)

    def run_ref():
        return ref(
            audio,
            sampling_rate=16000,
            padding="max_length",
            return_attention_mask=True,
            return_tensors="np",
        )

    def run_ours():
        return log_mel_spectrogram(audio)

    r = run_ref()
    f, n_valid = run_ours()
    assert int(r["attention_mask"][0].sum()) == n_valid
    diff = float(np.abs(r["input_features"][0][:, :n_valid] - f.numpy()).max())

    t_ref = _median_time(run_ref, args.repeats)
    t_ours = _median_time(run_ours, args.repeats)
    print(f"clip: {args.seconds:g} s, torch threads {torch.get_num_threads()}")
    print(f"reference WhisperFeatureExtractor (300 s padded): {t_ref * 1e3:8.1f} ms")
    print(f"omnistream log_mel_spectrogram (valid frames):    {t_ours * 1e3:8.1f} ms")
    print(f"speed-up: {t_ref / t_ours:.1f}x   max |diff| over valid frames: {diff:.2e}")


if __name__ == "__main__":
    main()
