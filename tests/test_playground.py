"""The playground page (issue 7): ``GET /`` and its assets over plain HTTP, then the page
itself in headless Chromium driven by Playwright, against the real server (``engine
serve`` on 127.0.0.1, a tiny random GPT-2, started with an API key).

The oracle is the API itself: the non-streamed ``POST /v1/reason`` with the same fields
(greedy, so deterministic) gives the answer text, usage and latent trace the page must
show; the streamed reply gives the number of answer deltas; the ProsQA generator's own
graph gives the concepts the page must find in the question. Failures the real server
cannot be made to produce on demand (503 overloaded, an error mid-stream, a dropped
connection) are served to the page by Playwright's request routing, in the server's own
error shapes (``server.errors.error_body``, ``server.sse.encode``).

The graph view needs traces that report each thought's frontier, which only a compact
model gives: those tests ask a second server, on the bundled model, and check the drawn
graph against the question text read here (nodes, edges, hop distances) and each
thought's masses, outlines and fills against that server's own ``/v1/reason`` reply.

Browser tests skip, saying why, where the ``playwright`` package or Chromium is missing
(``.ci/run`` installs Debian's ``chromium``; Playwright never downloads a browser here).
The main test saves a screenshot under pytest's tmp dir and prints its path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser

import httpx
import pytest

from server.errors import error_body
from server.middleware import PUBLIC_PATHS
from server.routes.playground import ASSETS, EXAMPLES_SEED, N_EXAMPLES, PAGE_PATHS, STATIC_DIR, example_questions
from server.sse import DONE, encode
from tests.live_server import LiveServer

KEY = "playground-s3cret"
KEY_STORAGE = "coconut-serve.api-key"  # the page's sessionStorage entry
QUESTION = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or a zumpus?"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000
# Content types by extension, written out here rather than taken from the route's table.
CONTENT_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with LiveServer(tiny_checkpoint("gpt2"), "--api-key", KEY, "--device", "cpu", "--dtype", "float32",
                    "--torch-threads", "1") as live:
        yield live


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def asset_refs(html: str) -> list[str]:
    parser = _Refs()
    parser.feed(html)
    return parser.refs


# ---------------------------------------------------------------- plain HTTP


def test_page_and_assets_are_public_and_typed_while_the_api_needs_the_key(server, api):
    with httpx.Client(base_url=server.url, timeout=30) as anon:  # no API key
        page = anon.get("/")
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.text == (STATIC_DIR / "index.html").read_text()
        refs = asset_refs(page.text)
        assert sorted(refs) == sorted(f"/static/{name}" for name in ASSETS), "every asset, only ours"
        for ref in refs:
            r = anon.get(ref)
            expected = CONTENT_TYPES[os.path.splitext(ref)[1]]
            assert r.status_code == 200 and r.headers["content-type"].split(";")[0] == expected, ref
            assert r.content == (STATIC_DIR / ref.rsplit("/", 1)[1]).read_bytes()
        for text in (page.text, anon.get("/static/playground.js").text, anon.get("/static/playground.css").text):
            assert not re.search(r"https?://|url\(", text), "the page must not load anything from elsewhere"

        examples = anon.get("/playground/examples")
        assert examples.status_code == 200 and examples.json() == {"examples": example_questions()}
        assert len(example_questions()) == N_EXAMPLES
        for ex in example_questions():
            assert ex["question"].endswith(ex["label"]) and re.fullmatch(r"Is \w+ a \w+ or \w+\?", ex["label"])

        assert anon.post("/v1/reason", json={"question": QUESTION}).status_code == 401
        assert anon.get("/static/app.py").status_code == 401  # only the page's own paths are public
    assert api.get("/static/app.py").status_code == 404
    assert api.post("/v1/reason", json={"question": QUESTION, "max_tokens": 2}).status_code == 200


def test_every_page_path_is_public_and_every_static_file_is_served():
    assert PAGE_PATHS <= PUBLIC_PATHS
    assert {p.name for p in STATIC_DIR.iterdir()} == {"index.html", *ASSETS}


# ---------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                   "(pip install -e '.[test]')")
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does it as root)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _fresh_page(browser, live):
    """A fresh browser context (its own sessionStorage) for a page of ``live``. Afterwards:
    no uncaught script error, no console error (a CSP violation is one), and no request
    left that server."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    urls: list[str] = []
    context.on("request", lambda r: urls.append(r.url))
    page = context.new_page()
    script_errors: list[str] = []
    page.on("pageerror", lambda e: script_errors.append(str(e)))
    page.on("console", lambda m: script_errors.append(f"console: {m.text}") if m.type == "error" else None)
    yield page
    context.close()
    # The failure tests make requests fail on purpose, and Chromium logs each as a console error.
    script_errors = [e for e in script_errors if not e.startswith("console: Failed to load resource")]
    assert not script_errors, script_errors
    assert urls and all(u.startswith(live.url + "/") for u in urls), urls


@pytest.fixture
def page(browser, server):
    yield from _fresh_page(browser, server)


def open_page(page, server, key: str | None = None):
    """Load the page; with ``key``, as if the person had entered it earlier in this tab."""
    if key is not None:
        page.context.add_init_script(f"sessionStorage.setItem({json.dumps(KEY_STORAGE)}, {json.dumps(key)})")
    page.goto(server.url + "/")
    page.wait_for_selector("button.example")


def fill_form(page, question, *, mode="fixed", thoughts="4", max_tokens="12", temperature="0", top_k="6"):
    page.fill("#question", question)
    page.select_option("#mode", mode)
    if mode == "fixed":
        page.fill("#thoughts", thoughts or "")  # empty: the checkpoint's thought count
    page.fill("#max_tokens", max_tokens)
    page.fill("#temperature", temperature)
    page.fill("#top_k", top_k)


def wait_done(page):
    page.wait_for_function("() => /^(done|failed)/.test(document.getElementById('status').textContent)")
    status = page.text_content("#status")
    assert status.startswith("done"), f"{status}: {page.text_content('#error')}"


def stream_deltas(api, body) -> list[str]:
    """The non-empty deltas of the streamed reply to ``body``."""
    deltas = []
    with api.stream("POST", "/v1/reason", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                deltas += [d for d in [json.loads(line[6:])["delta"]] if d]
    return deltas


def concept_cell(text: str, nodes: set[str]) -> tuple[bool, bool]:
    """(highlighted, partial) for a trace token, by the page's documented rule: the token
    (stripped) is a node's name, or begins one and has at least 3 characters."""
    t = text.strip().lower()
    names = {n.lower() for n in nodes}
    if t in names:
        return True, False
    if len(t) >= 3 and any(n.startswith(t) for n in names):
        return True, True
    return False, False


def shown(text: str) -> str:
    return "∅" if text == "" else text.replace(" ", "␣").replace("\n", "⏎")


def test_streamed_answer_matches_the_api_and_draws_one_column_per_thought(page, server, api, tmp_path):
    from engine.data.prosqa import generate

    open_page(page, server, key=KEY)
    sample = generate(N_EXAMPLES, EXAMPLES_SEED, size="mini")[0]
    page.locator("button.example").first.click()
    assert page.input_value("#question") == sample["question"]
    fill_form(page, sample["question"], thoughts="4", max_tokens="12", temperature="0", top_k="6")
    page.focus("#question")
    page.keyboard.press("Control+Enter")  # keyboard submit
    wait_done(page)

    body = {"question": sample["question"], "max_tokens": 12, "temperature": 0, "return_latent_trace": True,
            "latent_trace_top_k": 6, "latent": {"mode": "fixed", "thoughts": 4}}
    expected = api.post("/v1/reason", json=body).json()
    assert page.text_content("#answer") == expected["text"]
    deltas = stream_deltas(api, body)
    assert "".join(deltas) == expected["text"]
    assert page.evaluate("document.getElementById('answer').childNodes.length") == len(deltas), \
        "one text node per streamed delta: the page appends events as they come"

    nodes = set(sample["idx_to_symbol"])
    marks = page.locator("#asked mark")
    assert {marks.nth(i).text_content() for i in range(marks.count())} == nodes
    symbol = sample["idx_to_symbol"]
    options = page.locator("#asked mark.option")
    assert {options.nth(i).text_content() for i in range(options.count())} == \
        {symbol[sample["target"]], symbol[sample["neg_target"]]}
    assert page.locator("#asked mark.subject").first.text_content() == symbol[sample["root"]]
    assert page.text_content("#expected").endswith(sample["answer"])

    columns = page.locator("#trace .thought")
    assert columns.count() == 4 == expected["usage"]["latent_thoughts"] == len(expected["latent_trace"])
    for i, thought in enumerate(expected["latent_trace"]):
        column = columns.nth(i)
        assert column.locator("h3").text_content() == f"Thought {i + 1}"
        cells = column.locator(".cell")
        assert cells.count() == len(thought["tokens"]) == 6
        shades = []
        for j, tok in enumerate(thought["tokens"]):
            cell = cells.nth(j)
            assert cell.locator(".tok").text_content() == shown(tok["text"])
            assert cell.locator(".p").text_content() == f"{tok['prob'] * 100:.1f}%"
            classes = cell.get_attribute("class").split()
            assert ("concept" in classes, "partial" in classes) == concept_cell(tok["text"], nodes), tok
            rgb = cell.evaluate("el => getComputedStyle(el).backgroundColor")
            shades.append(sum(int(v) for v in re.findall(r"\d+", rgb)[:3]))
        assert shades == sorted(shades), "more probable tokens are darker (probabilities come sorted)"

    usage = expected["usage"]
    assert page.text_content("#usage-prompt") == str(usage["prompt_tokens"])
    assert page.text_content("#usage-thoughts") == "4"
    assert page.text_content("#usage-completion") == str(usage["completion_tokens"])
    assert page.text_content("#finish-reason") == expected["finish_reason"]
    for phase in ("queue", "prefill", "latent", "decode"):
        assert re.fullmatch(r"\d+\.\d ms", page.text_content(f"#t-{phase}")), phase
    assert page.is_hidden("#error") and page.is_hidden("#key-panel")
    assert page.is_hidden("#graph-section"), "no frontier in this model's trace: no graph view"

    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"playground screenshot: {shot}")


def test_field_errors_are_listed_and_the_form_recovers(page, server, api):
    open_page(page, server, key=KEY)
    fill_form(page, QUESTION, max_tokens="0", thoughts="2")
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    refused = api.post("/v1/reason", json={"question": QUESTION, "max_tokens": 0, "temperature": 0,
                                           "latent": {"mode": "fixed", "thoughts": 2}})
    assert refused.status_code == 422
    shown_error = page.text_content("#error")
    assert "HTTP 422" in shown_error and refused.json()["error"]["message"] in shown_error
    items = page.locator("#error li")
    assert [items.nth(i).text_content() for i in range(items.count())] == \
        [f"max_tokens: {f['msg']} (you sent 0)" for f in refused.json()["detail"]]
    assert page.get_attribute("#max_tokens", "aria-invalid") == "true"
    assert page.text_content("#answer") == "" and page.is_hidden("#trace-section")

    page.fill("#max_tokens", "4")
    page.click("#submit")
    wait_done(page)
    assert page.get_attribute("#max_tokens", "aria-invalid") is None and page.is_hidden("#error")
    assert page.locator("#trace .thought").count() == 2


def test_the_page_asks_for_the_api_key_and_retries(page, server, api):
    open_page(page, server)  # no key yet
    fill_form(page, QUESTION, thoughts=None, max_tokens="6")
    page.click("#submit")
    page.wait_for_selector("#key-panel:not([hidden])")
    assert "missing API key" in page.text_content("#key-message")
    assert page.get_attribute("#api-key", "type") == "password"
    assert page.text_content("#answer") == ""

    page.fill("#api-key", "not-the-key")
    page.press("#api-key", "Enter")
    page.wait_for_function("() => document.getElementById('key-message').textContent.includes('wrong API key')")
    page.wait_for_selector("#key-panel:not([hidden])")

    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    wait_done(page)
    expected = api.post("/v1/reason", json={"question": QUESTION, "max_tokens": 6, "temperature": 0,
                                            "latent": {"mode": "fixed"}}).json()
    assert page.text_content("#answer") == expected["text"]
    # thoughts left empty: the checkpoint's own count (the tiny checkpoint's is 4)
    assert page.locator("#trace .thought").count() == expected["usage"]["latent_thoughts"] == 4
    assert page.evaluate(f"sessionStorage.getItem({json.dumps(KEY_STORAGE)})") == KEY
    assert page.evaluate("localStorage.length") == 0, "the key stays in this tab's session only"


def a_question_with_concepts(count: int) -> str:
    """A ProsQA question (the generator's) naming exactly ``count`` people and concepts."""
    from engine.data.prosqa import generate

    for seed in range(50):
        for sample in generate(20, seed):
            if len(graph_nodes(*read_graph(sample["question"]))) == count:
                return sample["question"]
    raise AssertionError(f"no generated question names {count} concepts")


@pytest.mark.parametrize("width", [1280, 700, 420])
def test_the_concept_row_wraps_instead_of_overflowing(page, server, width):
    """A 23-concept question: every chip is shown, inside the page's width, over several
    rows (issue 25: the row ran past the page, a horizontal scrollbar)."""
    question = a_question_with_concepts(23)
    nodes = graph_nodes(*read_graph(question))
    page.set_viewport_size({"width": width, "height": 900})
    open_page(page, server, key=KEY)
    page.fill("#question", question)
    chips = page.eval_on_selector_all("#question-concepts mark", """els => els.map(e => {
        const r = e.getBoundingClientRect(); return {text: e.textContent, left: r.left, right: r.right, top: r.top};
    })""")
    assert sorted(c["text"] for c in chips) == sorted(nodes), (len(chips), len(nodes))
    row = page.eval_on_selector("#question-concepts", """e => {
        const r = e.getBoundingClientRect();
        return {left: r.left, right: r.right, scroll: e.scrollWidth, client: e.clientWidth};
    }""")
    assert row["scroll"] <= row["client"] + 1, row
    assert all(row["left"] - 1 <= c["left"] and c["right"] <= row["right"] + 1 for c in chips), (row, chips)
    assert len({round(c["top"]) for c in chips}) > 1, "23 chips on one row: nothing wrapped"
    page_width = page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert page_width[0] <= page_width[1], f"the page scrolls sideways: {page_width}"


def _sse(*payloads, done=True) -> str:
    return (b"".join(encode(p) for p in payloads) + (DONE if done else b"")).decode()


def test_trace_highlights_and_failures_in_words(page, server):
    """Canned replies in the server's shapes: a trace with known tokens, then 503,
    a mid-stream error, a stream cut short, a refused connection; then "Try again"
    reaches the real server."""
    open_page(page, server, key=KEY)
    fill_form(page, QUESTION, thoughts="2", max_tokens="4")
    replies: list[dict] = []
    page.route("**/v1/reason", lambda route: route.fulfill(**replies.pop(0)) if replies else route.fallback())
    sse = {"status": 200, "headers": {"content-type": "text/event-stream"}}

    def token(i, text, prob):
        return {"id": i, "text": text, "prob": prob}

    final = {"id": "r1", "model": "m", "delta": " zumpus.", "finish_reason": "stop", "answer": "Tom is a zumpus.",
             "usage": {"prompt_tokens": 20, "latent_thoughts": 2, "completion_tokens": 5},
             "timings": {"queue": 0.001, "prefill": 0.01, "latent": 0.02, "decode": 0.03},
             "latent_trace": [{"thought": 1, "tokens": [token(1, " wumpus", 0.6), token(2, "yum", 0.3),
                                                         token(3, " is", 0.1)]},
                              {"thought": 2, "tokens": [token(4, " Tom", 0.5), token(5, "zumpus", 0.5)]}]}
    replies.append({**sse, "body": _sse({"id": "r1", "model": "m", "delta": "### Tom is a"}, final)})
    page.click("#submit")
    wait_done(page)
    assert page.text_content("#answer") == "### Tom is a zumpus."
    cells = page.locator("#trace .cell")
    assert [cells.nth(i).get_attribute("class").split()[1:] for i in range(cells.count())] == \
        [["dark", "concept"], ["concept", "option", "partial"], [], ["dark", "concept", "subject"],
         ["dark", "concept", "option"]]
    assert page.is_hidden("#graph-section"), "a trace without frontiers draws no graph"

    overloaded = error_body(503, "waiting queue full (8 requests); retry later", "overloaded_error", "rid-503")
    replies.append({"status": 503, "headers": {"Retry-After": "7"}, "json": overloaded})
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    text = page.text_content("#error")
    assert all(s in text for s in ("HTTP 503", "waiting queue full", "retry after 7 s", "rid-503")), text

    failed = error_body(500, "the engine failed this request", "engine_error", "rid-500")
    replies.append({**sse, "body": _sse({"id": "r2", "model": "m", "delta": "Tom is"}, failed, done=False)})
    page.click("#submit")
    page.wait_for_function("() => document.getElementById('status').textContent === 'failed'")
    text = page.text_content("#error")
    assert all(s in text for s in ("stream failed", "the engine failed this request", "after 6 characters",
                                   "rid-500")), text
    assert page.text_content("#answer") == "Tom is", "the partial answer stays visible"

    replies.append({**sse, "body": _sse({"id": "r3", "model": "m", "delta": "Tom"}, done=False)})
    page.click("#submit")
    page.wait_for_function("() => document.getElementById('status').textContent === 'failed'")
    assert "closed before the answer was complete" in page.text_content("#error")

    page.unroute("**/v1/reason")
    page.route("**/v1/reason", lambda route: route.abort("connectionrefused"))
    page.click("#submit")
    page.wait_for_function("() => document.getElementById('status').textContent === 'failed'")
    assert "Could not reach the server" in page.text_content("#error")

    page.unroute("**/v1/reason")
    page.click("#error button")  # "Try again", now with the real server behind it
    wait_done(page)
    assert page.locator("#trace .thought").count() == 2 and page.is_hidden("#error")


# ---------------------------------------------------------------- the graph view (bundled model)

# Compact wording, with what a reference-sentence example lacks: a node reached by two
# paths (grulpus), an edge within one hop column (pilpus -> zhelpus, both 1 hop), a fact
# from an unreachable node into a reachable one (Sally -> pilpus) and an unreachable chain.
COMPACT_QUESTION = ("Sally kirpus | kirpus sumpus | Gabriel pilpus | Gabriel zhelpus | pilpus zhelpus | "
                    "pilpus grulpus | zhelpus grulpus | grulpus screrpus | Sally pilpus | ? Gabriel sumpus screrpus")


@pytest.fixture(scope="module")
def bundled():
    """The server on the bundled model (no --model): a compact model, so its traces carry
    each thought's frontier. No API key."""
    with LiveServer(None, "--torch-threads", "1") as live:
        yield live


@pytest.fixture
def graph_page(browser, bundled):
    yield from _fresh_page(browser, bundled)


def read_graph(question: str) -> tuple[str, tuple[str, str], list[tuple[str, str]]]:
    """(asked name, options, edges) of a question, read here by the rules the page states:
    "Every A is a B." / "X is a B." are A->B / X->B, "s t |" is s->t, and the last sentence
    "Is X a A or B?" (or "? X A B") asks."""
    text = " ".join(question.split())
    if "|" in text:
        *facts, ask = (p.strip() for p in text.split("|"))
        _, name, a, b = ask.split(" ")
        edges = [tuple(f.split(" ")) for f in facts]
    else:
        *facts, ask = (s.strip() for s in re.findall(r"[^.?]+[.?]", text))
        name, a, b = re.fullmatch(r"Is (\w+) an? (\w+) or (?:an? )?(\w+)\?", ask).groups()
        edges = [re.fullmatch(r"(?:Every )?(\w+) is an? (\w+)\.", f).groups() for f in facts]
    assert edges and all(len(e) == 2 for e in edges), question
    return name, (a, b), [tuple(e) for e in edges]


def graph_nodes(name, options, edges) -> list[str]:
    return list(dict.fromkeys([w for e in edges for w in e] + [name, *options]))


def hops_from(name, edges) -> dict[str, int]:
    """Breadth-first hop counts from the asked name (unreachable nodes absent)."""
    dist, queue = {name: 0}, [name]
    for s in queue:
        for a, t in edges:
            if a == s and t not in dist:
                dist[t] = dist[s] + 1
                queue.append(t)
    return dist


def node_classes(page) -> dict[str, set[str]]:
    return page.eval_on_selector_all("#graph svg g.node", "els => Object.fromEntries(els.map(g => "
                                     "[g.dataset.concept, g.getAttribute('class').split(' ')]))")


@pytest.mark.parametrize("which", ["example", "compact"])
def test_graph_view_draws_the_question_and_follows_the_selected_thought(graph_page, bundled, which):
    page = graph_page
    open_page(page, bundled)
    if which == "example":  # the bundled model's first held-out question, reference sentences
        page.locator("button.example").first.click()
        question = page.input_value("#question")
    else:
        question = COMPACT_QUESTION
    fill_form(page, question, thoughts="", max_tokens="12", top_k="3")
    page.click("#submit")
    wait_done(page)

    body = {"question": question, "max_tokens": 12, "temperature": 0, "return_latent_trace": True,
            "latent_trace_top_k": 3, "latent": {"mode": "fixed"}}
    r = httpx.post(bundled.url + "/v1/reason", json=body, timeout=60)
    assert r.status_code == 200, r.text
    trace = r.json()["latent_trace"]
    assert len(trace) >= 2 and all("frontier" in t for t in trace)

    name, options, edges = read_graph(question)
    nodes = graph_nodes(name, options, edges)
    hops = hops_from(name, edges)
    if which == "compact":
        assert hops == {"Gabriel": 0, "pilpus": 1, "zhelpus": 1, "grulpus": 2, "screrpus": 3}
    served = [(n["concept"], n.get("hops")) for n in trace[0]["frontier"]["nodes"]]
    assert served == [(n, hops.get(n)) for n in nodes], "the server reads the same graph"

    assert page.is_visible("#graph-section")
    drawn = page.locator("#graph svg g.node")
    assert drawn.count() == len(nodes)
    assert [drawn.nth(i).get_attribute("data-concept") for i in range(drawn.count())] == nodes
    assert page.eval_on_selector_all("#graph svg g.edge", "ps => ps.map(p => [p.dataset.source, "
                                     "p.dataset.target])") == [list(e) for e in edges]
    assert page.locator("#graph g.node.asked").get_attribute("data-concept") == name
    assert {o.get_attribute("data-concept") for o in page.locator("#graph g.node.option").all()} == set(options)

    # Layout: columns by hop distance, the unreachable ones last; no two nodes overlap;
    # the SVG holds every node.
    boxes = {n: drawn.nth(i).locator("rect.base").bounding_box() for i, n in enumerate(nodes)}
    reachable = [n for n in nodes if n in hops]
    lost = [n for n in nodes if n not in hops]
    assert lost, "both questions have unreachable nodes"
    for a in reachable:
        for b in reachable:
            if hops[a] < hops[b]:
                assert boxes[a]["x"] + boxes[a]["width"] < boxes[b]["x"], (a, b)
            elif hops[a] == hops[b]:
                assert boxes[a]["x"] == boxes[b]["x"], (a, b)
    right = max(boxes[n]["x"] + boxes[n]["width"] for n in reachable)
    assert len({boxes[n]["x"] for n in lost}) == 1, "unreachable nodes: one column"
    lost_x = boxes[lost[0]]["x"]
    column_x = sorted({boxes[n]["x"] for n in reachable})
    hop_gaps = [b - a - boxes[reachable[0]]["width"] for a, b in zip(column_x, column_x[1:])]
    assert lost_x - right > max(hop_gaps) + 20, "the unreachable column stands apart, past a wider gap"
    line = page.locator("#graph svg line.apart").bounding_box()
    assert right < line["x"] < lost_x, "with a dashed line between"
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            A, B = boxes[a], boxes[b]
            assert (A["x"] + A["width"] <= B["x"] or B["x"] + B["width"] <= A["x"]
                    or A["y"] + A["height"] <= B["y"] or B["y"] + B["height"] <= A["y"]), (a, b)
    svg = page.locator("#graph svg").bounding_box()
    for box in boxes.values():
        assert svg["x"] <= box["x"] and box["x"] + box["width"] <= svg["x"] + svg["width"]
        assert svg["y"] <= box["y"] and box["y"] + box["height"] <= svg["y"] + svg["height"]

    buttons = page.locator("#graph-thoughts button")
    assert buttons.count() == len(trace)
    assert page.text_content("#graph-masses") == masses(trace[0]["frontier"]), "thought 1 first"
    texts = []
    for k in [2, 1, *range(3, len(trace) + 1)]:  # to thought 2 and back, then the rest
        buttons.nth(k - 1).click()
        f = trace[k - 1]["frontier"]
        assert f["hops"] == k
        texts.append(page.text_content("#graph-masses"))
        assert texts[-1] == masses(f), k
        assert [b.get_attribute("aria-pressed") for b in buttons.all()] == \
            ["true" if j == k - 1 else "false" for j in range(len(trace))]
        classes = node_classes(page)
        assert {n for n, c in classes.items() if "frontier" in c} == \
            {n for n in nodes if n in hops and hops[n] <= k} == \
            {n["concept"] for n in f["nodes"] if n.get("hops") is not None and n["hops"] <= k}, k
        assert {n for n, c in classes.items() if "next" in c} == {n for n in nodes if hops.get(n) == k + 1}, k
        probs = {n["concept"]: n["prob"] for n in f["nodes"]}
        for i, n in enumerate(nodes):
            g = drawn.nth(i)
            assert float(g.locator("rect.heat").get_attribute("fill-opacity")) == pytest.approx(probs[n], abs=1e-4)
            shown_p = float(re.match(rf"{n}: p = (\S+) at thought {k} ", g.locator("title").text_content()).group(1))
            assert shown_p == pytest.approx(probs[n], rel=1e-2, abs=1e-12)
        assert f"within {k} hop" in page.text_content("#graph-legend")
    assert len(set(texts)) > 1, "the masses differ between thoughts (else this test could not tell them apart)"


def masses(f: dict) -> str:
    return f"frontier {f['frontier_mass']:.2f} · next hop {f['next_mass']:.2f} · rest {f['rest_mass']:.2f}"


# ---------------------------------------------------------------- the README's screenshot


def take_screenshot(model_dir: str, out: str, example: int = 0) -> None:
    """The page after answering one example question, trace shown, saved as a small PNG
    (a 128-colour palette keeps it well under 300 KB). Run:
    ``python -m tests.test_playground models/prosqa-coconut docs/playground.png``."""
    from playwright.sync_api import sync_playwright

    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    with LiveServer(model_dir, "--device", "cpu") as live, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        open_page(page, live)
        page.locator("button.example").nth(example).click()
        page.click("#submit")
        wait_done(page)
        page.screenshot(path=out, full_page=True)
        browser.close()
    from PIL import Image

    Image.open(out).convert("RGB").quantize(colors=128).save(out, optimize=True)
    print(f"{out}: {os.path.getsize(out) // 1024} KB")


if __name__ == "__main__":
    import sys

    take_screenshot(*sys.argv[1:3], *map(int, sys.argv[3:4]))


def test_examples_come_from_the_models_held_out_split(tmp_path):
    from engine.data.prosqa import generate
    from engine.data.records import load_records, save_records

    samples = generate(6, 123, size="linear")
    save_records(load_records_from(samples, tmp_path), tmp_path / "test.json")
    shown = example_questions(tmp_path)
    expected = load_records(tmp_path / "test.json")[:N_EXAMPLES]
    assert [e["question"] for e in shown] == [r.question for r in expected]
    assert [e["answer"] for e in shown] == [r.answer for r in expected]
    assert all(e["label"].startswith("Is ") and e["label"].endswith("?") for e in shown)


def load_records_from(samples, directory):
    import json

    from engine.data.records import load_records

    path = directory / "raw.json"
    path.write_text(json.dumps(samples))
    return load_records(path)


def test_the_bundled_models_examples_are_ones_it_answers_right(bundled):
    """The page's examples come from the served model's held-out split and are ones it answers
    right (asked here again through /v1/reason, with the gold answer from test.json)."""
    from engine.data.records import load_records
    from engine.models import default_model_dir

    gold = {r.question: r.answer for r in load_records(default_model_dir() / "test.json")}
    with httpx.Client(base_url=bundled.url, timeout=60) as http:
        shown = http.get("/playground/examples").json()["examples"]
        assert len(shown) == N_EXAMPLES
        for ex in shown:
            assert gold[ex["question"]] == ex["answer"]
            r = http.post("/v1/reason", json={"question": ex["question"], "max_tokens": 32})
            assert r.status_code == 200 and r.json()["answer"] == ex["answer"], r.text
