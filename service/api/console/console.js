// Lethe review console: plain browser JavaScript, no build step, no third-party code.
// The API key lives in sessionStorage (this tab only) and travels as a Bearer header: no
// cookie is ever set, so a cross-site page cannot make requests on the reviewer's behalf.
// Every value from the API is written with textContent, never parsed as HTML.
"use strict";

const KEY = "lethe.apiKey";
const SVG = "http://www.w3.org/2000/svg";
const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "onclick") node.addEventListener("click", value);
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function shape(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== null) node.textContent = String(text);
  return node;
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  return typeof value === "number" ? Number(value.toFixed(digits)).toString() : String(value);
}

class ApiError extends Error {
  constructor(status, body) {
    super(`${status} ${body.title || ""}: ${body.detail || ""}`);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY) || ""}` };
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) signOut("the key was refused (401): sign in again");
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

// -- sign in --------------------------------------------------------------------------------
function signOut(message = "") {
  sessionStorage.removeItem(KEY);
  $("#nav").hidden = true;
  $("#view").hidden = true;
  $("#sign-in").hidden = false;
  $("#sign-in-error").textContent = message;
}

$("#sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("#api-key").value.trim());
  $("#api-key").value = "";
  try {
    await api("/v1/models?limit=1");
  } catch (error) {
    signOut(`cannot sign in: ${error.message}`);
    return;
  }
  if (!location.hash) location.hash = "#/requests";
  route();
});
$("#sign-out").addEventListener("click", () => signOut());

// -- views ----------------------------------------------------------------------------------
function table(columns, rows) {
  return el("table", {},
    el("thead", {}, el("tr", {}, columns.map(([title]) => el("th", {}, title)))),
    el("tbody", {}, rows.map((row) => el("tr", {}, columns.map(([, cell]) => el("td", {}, cell(row)))))));
}

const statusCell = (status) => el("span", { class: `status-${status}` }, status);

async function requestsView(params) {
  const status = params.get("status") || "";
  const query = new URLSearchParams({ limit: "100" });
  if (status) query.set("status", status);
  if (params.get("model")) query.set("model", params.get("model"));
  const page = await api(`/v1/deletion-requests?${query}`);
  const filter = el("select", { id: "status-filter" },
    ["", "queued", "running", "needs_review", "completed", "failed", "cancelled", "rejected"]
      .map((s) => { const o = el("option", { value: s }, s || "any status"); o.selected = s === status; return o; }));
  filter.addEventListener("change", () => { location.hash = `#/requests?status=${filter.value}`; });
  return [
    el("h2", {}, "Deletion requests"),
    el("p", {}, "Status ", filter),
    el("div", { class: "card" }, table([
      ["request", (r) => el("a", { href: `#/requests/${r.id}`, class: "request-link" }, r.id.slice(0, 8))],
      ["status", (r) => statusCell(r.status)],
      ["model", (r) => r.model],
      ["records", (r) => r.record_keys.length],
      ["forgetting", (r) => r.forgetting || "–"],
      ["reason held", (r) => (r.policy && r.policy.reason) || "–"],
      ["subject", (r) => r.subject_ref || "–"],
      ["created", (r) => r.created_at],
    ], page.items)),
  ];
}

async function jobsView() {
  const page = await api("/v1/jobs?limit=100");
  return [el("h2", {}, "Jobs"), el("div", { class: "card" }, table([
    ["job", (j) => j.id.slice(0, 8)], ["status", (j) => statusCell(j.status)],
    ["phase", (j) => j.phase || "–"], ["progress", (j) => fmt(j.progress, 2)],
    ["attempts", (j) => j.attempts], ["model", (j) => j.model],
    ["request", (j) => el("a", { href: `#/requests/${j.request_id}` }, j.request_id.slice(0, 8))],
  ], page.items))];
}

async function modelsView() {
  const page = await api("/v1/models?limit=100");
  return [el("h2", {}, "Models"), el("div", { class: "card" }, table([
    ["name", (m) => m.name], ["architecture", (m) => m.architecture],
    ["active version", (m) => (m.active_version ? m.active_version.number : "–")],
    ["eval dataset", (m) => (m.eval_dataset_id ? "yes" : el("span", { class: "error" }, "none: every request is held"))],
    ["recipe (exact route)", (m) => (m.recipe ? `yes (${m.recipe_sha256.slice(0, 12)}…)` : "no")],
    ["requests", (m) => el("a", { href: `#/requests?model=${encodeURIComponent(m.name)}` }, "show")],
  ], page.items))];
}

async function auditView() {
  return [el("h2", {}, "Audit chain"), await auditCard()];
}

async function auditCard() {
  const result = await api("/v1/audit/verify");
  return el("div", { class: "card", id: "audit" },
    el("h3", {}, "Audit chain"),
    el("p", { class: result.ok ? "ok" : "error", id: "audit-status" },
      result.ok ? `intact: ${result.checked} events, against ${result.checkpoints} signed checkpoint(s)`
        : `BROKEN at seq ${result.first_bad_seq}: ${result.reason || ""}`));
}

// -- charts ---------------------------------------------------------------------------------
function normalPdf(x, mean, sd) {
  return Math.exp(-0.5 * ((x - mean) / sd) ** 2) / (sd * Math.sqrt(2 * Math.PI));
}

function evidenceChart(evidence) {
  // Each forgotten record's z (bars) against the two distributions it is judged between:
  // unseen records, N(0, 1), and the model's members, N(μ, s) per record.
  const width = 480, height = 220, pad = 30, lo = -4, hi = 6, step = 0.5;
  const n = evidence.per_record_z.length;
  const bins = Array.from({ length: (hi - lo) / step }, () => 0);
  for (const z of evidence.per_record_z) {
    const i = Math.min(bins.length - 1, Math.max(0, Math.floor((z - lo) / step)));
    bins[i] += 1;
  }
  const mu = evidence.member_shift / Math.sqrt(Math.max(n, 1));
  const sd = Math.max(evidence.member_sd || 1, 0.05);
  const peak = Math.max(...bins, n * step * normalPdf(0, 0, 1), n * step * normalPdf(mu, mu, sd));
  const x = (v) => pad + ((v - lo) / (hi - lo)) * (width - 2 * pad);
  const y = (v) => height - pad - (v / peak) * (height - 2 * pad);
  const chart = shape("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "evidence-chart", role: "img" });
  chart.append(shape("title", {}, "Per-record membership scores against unseen and member records"));
  bins.forEach((count, i) => {
    if (!count) return;
    chart.append(shape("rect", { class: "z-bar", "data-count": count, x: x(lo + i * step) + 1,
      y: y(count), width: x(lo + step) - x(lo) - 2, height: y(0) - y(count), fill: "var(--bar)" }));
  });
  for (const [cls, mean, spread, colour] of [["curve-unseen", 0, 1, "var(--unseen)"], ["curve-member", mu, sd, "var(--member)"]]) {
    const points = [];
    for (let v = lo; v <= hi; v += 0.1) points.push(`${x(v)},${y(n * step * normalPdf(v, mean, spread))}`);
    chart.append(shape("polyline", { class: cls, points: points.join(" "), fill: "none", stroke: colour, "stroke-width": 2 }));
  }
  chart.append(shape("line", { x1: pad, x2: width - pad, y1: y(0), y2: y(0), stroke: "#999" }));
  for (const tick of [-4, -2, 0, 2, 4, 6]) chart.append(shape("text", { x: x(tick), y: height - 10, "font-size": 10, "text-anchor": "middle" }, tick));
  return el("div", { class: "card" },
    el("h3", {}, "Membership evidence"),
    el("p", { id: "evidence-summary" },
      `${evidence.outcome}: Z = ${fmt(evidence.statistic)} over n = ${evidence.n} records `
      + `(forgotten at Z ≤ ${fmt(evidence.limit)} inside [${fmt(evidence.band[0], 2)}, ${fmt(evidence.band[1], 2)}]; `
      + `false-release rate ${fmt(evidence.false_release_rate, 4)} against α ${evidence.alpha}; `
      + `before: ${(evidence.before || {}).outcome || "–"})`),
    chart,
    el("p", { class: "legend" }, "bars: each record's z · blue: unseen records N(0, 1) · red: the model's members"),
    el("p", { class: "legend" }, evidence.test));
}

function lineChart(title, cls, points, yLabel) {
  const width = 320, height = 180, pad = 32;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys, Math.min(...ys) + 1e-3)];
  const x = (v) => pad + ((v - x0) / (x1 - x0)) * (width - 2 * pad);
  const y = (v) => height - pad - ((v - y0) / (y1 - y0)) * (height - 2 * pad);
  const chart = shape("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: cls, role: "img" });
  chart.append(shape("title", {}, title));
  chart.append(shape("polyline", { points: points.map(([a, b]) => `${x(a)},${y(b)}`).join(" "), fill: "none", stroke: "var(--unseen)", "stroke-width": 2 }));
  for (const [a, b] of points) chart.append(shape("circle", { class: "traj-point", cx: x(a), cy: y(b), r: 2.5, fill: "var(--unseen)" }));
  chart.append(shape("text", { x: 4, y: 14, "font-size": 10 }, `${yLabel}: ${fmt(y1, 3)} (top) … ${fmt(y0, 3)}`));
  chart.append(shape("text", { x: width - pad, y: height - 8, "font-size": 10, "text-anchor": "end" }, `step ${x1}`));
  return el("div", {}, el("h4", {}, title), chart);
}

function trajectoryCharts(calibration) {
  const steps = (calibration && calibration.trajectory) || [];
  const z = steps.filter((s) => s.membership).map((s) => [s.step, s.membership.statistic]);
  const guard = steps.filter((s) => s.guard_acc !== null && s.guard_acc !== undefined).map((s) => [s.step, s.guard_acc]);
  if (!z.length && !guard.length) return null;
  return el("div", { class: "card" }, el("h3", {}, `Calibration: ${calibration.reason} after ${calibration.steps} steps`),
    el("div", { class: "charts" },
      z.length ? lineChart("Membership Z per step", "trajectory-z", z, "Z") : null,
      guard.length ? lineChart("Guard accuracy per step", "trajectory-guard", guard, "accuracy") : null));
}

function perClassChart(before, after) {
  if (!before || !after) return null;
  const classes = Object.keys(before).sort((a, b) => Number(a) - Number(b));
  const width = 40 + classes.length * 40, height = 180, pad = 24;
  const y = (v) => height - pad - v * (height - 2 * pad);
  const chart = shape("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "per-class-chart", role: "img" });
  chart.append(shape("title", {}, "Held-out accuracy per class, before and after"));
  classes.forEach((c, i) => {
    const left = 30 + i * 40;
    for (const [j, value, colour, cls] of [[0, before[c], "#b9c0cf", "pc-before"], [1, after[c] ?? 0, "var(--unseen)", "pc-after"]]) {
      chart.append(shape("rect", { class: `pc-bar ${cls}`, x: left + j * 14, y: y(value), width: 12, height: y(0) - y(value), fill: colour }));
    }
    chart.append(shape("text", { x: left + 13, y: height - 8, "font-size": 10, "text-anchor": "middle" }, c));
  });
  return el("div", { class: "card" }, el("h3", {}, "Held-out accuracy per class"), chart,
    el("p", { class: "legend" }, "grey: before · blue: after"));
}

// -- one request ----------------------------------------------------------------------------
async function requestView(id) {
  const request = await api(`/v1/deletion-requests/${encodeURIComponent(id)}`);
  const job = request.job || {};
  const metrics = job.metrics || {};
  const influence = metrics.influence || {};
  const calibration = influence.calibration || (influence.escalated_from || {}).stats?.calibration;
  const policy = request.policy || {};
  const parts = [
    el("h2", {}, "Deletion request ", el("code", {}, request.id)),
    el("div", { class: "card" },
      el("p", {}, "Status: ", el("strong", { id: "request-status", class: `status-${request.status}` }, request.status),
        ` · model ${request.model} · ${request.record_keys.length} records · method ${request.method}`,
        request.forgetting ? ` · forgetting ${request.forgetting}` : ""),
      el("p", { id: "policy-decision" }, `Release policy: ${policy.decision || "–"}`,
        policy.reason ? ` (held: ${policy.reason})` : ""),
      (policy.reasons || []).length ? el("ul", {}, policy.reasons.map((r) => el("li", {}, r))) : null,
      (request.attempts || []).length ? table([
        ["attempt", (a) => a.method], ["outcome", (a) => a.outcome], ["reason", (a) => a.reason || "–"],
        ["evidence", (a) => (a.evidence ? `${a.evidence.outcome}, Z ${fmt(a.evidence.statistic)}` : "–")],
        ["seconds", (a) => fmt(a.seconds, 2)],
      ], request.attempts) : null),
  ];
  if (request.evidence) parts.push(evidenceChart(request.evidence));
  parts.push(trajectoryCharts(calibration));
  parts.push(perClassChart((metrics.before || {}).per_class_acc, (metrics.after || {}).per_class_acc));
  const version = request.result_version;
  if (version) {
    const actions = el("p", { class: "actions" });
    const note = el("p", { id: "review-note" });
    if (version.status === "candidate") {
      for (const action of ["promote", "reject"]) {
        actions.append(el("button", { id: `${action}-button`, type: "button", onclick: async () => {
          try {
            await api(`/v1/model-versions/${version.id}/${action}`, { method: "POST" });
            route();
          } catch (error) { note.textContent = `${action} refused: ${error.message}`; note.className = "error"; }
        } }, action === "promote" ? "Promote (release it)" : "Reject"));
      }
    }
    parts.push(el("div", { class: "card", id: "versions" }, el("h3", {}, "Result version"),
      el("p", {}, `version ${version.number} `, statusCell(version.status)), actions, note));
  }
  parts.push(await auditCard());
  if (request.status === "completed") {
    try {
      const receipt = await api(`/v1/deletion-requests/${request.id}/receipt`);
      const blob = new Blob([JSON.stringify(receipt, null, 2)], { type: "application/json" });
      parts.push(el("div", { class: "card", id: "receipt" }, el("h3", {}, "Erasure receipt"),
        el("p", {}, `signed (EdDSA, key ${receipt.kid.slice(0, 12)}…); forgetting `,
          el("strong", { id: "receipt-kind" }, receipt.payload.forgetting.kind)),
        el("a", { href: URL.createObjectURL(blob), download: `receipt-${request.id}.json` }, "download the receipt")));
    } catch (error) {
      parts.push(el("div", { class: "card", id: "receipt" }, el("p", {}, `receipt not ready: ${error.message}`)));
    }
  }
  return parts;
}

// -- router ---------------------------------------------------------------------------------
async function route() {
  if (!sessionStorage.getItem(KEY)) { signOut(); return; }
  $("#sign-in").hidden = true;
  $("#nav").hidden = false;
  const view = $("#view");
  view.hidden = false;
  const [path, query] = (location.hash.slice(1) || "/requests").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  try {
    let content;
    if (parts[0] === "requests" && parts[1]) content = await requestView(parts[1]);
    else if (parts[0] === "jobs") content = await jobsView();
    else if (parts[0] === "models") content = await modelsView();
    else if (parts[0] === "audit") content = await auditView();
    else content = await requestsView(params);
    view.replaceChildren(...content.filter(Boolean));
    view.setAttribute("data-ready", path);
  } catch (error) {
    view.replaceChildren(el("p", { class: "error" }, error.message));
  }
}

window.addEventListener("hashchange", route);
route();
