// The playground: ask POST /v1/reason for a streamed answer with the latent trace and draw it.
//
// Plain JavaScript, no framework and no build step: the server ships this file as is.
// The flow: submit -> fetch (stream: true) -> parse server-sent events as they arrive,
// appending each `delta` -> the last event carries usage, timings and `latent_trace`
// -> draw one heatmap column per thought. Every failure ends in words on the page.
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
    setBusy(false, `done in ${Math.round(performance.now() - started)} ms`);
  } catch (err) {
    setBusy(false, "failed");
    showError(err, body, received);
  }
}

// ---------------------------------------------------------------- showing results

function clearResult() {
  for (const id of ["error", "key-panel", "stats", "trace-section"]) $(id).hidden = true;
  $("answer").replaceChildren();
  $("trace").replaceChildren();
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
