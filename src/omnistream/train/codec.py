"""Speech codec stages of ``omnistream train`` (task "vocoder", "codec", "codec_dit" or
"codec_encoder").

Data: a speech corpus manifest (``train/speech_corpus.py``: 24 kHz clips + text). Model: a
checkpoint directory whose ``config.json`` has ``token2wav_config`` and ``codec_encoder_config``;
components whose weights are missing there start from a fresh initialisation.

* ``vocoder``: BigVGAN learns waveform from the clips' mel (log-mel L1 + multi-resolution STFT
  losses; no discriminator, to fit a CPU budget). With ``vocoder_input`` "decoded" it learns the
  recording from the checkpoint's round trip of it instead (encoder codes -> DiT mel, the
  checkpoint's ODE settings; cached in ``OUT/decoded_mels.pt``): the decoder's mel is smoother
  than a recording's, and a vocoder trained on recordings' mel does not expect that.
* ``codec``: the encoder (speech -> FSQ codes) and the DiT (codes -> mel by flow matching) learn
  together: the encoder from a small mel head on the quantised values (not saved in the model),
  the DiT by flow matching on the encoder's codes. Condition dropout trains the unconditional
  branch used by classifier-free guidance. With ``ctc_weight`` > 0 the encoder also learns from
  a character CTC head on whole clips' quantised values (the clip's text; training only): a mel
  regression alone leaves the codes short of what was said.
* ``codec_dit``: the DiT alone, the encoder frozen: a longer decoder training that keeps every
  code the same, so a Talker trained on the encoder's codes stays valid.
* ``codec_encoder``: the encoder with the DiT frozen; the DiT's code embedding is read through a
  straight-through soft assignment over the FSQ grid, so the flow-matching loss reaches the
  encoder: a new encoder for an existing decoder
  (e.g. the release's Token2Wav; codes then use the first ``prod(levels)`` rows of its table;
  a checkpoint without ``codec_encoder_config`` gets an encoder of the default size).
  ``attach`` then joins the encoder to that checkpoint, so its Talker trains on recordings.

Output: ``OUT/model.safetensors`` (``token2wav.*``, ``codec_encoder.*``), ``config.json``,
``spk_dict.pt`` (the voice: x-vector + reference mel), ``train_log.jsonl``, and ``resume.pt``,
written every ``save_every`` steps or ``save_every_s`` seconds and at the end.
"""

from __future__ import annotations

import json
import math
import random
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnistream.codec.encoder import MEL_SCALE, MEL_SHIFT, SpeechEncoder
from omnistream.codec.features import MEL_FLOOR, speech_mel
from omnistream.config import CodecEncoderConfig, OmniConfig
from omnistream.media.audio import OUTPUT_SAMPLE_RATE
from omnistream.nn.bigvgan import HOP
from omnistream.nn.token2wav import Token2Wav
from omnistream.train.loop import RESUME_FILE, StepBook, adamw, lr_at
from omnistream.train.model import save_whole, write_whole
from omnistream.train.speech_corpus import corpus_manifest, load_corpus
from omnistream.train.stages import Stage

REF_FRAMES = 300  # reference mel frames stored with the voice (3 s)
CFG_DROP = 0.15  # probability of training a row unconditionally (classifier-free guidance)
SOFT_TAU = 0.5  # temperature of the soft assignment over the FSQ grid
STFT_RES = ((512, 128), (1024, 256), (2048, 512))  # (n_fft, hop) of the STFT losses


# ------------------------------------------------------------------------------------- data


class SpeechSet:
    """Every clip of the corpus in memory: 24 kHz PCM and its log mel (cached beside the
    manifest as ``mel_cache.pt``)."""

    def __init__(self, manifests: list[str | Path], progress: bool = True):
        self.wavs: list[Tensor] = []
        self.mels: list[Tensor] = []
        self.texts: list[str] = []
        for m in map(corpus_manifest, manifests):  # the mel cache sits beside the manifest
            recs = load_corpus(m)
            self.texts += [r.get("text", "") for r in recs]
            cache = m.parent / "mel_cache.pt"
            mels = torch.load(cache) if cache.exists() else None
            if mels is not None and len(mels) != len(recs):
                mels = None
            it = recs
            if progress and mels is None:
                from tqdm import tqdm

                it = tqdm(recs, desc=f"mel {m.parent.name}", unit="clip")
            new = []
            for i, r in enumerate(it):
                w = read_wav(r["audio"])
                self.wavs.append(w)
                new.append(mels[i] if mels is not None else speech_mel(w))
            if mels is None:
                save_whole(new, cache)
            self.mels += new
        if not self.wavs:
            raise ValueError("the speech corpus is empty")

    def crops(self, rng: random.Random, batch: int, frames: int) -> tuple[Tensor, Tensor]:
        """``batch`` random crops of ``frames`` mel frames (an even start, so codes align):
        mel [B, 80, frames], wav [B, frames * 240] (zero-padded past a clip's end)."""
        mels, wavs = [], []
        for _ in range(batch):
            i = rng.randrange(len(self.mels))
            m, w = self.mels[i], self.wavs[i]
            f0 = 2 * rng.randrange(max(1, (m.shape[1] - frames) // 2 + 1))
            seg = m[:, f0:f0 + frames]
            ws = w[f0 * HOP:(f0 + frames) * HOP]
            seg = F.pad(seg, (0, frames - seg.shape[1]), value=math.log(MEL_FLOOR))
            mels.append(seg)
            wavs.append(F.pad(ws, (0, frames * HOP - ws.shape[0])))
        return torch.stack(mels), torch.stack(wavs)

    def clips(self, rng: random.Random, batch: int) -> tuple[Tensor, Tensor, list[str]]:
        """``batch`` random whole clips: mel [B, 80, F] (padded with silence to the longest, an
        even length), their frame counts [B], their texts."""
        idx = [rng.randrange(len(self.mels)) for _ in range(batch)]
        n = [self.mels[i].shape[1] for i in idx]
        width = max(n) + max(n) % 2
        mel = torch.stack([F.pad(self.mels[i], (0, width - self.mels[i].shape[1]),
                                 value=math.log(MEL_FLOOR)) for i in idx])
        return mel, torch.tensor(n), [self.texts[i] for i in idx]


def read_wav(path: str | Path) -> Tensor:
    """A 16-bit mono 24 kHz WAV as float32 [n]."""
    with wave.open(str(path), "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit mono WAV")
        if w.getframerate() != OUTPUT_SAMPLE_RATE:
            raise ValueError(f"{path}: expected {OUTPUT_SAMPLE_RATE} Hz, got {w.getframerate()}")
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return torch.from_numpy(x.astype(np.float32) / 32768.0)


# ------------------------------------------------------------------------------------ losses


def stft_loss(y: Tensor, x: Tensor) -> Tensor:
    """Multi-resolution STFT loss: spectral convergence + log-magnitude L1, averaged."""
    total = y.new_zeros(())
    for n_fft, hop in STFT_RES:
        win = torch.hann_window(n_fft, device=y.device)
        Y = torch.stft(y, n_fft, hop, window=win, return_complex=True).abs().clamp(min=1e-5)
        X = torch.stft(x, n_fft, hop, window=win, return_complex=True).abs().clamp(min=1e-5)
        total = total + torch.linalg.norm(Y - X) / torch.linalg.norm(X).clamp(min=1e-5)
        total = total + (Y.log() - X.log()).abs().mean()
    return total / len(STFT_RES)


class MelHead(nn.Module):
    """Training-only decoder of quantised codes [B, N, d_q] -> normalised log mel [B, 80, 2N]."""

    def __init__(self, d_q: int, hidden: int = 256):
        super().__init__()
        self.inp = nn.Linear(d_q, hidden)
        self.convs = nn.ModuleList(nn.Conv1d(hidden, hidden, 5, padding=2) for _ in range(3))
        self.out = nn.Linear(hidden, 160)

    def forward(self, q: Tensor) -> Tensor:
        h = self.inp(q).transpose(1, 2)
        for c in self.convs:
            h = h + c(F.gelu(h))
        B, N = q.shape[:2]
        y = self.out(h.transpose(1, 2)).reshape(B, 2 * N, 80)  # [B, 2N, 80]: two frames per code
        return y.transpose(1, 2)


CTC_CHARS = " abcdefghijklmnopqrstuvwxyz'"  # CTC classes 1..; 0 is the blank


def ctc_targets(texts: list[str]) -> tuple[Tensor, Tensor]:
    """Character ids (``CTC_CHARS``; other characters dropped, spaces collapsed) of each text,
    concatenated [sum L], and their lengths [B]."""
    ids = []
    for t in texts:
        t = " ".join("".join(c for c in t.lower() if c in CTC_CHARS).split())
        if not t:
            raise ValueError("a clip of the corpus has no text to supervise its codes")
        ids.append(torch.tensor([CTC_CHARS.index(c) + 1 for c in t]))
    return torch.cat(ids), torch.tensor([len(x) for x in ids])


class CTCHead(nn.Module):
    """Training-only reader of quantised codes [B, N, d_q] -> character log-probs [B, N, C]."""

    def __init__(self, d_q: int, hidden: int = 256, layers: int = 3):
        super().__init__()
        self.inp = nn.Linear(d_q, hidden)
        self.convs = nn.ModuleList(nn.Conv1d(hidden, hidden, 5, padding=2) for _ in range(layers))
        self.out = nn.Linear(hidden, len(CTC_CHARS) + 1)

    def forward(self, q: Tensor) -> Tensor:
        h = self.inp(q).transpose(1, 2)  # [B, H, N]
        for c in self.convs:
            h = h + c(F.gelu(h))
        return self.out(h.transpose(1, 2)).log_softmax(-1)


def ctc_loss(enc: SpeechEncoder, head: CTCHead, mel: Tensor, frames: Tensor,
             texts: list[str]) -> Tensor:
    """Character CTC loss (mean over clips, per target character) of the encoder's quantised
    codes of whole clips: mel [B, 80, F], frames [B] (two mel frames per code)."""
    q, _ = enc(mel)  # [B, N, d_q], straight-through to the encoder
    logp = head(q)  # [B, N, C]
    tgt, tgt_len = ctc_targets(texts)
    n = torch.clamp((frames + 1) // 2, max=logp.shape[1])
    return F.ctc_loss(logp.transpose(0, 1), tgt, n, tgt_len, zero_infinity=True)


def codec_loss(enc: SpeechEncoder, t2w: Token2Wav, head: MelHead | None, mel: Tensor, spk: Tensor,
               rng: torch.Generator, through_dit: bool) -> tuple[Tensor, dict[str, float]]:
    """Flow-matching loss of the DiT conditioned on the encoder's codes of ``mel`` [B, 80, 2N]
    + the mel head's L1 (none without ``head``). ``spk`` [2, C]: the voice's speaker condition
    and the unconditional one. ``through_dit``: the flow-matching loss reaches the encoder
    (straight-through soft code embeddings; for a trained, frozen DiT). Otherwise the encoder
    learns from the mel head only: a flow-matching gradient from an untrained DiT collapses the
    codes to one value."""
    dit = t2w.code2wav_dit_model
    B = mel.shape[0]
    with torch.set_grad_enabled(head is not None or through_dit):
        # a crop read alone: its first ~16 codes (the encoder's receptive field) mostly differ
        # from the whole clip's, which inference gives; training on the clip's changed nothing
        # (docs/CODEC.md, fifty-second session)
        z = enc.latents(mel)  # [B, N, d_q]
        q, codes = enc.fsq(z)
    grid = enc.fsq.grid()  # [K, d_q]
    table = dit.text_embed.codec_embed.weight[: grid.shape[0]]  # [K, emb]
    b = enc.fsq.bound(z)
    p = torch.softmax(-(b[..., None, :] - grid).pow(2).sum(-1) / SOFT_TAU, -1)  # [B, N, K]
    soft = p @ table
    emb = table[codes]
    if through_dit:
        emb = emb + soft - soft.detach()  # value: the hard code's row; grad: soft
    drop = torch.rand(B, generator=rng) < CFG_DROP
    emb = torch.where(drop[:, None, None], table[0].expand_as(emb), emb)
    emb = emb.repeat_interleave(dit.cfg.repeats, dim=1)  # [B, 2N, emb]
    spk_rows = spk[drop.long()]  # [B, C]
    c = dit.condition(codes, spk_rows, emb=emb)
    x1 = mel.transpose(1, 2)  # [B, 2N, 80]
    x0 = torch.randn(x1.shape, generator=rng)
    t = torch.rand(B, generator=rng)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
    fm = F.mse_loss(dit(xt, t, c), x1 - x0)
    usage = codes.unique().numel() / grid.shape[0]
    if head is None:
        return fm, {"fm": fm.item(), "code_usage": usage}
    aux = F.l1_loss(head(q), (mel + MEL_SHIFT) / MEL_SCALE)  # normalised: no mean to chase
    return fm + aux, {"fm": fm.item(), "mel_l1": aux.item(), "code_usage": usage}


def vocoder_loss(t2w: Token2Wav, mel: Tensor, wav: Tensor) -> tuple[Tensor, dict[str, float]]:
    y = t2w.code2wav_bigvgan_model(mel)  # [B, n]
    mel_l1 = F.l1_loss(speech_mel(y), speech_mel(wav))
    st = stft_loss(y, wav)
    return mel_l1 + st, {"mel_l1": mel_l1.item(), "stft": st.item()}


# ------------------------------------------------------------------------------------- model


def decoded_mels(enc: SpeechEncoder, t2w: Token2Wav, cfg: OmniConfig, voice: dict,
                 data: SpeechSet, seed: int, cache: Path, progress: bool = True) -> list[Tensor]:
    """Each clip's mel as the checkpoint decodes it: the encoder's codes through the DiT with the
    checkpoint's ODE settings (noise seeded per clip), cut to the recording's frames [80, F].
    Cached at ``cache`` (reused when it holds as many clips)."""
    if cache.exists():
        mels = torch.load(cache)
        if len(mels) == len(data.mels):
            return mels
    steps, solver, guidance = cfg.token2wav_config.decode_options()
    it = range(len(data.wavs))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="decoded mel", unit="clip")
    mels = []
    for i in it:
        codes = enc.encode(data.wavs[i])[None]  # [1, N]
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        mel = t2w.sample(codes, voice["cond"], voice["ref_mel"], steps, solver, guidance,
                         generator=g)[0]  # [80, 2N]
        n = data.mels[i].shape[1]
        mels.append(F.pad(mel[:, :n], (0, max(0, n - mel.shape[1])), value=math.log(MEL_FLOOR)))
    save_whole(mels, cache)
    return mels


def fresh_init_(module: nn.Module, seed: int) -> None:
    """Initialise a module built without weights (DiT: adaLN modulations and output at zero)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() > 1:
            fan_in = p[0].numel()
            p.data = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
        elif name.endswith((".alpha", ".beta")):
            p.data = torch.zeros(p.shape)  # SnakeBeta: a = b = 1
        elif "norm" in name and name.endswith("weight"):
            p.data = torch.ones(p.shape)
        else:
            p.data = torch.zeros(p.shape)
    for name, m in module.named_modules():
        if name.endswith(("attn_norm.linear", "norm_out.linear")) or name.endswith("proj_out"):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)


def _load_or_init(model_dir: Path, cfg: OmniConfig, part: str, seed: int) -> tuple[nn.Module, bool]:
    from omnistream.checkpoint import CheckpointError, component_factory, load_component

    try:
        m = load_component(model_dir, part, config=cfg, quiet=True)
        return m.float(), True
    except (CheckpointError, FileNotFoundError, KeyError):
        m = component_factory(part)(cfg)  # built for real: buffers (RoPE inv_freq) are computed
        fresh_init_(m, seed)
        return m, False


def voice_from_corpus(data: SpeechSet, seed: int) -> dict[str, Tensor]:
    """The corpus voice's speaker entry: a fixed x-vector and a reference mel of one clip."""
    g = torch.Generator().manual_seed(seed + 4242)
    cond = torch.randn(1, 192, generator=g) * 0.5
    longest = max(range(len(data.mels)), key=lambda i: data.mels[i].shape[1])
    ref = data.mels[longest][:, :REF_FRAMES].t()[None].contiguous()  # [1, T, 80]
    return {"cond": cond, "ref_mel": ref}


# -------------------------------------------------------------------------------------- loop


def train_codec(stage: Stage, data: list[str | Path], model_dir: str | Path, out_dir: str | Path,
                stop_at: int | None = None, resume: bool = True, verbose: bool = True,
                voice: str = "Joe", voice_bos: int = 151872) -> dict[str, Any]:
    """Run a codec stage; see the module docstring. Returns ``{"losses", "out"}``."""
    from omnistream.checkpoint import load_config, load_speakers

    s = stage
    torch.manual_seed(s.seed)
    model_dir, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(model_dir)
    if cfg.codec_encoder_config is None and s.task == "codec_encoder":
        # a checkpoint without a speech encoder (the release's): a new one of the default size
        cfg.codec_encoder_config = CodecEncoderConfig()
    if cfg.codec_encoder_config is None and s.task != "vocoder":
        raise ValueError(f"{model_dir}/config.json has no codec_encoder_config")
    t2w, t2w_loaded = _load_or_init(model_dir, cfg, "token2wav", s.seed)
    enc = head = ctc_head = None
    if s.task != "vocoder":
        enc, _ = _load_or_init(model_dir, cfg, "codec_encoder", s.seed + 1)
        head = MelHead(len(cfg.codec_encoder_config.levels))
        if s.task == "codec_encoder" and not t2w_loaded:
            raise ValueError("codec_encoder trains against a frozen Token2Wav: "
                             f"{model_dir} has no token2wav weights")
    if s.vocoder_input not in ("mel", "decoded"):
        raise ValueError(f"vocoder_input must be 'mel' or 'decoded', not {s.vocoder_input!r}")
    if s.vocoder_input == "decoded" and (s.task != "vocoder" or not t2w_loaded
                                         or cfg.codec_encoder_config is None):
        raise ValueError("vocoder_input 'decoded' needs a vocoder stage on a checkpoint with "
                         "trained codec_encoder and token2wav weights")
    if s.ctc_weight > 0:
        if s.task not in ("codec", "codec_encoder"):
            raise ValueError(f"ctc_weight trains the encoder: not in a {s.task!r} stage")
        ctc_head = CTCHead(len(cfg.codec_encoder_config.levels))
    dataset = SpeechSet(data, progress=verbose)
    try:
        speakers = {k: {"bos_token": v.bos_token, "cond": v.cond, "ref_mel": v.ref_mel}
                    for k, v in load_speakers(model_dir).items()}
    except Exception:  # noqa: BLE001 - no speaker file yet: derive the voice from the corpus
        speakers = {voice: {"bos_token": voice_bos, **voice_from_corpus(dataset, s.seed)}}
    spk_entry = next(iter(speakers.values()))
    if s.vocoder_input == "decoded":
        coder, _ = _load_or_init(model_dir, cfg, "codec_encoder", s.seed + 1)
        dataset.mels = decoded_mels(coder, t2w, cfg, spk_entry, dataset, s.seed,
                                    out / "decoded_mels.pt", verbose)

    if s.task == "vocoder":
        params = list(t2w.code2wav_bigvgan_model.parameters())
    elif s.task == "codec":
        params = [*enc.parameters(), *head.parameters(), *t2w.code2wav_dit_model.parameters()]
    elif s.task == "codec_dit":
        params = list(t2w.code2wav_dit_model.parameters())
        for p in enc.parameters():
            p.requires_grad_(False)
    else:
        params = [*enc.parameters(), *head.parameters()]
    if ctc_head is not None:
        params += list(ctc_head.parameters())
    for p in t2w.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = adamw(params, s, weight_decay=s.weight_decay)

    step, losses = 0, []
    rng = random.Random(s.seed)
    gen = torch.Generator().manual_seed(s.seed + 1)
    rpath = out / RESUME_FILE
    if resume and rpath.exists():
        st = torch.load(rpath, weights_only=False)
        t2w.load_state_dict(st["token2wav"])
        if enc is not None:
            enc.load_state_dict(st["codec_encoder"])
            head.load_state_dict(st["head"])
        if ctc_head is not None and "ctc_head" in st:
            ctc_head.load_state_dict(st["ctc_head"])
        opt.load_state_dict(st["optimizer"])
        step, rng, losses = st["step"], st["rng"], st["losses"]
        gen.set_state(st["gen"])
        if verbose:
            print(f"resumed {s.name} at step {step}")
    def save() -> None:
        _save_model(out, model_dir, cfg, t2w, enc, speakers)
        state = {"token2wav": t2w.state_dict(), "optimizer": opt.state_dict(), "step": step,
                 "rng": rng, "gen": gen.get_state(), "losses": losses, "stage": s.to_dict()}
        if enc is not None:
            state["codec_encoder"], state["head"] = enc.state_dict(), head.state_dict()
        if ctc_head is not None:
            state["ctc_head"] = ctc_head.state_dict()
        save_whole(state, rpath)

    end = s.max_steps if stop_at is None else min(s.max_steps, stop_at)
    book = StepBook(out, s, step, end, save, verbose)
    while step < end:
        t0 = time.perf_counter()
        lr = lr_at(step, s)
        for g in opt.param_groups:
            g["lr"] = lr
        mel, wav = dataset.crops(rng, s.batch_size, s.segment_frames)
        if s.task == "vocoder":
            loss, parts = vocoder_loss(t2w, mel, wav)
        else:
            dit = t2w.code2wav_dit_model
            spk = dit.speaker(spk_entry["cond"].float(), spk_entry["ref_mel"].float(), cfg=True)
            loss, parts = codec_loss(enc, t2w, None if s.task == "codec_dit" else head, mel, spk,
                                     gen, s.task == "codec_encoder")
        if ctc_head is not None:
            ctc = ctc_loss(enc, ctc_head, *dataset.clips(rng, s.batch_size))
            loss = loss + s.ctc_weight * ctc
            parts["ctc"] = ctc.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        step += 1
        losses.append(loss.item())
        book.stepped({"step": step, "of": s.max_steps, "loss": losses[-1], "lr": lr, **parts,
                      "step_s": time.perf_counter() - t0})
    book.close()
    if step >= end and not rpath.exists():
        save()
    return {"losses": losses, "out": str(out)}


def _save_model(out: Path, src: Path, cfg: OmniConfig, t2w: Token2Wav,
                enc: SpeechEncoder | None, speakers: dict) -> None:
    """Write the trained components in the released layout (plus ``codec_encoder.*``); the
    source checkpoint's other codec tensors are kept."""
    from safetensors.torch import save_file

    from omnistream.checkpoint import CheckpointError, read_tensors, weight_map

    tensors: dict[str, Tensor] = {}
    try:
        names = [n for n in weight_map(src) if n.startswith(("token2wav.", "codec_encoder."))]
        tensors.update({k: v.clone() for k, v in read_tensors(src, names=names)})
    except (CheckpointError, FileNotFoundError):
        pass
    tensors.update({f"token2wav.{k}": v.detach().contiguous() for k, v in t2w.state_dict().items()})
    if enc is not None:
        tensors.update({f"codec_encoder.{k}": v.detach().contiguous()
                        for k, v in enc.state_dict().items()})
    write_whole(out / "model.safetensors",
                lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    torch.save(speakers, out / "spk_dict.pt")


def merge_vocoder(codec_dir: str | Path, vocoder_dir: str | Path, out: str | Path) -> Path:
    """One codec checkpoint from stages run side by side: everything of ``codec_dir`` (encoder,
    DiT, config, voice) with the BigVGAN of ``vocoder_dir`` (a vocoder stage's output)."""
    import shutil

    from safetensors.torch import save_file

    from omnistream.checkpoint import read_tensors, weight_map

    codec_dir, vocoder_dir, out = Path(codec_dir), Path(vocoder_dir), Path(out)
    voc = "token2wav.code2wav_bigvgan_model."
    tensors = {k: v.clone() for k, v in read_tensors(codec_dir, names=list(weight_map(codec_dir)))}
    new = {k: v.clone() for k, v in read_tensors(vocoder_dir, prefix=voc)}
    if set(new) != {k for k in tensors if k.startswith(voc)}:
        raise ValueError(f"{vocoder_dir}'s vocoder does not match {codec_dir}'s config")
    tensors.update(new)
    out.mkdir(parents=True, exist_ok=True)
    write_whole(out / "model.safetensors",
                lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    for name in ("config.json", "spk_dict.pt"):
        if (codec_dir / name).resolve() != (out / name).resolve():
            shutil.copy(codec_dir / name, out / name)
    return out


def grow_dit(src: str | Path, out: str | Path, layers: int, seed: int = 0) -> Path:
    """A copy of codec checkpoint ``src`` whose DiT has ``layers`` blocks: the trained blocks
    first, then new ones without look-back or look-ahead (the receptive field, hence streaming,
    is unchanged). A new block's adaLN modulation starts at zero, so its gates are zero and it is
    the identity: the grown DiT decodes exactly as ``src`` until ``codec_dit`` trains it."""
    import shutil

    from omnistream.checkpoint import load_config, read_tensors, weight_map
    from omnistream.maketiny import write_safetensors
    from omnistream.nn.dit import DiTBlock

    src, out = Path(src), Path(out)
    cfg = load_config(src)
    dit_cfg = cfg.token2wav_config.dit_config
    old = dit_cfg.num_hidden_layers
    if layers <= old:
        raise ValueError(f"{src}'s DiT already has {old} layers: grow to more than that")
    tensors = dict(read_tensors(src, names=list(weight_map(src))))
    for i in range(old, layers):
        block = DiTBlock(dit_cfg, look_back=0, look_ahead=0)
        fresh_init_(block, seed + i)  # zeroes attn_norm.linear: the gates
        pre = f"token2wav.code2wav_dit_model.transformer_blocks.{i}."
        tensors |= {pre + k: v.detach() for k, v in block.state_dict().items()}
    dit_cfg.num_hidden_layers = layers
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out, [tensors])
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    shutil.copy(src / "spk_dict.pt", out / "spk_dict.pt")
    return out


def relevel(src: str | Path, out: str | Path, levels: list[int], seed: int = 0) -> Path:
    """A copy of codec checkpoint ``src`` whose encoder quantises to FSQ ``levels`` (richer codes,
    at most the Talker's 8,192): the encoder's trunk stays, its projection keeps the old rows for
    the dimensions both have (new ones start small), and the DiT's code table is new (one row per
    code, plus the padding row). Every code changes meaning, so the ``codec`` stage (encoder and
    DiT together) trains it next; a Talker must then learn the new codes."""
    import shutil

    from omnistream.checkpoint import load_config, read_tensors, weight_map
    from omnistream.maketiny import write_safetensors

    src, out = Path(src), Path(out)
    n = math.prod(levels)
    if len(levels) < 1 or min(levels) < 2 or n > 8192:
        raise ValueError(f"FSQ levels must each be at least 2, at most 8,192 codes: {levels}")
    cfg = load_config(src)
    tensors = dict(read_tensors(src, names=list(weight_map(src))))
    g = torch.Generator().manual_seed(seed)
    w, b = tensors["codec_encoder.proj.weight"], tensors["codec_encoder.proj.bias"]  # [d_q, D]
    k = min(len(levels), w.shape[0])
    new_w = torch.randn(len(levels), w.shape[1], generator=g) * 0.1 / math.sqrt(w.shape[1])
    new_w[:k] = w[:k]
    new_b = torch.zeros(len(levels))
    new_b[:k] = b[:k]
    tensors["codec_encoder.proj.weight"], tensors["codec_encoder.proj.bias"] = new_w, new_b
    key = "token2wav.code2wav_dit_model.text_embed.codec_embed.weight"
    dim = tensors[key].shape[1]
    tensors[key] = torch.randn(n + 1, dim, generator=g) / math.sqrt(dim)
    cfg.codec_encoder_config.levels = list(levels)
    cfg.token2wav_config.dit_config.num_embeds = n
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out, [tensors])
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    shutil.copy(src / "spk_dict.pt", out / "spk_dict.pt")
    return out


def attach(encoder_dir: str | Path, model_dir: str | Path, out: str | Path) -> Path:
    """``out``: checkpoint ``model_dir`` (e.g. the release's, any size) with the speech encoder
    of ``encoder_dir`` (a ``codec_encoder`` stage's output, trained against ``model_dir``'s
    frozen Token2Wav), so ``omnistream train`` encodes talker records' recordings (``speech``)
    into codes its DiT understands. ``model_dir`` is left as it is: ``out`` links to its files,
    with the encoder in a file of its own (``codec_encoder.safetensors``), a new index and a
    ``config.json`` with the encoder's config."""
    from safetensors.torch import save_file

    from omnistream.checkpoint import INDEX_FILE, load_config, read_tensors, weight_map

    encoder_dir, model_dir, out = Path(encoder_dir), Path(model_dir), Path(out)
    table = "token2wav.code2wav_dit_model.text_embed.codec_embed.weight"
    (mine,), (theirs,) = (
        [v for _, v in read_tensors(d, names=[table])] for d in (encoder_dir, model_dir))
    if not torch.equal(mine.float(), theirs.float()):  # False for other shapes too
        raise ValueError(f"{encoder_dir}'s encoder was trained against another Token2Wav than "
                         f"{model_dir}'s: its codes would mean something else there")
    enc_cfg = load_config(encoder_dir).codec_encoder_config
    enc = {k: v.contiguous() for k, v in read_tensors(encoder_dir, prefix="codec_encoder.")}
    if enc_cfg is None or not enc:
        raise ValueError(f"{encoder_dir} holds no speech encoder (codec_encoder.*)")
    wmap = {k: v for k, v in weight_map(model_dir).items() if not k.startswith("codec_encoder.")}
    if out.resolve() == model_dir.resolve():
        raise ValueError("attach writes a new checkpoint folder: give an OUT other than the model")
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():  # weights, tokenizer, voices: linked, not copied
        if f.name not in ("config.json", INDEX_FILE) and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    name = "codec_encoder.safetensors"
    write_whole(out / name, lambda p: save_file(enc, str(p), metadata={"format": "pt"}))
    index = {"metadata": {}, "weight_map": wmap | dict.fromkeys(enc, name)}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    cfg = json.loads((model_dir / "config.json").read_text())  # every key, as the model has it
    cfg["codec_encoder_config"] = enc_cfg.to_dict()
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


_USAGE = ("usage: python -m omnistream.train.codec merge CODEC_DIR VOCODER_DIR OUT\n"
          "       python -m omnistream.train.codec grow CODEC_DIR OUT LAYERS\n"
          "       python -m omnistream.train.codec relevel CODEC_DIR OUT L1,L2,...\n"
          "       python -m omnistream.train.codec attach ENCODER_DIR MODEL_DIR OUT")

if __name__ == "__main__":
    import sys

    if len(sys.argv) == 5 and sys.argv[1] == "merge":
        print(merge_vocoder(*sys.argv[2:5]))
    elif len(sys.argv) == 5 and sys.argv[1] == "grow":
        print(grow_dit(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    elif len(sys.argv) == 5 and sys.argv[1] == "relevel":
        print(relevel(sys.argv[2], sys.argv[3], [int(v) for v in sys.argv[4].split(",")]))
    elif len(sys.argv) == 5 and sys.argv[1] == "attach":
        print(attach(*sys.argv[2:5]))
    else:
        raise SystemExit(_USAGE)
