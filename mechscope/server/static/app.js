// The mechscope explorer page: one flow from a prompt to the units behind a token and what they do.
// Every view's inputs live in the URL's query string, so a URL reproduces the view (deep links).
// Text from the model, the index or the user is only ever set as textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {};
let pending = 0;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function fmt(x, digits = 4) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(2) : x.toFixed(digits);
}

function shown(token) {
  // Whitespace made visible, as in the CLI: a leading space as "·", newlines as "⏎".
  return token.replace(/\n/g, "⏎").replace(/ /g, "·");
}

function quoted(token) {
  // A token in quotes as it is (the server already shows undecodable bytes as escapes), newlines as "⏎".
  return `"${String(token).replace(/\n/g, "⏎")}"`;
}

function heat(value, max) {
  // White to orange for positive values, white to blue for negative ones.
  const t = max > 0 ? Math.max(-1, Math.min(1, value / max)) : 0;
  return t >= 0 ? `rgba(255, 140, 0, ${t.toFixed(3)})` : `rgba(30, 110, 255, ${(-t).toFixed(3)})`;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function call(route, body) {
  pending += 1;
  $("busy").hidden = false;
  try {
    const response = await fetch(route, {
      method: body === undefined ? "GET" : "POST",
      headers: { "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data;
    try { data = await response.json(); } catch { data = { error: `the server answered ${response.status} without JSON` }; }
    if (!response.ok) throw new Error(data.error || `the server answered ${response.status}`);
    showError("");
    return data;
  } catch (err) {
    showError(err.message);
    throw err;
  } finally {
    pending -= 1;
    $("busy").hidden = pending === 0;
  }
}

// -- the URL holds every view's inputs ---------------------------------------------------------------

function setLink(values) {
  Object.assign(state, values);
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(state)) if (value !== "" && value !== null && value !== undefined) params.set(key, value);
  history.replaceState(null, "", params.toString() ? `/?${params}` : "/");
}

function clearLink(...keys) { for (const key of keys) delete state[key]; setLink({}); }

// -- tables -----------------------------------------------------------------------------------------------

function fill(table, header, rows) {
  table.replaceChildren();
  const head = el("tr");
  for (const h of header) head.append(el("th", h));
  table.append(head);
  for (const row of rows) {
    const tr = el("tr");
    for (const cell of row) {
      if (cell instanceof Node) { const td = el("td"); td.append(cell); tr.append(td); }
      else tr.append(el("td", typeof cell === "number" ? fmt(cell) : cell, typeof cell === "number" ? "num" : ""));
    }
    table.append(tr);
  }
}

function unitLink(name) {
  const a = el("a", name, "unit");
  a.href = "#";
  a.addEventListener("click", (event) => { event.preventDefault(); $("unit").value = name; openUnit(); });
  return a;
}

// -- prompt: distribution and lens ------------------------------------------------------------------------

async function predict() {
  const prompt = $("prompt").value, target = $("target").value;
  if (!prompt) return showError("type a prompt first");
  const body = { prompt, k: 10 };
  if (target) body.target = target;
  $("lens-cell").replaceChildren(); // a cell of the previous prompt's lens
  let data;
  try { data = await call("/api/predict", body); } catch (err) { $("prediction").hidden = true; throw err; }
  setLink({ prompt, target });
  $("prediction").hidden = false;
  $("attribution-section").hidden = !target;
  $("target-prob").textContent = data.target
    ? `P(${quoted(data.target.target)}) = ${fmt(data.target.prob)}, rank ${data.target.rank} (first token ${quoted(data.target.token)})`
    : "Give a target to see its probability and the units behind it.";
  fill($("distribution"), ["token", "prob"],
    data.top.map((t) => [quoted(t.token), t.prob]));
  drawLens(data);
}

function drawLens(data) {
  const table = $("lens");
  table.replaceChildren();
  const head = el("tr");
  head.append(el("th", "layer"));
  for (const token of data.tokens) head.append(el("th", shown(token)));
  table.append(head);
  const rows = data.lens.rows.map((label, r) => ({ label, r })).reverse(); // last layer on top
  // Colour scale: the largest P(target) anywhere (targets are often unlikely), or 1 for the top token's probability.
  const scale = data.lens.target_prob ? Math.max(1e-6, ...data.lens.target_prob.flat()) : 1;
  for (const { label, r } of rows) {
    const tr = el("tr");
    tr.append(el("th", label));
    data.lens.top[r].forEach((cell, p) => {
      const value = data.lens.target_prob ? data.lens.target_prob[r][p] : cell[0].prob;
      const td = el("td", shown(cell[0].token));
      td.style.background = heat(value, scale);
      td.title = `${label} @ ${p}: ${fmt(value)}`;
      td.dataset.row = label;
      td.dataset.pos = p;
      td.addEventListener("click", () => lensCell(data, r, p));
      tr.append(td);
    });
    table.append(tr);
  }
}

function lensCell(data, r, p) {
  const box = $("lens-cell");
  box.replaceChildren(el("h4", `after layer ${data.lens.rows[r]}, position ${p} (${quoted(data.tokens[p])})`));
  const table = el("table");
  fill(table, ["token", "prob"], data.lens.top[r][p].map((t) => [quoted(t.token), t.prob]));
  box.append(table);
}

// -- attribution ------------------------------------------------------------------------------------------

async function attribute() {
  const prompt = $("prompt").value, target = $("target").value, contrast = $("contrast").value;
  const top = parseInt($("top").value || "10", 10);
  const body = { prompt, target, top };
  if (contrast) body.contrast = contrast;
  const data = await call("/api/attribute", body);
  setLink({ prompt, target, contrast, rank: 1 });
  fill($("rankings"), ["unit", "kind", "DLA", "rank", "attribution", "rank", "real effect", "rank"],
    data.rows.map((row) => [unitLink(row.unit), row.kind, row.dla, String(data.ranks.dla[row.unit]), row.attribution,
      String(data.ranks.attribution[row.unit]), row.real_effect, String(data.ranks.real_effect[row.unit])]));
  const agree = Object.entries(data.agreement).map(([pair, rho]) => `${pair.replace("|", " vs ")}: ${fmt(rho, 2)}`);
  $("agreement").textContent = `Spearman agreement over the ${data.rows.length} candidates. ${agree.join("; ")}`;
  if (data.top_dla.length) fill($("contrast-dla"), [`DLA of ${target} − ${contrast}`, ""], data.top_dla.map((u) => [unitLink(u.unit), u.dla]));
  else $("contrast-dla").replaceChildren();
}

// -- a unit's page ----------------------------------------------------------------------------------------

function tokenSpans(tokens, values, at, scale) {
  const max = scale ?? Math.max(1e-9, ...values.filter((v) => v !== null).map(Math.abs));
  return tokens.map((token, i) => {
    const span = el("span", token.replace(/\n/g, "⏎"));
    const v = values[i];
    if (v !== null) { span.style.background = heat(v, max); span.title = fmt(v); }
    if (i === at) span.className = "at";
    return span;
  });
}

function example(ex) {
  const li = el("li");
  li.append(el("span", fmt(ex.value, 3), "value"));
  li.append(...tokenSpans(ex.tokens, ex.acts, ex.at));
  return li;
}

function histogram(h) {
  const box = $("histogram");
  box.replaceChildren();
  if (!h) return;
  const W = 320, H = 90, n = h.counts.length, max = Math.max(1, ...h.counts.map((c) => Math.log10(1 + c)));
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H + 16); svg.id = "histogram-svg";
  h.counts.forEach((c, i) => {
    const bar = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    const height = (H * Math.log10(1 + c)) / max;
    bar.setAttribute("x", (i * W) / n); bar.setAttribute("width", Math.max(1, W / n - 1));
    bar.setAttribute("y", H - height); bar.setAttribute("height", height); bar.setAttribute("fill", "#e08a1e");
    const tip = document.createElementNS("http://www.w3.org/2000/svg", "title");
    tip.textContent = `[${fmt(h.edges[i])}, ${fmt(h.edges[i + 1])}): ${c} tokens`;
    bar.append(tip); svg.append(bar);
  });
  const caption = document.createElementNS("http://www.w3.org/2000/svg", "text");
  caption.setAttribute("x", 0); caption.setAttribute("y", H + 13); caption.setAttribute("font-size", 11);
  caption.textContent = `activation histogram (log counts), ${fmt(h.edges.find((e) => e !== null))} … ${fmt([...h.edges].reverse().find((e) => e !== null))}`;
  svg.append(caption);
  box.append(svg);
}

function heatmap(h) {
  // The first token's activation is often an outlier (an attention sink): colours are scaled to the largest
  // value after it, so the rest of the prompt stays visible. Positions a dictionary skips are null (uncoloured).
  const known = h.values.filter((v) => v !== null);
  const rest = h.values.length > 1 ? h.values.slice(1).filter((v) => v !== null) : known;
  const scale = Math.max(1e-9, ...rest.map(Math.abs));
  const max = known.length ? fmt(Math.max(...known)) : "–";
  const caption = `${h.label} on the prompt (max ${max}; colours scaled to ${fmt(scale)}, the largest after the first token)`;
  return [el("div", caption, "hint"), ...tokenSpans(h.tokens, h.values, -1, scale)];
}

async function openUnit() {
  const unit = $("unit").value.trim();
  if (!unit) return showError("give a unit: a neuron L:N, a head L.H or a feature f:NAME:F");
  const body = { unit, n: 10 };
  if ($("prompt").value) body.prompt = $("prompt").value;
  let data;
  try { data = await call("/api/unit", body); } catch (err) { $("unit-page").hidden = true; throw err; }
  clearLink("op", "value", "gen");
  setLink({ unit: data.unit });
  $("unit-page").hidden = false;
  $("intervention").hidden = true;
  $("unit-title").textContent = `${data.kind} ${data.unit}`;
  $("unit-about").textContent = data.about;
  $("unit-note").textContent = data.note || "";
  $("unit-heatmap").replaceChildren(...(data.heatmap ? heatmap(data.heatmap) : []));
  if (data.stats) fill($("unit-stats"), ["tokens", "mean", "std", "max", "density"],
    [[String(data.stats.tokens), data.stats.mean, data.stats.std, data.stats.max, `${(100 * data.stats.density).toFixed(2)}%`]]);
  else $("unit-stats").replaceChildren();
  histogram(data.histogram);
  $("unit-stats").parentElement.hidden = !data.stats && !data.histogram; // no empty column before "Raises"
  fill($("promoted"), ["token", "weight"], (data.promoted || []).map((t) => [quoted(t.token), t.weight]));
  fill($("suppressed"), ["token", "weight"], (data.suppressed || []).map((t) => [quoted(t.token), t.weight]));
  $("promoted").parentElement.hidden = $("suppressed").parentElement.hidden = !data.promoted; // heads have no logit effects
  $("examples-part").hidden = !data.top.length && !data.samples.length;
  $("top-examples").replaceChildren(...data.top.map(example));
  const samples = $("samples");
  samples.replaceChildren();
  for (const stratum of data.samples) {
    samples.append(el("h4", stratum.range));
    const list = el("ol", undefined, "examples");
    list.append(...stratum.examples.map(example));
    samples.append(list);
  }
  $("op").replaceChildren(...data.ops.map((op) => el("option", op)));
}

async function applyIntervention() {
  const prompt = $("prompt").value, target = $("target").value;
  if (!prompt) return showError("type a prompt first: the intervention re-runs it");
  const body = { prompt, unit: $("unit").value.trim(), op: $("op").value, value: parseFloat($("value").value || "0"),
                 new_tokens: parseInt($("new-tokens").value || "0", 10) };
  if (target) body.target = target;
  const data = await call("/api/intervene", body);
  setLink({ op: body.op, value: body.value, gen: body.new_tokens });
  $("intervention").hidden = false;
  $("intervention-summary").textContent = `${data.intervention}: KL(before ‖ after) = ${fmt(data.kl)} nats`;
  const t = data.target;
  $("target-change").textContent = t
    ? `P(${quoted(target)}): ${fmt(t.prob_before)} → ${fmt(t.prob_after)} (${t.prob_after >= t.prob_before ? "+" : ""}${fmt(t.prob_after - t.prob_before)})`
    : "";
  $("target-change").className = t ? (t.prob_after >= t.prob_before ? "up" : "down") : "";
  fill($("deltas"), ["token", "before", "after", "change"],
    data.deltas.map((d) => [quoted(d.token), d.prob_before, d.prob_after, d.prob_after - d.prob_before]));
  const generated = (text) => (text ?? "").replace(/\n/g, "⏎"); // newlines shown, as in the tables
  $("generation-before").textContent = data.generation_before === null ? "(no generation asked for)" : generated(data.generation_before);
  $("generation-after").textContent = generated(data.generation_after);
}

// -- patching and search ----------------------------------------------------------------------------------

async function patch() {
  const body = { clean: $("clean").value, corrupt: $("corrupt").value, target: $("patch-target").value, kind: $("patch-kind").value };
  if ($("patch-contrast").value) body.contrast = $("patch-contrast").value;
  const data = await call("/api/patch", body);
  setLink({ clean: body.clean, corrupt: body.corrupt, ptarget: body.target, pcontrast: body.contrast, pkind: body.kind });
  $("patch-summary").textContent = `${data.kind}: ${data.metric} clean ${fmt(data.clean)}, corrupt ${fmt(data.corrupt)}; each cell is the share of the clean metric restored`;
  const table = $("patch-grid");
  table.replaceChildren();
  const head = el("tr");
  head.append(el("th", "layer"));
  for (const c of data.cols) head.append(el("th", shown(c)));
  table.append(head);
  const order = data.rows.map((label, r) => ({ label, r })).reverse(); // last layer on top, as in the lens
  for (const { label, r } of order) {
    const tr = el("tr");
    tr.append(el("th", label));
    data.grid[r].forEach((v) => {
      const td = el("td", (Math.abs(v) < 0.005 ? 0 : v).toFixed(2), "num"); // never "-0.00"
      td.style.background = heat(v, 1);
      tr.append(td);
    });
    table.append(tr);
  }
}

async function search() {
  const text = $("search-text").value;
  const data = await call("/api/search", { text, n: 20 });
  setLink({ search: text });
  fill($("search-hits"), ["unit", "top examples on it", "best there", "max overall"],
    data.hits.map((h) => [unitLink(h.unit), String(h.hits), h.best, h.max]));
  if (!data.hits.length) fill($("search-hits"), ["no unit of the index has this token among its top examples"], []);
}

async function findFeature() {
  const texts = $("concept").value.split("\n").filter((t) => t.trim());
  const data = await call("/api/find-feature", { dictionary: $("dictionary").value, texts, top: 10 });
  fill($("found"), ["feature", "score", "on the concept", "elsewhere"], data.features.map((f) => [unitLink(f.unit), f.score, f.concept, f.others]));
}

// -- wiring and deep links --------------------------------------------------------------------------------

function on(form, action) {
  $(form).addEventListener("submit", (event) => { event.preventDefault(); action().catch(() => {}); });
}

async function start() {
  const info = await call("/api/info");
  $("model-info").textContent = `${info.model}: ${info.n_layers} layers, ${info.n_heads} heads, d_mlp ${info.d_mlp}` +
    (info.indexes.length ? ` · indexes ${info.indexes.map((p) => p.split("/").pop()).join(", ")}` : " · no index") + (info.dictionaries.length ? ` · dictionaries ${info.dictionaries.join(", ")}` : "");
  $("dictionary").replaceChildren(...info.dictionaries.map((d) => el("option", d)));
  $("find-form").hidden = !info.dictionaries.length;
  on("prompt-form", predict);
  on("attribute-form", attribute);
  on("unit-form", openUnit);
  on("intervene-form", applyIntervention);
  on("patch-form", patch);
  on("search-form", search);
  on("find-form", findFeature);

  const q = new URLSearchParams(location.search);
  const set = (id, key) => { if (q.has(key)) $(id).value = q.get(key); };
  set("prompt", "prompt"); set("target", "target"); set("contrast", "contrast"); set("unit", "unit");
  set("value", "value"); set("new-tokens", "gen"); set("clean", "clean"); set("corrupt", "corrupt");
  set("patch-target", "ptarget"); set("patch-contrast", "pcontrast"); set("patch-kind", "pkind"); set("search-text", "search");
  try {
    if (q.get("prompt")) await predict();
    if (q.get("rank") && q.get("target")) await attribute();
    if (q.get("unit")) { await openUnit(); if (q.get("op")) { $("op").value = q.get("op"); await applyIntervention(); } }
    if (q.get("clean") && q.get("corrupt") && q.get("ptarget")) await patch();
    if (q.get("search")) await search();
  } catch { /* shown in the error box */ }
  document.body.dataset.ready = "1";
}

start().catch(() => { document.body.dataset.ready = "1"; });
