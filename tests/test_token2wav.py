"""Token2wav (ECAPA, DiT, flow-matching sampler, BigVGAN) vs transformers: fp32, tiny config."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, randomize_, tiny_hf_config

from omnistream.config import Token2WavConfig
from omnistream.nn.token2wav import SAMPLES_PER_CODE, Token2Wav, time_points
from omnistream.tiny import tiny_config

# The tiny BigVGAN's 32 initial channels halve to 0 after 6 upsamplers; 128 keeps >= 2 channels.
OVERRIDES = {"token2wav_config.bigvgan_config.upsample_initial_channel": 128}
N, T_REF = 30, 40  # codes (60 mel frames = 2.5 DiT blocks), reference-mel frames


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small convolutions on a shared 2-core machine run ~10x faster without intra-op threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models():
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavModel

    ref = Qwen2_5OmniToken2WavModel._from_config(tiny_hf_config(**OVERRIDES).token2wav_config)
    ref = randomize_(ref.float().eval())  # parameters only: the anti-alias filters are buffers
    with torch.no_grad():
        ref.code2wav_bigvgan_model.conv_post.weight.mul_(20)  # waveform ~±0.5 instead of ~±0.02
    ours = Token2Wav(Token2WavConfig.from_dict(tiny_config(**OVERRIDES)["token2wav_config"]))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 8194, (1, N), generator=g)
    cond = torch.randn(1, 192, generator=g)
    ref_mel = torch.randn(1, T_REF, 80, generator=g) - 5.0
    return codes, cond, ref_mel


def _close(a, b, atol):
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs err {err:.3g} > {atol}"


def test_state_dict_names_and_shapes(models):
    ref, ours = models
    r, o = ref.state_dict(), ours.state_dict()
    # transformers keeps inv_freq out of its state dict; the released checkpoint stores it
    assert set(o) - set(r) == {"code2wav_dit_model.rotary_embed.inv_freq"}
    assert set(r) <= set(o)
    assert all(o[k].shape == v.shape for k, v in r.items())


def test_release_tensor_counts():
    with torch.device("meta"):
        full = Token2Wav(Token2WavConfig())
    keys = list(full.state_dict())
    assert sum(k.startswith("code2wav_dit_model.") for k in keys) == 360
    assert sum(k.startswith("code2wav_bigvgan_model.") for k in keys) == 449


def test_inv_freq_stored_or_computed(models):
    _, ours = models
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    key = "code2wav_dit_model.rotary_embed.inv_freq"
    computed = sd[key].clone()
    fresh = Token2Wav(ours.cfg)
    sd[key] = computed.bfloat16().float()  # what the release stores
    fresh.load_state_dict(sd, strict=True)
    assert torch.equal(fresh.code2wav_dit_model.rotary_embed.inv_freq, sd[key])
    del sd[key]
    with torch.device("meta"):
        meta = Token2Wav(ours.cfg)
    meta.load_state_dict(sd, strict=True, assign=True)
    assert torch.equal(meta.code2wav_dit_model.rotary_embed.inv_freq, computed)


def test_ecapa(models, inputs):
    ref, ours = models
    _, _, ref_mel = inputs
    with torch.no_grad():
        a = ref.code2wav_dit_model.input_embed.spk_encoder(ref_mel)
        b = ours.code2wav_dit_model.input_embed.spk_encoder(ref_mel)
    assert b.shape == (1, 16)
    _close(a, b, 1e-4)


@pytest.mark.parametrize("cfg", [True, False])
def test_dit_forward(models, inputs, cfg):
    ref, ours = models
    codes, cond, ref_mel = inputs
    rd, od = ref.code2wav_dit_model, ours.code2wav_dit_model
    x = torch.randn(1, 2 * N, 80, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(0.37)
    with torch.no_grad():
        want = rd(hidden_states=x, condition_vector=ref_mel,
                  speaker_embedding=cond[:, None].expand(1, 2 * N, 192), quantized_code=codes,
                  time_step=t, apply_cfg=cfg)
        c = od.condition(codes, od.speaker(cond, ref_mel, cfg))
        got = od(torch.cat([x, x]) if cfg else x, t, c)
    assert got.shape == want.shape == ((2 if cfg else 1), 2 * N, 80)
    _close(got, want, 1e-4)


def test_sample_rk4_same_noise(models, inputs):
    ref, ours = models
    codes, cond, ref_mel = inputs
    torch.manual_seed(5)  # the reference draws its initial state with torch.randn
    want = ref.code2wav_dit_model.sample(cond, ref_mel, codes)
    torch.manual_seed(5)
    got = ours.sample(codes, cond, ref_mel, noise=torch.randn(1, 2 * N, 80))
    assert got.shape == (1, 80, 2 * N)
    _close(got, want, 1e-4)


def test_sample_without_guidance(models, inputs):
    ref, ours = models
    codes, cond, ref_mel = inputs
    torch.manual_seed(6)
    want = ref.code2wav_dit_model.sample(cond, ref_mel, codes, num_steps=3, guidance_scale=0.0)
    torch.manual_seed(6)
    got = ours.sample(codes, cond, ref_mel, steps=3, guidance_scale=0.0,
                      noise=torch.randn(1, 2 * N, 80))
    _close(got, want, 1e-4)


def test_euler_is_one_velocity_step(models, inputs):
    _, ours = models
    codes, cond, ref_mel = inputs
    dit = ours.code2wav_dit_model
    x0 = torch.randn(1, 2 * N, 80, generator=torch.Generator().manual_seed(3))
    got = ours.sample(codes, cond, ref_mel, steps=2, solver="euler", noise=x0)
    with torch.no_grad():
        v_c, v_u = dit(torch.cat([x0, x0]), torch.tensor(0.0),
                       dit.condition(codes, dit.speaker(cond, ref_mel, True))).chunk(2)
    t = time_points(2)
    want = x0 + (t[1] - t[0]) * (v_c + 0.5 * (v_c - v_u))
    _close(got, want.transpose(1, 2), 1e-5)


def test_bigvgan(models):
    ref, ours = models
    mel = torch.randn(1, 80, 50, generator=torch.Generator().manual_seed(4)) * 2 - 5
    with torch.no_grad():
        want = ref.code2wav_bigvgan_model(mel)
    got = ours.vocode(mel)
    assert got.shape == (1, 50 * 240)
    assert want.abs().max() > 0.1  # a real signal, not a near-zero one
    _close(got[0], want, 1e-3)
    # inference fuses SnakeBeta's arithmetic in place; training (autograd) takes the plain path
    with torch.enable_grad():
        trained = ours.code2wav_bigvgan_model(mel)
    assert trained.grad_fn is not None and torch.equal(trained.detach(), got)


def test_end_to_end(models, inputs):
    ref, ours = models
    codes, cond, ref_mel = inputs
    torch.manual_seed(7)
    with torch.no_grad():
        want = ref(codes, cond, ref_mel, num_steps=4)
    torch.manual_seed(7)
    got = ours(codes, cond, ref_mel, steps=4, noise=torch.randn(1, 2 * N, 80))
    assert got.shape == (N * SAMPLES_PER_CODE,) == want.shape
    assert want.abs().max() > 0.1
    _close(got, want, 1e-3)


def test_out_of_range_codes_map_to_code_zero(models, inputs):
    _, ours = models
    _, cond, ref_mel = inputs
    bad = torch.tensor([[5, 8193, 8292, 8294, 8447, 99999, -1, 7]])  # 8193 is the last real row
    zero = torch.tensor([[5, 8193, 0, 0, 0, 0, 0, 7]])
    noise = torch.randn(1, 16, 80, generator=torch.Generator().manual_seed(8))
    a = ours.sample(bad, cond, ref_mel, steps=2, noise=noise)
    b = ours.sample(zero, cond, ref_mel, steps=2, noise=noise)
    assert torch.equal(a, b)


@pytest.mark.parametrize("n", [1, 7])
def test_samples_per_code(models, inputs, n):
    _, ours = models
    _, cond, ref_mel = inputs
    wav = ours(torch.arange(n)[None], cond, ref_mel, steps=2, solver="euler")
    assert wav.shape == (n * 480,) and wav.dtype == torch.float32


def test_stays_float32():
    m = Token2Wav(Token2WavConfig.from_dict(tiny_config(**OVERRIDES)["token2wav_config"]))
    m.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in m.state_dict().values())


def test_dit_rotary_built_on_meta_runs_where_the_weights_load():
    """A DiT built on meta and loaded with ``assign=True`` from a state dict without
    ``inv_freq`` (the benchmarks' path) computes it with the values of a DiT built normally, and
    its angles come out on the device the DiT runs on (the GPU check's crash: a CPU buffer
    beside CUDA weights; meta stands in for a second device on any machine)."""
    from omnistream.nn.dit import RotaryEmbedding

    for device in (DEVICE, "meta"):
        with torch.device("meta"):
            m = torch.nn.ModuleDict({"rot": RotaryEmbedding(64, 10000.0),
                                     "lin": torch.nn.Linear(2, 2)})
        m.load_state_dict({"lin.weight": torch.zeros(2, 2, device=device),
                           "lin.bias": torch.zeros(2, device=device)}, assign=True)
        assert torch.equal(m["rot"].inv_freq.cpu(), RotaryEmbedding(64, 10000.0).inv_freq)
        cos, _ = m["rot"](5, torch.device(device))
        assert cos.shape == (5, 32) and cos.device.type == torch.device(device).type
