// regseg live view: newest frame wins. A message that arrives while the previous one is still
// being decoded replaces any message already waiting (counted in "dropped here"), so the canvas
// always shows the newest overlay and decoding never queues up behind a slow tab.
"use strict";
const KEEP = 120;          // latencies kept for percentiles and the plot
const STALE_S = 1.0;       // no frame for this long: the view says STALE
const el = (id) => document.getElementById(id);
const state = {
  session: new URLSearchParams(location.search).get("session"),
  frames: 0, dropped: 0, pending: null, decoding: false, lastDrawn: null, lastSeq: null,
  pipeline: [], view: [], drawnTimes: [], header: null,
};
window.regsegView = state;  // read by tests and curious users

function percentile(values, p) {
  if (!values.length) return NaN;
  const s = values.slice().sort((a, b) => a - b);
  const i = (s.length - 1) * p, lo = Math.floor(i), hi = Math.ceil(i);
  return s[lo] + (s[hi] - s[lo]) * (i - lo);
}
const fmt = (v, d = 1) => (Number.isFinite(v) ? v.toFixed(d) : "-");
function push(list, v) { list.push(v); if (list.length > KEEP) list.shift(); }

function parse(buffer) {
  const n = new DataView(buffer).getUint32(0, false);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, n)));
  return [header, new Blob([new Uint8Array(buffer, 4 + n)], { type: "image/jpeg" })];
}

async function drawPending() {
  state.decoding = true;
  try {
    while (state.pending) {
      const buffer = state.pending;
      state.pending = null;
      const [header, blob] = parse(buffer);
      const bitmap = await createImageBitmap(blob);
      const canvas = el("overlay");
      if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
        canvas.width = bitmap.width; canvas.height = bitmap.height;
      }
      canvas.getContext("2d").drawImage(bitmap, 0, 0);
      bitmap.close();
      const now = Date.now() / 1000;
      state.frames += 1; state.lastDrawn = now; state.lastSeq = header.seq; state.header = header;
      push(state.drawnTimes, now);
      if (header.latency_ms !== null) push(state.pipeline, header.latency_ms);
      push(state.view, Math.max(0, (now - header.sent_ts) * 1000));
      show(header);
    }
  } catch (err) {
    console.error("regseg view: frame not drawn", err);
  } finally {
    state.decoding = false;
  }
}

function show(h) {
  el("frames").textContent = state.frames;
  el("seq").textContent = h.seq;
  const t = state.drawnTimes;
  el("fps").textContent = t.length > 1 ? fmt((t.length - 1) / (t[t.length - 1] - t[0])) : "-";
  el("lat-p50").textContent = fmt(percentile(state.pipeline, 0.5));
  el("lat-p99").textContent = fmt(percentile(state.pipeline, 0.99));
  el("view-p50").textContent = fmt(percentile(state.view, 0.5));
  el("view-p99").textContent = fmt(percentile(state.view, 0.99));
  el("error").textContent = h.error_mm === null ? "-" : `${fmt(h.error_mm, 2)} mm`;
  el("quality").textContent = h.quality === null ? "-" : fmt(h.quality, 3);
  el("flags").textContent = h.flagged ? `UNVERIFIED: ${h.flags.join(", ")}` : "";
  el("dropped").textContent = state.dropped;
  plot();
}

function plot() {
  const c = el("plot"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const top = Math.max(1, ...state.pipeline, ...state.view) * 1.1;
  el("plot-max").textContent = `(top ${fmt(top, 0)} ms)`;
  for (const [values, colour] of [[state.pipeline, "#4fc3f7"], [state.view, "#ffb74d"]]) {
    g.strokeStyle = colour; g.beginPath();
    values.forEach((v, i) => {
      const x = (i / (KEEP - 1)) * c.width, y = c.height - (v / top) * c.height;
      if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
    });
    g.stroke();
  }
}

function tick() {  // staleness and the badge, also while no frame comes
  const badge = el("state");
  if (state.lastDrawn === null) { badge.className = "badge waiting"; badge.textContent = "waiting"; return; }
  const age = Date.now() / 1000 - state.lastDrawn;
  el("staleness").textContent = `${fmt(age * 1000, 0)} ms since last frame`;
  if (age > STALE_S) { badge.className = "badge stale"; badge.textContent = `STALE ${fmt(age)} s`; }
  else if (state.header && state.header.flagged) { badge.className = "badge flagged"; badge.textContent = "flagged"; }
  else { badge.className = "badge live"; badge.textContent = "live"; }
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws/${encodeURIComponent(state.session)}`);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (event) => {
    if (state.pending) state.dropped += 1;  // never drawn: a newer one came first
    state.pending = event.data;
    if (!state.decoding) drawPending();
  };
  ws.onclose = () => setTimeout(connect, 1000);
}

async function sessions() {
  try {
    const reply = await fetch("/api/sessions", { cache: "no-store" });
    return (await reply.json()).sessions;
  } catch (err) { return []; }
}

async function refreshList() {
  const list = el("session-list"), items = await sessions();
  list.replaceChildren(...items.map((s) => {
    const li = document.createElement("li"), a = document.createElement("a");
    a.href = `/?session=${encodeURIComponent(s.name)}`; a.textContent = s.name;
    li.append(a);
    const fps = s.fps === undefined || s.fps === null ? "" : ` ${fmt(s.fps)} fps`;
    li.append(` ${s.state || ""}${fps}`);
    if (s.name === state.session) li.className = "current";
    return li;
  }));
  return items;
}

async function main() {
  let items = await refreshList();
  while (!state.session) {  // no ?session=: the first one, once there is one
    if (items.length) state.session = items[0].name;
    else { await new Promise((r) => setTimeout(r, 1000)); items = await refreshList(); }
  }
  el("session-name").textContent = state.session;
  document.title = `regseg ${state.session}`;
  connect();
  setInterval(tick, 200);
  setInterval(refreshList, 2000);
}
main();
