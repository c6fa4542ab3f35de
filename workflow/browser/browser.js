// The feature browser's pages: plain JavaScript, no library, no network. Data files are scripts that
// call MI.put(key, data) (a page opened from file:// may not fetch() local files). Every string from
// the corpus or the tokenizer reaches the page through text nodes (el() below), never as HTML.
"use strict";

const MI = {
  store: {},
  put(key, data) { this.store[key] = data; },
  // Load a data script once; resolves to what it put under `key`.
  load(src, key) {
    if (key in this.store) return Promise.resolve(this.store[key]);
    return new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = src;
      script.onload = () => (key in this.store ? resolve(this.store[key]) : reject(new Error(`${src} did not define ${key}`)));
      script.onerror = () => reject(new Error(`cannot load ${src}`));
      document.head.appendChild(script);
    });
  },
};

// An element with attributes and children; strings become text nodes, so data is never parsed as HTML.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (name === "class") node.className = value;
    else if (name === "style") node.style.cssText = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const child of children.flat()) node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function hashParams() { return new URLSearchParams(location.hash.slice(1)); }
// Every view is index.html with its name and arguments in the hash: #view=unit&sae=...&dict=...&unit=...
function pageLink(view, params) { return `index.html#${new URLSearchParams({ view, ...params })}`; }
function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e5)) return value.toExponential(2);
  return String(Number(value.toPrecision(digits)));
}
function fail(error) {
  console.error(error);
  document.getElementById("main").replaceChildren(el("p", { class: "error" }, `Cannot show this page: ${error.message}`));
}

// --- data --------------------------------------------------------------------------------------------

function loadSite() { return MI.load("site.js", "site"); }
function saeOf(site, id) {
  const found = site.saes.find((s) => s.sae === id);
  if (!found) throw new Error(`no SAE ${id} in this browser (have: ${site.saes.map((s) => s.sae).join(", ")})`);
  return found;
}
// A script's address is built only from names the site lists: a link cannot make a page load a file outside it.
function dictOf(sae, name) {
  const dict = name || "features";
  if (!Object.hasOwn(sae.dictionaries, dict)) {
    throw new Error(`no dictionary ${dict} of ${sae.sae} (have: ${Object.keys(sae.dictionaries).join(", ")})`);
  }
  return dict;
}
function loadIndex(sae, dict) { return MI.load(`${sae}/${dict}-index.js`, `${sae}/${dict}-index`); }
function loadUnit(sae, dict, index, unit) {
  const file = index.file_of[String(unit)];
  if (file === undefined) return Promise.reject(new Error(`${dict} ${unit} of ${sae} is dead or does not exist`));
  return MI.load(`${sae}/${dict}-${file}.js`, `${sae}/${dict}/${file}`).then((chunk) => chunk[String(unit)]);
}
// Columns of an index as one object per live unit.
function indexRows(index) {
  const names = Object.keys(index.columns);
  return index.columns.unit.map((_, i) => Object.fromEntries(names.map((n) => [n, index.columns[n][i]])));
}

// The scored windows' text: token rows grouped by window (sequence), found by binary search.
class Corpus {
  constructor(data) {
    this.windows = Object.entries(data).map(([sequence, w]) => ({ sequence: Number(sequence), ...w }))
      .sort((a, b) => a.first - b.first);
  }
  windowOf(row) {
    let lo = 0, hi = this.windows.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.windows[mid].first <= row) lo = mid; else hi = mid - 1;
    }
    const w = this.windows[lo];
    if (!w || row < w.first || row >= w.first + w.tokens.length) throw new Error(`token row ${row} is not in the browser's corpus`);
    return w;
  }
}
function loadCorpus() { return MI.load("corpus.js", "corpus").then((data) => new Corpus(data)); }

// --- pieces of a unit's page -------------------------------------------------------------------------

function unitTitle(sae, dict, unit) {
  return dict === "features" ? `${sae.sae} feature ${unit}` : `${sae.site} ${sae.unit_kind.replace("_", " ")} ${unit}`;
}
function unitLink(sae, dict, unit, text) {
  return el("a", { href: pageLink("unit", { sae: sae.sae, dict, unit }) }, text ?? unitTitle(sae, dict, unit));
}

// One context [row, activations]: its tokens coloured by the unit's activation (title: the value), the
// unit's token framed, and the document's source and label. The span starts `before` tokens before the
// row, within its window (the rule of mechinterp.browser.Windows.span).
function contextView(corpus, context, maxActivation, before) {
  const [row, acts] = context;
  const w = corpus.windowOf(row);
  const first = Math.max(w.first, row - before);
  const tokens = el("span", { class: "tokens" });
  acts.forEach((a, i) => {
    const r = first + i;
    const strength = a === null ? 0 : Math.min(1, Math.max(0, a / (maxActivation || 1)));
    tokens.appendChild(el("span", {
      class: `tok${r === row ? " center" : ""}${a === null ? " unscored" : ""}`,
      "data-row": r, "data-act": a === null ? "" : a,
      title: a === null ? "not scored" : `activation ${fmt(a)}`,
      style: `background: rgba(230, 85, 13, ${strength.toFixed(3)})`,
    }, w.tokens[r - w.first]));
  });
  const at = row - w.first;
  return el("div", { class: "context", "data-row": row, "data-first": first, "data-last": first + acts.length - 1 },
    tokens, el("span", { class: "source" }, `${w.source[at] ?? "?"}${w.label[at] ? ` · ${w.label[at]}` : ""} · doc ${w.doc[at]}`));
}

// A histogram of `counts` in equal bins from `low` to `high` (hover a bar for its range and count).
function histogramView(counts, low, high, caption, cls) {
  const width = 320, height = 90, n = counts.length, top = Math.max(1, ...counts), step = (high - low) / n;
  const bars = counts.map((c, i) => svg("rect", {
    x: (i * width) / n, y: height - (c / top) * height, width: width / n - 1, height: (c / top) * height, class: "bar",
  }, svg("title", {}, `${fmt(low + i * step)}–${fmt(low + (i + 1) * step)}: ${c} tokens`)));
  return el("figure", { class: `histogram ${cls}` },
    svg("svg", { viewBox: `0 0 ${width} ${height + 14}`, width, height: height + 14 }, bars,
      svg("text", { x: 0, y: height + 12, class: "axis" }, fmt(low)),
      svg("text", { x: width, y: height + 12, class: "axis", "text-anchor": "end" }, fmt(high))),
    el("figcaption", {}, caption));
}

function alignedView(sae, dict, aligned) {
  return el("table", { class: "aligned" },
    el("caption", {}, dict === "features" ? "features with the closest decoder directions (cosine)" : "features whose decoder writes most along it (cosine)"),
    el("tbody", {}, aligned.map(([feature, cosine]) => el("tr", {}, el("td", {}, unitLink(sae, "features", feature, `feature ${feature}`)),
      el("td", { class: "num" }, fmt(cosine))))));
}

// Tokens as framed chips, so leading spaces show.
function chips(tokens) { return tokens.map((t) => el("span", { class: "chip tok-text" }, t)); }

function logitList(title, pairs, cls) {
  return el("table", { class: `logits ${cls}` }, el("caption", {}, title),
    el("tbody", {}, pairs.map(([token, value]) => el("tr", {}, el("td", { class: "tok-text" }, token), el("td", { class: "num" }, fmt(value))))));
}

function scoresTable(row, sae, dict) {
  const rows = [["status", row.status], [`density (active: ≥ ${fmt(sae.active_fraction * 100)}% of its maximum)`, row.density], ["tokens active", row.n_active],
    ["max activation", row.max_activation], ["monosemanticity", row.monosemanticity],
    ["effective tokens", row.effective_tokens], ["token focus", row.token_focus],
    ["best concept", row.best_concept], ["concept specificity", row.concept_specificity],
    ["concept share / base rate", `${fmt(row.concept_share)} / ${fmt(row.concept_base_rate)}`]];
  const table = el("table", { class: "scores" }, el("tbody", {}, rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, fmt(v))))));
  const body = table.tBodies[0];
  if (dict === "features" && row.best_neuron !== undefined && row.best_neuron !== null) {
    body.appendChild(el("tr", {}, el("th", {}, "best-correlated " + sae.unit_kind.replace("_", " ")),
      el("td", {}, unitLink(sae, "neurons", row.best_neuron, String(row.best_neuron)), ` (r = ${fmt(row.best_neuron_correlation)})`)));
  }
  if (dict === "neurons" && row.best_feature !== undefined && row.best_feature !== null) {
    const other = { ...sae, sae: row.best_feature_sae };
    body.appendChild(el("tr", {}, el("th", {}, "best-correlated feature"),
      el("td", {}, unitLink(other, "features", row.best_feature, `${row.best_feature_sae} ${row.best_feature}`), ` (r = ${fmt(row.best_feature_correlation)})`)));
  }
  return table;
}

// The effect-versus-strength curves of one clamping: this unit bold, the baselines beside it.
function curveChart(curves) {
  const width = 420, height = 200, pad = 34;
  const all = curves.flatMap((c) => c.strength.map((s, i) => [s, c.effect[i]]));
  if (!all.length) return el("p", {}, "no effects measured");
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]).concat([0]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const X = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (width - 2 * pad);
  const Y = (y) => height - pad - ((y - y0) / (y1 - y0 || 1)) * (height - 2 * pad);
  const colours = ["#e6550d", "#3182bd", "#31a354", "#756bb1", "#636363", "#de2d26"];
  const parts = [svg("line", { x1: pad, x2: width - pad, y1: Y(0), y2: Y(0), class: "zero" })];
  const legend = el("ul", { class: "legend" });
  curves.forEach((c, k) => {
    const colour = colours[k % colours.length];
    const points = c.strength.map((s, i) => `${X(s)},${Y(c.effect[i])}`).join(" ");
    parts.push(svg("polyline", { points, fill: "none", stroke: colour, "stroke-width": c.this ? 3 : 1.2 },
      svg("title", {}, `${c.label} ${c.unit}`)));
    legend.appendChild(el("li", { style: `color: ${colour}` }, `${c.this ? "▶ " : ""}${c.label} ${c.unit}: KL ${c.kl.map((v) => fmt(v, 2)).join(", ")}`));
  });
  parts.push(svg("text", { x: pad, y: height - 8, class: "axis" }, `strength ${fmt(x0)}`),
    svg("text", { x: width - pad, y: height - 8, class: "axis", "text-anchor": "end" }, fmt(x1)),
    svg("text", { x: 2, y: Y(y1) + 4, class: "axis" }, fmt(y1, 2)), svg("text", { x: 2, y: Y(y0), class: "axis" }, fmt(y0, 2)));
  return el("figure", { class: "curves" }, svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height }, parts),
    el("figcaption", {}, "mean change in log-probability of the concept's tokens minus control tokens, per clamping strength (× the unit's maximum)"), legend);
}

function clampingView(records) {
  if (!records.length) return el("p", {}, "Not clamped in this study.");
  return el("div", {}, records.map((r) => el("section", { class: "clamping" },
    el("h3", {}, `${r.concept} — clamped as ${r.label}`),
    el("p", {}, `selection scores: input ${fmt(r.input_score)}, output ${fmt(r.output_score)}, direct logit effect ${fmt(r.direct_logit_effect)}; concept tokens: `,
      chips(r.concept_tokens)),
    curveChart(r.curves),
    r.comparisons.length ? el("table", { class: "comparisons" }, el("caption", {}, "feature minus baseline at equal KL (95% CI)"),
      el("thead", {}, el("tr", {}, ["feature", "baseline", "KL", "difference", "CI", "beats"].map((h) => el("th", {}, h)))),
      el("tbody", {}, r.comparisons.map((c) => el("tr", {}, el("td", {}, `${c.feature_selection} ${c.feature}`), el("td", {}, `${c.baseline} ${c.baseline_unit}`),
        el("td", {}, fmt(c.kl)), el("td", {}, fmt(c.difference)), el("td", {}, `[${fmt(c.ci_low)}, ${fmt(c.ci_high)}]`), el("td", {}, c.beats ? "yes" : "no"))))) : null,
    r.continuations.length ? el("table", { class: "continuations" }, el("caption", {}, "continuations with the unit clamped at every position"),
      el("thead", {}, el("tr", {}, ["prompt", "mode", "strength", "continuation", "perplexity"].map((h) => el("th", {}, h)))),
      el("tbody", {}, r.continuations.map((c) => el("tr", {}, el("td", {}, c.prompt), el("td", {}, c.mode), el("td", {}, fmt(c.strength)),
        el("td", { class: "tok-text" }, c.text), el("td", {}, fmt(c.perplexity)))))) : null)));
}

// A unit's whole panel: used by the unit page and, twice, by the compare view.
function unitPanel(sae, dict, row, data, corpus) {
  const max = row.max_activation || 1;
  return el("div", { class: "panel", "data-dict": dict, "data-unit": row.unit },
    el("h2", {}, unitLink(sae, dict, row.unit)),
    el("div", { class: "row" }, scoresTable(row, sae, dict),
      el("div", {}, histogramView(data.histogram.counts, 0, data.histogram.max,
        `its positive activations: on ${fmt(row.density_positive * 100)}% of the scored tokens`, "activations"),
      histogramView(data.logit_histogram.counts, data.logit_histogram.low, data.logit_histogram.high,
        "direct logit effect on every token of the vocabulary", "logits")),
      logitList("promoted tokens (direct logit effect)", data.promoted, "promoted"),
      logitList("suppressed tokens", data.suppressed, "suppressed"), alignedView(sae, dict, data.aligned)),
    el("h3", {}, "Top-activating contexts"),
    el("div", { class: "contexts top" }, data.top.map((c) => contextView(corpus, c, max, sae.context_before))),
    el("h3", {}, "Samples from activation quantiles (highest first)"),
    el("div", { class: "quantiles" }, data.quantiles.map((q, i) => el("div", { class: "quantile" },
      el("h4", {}, `quantile ${data.quantiles.length - i} of ${data.quantiles.length}: activations ${fmt(q.low)}–${fmt(q.high)}`),
      q.contexts.map((c) => contextView(corpus, c, max, sae.context_before))))),
    el("h3", {}, "Selection scores (clamping stage)"), selectionView(data.selection),
    el("h3", {}, "Clamping"), clampingView(data.clamping));
}

// The concepts a unit scores best for by input score, and those it was an output candidate for.
function selectionView(rows) {
  if (!rows.length) return el("p", {}, "Among no concept's best units by input score, and no output candidate.");
  return el("table", { class: "selection" },
    el("thead", {}, el("tr", {}, ["concept", "input score", "output score", "direct logit effect"].map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, el("td", {}, r.concept), el("td", { class: "num" }, fmt(r.input_score)),
      el("td", { class: "num" }, fmt(r.output_score)), el("td", { class: "num" }, fmt(r.direct_logit_effect))))));
}

// --- pages -----------------------------------------------------------------------------------------

function header(site, crumbs) {
  document.getElementById("crumbs").replaceChildren(el("a", { href: "index.html" }, `${site.model} · ${site.run}`), ...crumbs.flatMap((c) => [" › ", c]));
}

async function siteIndexPage() {
  const site = await loadSite();
  header(site, []);
  const main = document.getElementById("main");
  main.replaceChildren(
    el("p", {}, `Features of ${site.saes.length} sparse autoencoders of ${site.model} and the neurons (or residual dimensions) of their sites, scored on the ${site.split} split.`),
    el("table", { class: "saes" }, el("thead", {}, el("tr", {}, ["SAE", "site", "features (live / dead / dense)", "units of the site", "clamped", "views"].map((h) => el("th", {}, h)))),
      el("tbody", {}, site.saes.map((s) => el("tr", { "data-sae": s.sae }, el("td", {}, s.sae), el("td", {}, s.site),
        el("td", {}, `${s.dictionaries.features.live} / ${s.dictionaries.features.dead} / ${s.dictionaries.features.dense}`),
        el("td", {}, `${s.dictionaries.neurons.live} ${s.unit_kind.replace("_", " ")}s`),
        el("td", {}, `${s.dictionaries.features.clamped} features, ${s.dictionaries.neurons.clamped} ${s.unit_kind.replace("_", " ")}s`),
        el("td", {}, el("a", { href: pageLink("table", { sae: s.sae, dict: "features" }), class: "features-link" }, "features"), " · ",
          el("a", { href: pageLink("table", { sae: s.sae, dict: "neurons" }) }, s.unit_kind.replace("_", " ") + "s"), " · ",
          el("a", { href: pageLink("prompts", { sae: s.sae }) }, "prompts")))))),
    el("h2", {}, "Units the study names"),
    el("div", {}, site.saes.map((s) => el("details", { class: "named", "data-sae": s.sae }, el("summary", {}, `${s.sae}: ${s.named.length} units`),
      el("ul", {}, s.named.map((n) => el("li", {}, unitLink(s, n.dict, n.unit), ` — ${n.label}`)))))),
    el("h2", {}, "The study"),
    el("ul", {}, el("li", {}, el("a", { href: "../report.html" }, "Snakemake report"),
      " (made by ", el("code", {}, `snakemake --report results/${site.run}/report.html`), "; it links back here)"),
      ["logit_lens", "tuned_lens", "sae_quality", "polysemanticity", "clamping", "claims", "crosscoder", "toy_superposition"].map((n) => el("li", {}, el("a", { href: `../figures/${n}.html` }, `figures: ${n.replaceAll("_", " ")}`)))));
}

const TABLE_COLUMNS = [["unit", "unit"], ["density", "density"], ["monosemanticity", "monosemanticity"],
  ["effective_tokens", "effective tokens"], ["best_concept", "best concept"], ["concept_specificity", "specificity"],
  ["match", "best-correlated"], ["top_tokens", "top-context tokens"]];

// Search: a row matches when a token of its top contexts equals the query (both stripped and
// lower-cased) or its best concept contains the query.
function matches(row, query) {
  if (!query) return true;
  return row.top_tokens.some((t) => t.trim().toLowerCase() === query) || (row.best_concept || "").toLowerCase().includes(query);
}

async function tablePage() {
  const params = hashParams();
  const site = await loadSite(), sae = saeOf(site, params.get("sae")), dict = dictOf(sae, params.get("dict"));
  const index = await loadIndex(sae.sae, dict);
  const title = dict === "features" ? `${sae.sae} features` : `${sae.site} ${sae.unit_kind.replace("_", " ")}s`;
  header(site, [title]);
  document.title = title;
  const rows = indexRows(index).map((r) => ({ ...r,
    match: dict === "features" ? r.best_neuron : r.best_feature,
    match_r: dict === "features" ? r.best_neuron_correlation : r.best_feature_correlation }));
  let sortKey = "unit", descending = false;
  const search = el("input", { id: "search", type: "search", placeholder: "token text or concept", size: 30 });
  const status = el("select", { id: "status" }, ["all live", "alive", "rare"].map((s) => el("option", { value: s }, s)));
  const count = el("span", { id: "count" });
  const body = el("tbody");
  const headRow = el("tr", {}, TABLE_COLUMNS.map(([key, label]) => el("th", { "data-key": key, onclick: () => {
    descending = sortKey === key ? !descending : key !== "unit";
    sortKey = key;
    render();
  } }, label)));
  function cell(row, key) {
    if (key === "unit") return el("td", {}, unitLink(sae, dict, row.unit, String(row.unit)));
    if (key === "match") {
      if (row.match === undefined || row.match === null) return el("td", {}, "–");
      const other = dict === "features" ? sae : { ...sae, sae: row.best_feature_sae };
      return el("td", {}, unitLink(other, dict === "features" ? "neurons" : "features", row.match, String(row.match)), ` r=${fmt(row.match_r, 2)}`,
        " ", el("a", { href: pageLink("compare", dict === "features" ? { sae: sae.sae, neuron: row.match, feature: row.unit } : { sae: row.best_feature_sae, neuron: row.unit, feature: row.match }) }, "compare"));
    }
    if (key === "top_tokens") return el("td", {}, chips(row.top_tokens));
    return el("td", { class: typeof row[key] === "number" ? "num" : "" }, fmt(row[key]));
  }
  function render() {
    const query = search.value.trim().toLowerCase(), wanted = status.value;
    const shown = rows.filter((r) => matches(r, query) && (wanted === "all live" || r.status === wanted));
    const value = (r) => (r[sortKey] === null || r[sortKey] === undefined ? -Infinity : Array.isArray(r[sortKey]) ? r[sortKey].join() : r[sortKey]);
    shown.sort((a, b) => (value(a) < value(b) ? -1 : value(a) > value(b) ? 1 : a.unit - b.unit) * (descending ? -1 : 1));
    body.replaceChildren(...shown.map((r) => el("tr", { "data-unit": r.unit }, TABLE_COLUMNS.map(([key]) => cell(r, key)))));
    count.textContent = `${shown.length} of ${rows.length} live units`;
    for (const th of headRow.children) th.className = th.dataset.key === sortKey ? (descending ? "sorted-desc" : "sorted-asc") : "";
  }
  search.addEventListener("input", render);
  status.addEventListener("change", render);
  const apart = (label, units) => el("details", { class: label.split(" ")[0] }, el("summary", {}, `${units.length} ${label}`),
    el("p", {}, units.length ? units.map((u, i) => [i ? ", " : "", dict === "features" && label.startsWith("dense") ? unitLink(sae, dict, u, String(u)) : String(u)]) : "none"));
  // (replaceChildren would show a null child as the text "null": the neurons have no dense list)
  document.getElementById("main").replaceChildren(...[
    el("p", {}, `${index.n_units} units: ${rows.length} live (scored when active on enough tokens: alive; else rare), ${index.dead.length} dead (never positive on the scored tokens).`),
    apart("dead units", index.dead),
    dict === "features" ? apart(`dense latents (active on more than ${fmt(index.dense_density * 100)}% of tokens)`, index.dense) : null,
    el("div", { class: "controls" }, el("label", {}, "search ", search), " ", el("label", {}, "status ", status), " ", count),
    el("table", { class: "units", id: "units" }, el("thead", {}, headRow), body)].filter((child) => child !== null));
  render();
}

async function unitPage() {
  const params = hashParams(), unit = Number(params.get("unit"));
  const site = await loadSite(), sae = saeOf(site, params.get("sae")), dict = dictOf(sae, params.get("dict"));
  const [index, corpus] = await Promise.all([loadIndex(sae.sae, dict), loadCorpus()]);
  const row = indexRows(index).find((r) => r.unit === unit);
  if (!row) throw new Error(`${dict} ${unit} of ${sae.sae} is dead or does not exist`);
  const data = await loadUnit(sae.sae, dict, index, unit);
  document.title = unitTitle(sae, dict, unit);
  header(site, [el("a", { href: pageLink("table", { sae: sae.sae, dict }) }, dict === "features" ? `${sae.sae} features` : `${sae.site} ${sae.unit_kind.replace("_", " ")}s`), String(unit)]);
  const compare = dict === "features"
    ? (row.best_neuron !== null && row.best_neuron !== undefined ? { sae: sae.sae, neuron: row.best_neuron, feature: unit } : null)
    : (row.best_feature !== null && row.best_feature !== undefined ? { sae: row.best_feature_sae, neuron: unit, feature: row.best_feature } : null);
  document.getElementById("main").replaceChildren(
    compare ? el("p", {}, el("a", { href: pageLink("compare", compare), id: "compare-link" }, "compare side by side with its best-correlated " + (dict === "features" ? sae.unit_kind.replace("_", " ") : "feature"))) : null,
    unitPanel(sae, dict, row, data, corpus));
}

async function comparePage() {
  const params = hashParams();
  const site = await loadSite(), sae = saeOf(site, params.get("sae"));
  const [features, neurons, corpus] = await Promise.all([loadIndex(sae.sae, "features"), loadIndex(sae.sae, "neurons"), loadCorpus()]);
  const neuron = Number(params.get("neuron"));
  const neuronRow = indexRows(neurons).find((r) => r.unit === neuron);
  if (!neuronRow) throw new Error(`${sae.unit_kind} ${neuron} of ${sae.site} is dead or does not exist`);
  const feature = params.has("feature") ? Number(params.get("feature")) : neuronRow.best_feature;
  const featureRow = indexRows(features).find((r) => r.unit === feature);
  if (!featureRow) throw new Error(`feature ${feature} of ${sae.sae} is dead or does not exist`);
  const [neuronData, featureData] = await Promise.all([loadUnit(sae.sae, "neurons", neurons, neuron), loadUnit(sae.sae, "features", features, feature)]);
  document.title = `${unitTitle(sae, "neurons", neuron)} vs ${unitTitle(sae, "features", feature)}`;
  header(site, [`compare ${sae.site} ${neuron} with ${sae.sae} ${feature}`]);
  document.getElementById("main").replaceChildren(el("div", { class: "compare" },
    unitPanel(sae, "neurons", neuronRow, neuronData, corpus), unitPanel(sae, "features", featureRow, featureData, corpus)));
}

async function promptsPage() {
  const params = hashParams();
  const site = await loadSite(), sae = saeOf(site, params.get("sae"));
  const corpus = await loadCorpus();
  const windows = Object.keys(sae.windows).map(Number).sort((a, b) => a - b);
  const chosen = params.has("window") ? Number(params.get("window")) : windows[0];
  if (!(String(chosen) in sae.windows)) throw new Error(`window ${chosen} has no scored tokens for ${sae.sae}`);
  const file = sae.windows[String(chosen)];
  const data = (await MI.load(`${sae.sae}/prompts-${file}.js`, `${sae.sae}/prompts/${file}`))[String(chosen)].tokens;
  header(site, [`${sae.sae} prompts`, `window ${chosen}`]);
  const picker = el("select", { id: "window", onchange: (e) => { location.href = pageLink("prompts", { sae: sae.sae, window: e.target.value }); } },
    windows.map((s) => {
      const w = corpus.windows.find((x) => x.sequence === s);
      return el("option", { value: s, selected: s === chosen ? "" : null }, `${s}: ${w ? w.tokens.slice(1, 9).join("").slice(0, 50) : ""}…`);
    }));
  const firing = new Map(data.map(([row, units, acts]) => [row, [units, acts]]));
  const detail = el("div", { id: "firing" }, "Click a token to see the features that fire on it.");
  const w = corpus.windows.find((x) => x.sequence === chosen);
  const strongest = Math.max(1e-9, ...data.map(([, , acts]) => acts[0] || 0));
  const tokens = el("p", { class: "tokens prompt" }, w.tokens.map((text, i) => {
    const row = w.first + i, [units, acts] = firing.get(row) || [[], []];
    return el("span", { class: `tok${firing.has(row) ? "" : " unscored"}`, "data-row": row, title: units.length ? `${units.length} features shown` : "not scored",
      style: `background: rgba(49, 130, 189, ${((acts[0] || 0) / strongest).toFixed(3)})`,
      onclick: () => detail.replaceChildren(el("h3", {}, "features firing on ", el("span", { class: "tok-text" }, text), ` (row ${row})`),
        units.length ? el("ol", {}, units.map((u, k) => el("li", {}, unitLink(sae, "features", u, `feature ${u}`), `: ${fmt(acts[k])}`))) : el("p", {}, "none (or not scored)")) }, text);
  }));
  document.getElementById("main").replaceChildren(el("p", {}, el("label", {}, "held-out window ", picker)),
    el("p", {}, `source: ${w.source[1] ?? "?"}${w.label[1] ? ` · ${w.label[1]}` : ""}; colour: the strongest feature on each token`), tokens, detail);
}

// The view the hash names (the index without one); browser.js is the last element of the body.
const VIEWS = { index: siteIndexPage, table: tablePage, unit: unitPage, compare: comparePage, prompts: promptsPage };
function showView() {
  const name = hashParams().get("view") || "index";
  window.scrollTo(0, 0);
  document.title = "Feature browser";
  (VIEWS[name] || (() => Promise.reject(new Error(`no view ${name}`))))().catch(fail);
}
window.addEventListener("hashchange", showView);
showView();
