// roadcascade dashboard: polls /v1/stats once a second; the form posts to /v1/predict (multipart).
"use strict";
const $ = (id) => document.getElementById(id);
const fmt = (v, d = 1) => (v === null || v === undefined || Number.isNaN(v)) ? "–" : Number(v).toFixed(d);

function drawSeries(canvas, series, keys, colors) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  ctx.clearRect(0, 0, w, h);
  let max = 0;
  for (const p of series) for (const k of keys) if (p[k] !== null && p[k] > max) max = p[k];
  max = max > 0 ? max * 1.15 : 1;
  ctx.strokeStyle = "#d0d5dd"; ctx.fillStyle = "#6b7280"; ctx.font = "11px system-ui";
  ctx.beginPath(); ctx.moveTo(pad, 4); ctx.lineTo(pad, h - 16); ctx.lineTo(w - 4, h - 16); ctx.stroke();
  ctx.fillText(max.toFixed(max < 10 ? 1 : 0), 2, 12); ctx.fillText("0", 14, h - 16);
  const n = series.length;
  keys.forEach((k, i) => {
    ctx.strokeStyle = colors[i]; ctx.lineWidth = 2; ctx.beginPath();
    let started = false;
    series.forEach((p, j) => {
      const v = p[k];
      if (v === null || v === undefined) { started = false; return; }
      const x = pad + (w - pad - 6) * (n > 1 ? j / (n - 1) : 0);
      const y = (h - 16) - (h - 24) * (v / max);
      if (!started) { ctx.moveTo(x, y); started = true; } else ctx.lineTo(x, y);
    });
    ctx.stroke();
    ctx.fillStyle = colors[i];
    series.forEach((p, j) => {  // dots, so that isolated seconds show too
      const v = p[k];
      if (v === null || v === undefined) return;
      const x = pad + (w - pad - 6) * (n > 1 ? j / (n - 1) : 0);
      ctx.beginPath(); ctx.arc(x, (h - 16) - (h - 24) * (v / max), 1.8, 0, 2 * Math.PI); ctx.fill();
    });
  });
}

function renderExits(s) {
  const box = $("exit-bars");
  const names = (s.tiers || []).concat(["deadline"]);
  const total = Object.values(s.exit_counts || {}).reduce((a, b) => a + b, 0);
  if (!total) { box.innerHTML = '<p class="muted">no traffic in the window</p>'; return; }
  box.innerHTML = "";
  for (const name of names) {
    const rate = (s.exit_rates || {})[name] || 0;
    const row = document.createElement("div");
    row.className = "bar"; row.dataset.tier = name;
    row.innerHTML = `<span>${name === "deadline" ? "deadline (anytime)" : "exit at " + name}</span>` +
      `<div class="track"><div class="fill ${name === "deadline" ? "deadline" : ""}" style="width:${(100 * rate).toFixed(1)}%"></div></div>` +
      `<span class="pct">${(100 * rate).toFixed(1)} %</span>`;
    box.appendChild(row);
  }
}

async function poll() {
  try {
    const r = await fetch("/v1/stats", { cache: "no-store" });
    const s = await r.json();
    $("phase").textContent = s.ready ? "ready" : s.phase;
    $("phase").className = "badge" + (s.ready ? " ready" : "");
    $("spec").textContent = `speculation ${s.speculate_mode}: ${s.speculation && s.speculation.active ? "on" : "off"}`;
    $("throughput").textContent = fmt(s.requests_per_s);
    $("p50").textContent = fmt(s.latency_ms.p50);
    $("p95").textContent = fmt(s.latency_ms.p95);
    $("p99").textContent = fmt(s.latency_ms.p99);
    $("inflight").textContent = s.inflight;
    $("maxq").textContent = s.max_queue;
    $("errors").textContent = fmt(s.errors_per_s);
    $("fallbacks").textContent = s.deadline_fallbacks;
    $("window").textContent = s.window_s;
    for (const el of document.querySelectorAll(".win")) el.textContent = s.window_s;
    drawSeries($("rps-chart"), s.series, ["rps"], ["#e8590c"]);
    drawSeries($("lat-chart"), s.series, ["p50", "p95"], ["#1c7ed6", "#e8590c"]);
    renderExits(s);
    $("queues").textContent = "queue depth: " + Object.entries(s.queue_depth || {}).map(([k, v]) => `${k} ${v}`).join(" · ");
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  } catch (e) {
    $("phase").textContent = "offline";
  }
}

async function classify(ev) {
  ev.preventDefault();
  const file = $("file").files[0];
  if (!file) return;
  $("result-error").hidden = true;
  $("preview").src = URL.createObjectURL(file);
  const form = new FormData();
  form.append("file", file);
  const headers = {};
  if ($("deadline").value) headers["X-Deadline-Ms"] = $("deadline").value;
  $("submit").disabled = true;
  try {
    const r = await fetch("/v1/predict", { method: "POST", body: form, headers });
    const body = await r.json();
    if (!r.ok) throw new Error(`${r.status} ${body.error ? body.error.reason + ": " + body.error.message : ""}`);
    $("result").hidden = false;
    $("result-prob").textContent = body.probability.toFixed(4);
    $("result-label").textContent = body.label ? "roadwork" : "no roadwork";
    $("result-label").className = "badge " + (body.label ? "roadwork-yes" : "roadwork-no");
    const tb = $("trace").querySelector("tbody");
    tb.innerHTML = "";
    for (const t of body.trace.tiers) {
      const tr = document.createElement("tr");
      tr.innerHTML = `<td>${t}</td><td>${fmt(body.trace.probs[t], 4)}</td><td>${fmt(body.trace.ms[t], 1)}</td>`;
      tb.appendChild(tr);
    }
    $("trace-meta").textContent = `rule ${body.trace.rule} · exit ${body.trace.exit}` +
      (body.trace.anytime ? " · anytime (deadline)" : "") + (body.trace.speculative ? " · speculative" : "") +
      ` · ${fmt(body.trace.total_ms, 1)} ms in the server`;
    document.body.dataset.result = "done";
  } catch (e) {
    $("result-error").hidden = false;
    $("result-error").textContent = "error: " + e.message;
    document.body.dataset.result = "error";
  } finally {
    $("submit").disabled = false;
  }
}

$("upload").addEventListener("submit", classify);
poll();
setInterval(poll, 1000);
