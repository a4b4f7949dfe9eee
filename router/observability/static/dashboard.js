// kvlab live dashboard: polls GET /cluster every second and redraws tiles, the worker grid, the charts
// and the tables. Plain DOM and inline SVG: no build step, no network beyond the router itself.
"use strict";

const POLL_MS = 1000;
const SPAN_S = 180;          // seconds of history the charts show at most
const MIN_SPAN_S = 20;       // ...and at least, so a young history fills the width
const KEEP = 600;            // history points kept in the page
const COLORS = { prefill: "#e8710a", decode: "#1a73e8", kv: "#8e44ad", p50: "#0f9d8a", p99: "#d93025",
                 routed: "#1a73e8", rejected: "#d93025", occupancy: "#0f9d8a", mbu: "#1a73e8", mfu: "#e8710a" };
const POLICY_COLORS = ["#1a73e8", "#e8710a", "#0f9d8a", "#8e44ad", "#d93025", "#5f6368"];

const state = { history: [], lastT: null, updates: 0 };
window.kvlab = state;   // for tests and for poking at from the console

// -- formatting -----------------------------------------------------------------------------------
const dash = "–";
const pct = v => v == null ? dash : (100 * v).toFixed(1) + "%";
const ms = v => v == null ? dash : (1000 * v).toFixed(v < 0.01 ? 2 : 1) + " ms";
const rate = v => v == null ? dash : v.toFixed(v < 10 ? 2 : 0) + "/s";
const num = v => v == null ? dash : String(Math.round(v));
const ratio = v => v == null ? dash : (v >= 10 ? v.toFixed(0) : v >= 1 ? v.toFixed(2) : v.toFixed(3)) + " : 1";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function setMetric(name, text) {
  for (const node of document.querySelectorAll(`[data-metric="${name}"]`)) node.textContent = text;
}

// -- tiles and header -----------------------------------------------------------------------------
function renderTiles(view) {
  const c = view.cluster, lat = view.latency;
  const routed = Object.values(view.routing).reduce((s, p) => s + p.routed_per_s, 0);
  setMetric("prefill_util", pct(c.prefill_util));
  setMetric("decode_util", pct(c.decode_util));
  setMetric("ratio", c.ratio == null && c.prefill_share === 1 ? "prefill only" : ratio(c.ratio));
  setMetric("kv_usage", pct(c.kv_usage));
  setMetric("kv_usage_max", pct(c.kv_usage_max));
  setMetric("hit_rate", pct(c.hit_rate));
  setMetric("decode_occupancy", pct(c.decode_occupancy));
  setMetric("decode_batch", c.decode_batch == null ? dash : c.decode_batch.toFixed(1));
  setMetric("mbu", pct(c.mbu));
  setMetric("mfu", pct(c.mfu));
  // One hit rate, defined once (by the router): every place that shows it explains it on hover.
  for (const node of document.querySelectorAll('[data-definition="hit_rate"]')) node.title = view.hit_rate_definition;
  setMetric("ttft_p50", ms(lat.ttft.p50));
  setMetric("ttft_p99", ms(lat.ttft.p99));
  setMetric("itl_p50", ms(lat.itl.p50));
  setMetric("itl_p99", ms(lat.itl.p99));
  setMetric("routed_per_s", rate(routed));
  setMetric("rejected_per_s", rate(view.rejections.per_s));
  setMetric("rejections_total", `(${num(view.rejections.total)} total)`);
  setMetric("workers_up", `${c.workers_up}/${c.workers}`);
  setMetric("updated", view.t.toFixed(1) + " s");
  document.getElementById("policy").textContent = view.policy;
  document.getElementById("window").textContent = `${view.window_s} s`;
  document.getElementById("scale").textContent = c.time_scale == null ? dash : `${c.time_scale}×`;
  const status = document.getElementById("status");
  status.className = "status " + (c.lagging ? "lagging" : "live");
  status.textContent = c.lagging ? `live · host lagging (p99 ${ms(c.lag_p99_s)})` : "live";
}

// -- worker grid ----------------------------------------------------------------------------------
function bar(label, value, kind) {
  const fill = el("div", { class: `fill ${kind}` });
  fill.style.width = `${Math.max(0, Math.min(1, value || 0)) * 100}%`;
  return el("div", { class: "bar", "data-bar": kind }, el("span", {}, label),
            el("div", { class: "track" }, fill), el("span", { class: "num" }, pct(value)));
}

function fact(label, value) {
  return el("span", {}, `${label} `, el("b", {}, value));
}

function workerCard(w) {
  const state = !w.up ? "down" : w.lagging ? `lagging ${ms(w.lag_p99_s)}` : "up";
  return el("div", { class: "worker" + (w.up ? "" : " down"), "data-worker": w.id },
    el("div", { class: "head" }, el("b", {}, w.id), el("span", { class: "role" }, w.role),
       el("span", { class: "state" + (w.lagging ? " lagging" : "") }, state)),
    bar("KV", w.kv_usage, "kv"), bar("prefill busy", w.prefill_util, "prefill"),
    bar("decode busy", w.decode_util, "decode"), bar("batch occ.", w.decode_occupancy, "occupancy"),
    bar("MBU", w.mbu, "mbu"),
    el("div", { class: "facts" }, fact("running", num(w.running)), fact("waiting", num(w.waiting)),
       fact("in flight", num(w.in_flight)), fact("routed", rate(w.routed_per_s)),
       fact("seqs/step", w.decode_batch == null ? dash : w.decode_batch.toFixed(1)), fact("MFU", pct(w.mfu)),
       el("span", { "data-definition": "hit_rate", title: state.hitRateDefinition || "" }, "hit ", el("b", {}, pct(w.hit_rate))),
       fact("preempt", num(w.preemptions))));
}

function renderWorkers(view) {
  state.hitRateDefinition = view.hit_rate_definition;
  document.getElementById("workers").replaceChildren(...view.workers.map(workerCard));
}

// -- tables ---------------------------------------------------------------------------------------
function fillTable(id, rows, columns) {
  const body = document.querySelector(`#${id} tbody`);
  if (!rows.length) {
    body.replaceChildren(el("tr", {}, el("td", { class: "empty", colspan: columns }, "none")));
    return;
  }
  body.replaceChildren(...rows.map(cells => el("tr", {}, ...cells.map(c => el("td", {}, c)))));
}

function renderTables(view) {
  fillTable("policies", Object.entries(view.routing).map(([name, p]) => [
    name, rate(p.routed_per_s), rate(p.overflow_per_s), pct(p.hit_rate), num(p.decisions_total)]), 5);
  fillTable("pools", Object.entries(view.pools).map(([name, p]) => [
    name, `${p.workers_up}/${p.workers}`, pct(p.prefill_util), pct(p.decode_util), pct(p.decode_occupancy),
    pct(p.mbu), pct(p.mfu), pct(p.kv_usage), pct(p.hit_rate), num(p.running), num(p.waiting)]), 11);
  fillTable("rejections", view.rejections.by.slice(0, 8).map(r => [
    r.status, r.reason, r.tenant, num(r.count), rate(r.per_s)]), 5);
}

// -- charts ---------------------------------------------------------------------------------------
const SVG = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}

// series: [{label, color, get(point) -> number|null}]; opts: {max, log, fmt, ref}
function lineChart(svg, points, series, opts) {
  const W = svg.clientWidth || 400, H = svg.clientHeight || 190;
  const pad = { l: 52, r: 8, t: 18, b: 18 };
  const tMax = points.length ? points[points.length - 1].t : 0;
  const span = Math.min(SPAN_S, Math.max(MIN_SPAN_S, points.length ? tMax - points[0].t : 0));
  const tMin = tMax - span;
  const shown = points.filter(p => p.t >= tMin);
  const tr = v => opts.log ? Math.log10(Math.min(100, Math.max(0.01, v))) : v;
  let lo = opts.log ? -2 : 0, hi = opts.log ? 2 : opts.max;
  if (hi == null) {
    const values = shown.flatMap(p => series.map(s => s.get(p))).filter(v => v != null);
    hi = niceCeil(Math.max(1e-9, ...values) * 1.05);
  }
  const x = t => pad.l + (W - pad.l - pad.r) * (t - tMin) / span;
  const y = v => H - pad.b - (H - pad.t - pad.b) * (tr(v) - lo) / (hi - lo);
  const nodes = [];
  const ticks = opts.log ? [0.01, 0.1, 1, 10, 100] : [0, 0.25, 0.5, 0.75, 1].map(f => f * hi);
  for (const v of ticks) {
    nodes.push(svgEl("line", { class: "grid", x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v) }));
    nodes.push(svgEl("text", { x: pad.l - 4, y: y(v) + 3, "text-anchor": "end" }, opts.fmt(v)));
  }
  if (opts.ref != null) nodes.push(svgEl("line", { class: "ref", x1: pad.l, x2: W - pad.r, y1: y(opts.ref), y2: y(opts.ref) }));
  nodes.push(svgEl("text", { x: pad.l, y: H - 4 }, `−${Math.round(span)} s`), svgEl("text", { x: W - pad.r, y: H - 4, "text-anchor": "end" }, "now"));
  let drawn = 0, lx = pad.l + 8;
  series.forEach(s => {
    let d = "", pen = "M";
    for (const p of shown) {
      const v = s.get(p);
      if (v == null) { pen = "M"; continue; }
      d += `${pen}${x(p.t).toFixed(1)},${y(v).toFixed(1)}`;
      pen = "L";
      drawn++;
    }
    nodes.push(svgEl("path", { class: "series", d, stroke: s.color, "data-series": s.label }));
    const key = svgEl("g", { class: "legend" });
    key.append(svgEl("rect", { x: lx, y: 4, width: 10, height: 3, fill: s.color }),
               svgEl("text", { x: lx + 14, y: 9 }, s.label));
    nodes.push(key);
    lx += 30 + 6.5 * s.label.length;
  });
  svg.setAttribute("data-points", drawn);
  svg.replaceChildren(...nodes);
}

// The smallest 1, 2 or 5 x 10^k at or above v: round axis ticks.
function niceCeil(v) {
  const step = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 5, 10].map(m => m * step).find(n => n >= v);
}

function policyNames(points) {
  const names = new Set();
  for (const p of points) for (const name of Object.keys(p.policy_hit_rate || {})) names.add(name);
  return [...names].sort();
}

function renderCharts() {
  const h = state.history;
  const latency = key => [
    { label: "p50", color: COLORS.p50, get: p => p[`${key}_p50`] },
    { label: "p99", color: COLORS.p99, get: p => p[`${key}_p99`] }];
  lineChart(document.getElementById("chart-util"), h, [
    { label: "prefill", color: COLORS.prefill, get: p => p.prefill_util },
    { label: "decode", color: COLORS.decode, get: p => p.decode_util },
    { label: "KV usage", color: COLORS.kv, get: p => p.kv_usage }], { max: 1, fmt: pct });
  lineChart(document.getElementById("chart-headroom"), h, [
    { label: "batch occupancy", color: COLORS.occupancy, get: p => p.decode_occupancy },
    { label: "MBU", color: COLORS.mbu, get: p => p.mbu },
    { label: "MFU", color: COLORS.mfu, get: p => p.mfu }], { max: 1, fmt: pct });
  lineChart(document.getElementById("chart-ratio"), h, [
    { label: "prefill : decode", color: COLORS.prefill,
      get: p => p.ratio != null ? p.ratio : p.prefill_share === 1 ? 100 : null }],
    { log: true, ref: 1, fmt: v => String(v) });
  lineChart(document.getElementById("chart-ttft"), h, latency("ttft"), { fmt: ms });
  lineChart(document.getElementById("chart-itl"), h, latency("itl"), { fmt: ms });
  lineChart(document.getElementById("chart-hits"), h, policyNames(h).map((name, i) => ({
    label: name, color: POLICY_COLORS[i % POLICY_COLORS.length], get: p => (p.policy_hit_rate || {})[name] ?? null,
  })), { max: 1, fmt: pct });
  lineChart(document.getElementById("chart-load"), h, [
    { label: "routed/s", color: COLORS.routed, get: p => p.routed_per_s },
    { label: "rejected/s", color: COLORS.rejected, get: p => p.rejected_per_s }],
    { fmt: v => v.toFixed(1) });
}

// -- polling --------------------------------------------------------------------------------------
// A router with a metrics token: open /dashboard#token=... (a fragment never leaves the browser).
const TOKEN = new URLSearchParams(location.hash.slice(1)).get("token");
const AUTH = TOKEN ? { authorization: `Bearer ${TOKEN}` } : {};
async function poll() {
  const status = document.getElementById("status");
  try {
    const query = state.lastT == null ? "" : `?since=${state.lastT}`;
    const response = await fetch(`/cluster${query}`, { cache: "no-store", headers: AUTH });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const view = await response.json();
    if (state.lastT != null && view.t < state.lastT) {   // the router restarted: fetch its whole history next
      state.history = [];
      state.lastT = null;
    }
    state.history.push(...view.history);
    state.history.splice(0, Math.max(0, state.history.length - KEEP));
    if (state.history.length) state.lastT = state.history[state.history.length - 1].t;
    state.updates++;
    renderTiles(view);
    renderWorkers(view);
    renderTables(view);
    renderCharts();
  } catch (err) {
    status.className = "status down";
    status.textContent = `disconnected (${err.message})`;
  }
  setTimeout(poll, POLL_MS);
}

poll();
