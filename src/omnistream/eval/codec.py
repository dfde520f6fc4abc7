"""Codec round-trip evaluation: held-out sentences (never in a training corpus) read by the
Piper voice -> our encoder -> codes -> the checkpoint's Token2Wav streamed through the engine's
code2wav -> speech, judged by an independent recognizer (``eval/recognizer.py``).

``omnistream codec eval --model DIR [--n 100]`` prints: WER of the original Piper audio and of
the round trip, mel cepstral distortion, streaming decode real-time factor, the first chunk's
compute time after its codes exist, and encoding speed.

MCD here: cepstral coefficients c1..c13 of the codec's 80-band natural-log amplitude mel, at
mel-cepstrum scale (see ``_dct_matrix``); (10 / ln 10) * sqrt(2 * sum of squared differences),
averaged over frames where the original is within 60 dB of its peak. The round trip has exactly
the original's frames, so no alignment is needed.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from omnistream.codec.features import speech_mel
from omnistream.engine.codec import Codec
from omnistream.media.audio import OUTPUT_SAMPLE_RATE

N_CEPS = 13


def _dct_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Cepstrum of a log spectrum sampled at ``n_in`` bands: ``log S_n = c_0 + 2 sum_k c_k
    cos(pi k (n + 1/2) / n_in)``, so ``c_k = (1/n_in) sum_n log S_n cos(...)`` (the scale of
    SPTK's mel-cepstrum, for which MCD is defined)."""
    k = torch.arange(n_out, dtype=torch.float64)[:, None]
    i = torch.arange(n_in, dtype=torch.float64)[None]
    return (torch.cos(math.pi / n_in * (i + 0.5) * k) / n_in).float()


def mcd(ref: np.ndarray, test: np.ndarray) -> float:
    """Mel cepstral distortion (dB) between two 24 kHz clips (``test`` cut/padded to ``ref``)."""
    n = ref.shape[0]
    test = np.pad(test[:n], (0, max(0, n - test.shape[0])))
    a, b = speech_mel(ref), speech_mel(test)  # [80, T]
    d = _dct_matrix(a.shape[0], N_CEPS + 1)
    ca, cb = (d @ a)[1:], (d @ b)[1:]  # [13, T]
    energy = a.max(0).values
    keep = energy > energy.max() - math.log(1000.0)  # within 60 dB of the peak
    diff = (ca - cb)[:, keep]
    per_frame = torch.sqrt(2.0 * diff.pow(2).sum(0)) * (10.0 / math.log(10.0))
    return float(per_frame.mean())


def held_out_clips(n: int, cache: str | Path | None = None) -> list[dict]:
    """The codec's held-out sentences read by the Piper voice (rendered once into ``cache``)."""
    from omnistream.train.speech_corpus import MANIFEST, load_corpus, make_corpus

    cache = Path(cache or Path.home() / ".cache" / "omnistream" / "codec_heldout")
    manifest = cache / MANIFEST
    recs = load_corpus(manifest) if manifest.exists() else []
    if len(recs) < n:
        make_corpus(cache, n, held_out=True)
        recs = load_corpus(manifest)
    return recs[:n]


def evaluate_codec(model: str | Path, n: int = 100, cache: str | Path | None = None,
                   recognize: bool = True, progress: bool = True, vocoder_wer: bool = False,
                   seed: int = 0, **decode_options) -> dict:
    """Round-trip figures over ``n`` held-out clips (see the module docstring). With
    ``vocoder_wer`` also the recognizer on the vocoder fed each clip's own mel: the part of the
    round trip's error that the vocoder makes (the rest is between the codes and the mel).

    Clip i is decoded from the noise of seed ``seed + i``, as the engine draws a new seed per
    session: one noise for every clip would make the whole figure one draw (the round trip's WER
    moved from 11.6% to 14.2% between seeds 0 and 1 that way), and a comparison of two decoders
    on it, mostly chance."""
    from omnistream.codec.features import speech_mel
    from omnistream.train.codec import read_wav

    torch.set_num_threads(max(1, torch.get_num_threads()))
    codec = Codec.load(model)
    clips = held_out_clips(n, cache)
    if recognize:
        from omnistream.eval import recognizer
    refs, hyp_orig, hyp_rt, hyp_voc, mcds = [], [], [], [], []
    enc_s = dec_s = audio_s = 0.0
    first_chunk: list[float] = []
    it = clips
    if progress:
        from tqdm import tqdm

        it = tqdm(clips, desc="codec round trip", unit="clip")
    for i, rec in enumerate(it):
        wav = read_wav(rec["audio"]).numpy()
        t0 = time.perf_counter()
        codes = codec.encode(wav, OUTPUT_SAMPLE_RATE)
        enc_s += time.perf_counter() - t0
        chunks, t_first = [], None
        t0 = time.perf_counter()
        last = t0
        for c in codec.decode_stream(codes, seed=seed + i, **decode_options):
            now = time.perf_counter()
            if t_first is None:
                t_first = now - last  # compute of the chunk (its codes were all pushed)
            chunks.append(c)
            last = now
        dec_s += time.perf_counter() - t0
        out = np.concatenate(chunks)
        audio_s += out.size / OUTPUT_SAMPLE_RATE
        first_chunk.append(t_first or 0.0)
        mcds.append(mcd(wav, out))
        refs.append(rec["text"])
        if recognize:
            hyp_orig.append(recognizer.transcribe(wav, OUTPUT_SAMPLE_RATE))
            hyp_rt.append(recognizer.transcribe(out, OUTPUT_SAMPLE_RATE))
            if vocoder_wer:
                voc = codec.token2wav.vocode(speech_mel(wav)[None])[0].cpu().numpy()
                hyp_voc.append(recognizer.transcribe(voc, OUTPUT_SAMPLE_RATE))
    res = {
        "clips": len(clips),
        "seed": seed,
        "audio_s": audio_s,
        "mcd_db": float(np.mean(mcds)),
        "decode_rtf": dec_s / max(audio_s, 1e-9),
        "first_chunk_ms_median": 1000 * float(np.median(first_chunk)),
        "first_chunk_ms_max": 1000 * float(np.max(first_chunk)),
        "encode_x_realtime": audio_s / max(enc_s, 1e-9),
    }
    if recognize:
        res["wer_original"] = recognizer.wer(refs, hyp_orig)
        res["wer_round_trip"] = recognizer.wer(refs, hyp_rt)
        if vocoder_wer:
            res["wer_vocoder"] = recognizer.wer(refs, hyp_voc)
        res["examples"] = [{"text": r, "original": a, "round_trip": b}
                           for r, a, b in list(zip(refs, hyp_orig, hyp_rt, strict=True))[:5]]
    return res


def print_report(res: dict) -> None:
    seeds = f"noise seeds {res['seed']}..{res['seed'] + res['clips'] - 1}"
    rows = [("clips", f"{res['clips']} ({res['audio_s']:.1f} s of speech, {seeds})")]
    if "wer_original" in res:
        rows += [("WER original (Piper)", f"{100 * res['wer_original']:.1f}%"),
                 ("WER round trip", f"{100 * res['wer_round_trip']:.1f}%")]
    if "wer_vocoder" in res:
        rows.append(("WER vocoder, original mel", f"{100 * res['wer_vocoder']:.1f}%"))
    rows += [("MCD", f"{res['mcd_db']:.2f} dB"),
             ("streaming decode RTF", f"{res['decode_rtf']:.3f}"),
             ("first chunk after its codes", f"{res['first_chunk_ms_median']:.0f} ms median, "
                                             f"{res['first_chunk_ms_max']:.0f} ms max"),
             ("encoding speed", f"{res['encode_x_realtime']:.0f}x real time")]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    for ex in res.get("examples", []):
        print(f"  ref: {ex['text']}\n  rt:  {ex['round_trip']}")
