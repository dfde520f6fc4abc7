"""Streaming code2wav: equals the official chunked path, stays close to offline token2wav."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import randomize_

from omnistream.config import Token2WavConfig
from omnistream.engine.code2wav import Code2WavStream, chunked_code2wav
from omnistream.nn.token2wav import Token2Wav
from omnistream.tiny import tiny_config

N = 70  # codes: 140 mel frames -> 3 chunks of 48 (the middle one has a window clipped at 0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small convolutions on a shared 2-core machine run ~10x faster without intra-op threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(**{"token2wav_config.bigvgan_config.upsample_initial_channel": 128})
    m = Token2Wav(Token2WavConfig.from_dict(cfg["token2wav_config"])).eval()
    # std 0.1 makes the DiT depend on its context (at 0.05 attention is nearly uniform and the
    # edge effects vanish); the bias centres the mel in the vocoder's unclipped range, the conv_post
    # gain gives a waveform of ~±0.5.
    randomize_(m.code2wav_dit_model, seed=0, std=0.1)
    randomize_(m.code2wav_bigvgan_model, seed=1)
    with torch.no_grad():
        m.code2wav_dit_model.proj_out.bias.fill_(-5.0)
        m.code2wav_bigvgan_model.conv_post.weight.mul_(20)
    return m


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 8194, (1, N), generator=g)
    cond = torch.randn(1, 192, generator=g)
    ref_mel = torch.randn(1, 40, 80, generator=g) - 5.0
    noise = torch.randn(1, 2 * N, 80, generator=g)
    return codes, cond, ref_mel, noise


def official_chunked(model, codes, cond, ref_mel, noise, C, steps):
    """The official chunked decode's index arithmetic, transcribed branch by branch (first /
    window clipped at 0 / middle / finished chunk), on our DiT sampler and vocoder."""
    past, future, keep, hop = 48, 24, 20, 240
    M = 2 * codes.shape[1]
    n_chunks = math.ceil(M / C)
    prev, out = None, []
    for i in range(n_chunks):
        finished = i == n_chunks - 1
        start, end = max(i * C - past, 0), min((i + 1) * C + future, M)
        gen = model.sample(codes[:, start // 2: end // 2], cond, ref_mel, steps=steps,
                           noise=noise[:, start:end])
        if i == 0:
            mel = gen[..., :C]
        elif finished:
            mel = torch.cat([prev[..., -2 * keep:], gen[..., past:]], dim=-1)
        elif start == 0:
            mel = torch.cat([prev[..., -2 * keep:], gen[..., i * C: -future]], dim=-1)
        else:
            mel = torch.cat([prev[..., -2 * keep:], gen[..., past: -future]], dim=-1)
        audio = model.vocode(mel)[0]
        if i == 0:
            audio = audio[: -keep * hop]
        elif finished:
            audio = audio[keep * hop:]
        else:
            audio = audio[keep * hop: -keep * hop]
        prev = mel
        out.append(audio)
    return torch.cat(out)


@pytest.mark.parametrize("C", [48, 72])
def test_stream_equals_official_chunked_path(model, inputs, C):
    codes, cond, ref_mel, noise = inputs
    want = official_chunked(model, codes, cond, ref_mel, noise, C, steps=3)
    got = chunked_code2wav(model, codes, cond, ref_mel, chunk_size=C, steps=3, noise=noise)
    assert got.shape == want.shape == (N * 480,)
    assert (got - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("C_max", [48, 96])
def test_push_granularity_does_not_matter(model, inputs, C_max):
    codes, cond, ref_mel, _ = inputs
    C = 48
    stream = Code2WavStream(model, cond, ref_mel, chunk_size=C, max_chunk_size=C_max, steps=3,
                            seed=3)
    chunks, first_at = [], None
    for k, code in enumerate(codes[0].tolist(), start=1):
        ready = stream.push(code)
        if ready and first_at is None:
            first_at = k
        chunks += ready
    chunks += stream.flush()
    assert first_at == (C + 24) // 2  # the first chunk needs C frames + 24 frames of lookahead
    assert all(c.dtype == np.float32 for c in chunks)
    # 140 frames; emitted frames: fixed [0, 28) [28, 76) [76, 140); growing [0, 28) [28, 140)
    sizes = [c.size // 240 for c in chunks]
    assert sizes == ([28, 48, 64] if C_max == C else [28, 112])
    once = chunked_code2wav(model, codes, cond, ref_mel, chunk_size=C, max_chunk_size=C_max,
                            steps=3, seed=3)
    assert torch.equal(torch.from_numpy(np.concatenate(chunks)), once)


@pytest.mark.parametrize("n", [0, 1, 11, 36, 37])
def test_length_is_480_per_code(model, inputs, n):
    _, cond, ref_mel, _ = inputs
    wav = chunked_code2wav(model, torch.arange(n)[None], cond, ref_mel, chunk_size=24, steps=2,
                           solver="euler")
    assert wav.shape == (n * 480,)


def test_chunk_size_must_be_block_multiple(model, inputs):
    _, cond, ref_mel, _ = inputs
    with pytest.raises(ValueError, match="chunk_size"):
        Code2WavStream(model, cond, ref_mel, chunk_size=40)
    with pytest.raises(ValueError, match="max_chunk_size"):
        Code2WavStream(model, cond, ref_mel, chunk_size=48, max_chunk_size=100)


@pytest.fixture(scope="module")
def offline(model, inputs):
    codes, cond, ref_mel, noise = inputs
    return model(codes, cond, ref_mel, noise=noise)  # 10-point RK4, as the stream below


@pytest.mark.parametrize("C, C_max", [(48, 48), (72, 72), (48, 144), (24, 144)])
def test_stream_close_to_offline(model, inputs, offline, C, C_max):
    codes, cond, ref_mel, noise = inputs
    stream = Code2WavStream(model, cond, ref_mel, chunk_size=C, max_chunk_size=C_max, noise=noise)
    chunks = []
    for piece in codes[0].split(10):
        chunks += stream.push(piece)
    got = torch.from_numpy(np.concatenate(chunks + stream.flush()))
    assert got.shape == offline.shape == (N * 480,)
    err = got - offline
    max_abs = err.abs().max().item()
    snr = 10 * math.log10(offline.pow(2).sum().item() / max(err.pow(2).sum().item(), 1e-30))
    print(f"\nstream vs offline, chunk {C}..{C_max}: max abs diff {max_abs:.2e} "
          f"(peak {offline.abs().max().item():.2f}), SNR {snr:.1f} dB")
    # Streaming departs from offline only through the context a DiT window lacks at its edges
    # (it leaks inward one receptive field per ODE evaluation) and the vocoder's 20-frame
    # boundary context. Measured on this model: 81 dB / 3e-4 (C=48), 83 dB / 2e-4 (C=72) on a
    # ±0.5 signal. Broken windowing measured on the same model: no past context 53 dB / 7e-3,
    # no future context 61 dB / 3e-3, noise slice shifted by 2 frames 33 dB / 5e-2, no vocoder
    # boundary trim 38 dB / 0.23. The bounds sit ~10 dB under the measurement (float32 rounding
    # is ~1e-7, far below it) and above every broken variant.
    assert snr > 70.0
    assert max_abs < 1.5e-3


@pytest.mark.parametrize("C", [24, 48])
def test_first_chunk_without_lookahead(model, inputs, offline, C):
    """``first_future=0``: the first chunk comes after C / 2 codes, however the codes arrive;
    past its first C - 20 voiced frames the stream stays as close to offline as the official
    windowing (the next window re-solves the block that lacked its future), and those first
    frames stay close too."""
    codes, cond, ref_mel, noise = inputs
    kw = dict(chunk_size=C, max_chunk_size=144, noise=noise)
    stream = Code2WavStream(model, cond, ref_mel, first_future=0, **kw)
    chunks, first_at = [], None
    for k, code in enumerate(codes[0].tolist(), start=1):
        ready = stream.push(code)
        if ready and first_at is None:
            first_at, first_len = k, ready[0].size
        chunks += ready
    got = torch.from_numpy(np.concatenate(chunks + stream.flush()))
    assert first_at == C // 2 and first_len == (C - 20) * 240
    once = chunked_code2wav(model, codes, cond, ref_mel, first_future=0, **kw)
    assert torch.equal(got, once)  # pushing one code at a time or all at once: the same
    official = chunked_code2wav(model, codes, cond, ref_mel, **kw)

    def snr(x, ref):
        return 10 * math.log10(ref.pow(2).sum().item() / max((x - ref).pow(2).sum().item(), 1e-30))

    head = first_len + 20 * 240  # the early frames and the vocoder context right after them
    late = [snr(x[head:], offline[head:]) for x in (got, official)]
    early = snr(got[:head], offline[:head])
    print(f"\nfirst chunk without look-ahead, C={C}: SNR vs offline after {head} samples "
          f"{late[0]:.1f} dB (official windowing {late[1]:.1f}), first {head}: {early:.1f} dB")
    assert late[0] > late[1] - 3.0
    assert early > 40.0  # broken windowing (tests above) gives 33-61 dB over the whole signal
    with pytest.raises(ValueError, match="first_future"):
        Code2WavStream(model, cond, ref_mel, first_future=25)
