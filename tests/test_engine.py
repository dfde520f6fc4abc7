"""The streaming engine on a tiny random checkpoint: streaming equals offline, speech starts
before the text ends, conversations continue as the chat template renders them, live turns
equal message turns, cancellation and bad input leave the session usable."""

import numpy as np
import pytest
import torch

from omnistream.engine.events import AudioChunk, Done, TextDelta
from omnistream.engine.session import Engine
from omnistream.engine.wav import StreamingWavWriter
from omnistream.prompt import Processor

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine.load(tiny_dir, quiet=True)


def _run(sess, messages, **kw):
    evs = list(sess.respond(messages, **kw))
    assert isinstance(evs[-1], Done) and not any(isinstance(e, Done) for e in evs[:-1])
    return evs, evs[-1]


def _tone(seconds: float, sr: int = 16000, f: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * f * t) * (1 + 0.5 * np.sin(2 * np.pi * 1.5 * t))).astype(
        np.float32)


def test_streaming_equals_offline_and_speech_overlaps_text(engine):
    kw = dict(seed=3, max_new_tokens=60, talker_max_new_tokens=90, ignore_eos=True)
    evs, done = _run(engine.session(**kw), "Tell me a long story.")
    kinds = "".join("T" if isinstance(e, TextDelta) else "A" if isinstance(e, AudioChunk) else ""
                    for e in evs)
    # the first audio chunk comes while the Thinker is still writing
    assert "A" in kinds and kinds.index("A") < kinds.rindex("T"), kinds
    assert done.finish_reason == "length" and len(done.text_ids) == 60
    assert 0 < len(done.codec_ids) <= 90
    wav = np.concatenate([e.pcm for e in evs if isinstance(e, AudioChunk)])
    assert wav.dtype == np.float32 and wav.size == 480 * len(done.codec_ids)  # 24 kHz, 50 codes/s
    assert [e.index for e in evs if isinstance(e, AudioChunk)] == list(range(kinds.count("A")))
    assert done.timings["ttfa_s"] < done.timings["total_s"]

    _, off = _run(engine.session(**kw), "Tell me a long story.", offline=True)
    assert off.text_ids == done.text_ids and off.codec_ids == done.codec_ids
    off_wav = np.concatenate([e.pcm for e in _ if isinstance(e, AudioChunk)])
    snr = 10 * np.log10(np.sum(off_wav**2) / max(np.sum((wav - off_wav) ** 2), 1e-30))
    print(f"streamed vs offline waveform: max|diff| {np.abs(wav - off_wav).max():.3g}, "
          f"SNR {snr:.1f} dB over {wav.size} samples")
    assert snr > 40, snr  # chunked code2wav vs one solve over the whole utterance


def test_text_only_session_and_text_matches_ids(engine):
    sess = engine.session(audio_output=False, seed=0, max_new_tokens=12)
    evs, done = _run(sess, [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert not any(isinstance(e, AudioChunk) for e in evs) and done.codec_ids == []
    streamed = "".join(e.text for e in evs if isinstance(e, TextDelta))
    assert streamed == engine.tokenizer.decode(
        [t for t in done.text_ids if t not in (151643, 151645)], skip_special_tokens=True)


def test_conversation_continues_as_the_template_renders_it(engine, tiny_dir):
    sess = engine.session(audio_output=False, seed=1, max_new_tokens=8, ignore_eos=True)
    _, d1 = _run(sess, "What is the capital of France?")
    _, d2 = _run(sess, "And of Spain?")
    assert d2.usage.cached_tokens == len(sess.ctx.ids) - d2.usage.prompt_tokens - 7
    # the whole cached conversation == the processor's rendering of the full history, with the
    # sampled reply ids spliced in where the assistant text goes
    proc = Processor.from_dir(tiny_dir)
    marker = "@@@"
    full = proc([{"role": "user", "content": "What is the capital of France?"},
                 {"role": "assistant", "content": marker},
                 {"role": "user", "content": "And of Spain?"}],
                system_prompt="You are a helpful assistant.").input_ids.tolist()
    m = engine.tokenizer.encode(marker)
    i = next(k for k in range(len(full)) if full[k:k + len(m)] == m)
    expected = full[:i] + d1.text_ids + full[i + len(m):]
    assert sess.ctx.ids[:len(expected)] == expected
    assert len(sess.ctx.ids) == len(expected) + 7  # + the second reply's fed tokens
    assert sess.cache.length == len(sess.ctx.ids)


def test_live_audio_turn_equals_message_turn(engine):
    audio = _tone(4.3)
    kw = dict(audio_output=False, seed=0, max_new_tokens=6, ignore_eos=True)
    ref_sess = engine.session(**kw)
    _, ref = _run(ref_sess, [{"role": "user", "content": [{"type": "audio",
                                                             "audio": (audio, 16000)}]}])
    live = engine.session(**kw)
    for k in range(0, audio.size, 1600):  # 100 ms packets, as a microphone sends them
        live.append_audio(audio[k:k + 1600], 16000)
    assert live.cache.length > 100  # complete 2 s blocks were prefilled during the turn
    live.commit_user_turn()
    _, got = _run(live, [])
    assert live.last_prompt_ids == ref_sess.last_prompt_ids
    assert got.text_ids == ref.text_ids
    assert got.usage.prompt_tokens == ref.usage.prompt_tokens

    # a second live turn continues the conversation; clearing one leaves no trace
    n = live.cache.length
    live.append_audio(audio[:40000], 16000)
    live.clear_user_turn()
    assert live.cache.length == n
    live.append_audio(audio[:20000], 16000)
    live.commit_user_turn("What was that?")
    _, d = _run(live, [])
    assert d.usage.cached_tokens == n and len(d.text_ids) == 6


def test_live_turn_with_camera_frames(engine):
    sess = engine.session(audio_output=False, seed=0, max_new_tokens=4)
    audio = _tone(2.5)
    sess.append_audio(audio[:8000], 16000)  # audio first: the turn is rebuilt as video
    rgb = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    for k in range(6):
        sess.append_video_frame(rgb, 10.0 + 0.5 * k)
        sess.append_audio(audio[8000 + k * 4000: 12000 + k * 4000], 16000)
    sess.commit_user_turn()
    _, d = _run(sess, [])
    cfg = engine.cfg.thinker_config
    ids = sess.last_prompt_ids
    assert cfg.video_token_index in ids and cfg.audio_token_index in ids
    assert d.usage.prompt_tokens == len(ids)


def test_cancel_keeps_the_session_usable(engine):
    sess = engine.session(seed=0, max_new_tokens=40, talker_max_new_tokens=60, ignore_eos=True)
    gen = sess.respond("Talk for a while.")
    n = 0
    for ev in gen:
        if isinstance(ev, TextDelta):
            n += 1
            if n == 5:
                sess.cancel()
        if isinstance(ev, Done):
            done = ev
    assert done.finish_reason == "cancelled" and len(done.text_ids) == 5
    cached = sess.cache.length
    _, d2 = _run(sess, "Go on.")
    assert d2.finish_reason == "length" and d2.usage.cached_tokens == cached


def test_bad_input_is_named(engine, tmp_path, monkeypatch):
    from omnistream.engine.prefix import PrefixStore

    monkeypatch.setattr(engine, "prefixes", PrefixStore())  # no system block shared yet
    with pytest.raises(ValueError, match="Chelsie"):
        engine.session(voice="nobody")
    sess = engine.session(audio_output=False, max_new_tokens=4, max_context=64)
    with pytest.raises(ValueError, match="too long"):
        _run(sess, "word " * 200)
    with pytest.raises(ValueError, match="nothing to respond to"):
        _run(sess, [])
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(ValueError):
        _run(sess, [{"role": "user", "content": [{"type": "audio", "audio": str(bad)}]}])
    _, d = _run(sess, "Still there?")  # the session survives all of it
    assert d.usage.cached_tokens == 0 and len(engine.prefixes) == 1  # nothing kept before


def test_text_only_load_skips_speech(tiny_dir):
    eng = Engine.load(tiny_dir, audio_output=False, quiet=True)
    assert eng.talker is None and eng.token2wav is None and eng.random_weights
    with pytest.raises(ValueError, match="text-only"):
        eng.session(audio_output=True)


def test_tf32_is_asked_of_cuda_only(tiny_dir):
    """``Engine.load(tf32=True)`` turns on TF32 matmuls for a CUDA engine and leaves the
    process-wide flag alone for a CPU one (where it means nothing, and other engines share it)."""
    matmul = torch.backends.cuda.matmul
    was = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        Engine.load(tiny_dir, quiet=True, audio_output=False, tf32=True)
        assert matmul.allow_tf32 is False
        if torch.cuda.is_available():
            Engine.load(tiny_dir, quiet=True, audio_output=False, device="cuda", tf32=True)
            assert matmul.allow_tf32 is True
    finally:
        matmul.allow_tf32 = was


def test_wav_writer_streams_a_valid_file(tmp_path):
    import wave

    w = StreamingWavWriter(tmp_path / "a.wav")
    w.write(np.zeros(480, np.float32))
    w.write(np.ones(960, np.float32))
    w.close()
    with wave.open(str(tmp_path / "a.wav")) as f:
        assert f.getframerate() == 24000 and f.getnframes() == 1440 and f.getsampwidth() == 2


def test_talker_cache_is_reused_across_turns(engine, monkeypatch):
    from omnistream.engine.sampling import SamplingParams

    kw = dict(seed=0, max_new_tokens=6, talker_max_new_tokens=12, ignore_eos=True,
              talker_sampling=SamplingParams(repetition_penalty=1.05))
    prefilled = []
    real = type(engine.talker).prefill_inputs

    def counting(self, cache, prompt, *a, **k):
        prefilled.append(prompt.shape[1])
        return real(self, cache, prompt, *a, **k)

    monkeypatch.setattr(type(engine.talker), "prefill_inputs", counting)
    monkeypatch.setattr(engine, "prefixes", None)  # within one session (shared blocks: below)
    codes = []
    for reuse in (True, False):
        sess = engine.session(**kw)
        sess.reuse_talker_cache = reuse
        _, d1 = _run(sess, "First question?")
        p1 = len(sess.last_prompt_ids)
        _, d2 = _run(sess, "Second question?")
        codes.append((d1.codec_ids, d2.codec_ids))
    with_reuse, without = prefilled[:2], prefilled[2:]
    assert with_reuse[0] == without[0] == p1
    assert with_reuse[1] < without[1]  # only the positions after the first prompt
    assert codes[0] == codes[1] and len(codes[0][1]) == 12


def test_session_options_object_or_fields(engine):
    import dataclasses

    from omnistream.engine.options import SessionOptions

    opts = SessionOptions(audio_output=False, seed=5, max_new_tokens=5, ignore_eos=True)
    _, a = _run(engine.session(opts), "Hello")
    _, b = _run(engine.session(audio_output=False, seed=5, max_new_tokens=5, ignore_eos=True),
                "Hello")
    sess = engine.session(opts, seed=6)
    assert a.text_ids == b.text_ids and len(a.text_ids) == 5
    assert sess.options == opts.replace(seed=6) and opts.seed == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.seed = 1
    for bad in (dict(max_new_tokens=0), dict(solver="heun"), dict(max_chunk_frames=8),
                dict(guidance_scale=-1.0), dict(ode_steps=0)):
        with pytest.raises(ValueError):
            SessionOptions(**bad)
    assert SessionOptions.speech_limit(2.0) == 100


def test_decode_options_default_to_the_checkpoint(engine, monkeypatch):
    # a session's ODE options left None come from token2wav_config (the release's without keys);
    # the tiny DiT's output layer is zero, so the calls that reach the solver are what we check
    sess = engine.session(seed=1)
    assert (sess.ode_steps, sess.solver, sess.guidance_scale) == (10, "rk4", 0.5)
    t2w = engine.cfg.token2wav_config
    monkeypatch.setattr(t2w, "ode_steps", 2)
    monkeypatch.setattr(t2w, "solver", "euler")
    monkeypatch.setattr(t2w, "guidance_scale", 0.0)
    calls = []
    solve = engine.token2wav.solve

    def spy(codes, spk, noise, steps, solver, guidance_scale):
        calls.append((steps, solver, guidance_scale, spk.shape[0]))
        return solve(codes, spk, noise, steps, solver, guidance_scale)

    monkeypatch.setattr(engine.token2wav, "solve", spy)
    kw = dict(seed=4, max_new_tokens=6, talker_max_new_tokens=40, ignore_eos=True)
    _, done = _run(engine.session(**kw), "Hello")
    assert done.codec_ids and calls and set(calls) == {(2, "euler", 0.0, 1)}  # no CFG branch
    calls.clear()
    _run(engine.session(**kw, ode_steps=3, solver="rk4", guidance_scale=0.5), "Hello")
    assert calls and set(calls) == {(3, "rk4", 0.5, 2)}


def test_new_sessions_share_the_system_blocks_cache(engine, monkeypatch):
    """engine/prefix.py: the first session opening with a system block stores its Thinker cache
    rows (and the Talker's); later ones copy them and prefill only the rest of the prompt, and
    answer as a session that prefilled the whole prompt (text, codes; cache rows to float
    rounding). Another system prompt gets its own entry; a continued turn prefills as before."""
    from omnistream.engine.prefix import PrefixStore

    kw = dict(seed=1, max_new_tokens=8, talker_max_new_tokens=30, ignore_eos=True)
    prefilled, talker = [], []
    real, real_talker = type(engine.thinker).prefill_chunks, type(engine.talker).prefill_inputs

    def counting(self, input_ids, *a, **k):
        prefilled.append(input_ids.shape[1])
        return (yield from real(self, input_ids, *a, **k))

    def counting_talker(self, cache, prompt, *a, **k):
        talker.append(prompt.shape[1])
        return real_talker(self, cache, prompt, *a, **k)

    monkeypatch.setattr(type(engine.thinker), "prefill_chunks", counting)
    monkeypatch.setattr(type(engine.talker), "prefill_inputs", counting_talker)
    store = engine.prefixes
    try:
        engine.prefixes = None
        whole_sess = engine.session(**kw)
        _, want = _run(whole_sess, "Tell me a story.")
        whole = prefilled.pop()
        engine.prefixes = PrefixStore()
        _, first = _run(engine.session(**kw), "Tell me a story.")  # prefills and stores
        n = prefilled[0]
        assert len(prefilled) == 2 and 0 < n and prefilled[1] == whole - n
        prefilled.clear()
        sess = engine.session(**kw)
        _, second = _run(sess, "Tell me a story.")  # copies
        assert prefilled == [whole - n] and engine.prefixes.hits == 1
        assert talker == [whole, whole, whole - n]  # the Talker's rows of the block shared too
        for d in (first, second):
            assert (d.text_ids, d.codec_ids) == (want.text_ids, want.codec_ids)
        assert (first.usage.cached_tokens, second.usage.cached_tokens) == (0, n)  # as OpenAI's
        assert len(want.codec_ids) == 30
        for c, w in ((sess.cache, whole_sess.cache),
                     (sess.ctx.talker_cache, whole_sess.ctx.talker_cache)):
            for a, b in zip(c.k + c.v, w.k + w.v, strict=True):
                torch.testing.assert_close(a[:, :, :n], b[:, :, :n], rtol=1e-5, atol=1e-5)
        prefilled.clear()
        _run(sess, "And another one.")  # a later turn: no system block, prefilled whole
        assert len(prefilled) == 1 and engine.prefixes.hits == 1
        _run(engine.session(system="Answer briefly.", **kw), "Tell me a story.")
        assert len(engine.prefixes) == 2 and engine.prefixes.hits == 1
    finally:
        engine.prefixes = store


def test_system_block_length():
    from omnistream.engine.prefix import IDS, system_block_length

    block = [IDS.im_start, IDS.system, IDS.newline, 40, 41, IDS.im_end]
    turn = [IDS.newline, IDS.im_start, IDS.user, IDS.newline, 42]
    assert system_block_length(block + turn) == len(block)
    assert system_block_length(block) == 0  # nothing after it to prefill
    assert system_block_length(turn + block) == 0  # not at the start
    assert system_block_length(block[:3] + [IDS.image] + block[3:] + turn) == 0  # media
    assert system_block_length([IDS.im_start, IDS.user, 40, IDS.im_end, 41]) == 0


def test_a_voices_condition_is_computed_once(engine, monkeypatch):
    """The DiT's per-voice condition (ECAPA over the reference mel) runs once per voice and
    guidance scale, not once per reply; a reply started from the kept one sounds the same."""
    calls = []
    real = type(engine.token2wav).speaker

    def counting(self, cond, ref_mel, guidance_scale=0.5):
        calls.append(guidance_scale)
        return real(self, cond, ref_mel, guidance_scale)

    monkeypatch.setattr(engine, "_voice_conditions", {})
    kw = dict(seed=3, max_new_tokens=4, talker_max_new_tokens=40, ignore_eos=True)
    pcm = []
    for i in range(2):
        if i:  # counted from the second reply on
            monkeypatch.setattr(type(engine.token2wav), "speaker", counting)
        evs, _ = _run(engine.session(**kw), "Hello")
        pcm.append(np.concatenate([e.pcm for e in evs if isinstance(e, AudioChunk)]))
    assert calls == []  # the second reply took the first one's
    _run(engine.session(**kw, guidance_scale=0.0), "Hello")
    _run(engine.session(**kw, guidance_scale=0.0), "Hello")
    assert calls == [0.0]  # another scale: its own, once
    np.testing.assert_array_equal(pcm[0], pcm[1])
