// The playground: ask POST /v1/reason for a streamed answer with the latent trace and draw it.
//
// Plain JavaScript, no framework and no build step: the server ships this file as is.
// The flow: submit -> fetch (stream: true) -> parse server-sent events as they arrive,
// appending each `delta` -> the last event carries usage, timings and `latent_trace`
// -> draw one heatmap column per thought and, when the trace reports each thought's
// frontier (a graph question), the question's graph with that thought's probability on
// each node. Every failure ends in words on the page.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "coconut-serve.api-key";  // sessionStorage: gone when the tab closes
const FIELD_INPUTS = {  // request field path -> the form input that sets it (for 422s)
  question: "question", max_tokens: "max_tokens", temperature: "temperature",
  "latent.thoughts": "thoughts", "latent.mode": "mode", latent_trace_top_k: "top_k",
};

let examples = [];        // [{question, label, answer}] from /playground/examples
let pendingBody = null;   // the request waiting for an API key (retried once one is given)
let lastBody = null;      // the last request sent (the "Try again" button resends it)

// ---------------------------------------------------------------- concepts

// ProsQA questions name people ("Tom is a wumpus.", "Is Tom a ...") and made-up
// "-pus" concepts. These are the graph's nodes; the paper reads each thought as a
// distribution over them, so they are what a person wants to spot in the trace.
// Returns Map(lowercase word -> {word, role}); role is "option" for the two answer
// choices, "subject" for the person asked about, else "person" or "concept".
function conceptsOf(question) {
  const found = new Map();
  const add = (word, role) => {
    const key = word.toLowerCase();
    const rank = { option: 3, subject: 2, person: 1, concept: 0 };
    if (!found.has(key) || rank[role] > rank[found.get(key).role]) found.set(key, { word, role });
  };
  for (const m of question.matchAll(/\b[a-z]+pus\b/g)) add(m[0], "concept");
  for (const m of question.matchAll(/\b([A-Z][a-z]+) is an? /g)) if (m[1] !== "Every") add(m[1], "person");
  const asked = question.match(/\bIs ([A-Z][a-z]+) an? (\w+) or (?:an? )?(\w+)\?/);
  if (asked) {
    add(asked[1], "subject");
    add(asked[2], "option");
    add(asked[3], "option");
  }
  return found;
}

// A trace token names a concept when its text (minus the leading space byte-level BPE
// keeps) is the whole word; with a coarser tokenizer a word spans several tokens, and
// its first piece is what the paper reads, so a token that begins a concept counts too.
function conceptMatch(text, concepts) {
  const t = text.trim().toLowerCase();
  if (!t) return null;
  if (concepts.has(t)) return { ...concepts.get(t), partial: false };
  if (t.length < 3) return null;  // "a", "is" would begin half the vocabulary
  const starts = [...concepts.values()].filter((c) => c.word.toLowerCase().startsWith(t));
  return starts.length ? { ...starts[0], partial: true, words: starts.map((c) => c.word) } : null;
}

// The question with its concepts marked (text nodes only: the question is never parsed as HTML).
function renderQuestion(el, question, concepts) {
  el.replaceChildren();
  let last = 0;
  for (const m of question.matchAll(/\b[A-Za-z]+\b/g)) {
    const c = concepts.get(m[0].toLowerCase());
    if (!c) continue;
    el.append(question.slice(last, m.index), mark(m[0], c.role));
    last = m.index + m[0].length;
  }
  el.append(question.slice(last));
}

function mark(text, role) {
  const m = document.createElement("mark");
  m.className = `concept ${role}`;
  m.textContent = text;
  return m;
}

function showConceptPreview() {
  const concepts = conceptsOf($("question").value);
  const el = $("question-concepts");
  el.replaceChildren(...[...concepts.values()].map((c) => mark(c.word, c.role)));
  if (!concepts.size) el.textContent = "none found";
}

// ---------------------------------------------------------------- the request

// Form -> request body. Empty fields are left out (the server's defaults apply); values
// are sent as typed, even out of range: the server validates and its 422 is shown.
function buildBody() {
  const num = (id) => ($(id).value.trim() === "" ? undefined : Number($(id).value));
  const mode = $("mode").value;
  const latent = mode === "fixed" ? { mode, thoughts: num("thoughts") } : { mode };
  return {
    question: $("question").value, stream: true, return_latent_trace: true,
    latent_trace_top_k: num("top_k"), max_tokens: num("max_tokens"), temperature: num("temperature"),
    latent,
  };
}

class HttpError extends Error {
  constructor(status, body, retryAfter) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    Object.assign(this, { status, body, retryAfter });
  }
}

class StreamError extends Error {  // a `data: {"error": ...}` event, or a stream cut short
  constructor(error) {
    super(error.message);
    this.error = error;
  }
}

// Yields each event's JSON payload as it arrives; returns when `data: [DONE]` comes.
// SSE frames end with a blank line; a network chunk may hold part of one or several.
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const payload = JSON.parse(data);
      if (payload.error) throw new StreamError(payload.error);
      yield payload;
    }
  }
  // No [DONE]: the server promises it after every complete answer, so this is a failure.
  throw new StreamError({ message: "the connection closed before the answer was complete" });
}

async function ask(body) {
  lastBody = body;
  clearResult();
  const concepts = conceptsOf(body.question);
  renderQuestion($("asked"), body.question, concepts);
  $("asked").hidden = false;
  const example = examples.find((e) => e.question === body.question);
  $("expected").hidden = !example;
  if (example) $("expected").textContent = `Expected (from the generator): ${example.answer}`;
  setBusy(true, "streaming…");
  const started = performance.now();
  let received = 0;
  try {
    const headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch("/v1/reason", { method: "POST", headers, body: JSON.stringify(body) });
    if (!response.ok) {
      let json = null;
      try { json = await response.json(); } catch (_) { /* not JSON: a proxy's page, say */ }
      throw new HttpError(response.status, json, response.headers.get("Retry-After"));
    }
    let final = null;
    for await (const event of sseEvents(response)) {
      // One text node per delta: appending is cheap for long answers (no re-layout of
      // the whole text), and the browser test counts the nodes against the API's events.
      if (event.delta) $("answer").append(document.createTextNode(event.delta));
      received += (event.delta || "").length;
      if (event.finish_reason) final = event;
    }
    if (!final) throw new StreamError({ message: "the stream ended without its final event" });
    showStats(final);
    drawTrace(final.latent_trace || [], concepts);
    drawGraph(final.latent_trace || [], body.question);
    setBusy(false, `done in ${Math.round(performance.now() - started)} ms`);
  } catch (err) {
    setBusy(false, "failed");
    showError(err, body, received);
  }
}

// ---------------------------------------------------------------- showing results

function clearResult() {
  for (const id of ["error", "key-panel", "stats", "trace-section", "graph-section"]) $(id).hidden = true;
  $("answer").replaceChildren();
  $("trace").replaceChildren();
  $("graph").replaceChildren();
  graphView = null;
  document.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
}

function setBusy(busy, status) {
  $("submit").disabled = busy;
  $("result").setAttribute("aria-busy", String(busy));
  $("status").textContent = status;
}

function showStats(final) {
  const ms = (s) => `${(s * 1000).toFixed(1)} ms`;
  const u = final.usage || {}, t = final.timings || {};
  $("usage-prompt").textContent = u.prompt_tokens;
  $("usage-thoughts").textContent = u.latent_thoughts;
  $("usage-completion").textContent = u.completion_tokens;
  $("finish-reason").textContent = final.finish_reason;
  for (const phase of ["queue", "prefill", "latent", "decode"]) $(`t-${phase}`).textContent = ms(t[phase] || 0);
  $("stats").hidden = false;
}

// Visible whitespace: a token " Tom" and "Tom" differ, and "\n" would be invisible.
const shown = (text) => (text === "" ? "∅" : text.replace(/ /g, "␣").replace(/\n/g, "⏎"));

function drawTrace(trace, concepts) {
  const box = $("trace");
  if (!trace.length) {
    box.textContent = "No latent thoughts for this answer (latent mode none, or auto stopped at once).";
  }
  for (const thought of trace) {
    const col = document.createElement("div");
    col.className = "thought";
    col.setAttribute("role", "group");
    col.setAttribute("aria-label", `Thought ${thought.thought}`);
    const head = document.createElement("h3");
    head.textContent = `Thought ${thought.thought}`;
    const list = document.createElement("ol");
    for (const tok of thought.tokens) list.append(traceCell(tok, concepts));
    col.append(head, list);
    box.append(col);
  }
  $("trace-section").hidden = false;
}

function traceCell(tok, concepts) {
  const li = document.createElement("li");
  li.className = "cell";
  // Heatmap: lightness falls with probability (white-ish at 0, deep blue at 1); the
  // text turns white where the background gets dark enough to need it.
  li.style.backgroundColor = `hsl(212 75% ${Math.round(97 - 62 * tok.prob)}%)`;
  if (tok.prob > 0.45) li.classList.add("dark");
  const text = document.createElement("span");
  text.className = "tok";
  text.textContent = shown(tok.text);
  const p = document.createElement("span");
  p.className = "p";
  p.textContent = `${(tok.prob * 100).toFixed(1)}%`;
  li.append(text, p);
  let title = `token ${tok.id} ${JSON.stringify(tok.text)}: p = ${tok.prob.toFixed(4)}`;
  const hit = conceptMatch(tok.text, concepts);
  if (hit) {
    li.classList.add("concept", hit.role);
    if (hit.partial) li.classList.add("partial");
    title += hit.partial ? ` (begins ${hit.words.join(", ")})` : ` (${hit.role}: ${hit.word})`;
  }
  li.title = title;
  return li;
}

// ---------------------------------------------------------------- the graph view

// The question's graph, read as the server reads it (engine/data/question.py): the
// reference sentences ("Every A is a B." and "X is a B." are edges A->B, X->B; then
// "Is X a A or B?") or the compact text ("A B | X B | ? X A B"). Returns
// {name, options: [A, B], edges: [[source, target], ...]} in the order stated, or null
// when the last sentence is not a question of that shape. A fact it cannot read is
// skipped (the server refuses such questions before any trace exists).
function graphOf(question) {
  const text = question.split(/\s+/).filter(Boolean).join(" ");
  const W = "([A-Za-z]+)";
  let ask, facts;
  if (text.includes("|") || text.startsWith("?")) {
    const parts = text.split("|").map((p) => p.trim());
    ask = parts.pop().match(new RegExp(`^\\? ${W} ${W} ${W}$`));
    facts = parts.map((p) => p.match(new RegExp(`^${W} ${W}$`))).map((m) => m && [m[1], m[2]]);
  } else {
    const sentences = (text.match(/[^.?]+[.?]|[^.?]+$/g) || []).map((s) => s.trim()).filter(Boolean);
    ask = (sentences.pop() || "").match(new RegExp(`^Is ${W} an? ${W} or (?:an? )?${W}\\?$`));
    facts = sentences.map((s) => s.match(new RegExp(`^(?:Every ${W}|${W}) is an? ${W}\\.$`)))
      .map((m) => m && [m[1] || m[2], m[3]]);
  }
  if (!ask) return null;
  return { name: ask[1], options: [ask[2], ask[3]], edges: facts.filter(Boolean) };
}

const GRAPH = {
  nodeH: 34, pitch: 50, gapX: 58, subGapX: 26, apart: 34, top: 40, left: 12, right: 44, bottom: 12,
  maxRows: 12,  // a column with more nodes wraps into side-by-side sub-columns
  charW: 7.3,   // the labels' monospace advance at 12px
};

// Node positions. Reachable nodes go in columns by hop distance from the asked name;
// unreachable ones in one last column set apart (wrapped like the others when tall).
// Within a reachable column, nodes sit in the order of the mean height of their parents
// placed to their left (barycentre: fewer crossings), ties in order of first mention;
// the unreachable column lists its chains depth-first, so a chain reads top-down with
// short arcs. Every column is centred on the tallest one. Returns {width, height,
// nodeW, pos: Map(concept -> {x, y}), columns: [{x, width, label, hops}], apartX}.
function layoutGraph(nodes, edges) {
  const g = GRAPH;
  const nodeW = Math.round(Math.max(70, g.charW * Math.max(...nodes.map((n) => n.concept.length)) + 22));
  const parents = new Map(nodes.map((n) => [n.concept, []]));
  const children = new Map(nodes.map((n) => [n.concept, []]));
  for (const [s, t] of edges) {
    if (parents.has(t) && children.has(s)) { parents.get(t).push(s); children.get(s).push(t); }
  }
  const reachable = nodes.filter((n) => n.hops != null);
  const maxHops = Math.max(0, ...reachable.map((n) => n.hops));
  const groups = [];
  for (let h = 0; h <= maxHops; h++) {
    const members = reachable.filter((n) => n.hops === h).map((n) => n.concept);
    if (members.length) groups.push({ hops: h, members });
  }
  const lost = nodes.filter((n) => n.hops == null).map((n) => n.concept);
  if (lost.length) {  // depth-first from the chains' starts, children in the order stated
    const isLost = new Set(lost), seen = new Set(), order = [];
    const visit = (c) => {
      if (seen.has(c)) return;
      seen.add(c);
      order.push(c);
      for (const child of children.get(c)) if (isLost.has(child)) visit(child);
    };
    for (const c of lost) if (!parents.get(c).some((p) => isLost.has(p))) visit(c);
    for (const c of lost) visit(c);  // what a cycle left out
    groups.push({ hops: null, members: order });
  }
  // Split each group into sub-columns of balanced heights.
  for (const grp of groups) {
    grp.subs = Math.ceil(grp.members.length / g.maxRows);
    grp.rows = Math.ceil(grp.members.length / grp.subs);
  }
  const rows = Math.max(1, ...groups.map((grp) => grp.rows));
  const pos = new Map(), columns = [];
  let x = g.left, apartX = null;
  for (const grp of groups) {
    if (grp.hops == null) {
      x += g.apart;  // extra room before the unreachable column, a dashed line in its middle
      apartX = x - (g.gapX + g.apart) / 2;
    }
    if (grp.hops != null && grp.hops > 0) {  // barycentre of the parents already placed
      const key = (c) => {
        const ys = parents.get(c).filter((p) => pos.has(p)).map((p) => pos.get(p).y);
        return ys.length ? ys.reduce((a, b) => a + b, 0) / ys.length : Infinity;
      };
      const keys = new Map(grp.members.map((c) => [c, key(c)]));
      grp.members = grp.members.slice().sort((a, b) => keys.get(a) - keys.get(b) || 0);
    }
    const width = grp.subs * nodeW + (grp.subs - 1) * g.subGapX;
    const label = grp.hops == null ? "unreachable" : grp.hops === 0 ? "asked" : `${grp.hops} hop${grp.hops > 1 ? "s" : ""}`;
    columns.push({ x, width, label, hops: grp.hops });
    grp.members.forEach((c, i) => {
      const sub = Math.floor(i / grp.rows), row = i % grp.rows;
      const inSub = Math.min(grp.rows, grp.members.length - sub * grp.rows);
      pos.set(c, { x: x + sub * (nodeW + g.subGapX), y: g.top + ((rows - inSub) / 2 + row) * g.pitch });
    });
    x += width + g.gapX;
  }
  const width = x - g.gapX + g.right;
  const height = g.top + (rows - 1) * g.pitch + g.nodeH + g.bottom;
  return { width, height, nodeW, pos, columns, apartX };
}

// The SVG namespace, from the page's own <svg> (the HTML parser sets it): the page's
// text names no URL at all.
const SVG_NS = $("graph-mass-bar").namespaceURI;
function svgEl(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

// An edge's curve and arrowhead: forward edges leave a node's right side for the next
// node's left side; an edge within one column arcs out to the right; a backward edge
// (into a node further left) leaves the left side and enters the right side. Every
// curve ends horizontally, so its head is a triangle pointing right or left.
function edgePaths(a, b, w, h) {
  const ay = a.y + h / 2, by = b.y + h / 2;
  const head = (x, dir) => `M${x},${by} l${-8 * dir},-4 v8 z`;
  if (b.x > a.x) {
    const x1 = a.x + w, x2 = b.x, dx = (x2 - x1) / 2;
    return [`M${x1},${ay} C${x1 + dx},${ay} ${x2 - dx},${by} ${x2 - 6},${by}`, head(x2, 1)];
  }
  if (b.x === a.x) {
    const x1 = a.x + w, bulge = Math.min(GRAPH.gapX - 8, 16 + Math.abs(by - ay) / 6);
    return [`M${x1},${ay} C${x1 + bulge},${ay} ${x1 + bulge},${by} ${x1 + 6},${by}`, head(x1, -1)];
  }
  const x1 = a.x, x2 = b.x + w;
  return [`M${x1},${ay} C${x1 - 30},${ay} ${x2 + 30},${by} ${x2 + 6},${by}`, head(x2, -1)];
}

const percent = (p) => (p === 0 ? "0%" : p < 0.0005 ? "<0.1%" : `${(p * 100).toFixed(p >= 0.9995 ? 0 : 1)}%`);

let graphView = null;  // {frontiers, nodes: Map(concept -> <g>), edges: [<path>], bands: [<rect>], name}

// Draws the graph of `question` for a trace whose entries carry `frontier`; hidden otherwise.
function drawGraph(trace, question) {
  const frontiers = trace.filter((t) => t.frontier && Array.isArray(t.frontier.nodes));
  graphView = null;
  $("graph").replaceChildren();
  $("graph-thoughts").replaceChildren();
  $("graph-note").hidden = true;
  if (!frontiers.length) {
    $("graph-section").hidden = true;
    return;
  }
  const nodes = frontiers[0].frontier.nodes.map((n) => ({ concept: n.concept, hops: n.hops ?? null }));
  const known = new Set(nodes.map((n) => n.concept));
  const graph = graphOf(question);
  const edges = graph ? graph.edges.filter(([s, t]) => known.has(s) && known.has(t)) : [];
  if (!graph) {
    $("graph-note").textContent = "The question's facts could not be read here, so the graph is drawn without its edges.";
    $("graph-note").hidden = false;
  }
  const name = graph ? graph.name : (nodes.find((n) => n.hops === 0) || {}).concept;
  const options = graph ? graph.options : [];
  const L = layoutGraph(nodes, edges);
  const h = GRAPH.nodeH, w = L.nodeW;
  const svg = svgEl("svg", { width: L.width, height: L.height, viewBox: `0 0 ${L.width} ${L.height}`,
    role: "img", "aria-label": `Graph of the question: ${nodes.length} concepts, ${edges.length} facts` });
  const bands = [];
  for (const col of L.columns) {
    const band = svgEl("rect", { x: col.x - 8, y: 4, width: col.width + 16, height: L.height - 8, rx: 8,
      class: col.hops == null ? "band unreachable" : "band" });
    band.dataset.hops = col.hops ?? "";
    bands.push(band);
    svg.append(band, svgEl("text", { x: col.x + col.width / 2, y: 20, class: "col-head", "text-anchor": "middle" }, col.label));
  }
  if (L.apartX != null) svg.append(svgEl("line", { x1: L.apartX, y1: 8, x2: L.apartX, y2: L.height - 8, class: "apart" }));
  const edgeEls = [];
  for (const [s, t] of edges) {
    const [line, head] = edgePaths(L.pos.get(s), L.pos.get(t), w, h);
    const edge = svgEl("g", { class: "edge" });
    edge.dataset.source = s;
    edge.dataset.target = t;
    edge.append(svgEl("path", { d: line, class: "line" }), svgEl("path", { d: head, class: "head" }));
    edgeEls.push(edge);
    svg.append(edge);
  }
  const nodeEls = new Map();
  for (const n of nodes) {
    const p = L.pos.get(n.concept);
    const role = n.concept === name ? "asked" : options.includes(n.concept) ? "option" : "";
    const g = svgEl("g", { transform: `translate(${p.x} ${p.y})`, class: `node ${role}`.trim() });
    g.dataset.concept = n.concept;
    g.dataset.hops = n.hops ?? "";
    const title = svgEl("title");
    const heat = svgEl("rect", { width: w, height: h, rx: 6, class: "heat", "fill-opacity": 0 });
    g.append(title, svgEl("rect", { width: w, height: h, rx: 6, class: "base" }), heat);
    if (role) {
      g.append(svgEl("rect", { x: 0, y: 0, width: 5, height: h, rx: 2, class: "stripe" }),
        svgEl("text", { x: w / 2, y: -5, "text-anchor": "middle", class: "tag" }, role === "asked" ? "asked" : "option"));
    }
    const pText = svgEl("text", { x: w / 2, y: 28, "text-anchor": "middle", class: "prob" });
    g.append(svgEl("rect", { x: -3, y: -3, width: w + 6, height: h + 6, rx: 8, class: "outline" }),
      svgEl("text", { x: w / 2, y: 14, "text-anchor": "middle", class: "label" }, n.concept), pText);
    nodeEls.set(n.concept, { g, title, heat, pText, role, hops: n.hops });
    svg.append(g);
  }
  $("graph").append(svg);
  graphView = { frontiers, nodes: nodeEls, edges: edgeEls, bands, name };
  frontiers.forEach((t, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "graph-thought";
    b.textContent = `Thought ${t.thought}`;
    b.setAttribute("aria-pressed", "false");
    b.addEventListener("click", () => showThought(i));
    $("graph-thoughts").append(b);
  });
  $("graph-section").hidden = false;
  showThought(0);
}

// Thought i (an index into the frontier entries) on the graph: fills, outlines, masses.
function showThought(i) {
  const view = graphView;
  const t = view.frontiers[i], f = t.frontier, k = f.hops;
  const probs = new Map(f.nodes.map((n) => [n.concept, n.prob]));
  const inFrontier = (hops) => hops != null && hops <= k;
  for (const [concept, el] of view.nodes) {
    const p = probs.get(concept) ?? 0;
    el.heat.setAttribute("fill-opacity", p.toFixed(4));
    el.pText.textContent = percent(p);
    el.g.classList.toggle("dark", p > 0.5);
    el.g.classList.toggle("frontier", inFrontier(el.hops));
    el.g.classList.toggle("next", el.hops === k + 1);
    const where = el.hops == null ? `not reachable from ${view.name}` : el.hops === 0 ? "the asked name"
      : `${el.hops} hop${el.hops > 1 ? "s" : ""} from ${view.name}`;
    el.title.textContent = `${concept}: p = ${p.toPrecision(3)} at thought ${t.thought} (${where}` +
      (el.role === "option" ? ", an option" : "") + ")";
  }
  const hopsOf = (c) => (view.nodes.get(c) || {}).hops;
  for (const e of view.edges) {
    const s = hopsOf(e.dataset.source), d = hopsOf(e.dataset.target);
    e.classList.toggle("reach", inFrontier(s) && d != null && d <= k + 1);
  }
  for (const band of view.bands) {
    const hops = band.dataset.hops === "" ? null : Number(band.dataset.hops);
    band.classList.toggle("frontier", inFrontier(hops));
    band.classList.toggle("next", hops === k + 1);
  }
  [...$("graph-thoughts").children].forEach((b, j) => b.setAttribute("aria-pressed", String(j === i)));
  const m = (x) => x.toFixed(2);
  $("graph-masses").textContent = `frontier ${m(f.frontier_mass)} · next hop ${m(f.next_mass)} · rest ${m(f.rest_mass)}`;
  const bar = $("graph-mass-bar");
  bar.replaceChildren();
  let x = 0;
  for (const [mass, cls] of [[f.frontier_mass, "frontier"], [f.next_mass, "next"], [f.rest_mass, "rest"]]) {
    const width = 180 * Math.max(0, Math.min(1, mass));
    bar.append(svgEl("rect", { x, y: 0, width, height: 12, class: `mass ${cls}` }));
    x += width;
  }
  $("graph-legend").textContent = `Thought ${t.thought}'s probability on each concept (softmax of the LM head on ` +
    `the thought): darker = more probable, hover a node for its value. Outlined: reachable within ${k} ` +
    `hop${k > 1 ? "s" : ""} of ${view.name} (the frontier); dashed: exactly ${k + 1} hops away; ` +
    "unreachable concepts stand apart on the right. Rest = every other token.";
}

// Every failure in words: what went wrong, what to do, and the request id to quote.
function showError(err, body, received) {
  const box = $("error");
  box.replaceChildren();
  const say = (tag, text) => { const el = document.createElement(tag); el.textContent = text; box.append(el); return el; };
  if (err instanceof HttpError && err.status === 401) {
    pendingBody = body;
    sessionStorage.removeItem(KEY_STORAGE);  // it was missing or wrong
    $("key-message").textContent = `The server says: ${err.message}. Enter the API key to continue.`;
    $("key-panel").hidden = false;
    $("api-key").value = "";
    $("api-key").focus();
    return;
  }
  if (err instanceof HttpError) {
    say("h2", `The server refused the request (HTTP ${err.status})`);
    say("p", err.message);
    const fields = (err.body && err.body.detail) || [];
    if (err.status === 422 && fields.length) {
      const list = say("ul", "");
      for (const f of fields) {
        const path = (f.loc || []).filter((p) => p !== "body").join(".");
        const li = document.createElement("li");
        li.textContent = `${path || "body"}: ${f.msg}` + ("input" in f ? ` (you sent ${JSON.stringify(f.input)})` : "");
        list.append(li);
        const input = $(FIELD_INPUTS[path] || "");
        if (input) input.setAttribute("aria-invalid", "true");
      }
    }
    if (err.status === 503) {
      say("p", err.retryAfter ? `The server is busy; it asks to retry after ${err.retryAfter} s.`
        : "The server is busy or not ready; try again shortly.");
    }
    if (err.body && err.body.error && err.body.error.request_id) say("p", `request id: ${err.body.error.request_id}`).className = "rid";
  } else if (err instanceof StreamError) {
    say("h2", "The answer stream failed");
    say("p", `${err.message}` + (err.error.type ? ` (${err.error.type})` : "") +
      ` after ${received} characters of answer.`);
    if (err.error.request_id) say("p", `request id: ${err.error.request_id}`).className = "rid";
  } else {  // fetch throws TypeError when the server cannot be reached at all
    say("h2", "Could not reach the server");
    say("p", `${err.message}. Is the server still running?`);
  }
  const again = say("button", "Try again");
  again.type = "button";
  again.addEventListener("click", () => ask(lastBody));
  box.hidden = false;
}

// ---------------------------------------------------------------- wiring

async function loadExamples() {
  try {
    const r = await fetch("/playground/examples");
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    examples = (await r.json()).examples;
  } catch (err) {
    $("examples").append(` (could not load examples: ${err.message})`);
    return;
  }
  examples.forEach((ex, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "example";
    b.textContent = `${i + 1}. ${ex.label}`;
    b.title = ex.question;
    b.addEventListener("click", () => {
      $("question").value = ex.question;
      showConceptPreview();
      $("question").focus();
    });
    $("examples").append(b);
  });
  if (examples.length && !$("question").value.trim()) {   // never an empty box that looks filled
    $("question").value = examples[0].question;
    showConceptPreview();
  }
}

async function loadModelName() {
  try {
    const r = await fetch("/ready");
    const j = await r.json();
    $("model-name").textContent = j.model || j.status || "unknown";
  } catch (_) {
    $("model-name").textContent = "unknown (server not reachable)";
  }
}

function init() {
  $("ask").addEventListener("submit", (e) => {
    e.preventDefault();
    ask(buildBody());
  });
  $("question").addEventListener("keydown", (e) => {  // Enter in a textarea is a newline
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask").requestSubmit();
  });
  $("question").addEventListener("input", showConceptPreview);
  $("mode").addEventListener("change", () => { $("thoughts-field").hidden = $("mode").value !== "fixed"; });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value);
    $("key-panel").hidden = true;
    if (pendingBody) ask(pendingBody);
  });
  loadExamples();
  loadModelName();
}

init();
