// omnistream web client: microphone -> PCM16 24 kHz over /v1/realtime, replies played as they
// stream (Web Audio), transcript shown live, optional camera frames. No build step.
"use strict";

const RATE = 24000;
const $ = (id) => document.getElementById(id);
// state the page exposes for tests and curious users
const omni = (window.omni = {
  state: "idle", chunks: 0, samples: 0, ended: 0, framesSent: 0, blocksSent: 0,
  replies: 0, text: "", firstAudioMs: null, events: {},
  lastReply: { text: "", audio: [], status: null },  // the latest reply, as received
});

let ws = null, ctx = null, micStream = null, micNode = null, camStream = null, camTimer = null;
let nextTime = 0, sources = [], current = null, turnEndAt = null;

function setState(s) {
  omni.state = s;
  const el = $("state");
  el.textContent = s;
  el.className = "pill " + s;
}

function addMsg(cls, text) {
  const div = document.createElement("div");
  div.className = "msg " + cls;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function b64FromInt16(i16) {
  const bytes = new Uint8Array(i16.buffer, i16.byteOffset, i16.byteLength);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

function floatFromB64(b64) {
  const bin = atob(b64);
  const n = bin.length >> 1;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    let v = bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8);
    if (v >= 0x8000) v -= 0x10000;
    out[i] = v / 32768;
  }
  return out;
}

function send(ev) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(ev));
}

function stopPlayback() {
  for (const s of sources) { try { s.stop(); } catch (e) { /* already ended */ } }
  sources = [];
  nextTime = 0;
}

function play(pcm) {
  const buf = ctx.createBuffer(1, pcm.length, RATE);
  buf.copyToChannel(pcm, 0);
  const src = ctx.createBufferSource();
  src.buffer = buf;
  src.connect(ctx.destination);
  const t = Math.max(nextTime, ctx.currentTime + 0.03);
  src.start(t);
  nextTime = t + buf.duration;
  sources.push(src);
  src.onended = () => {
    omni.ended += 1;
    sources = sources.filter((x) => x !== src);
    if (!sources.length && omni.state === "speaking") setState("listening");
  };
}

function onEvent(ev) {
  omni.events[ev.type] = (omni.events[ev.type] || 0) + 1;
  switch (ev.type) {
    case "session.created":
      $("model").textContent = ev.session.model;
      send({ type: "session.update", session: { voice: $("voice").value || undefined } });
      setState("listening");
      break;
    case "input_audio_buffer.speech_started":
      stopPlayback(); // barge-in: the server cancels the reply, we stop playing it
      setState("hearing you");
      break;
    case "input_audio_buffer.speech_stopped":
      turnEndAt = performance.now();
      setState("thinking");
      break;
    case "conversation.item.created":
      if (ev.item.role === "user") {
        const c = ev.item.content && ev.item.content[0];
        addMsg("user", c && c.type === "input_text" ? c.text : "(you spoke)");
      }
      break;
    case "response.created":
      current = addMsg("assistant", "");
      omni.lastReply = { text: "", audio: [], status: null };
      break;
    case "response.audio_transcript.delta":
    case "response.text.delta":
      if (!current) current = addMsg("assistant", "");
      current.textContent += ev.delta;
      omni.text += ev.delta;
      omni.lastReply.text += ev.delta;
      break;
    case "response.audio.delta": {
      const pcm = floatFromB64(ev.delta);
      omni.chunks += 1;
      omni.samples += pcm.length;
      omni.lastReply.audio.push(pcm);
      if (turnEndAt !== null) {
        omni.firstAudioMs = Math.round(performance.now() - turnEndAt);
        turnEndAt = null;
      }
      setState("speaking");
      play(pcm);
      break;
    }
    case "response.done":
      omni.replies += 1;
      omni.lastReply.status = ev.response.status;
      if (current && ev.response.status === "cancelled") current.classList.add("cancelled");
      current = null;
      if (!sources.length) setState("listening");
      break;
    case "error":
      addMsg("sys", "error: " + ev.error.message);
      break;
  }
  $("stats").textContent = `replies ${omni.replies} · audio ${(omni.samples / RATE).toFixed(1)} s`
    + (omni.firstAudioMs !== null ? ` · first audio ${omni.firstAudioMs} ms` : "");
}

async function startCamera() {
  camStream = await navigator.mediaDevices.getUserMedia({ video: { width: 320, height: 240 } });
  const v = $("preview");
  v.srcObject = camStream;
  v.hidden = false;
  const canvas = document.createElement("canvas");
  camTimer = setInterval(() => {
    if (!v.videoWidth) return;
    canvas.width = v.videoWidth;
    canvas.height = v.videoHeight;
    canvas.getContext("2d").drawImage(v, 0, 0);
    const url = canvas.toDataURL("image/jpeg", 0.7);
    send({ type: "input_video_frame.append", image: url, timestamp: ctx.currentTime });
    omni.framesSent += 1;
  }, 500);
}

async function start() {
  $("start").disabled = true;
  try {
    ctx = new AudioContext({ sampleRate: RATE });
    await ctx.resume();
    micStream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
    });
    await ctx.audioWorklet.addModule("/static/mic-worklet.js");
    const src = ctx.createMediaStreamSource(micStream);
    micNode = new AudioWorkletNode(ctx, "mic-blocks");
    micNode.port.onmessage = (e) => {
      const f = e.data;
      let peak = 0;
      const i16 = new Int16Array(f.length);
      for (let i = 0; i < f.length; i++) {
        const v = Math.max(-1, Math.min(1, f[i]));
        peak = Math.max(peak, Math.abs(v));
        i16[i] = v * 32767;
      }
      $("levelbar").style.width = Math.min(100, peak * 200) + "%";
      send({ type: "input_audio_buffer.append", audio: b64FromInt16(i16) });
      omni.blocksSent += 1;
    };
    src.connect(micNode);
    const key = $("key").value.trim();
    const protos = ["realtime"];
    if (key) protos.push("openai-insecure-api-key." + key);
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host
      + "/v1/realtime";
    ws = new WebSocket(url, protos);
    ws.onmessage = (m) => onEvent(JSON.parse(m.data));
    ws.onclose = () => { setState("idle"); stop(); };
    ws.onerror = () => setState("error");
    if ($("camera").checked) await startCamera();
    $("stop").disabled = false;
  } catch (err) {
    addMsg("sys", "could not start: " + err);
    setState("error");
    $("start").disabled = false;
  }
}

function stop() {
  if (camTimer) clearInterval(camTimer);
  camTimer = null;
  for (const s of [micStream, camStream]) if (s) s.getTracks().forEach((t) => t.stop());
  micStream = camStream = null;
  $("preview").hidden = true;
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close();
  ws = null;
  stopPlayback();
  $("start").disabled = false;
  $("stop").disabled = true;
}

$("start").onclick = start;
$("stop").onclick = stop;
$("textform").onsubmit = (e) => {
  e.preventDefault();
  const text = $("text").value.trim();
  if (!text || !ws) return;
  send({ type: "conversation.item.create",
         item: { type: "message", role: "user", content: [{ type: "input_text", text }] } });
  send({ type: "response.create" });
  $("text").value = "";
};

fetch("/ready").then((r) => r.json()).then((r) => {
  for (const v of r.voices || []) {
    const o = document.createElement("option");
    o.textContent = v;
    $("voice").appendChild(o);
  }
  if (r.model) $("model").textContent = r.model;
}).catch(() => {});
