// tuneloop dashboard: draws the charts (uPlot) and keeps the runs/traffic pages current.
"use strict";

const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

function readJson(id) {
  const el = document.getElementById(id);
  return el ? JSON.parse(el.textContent) : null;
}

function chartWidth(el) {
  return Math.max(320, Math.min(900, (el.parentElement.clientWidth || 900) - 20));
}

function drawLoss(el) {
  const data = readJson(el.dataset.source);
  if (!data || data.x.length === 0) {
    el.textContent = "No loss values were logged for this run.";
    return;
  }
  const series = [{ label: "step" }].concat(data.phases.map((p, i) => ({
    label: "phase " + p, stroke: COLOURS[i % COLOURS.length], width: 2, spanGaps: false,
    points: { show: data.x.length < 60 },
  })));
  el.uplot = new uPlot({
    title: "Training loss per phase", width: chartWidth(el), height: 280, series,
    scales: { x: { time: false } },
    axes: [{ label: "step (cumulative over phases)" }, { label: "loss (cross-entropy)" }],
  }, [data.x].concat(data.y), el);
  el.dataset.points = String(data.x.length);
}

function drawCategories(el) {
  const ev = readJson(el.dataset.source);
  if (!ev || ev.categories.length === 0) {
    el.textContent = "No per-category scores.";
    return;
  }
  const xs = ev.categories.map((_, i) => i);
  const bars = uPlot.paths.bars({ size: [0.35, 60], align: 0 });
  const series = [{ label: "category" }];
  const data = [xs];
  if (ev.base.length) {
    series.push({ label: "base", fill: "#94a3b8", stroke: "#64748b", paths: uPlot.paths.bars({ size: [0.35, 60], align: -1 }), points: { show: false } });
    data.push(ev.base);
  }
  series.push({ label: "fine-tuned", fill: "#2563eb", stroke: "#1d4ed8", paths: ev.base.length ? uPlot.paths.bars({ size: [0.35, 60], align: 1 }) : bars, points: { show: false } });
  data.push(ev.tuned);
  el.uplot = new uPlot({
    title: "Benchmark score per category: base vs fine-tuned", width: chartWidth(el), height: 280, series,
    scales: { x: { time: false, range: [-0.6, xs.length - 0.4] }, y: { range: [0, 1] } },
    axes: [
      { label: "category", splits: () => xs, values: (u, splits) => splits.map((i) => ev.categories[i] ?? "") },
      { label: "score (0–1)" },
    ],
  }, data, el);
  el.dataset.points = String(xs.length * (data.length - 1));
}

function renderRuns(runs) {
  const body = document.querySelector("#runs tbody");
  if (!body) return;
  body.replaceChildren();
  for (const run of runs) {
    const tr = document.createElement("tr");
    tr.dataset.run = run.run_id;
    tr.className = run.status;
    const a = document.createElement("a");
    a.href = "/ui/runs/" + encodeURIComponent(run.run_id);
    a.textContent = run.run_id;
    const cell = (text, cls) => {
      const td = document.createElement("td");
      if (text instanceof Node) td.append(text); else td.textContent = text;
      if (cls) td.className = cls;
      tr.append(td);
      return td;
    };
    cell(a); cell(run.origin); cell(run.started_at); cell(run.status, "status");
    for (const s of run.stages) {
      if (!s.reached) { cell("–", "none"); continue; }
      const td = cell((s.ok ? "✓" : "✗") + " +" + s.seconds + " s", s.ok ? "ok" : "bad");
      td.title = s.event + " " + s.detail;
    }
    cell(run.seconds + " s"); cell(run.failure, "reason");
    body.append(tr);
  }
}

async function pollRuns() {
  try {
    const r = await fetch("/ui/api/runs", { credentials: "same-origin" });
    if (r.ok) renderRuns((await r.json()).runs);
  } catch (e) { /* next poll */ }
}

// --- traffic -------------------------------------------------------------------------
const history = {}; // model -> {t: [], rps: {dep: []}, error_rate: {dep: []}, p95_ms: {dep: []}}
let lastRequests = {};

function record(traffic) {
  const now = Date.now() / 1000;
  for (const [model, rows] of Object.entries(traffic.models)) {
    const h = history[model] ??= { t: [], deps: [], rps: {}, error_rate: {}, p95_ms: {} };
    const prevT = h.t.length ? h.t[h.t.length - 1] : null;
    h.t.push(now);
    for (const row of rows) {
      const dep = row.deployment_id;
      if (!h.deps.includes(dep)) {
        h.deps.push(dep);
        for (const k of ["rps", "error_rate", "p95_ms"]) h[k][dep] = new Array(h.t.length - 1).fill(null);
      }
      const reqs = row.live.requests ?? 0;
      const prev = lastRequests[dep];
      const rps = prevT !== null && prev !== undefined && reqs >= prev ? (reqs - prev) / (now - prevT) : null;
      lastRequests[dep] = reqs;
      h.rps[dep].push(rps);
      h.error_rate[dep].push(row.live.error_rate !== undefined ? row.live.error_rate * 100 : null);
      h.p95_ms[dep].push(row.live.p95_ms ?? null);
    }
    for (const dep of h.deps) for (const k of ["rps", "error_rate", "p95_ms"]) if (h[k][dep].length < h.t.length) h[k][dep].push(null);
    if (h.t.length > 600) { h.t.shift(); for (const dep of h.deps) for (const k of ["rps", "error_rate", "p95_ms"]) h[k][dep].shift(); }
  }
}

function drawLive() {
  for (const section of document.querySelectorAll("section.model")) {
    const h = history[section.dataset.model];
    if (!h) continue;
    for (const el of section.querySelectorAll(".live-chart")) {
      const kind = el.dataset.kind;
      const data = [h.t].concat(h.deps.map((d) => h[kind][d]));
      const last = h.t[h.t.length - 1];
      // At least a minute of axis, so a page just opened does not stretch a point over years.
      const window_ = { min: Math.min(h.t[0], last - 60), max: last + 1 };
      if (el.uplot && el.uplot.series.length === h.deps.length + 1) {
        el.uplot.setData(data, false);
        el.uplot.setScale("x", window_);
        continue;
      }
      if (el.uplot) el.uplot.destroy();
      el.uplot = new uPlot({
        title: el.dataset.title, width: 420, height: 200,
        series: [{ label: "time" }].concat(h.deps.map((d, i) => ({ label: d, stroke: COLOURS[i % COLOURS.length], width: 2 }))),
        scales: { x: { time: true, auto: false } },
        axes: [{ label: "time (local)" }, { label: el.dataset.title }],
      }, data, el);
      el.uplot.setScale("x", window_);
    }
  }
}

async function pollTraffic() {
  try {
    const r = await fetch("/ui/api/traffic", { credentials: "same-origin" });
    if (!r.ok) return;
    const traffic = await r.json();
    record(traffic);
    drawLive();
    for (const [model, rows] of Object.entries(traffic.models)) {
      for (const row of rows) {
        const tr = document.querySelector(`section.model[data-model="${CSS.escape(model)}"] tr[data-deployment="${CSS.escape(row.deployment_id)}"]`);
        if (!tr) continue;
        tr.querySelector(".state").textContent = row.state;
        tr.querySelector(".weight").textContent = Math.round(row.weight * 100) + "%";
        tr.querySelector(".share").textContent = Math.round(row.share * 100) + "%";
      }
    }
  } catch (e) { /* next poll */ }
}

async function act(model, body, question) {
  if (!window.confirm(question)) return;
  const status = document.getElementById("action-status");
  const r = await fetch("/ui/api/traffic/" + encodeURIComponent(model), {
    method: "POST", credentials: "same-origin",
    headers: { "content-type": "application/json", "x-tuneloop-ui": "1" },
    body: JSON.stringify(body),
  });
  const answer = await r.json().catch(() => ({}));
  status.textContent = r.ok ? "done: " + body.action + " " + body.deployment_id : "refused: " + (answer.error || r.status);
  await pollTraffic();
  if (r.ok) window.location.reload();
}

function wireActions() {
  for (const tr of document.querySelectorAll("table.routes tr[data-deployment]")) {
    const model = tr.closest("section.model").dataset.model;
    const dep = tr.dataset.deployment;
    tr.querySelector(".set-weight")?.addEventListener("click", () => {
      const pct = Number(tr.querySelector(".weight-input").value);
      act(model, { action: "weight", deployment_id: dep, weight: Math.min(100, Math.max(0, pct)) / 100 },
        `Send ${pct}% of ${model}'s traffic to ${dep}?`);
    });
    tr.querySelector(".promote")?.addEventListener("click", () =>
      act(model, { action: "promote", deployment_id: dep }, `Promote ${dep} to stable for ${model}?`));
    tr.querySelector(".rollback")?.addEventListener("click", () =>
      act(model, { action: "rollback", deployment_id: dep }, `Roll back ${dep} (0% at once)?`));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  document.querySelectorAll("#loss-chart").forEach(drawLoss);
  document.querySelectorAll(".category-chart").forEach(drawCategories);
  if (page === "runs") setInterval(pollRuns, 5000);
  if (page === "traffic") {
    wireActions();
    pollTraffic();
    setInterval(pollTraffic, 3000);
  }
  document.body.dataset.ready = "1";
});
