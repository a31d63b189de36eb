"""``server.fast_lane``: ``POST /v1/reason``, ``/v1/completions`` and ``/v1/chat/completions``
without FastAPI's layers must answer exactly as FastAPI's own routes do.

The oracle is the same app with the lane switched off (``app.fast_lane = False``: every
request through FastAPI's routing, validation and serialisation), asked the same requests
on the same engine, one after the other:

- greedy answers, JSON and SSE, n = 1 and n = 2: the same bytes once the fields that differ
  by nature (response id, timings) are set aside;
- every refusal (malformed JSON, a field error, a body that is not an object, a text
  content type, no content type, an unknown model, a body over the limit): the same
  status, the same body apart from the request id;
- the lane does serve: a valid request never reaches FastAPI (its entry is watched), an
  invalid one always does;
- with an API key, the lane's requests are held to it as FastAPI's are.
"""

from __future__ import annotations

import json
import math
import re

import httpx
import pytest

from tests.test_server_harness import one_thread_server, sse_payloads

QUESTION = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or a zumpus?"
#: fields that differ between two identical requests (cached_tokens: what earlier requests left in the slots)
VARYING = {"id", "timings", "request_id", "created", "cached_tokens"}
CHAT = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with one_thread_server(tiny_checkpoint("gpt2"), max_batch_size=4, max_body_bytes=4096) as live:
        yield live


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def _stable(value):
    """The value with the fields that differ between two identical requests removed."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VARYING}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def same(a, b) -> bool:
    """Equal, floats to 1e-5: log-probabilities of the same greedy tokens differ in the last
    bits when the engine batches the two runs' rows differently."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def both_ways(server, send):
    """``send()``'s response with the lane on, then with every request through FastAPI."""
    app = server.app
    assert app.fast_lane
    fast = send()
    app.fast_lane = False
    try:
        framework = send()
    finally:
        app.fast_lane = True
    return fast, framework


@pytest.mark.parametrize("body", [{"max_tokens": 6}, {"max_tokens": 6, "n": 2},
                                  {"max_tokens": 4, "return_latent_trace": True, "latent_trace_top_k": 2}])
def test_json_replies_equal_fastapis(server, http, body):
    fast, framework = both_ways(server, lambda: http.post("/v1/reason", json={"question": QUESTION,
                                                                              "temperature": 0, **body}))
    assert fast.status_code == framework.status_code == 200, (fast.text, framework.text)
    assert fast.headers["content-type"] == framework.headers["content-type"]
    assert _stable(fast.json()) == _stable(framework.json())
    # the same bytes, key order and spelling included, once the varying values are blanked
    assert _blanked(fast.content) == _blanked(framework.content)


def _blanked(content: bytes, numbers: bool = False) -> bytes:
    content = re.sub(rb'"id":"[^"]*"', b'"id":""', content)
    if numbers:       # the float values (compared to a tolerance by ``same``)
        content = re.sub(rb'-?\d+\.\d+(?:[eE][-+]?\d+)?', b'0.0', content)
    content = re.sub(rb'"created":\d+', b'"created":0', content)
    content = re.sub(rb'"cached_tokens":\d+', b'"cached_tokens":0', content)
    return re.sub(rb'"timings":\{[^}]*\}', b'"timings":{}', content)


OPENAI_BODIES = [
    ("/v1/completions", {"prompt": QUESTION, "max_tokens": 5}),
    ("/v1/completions", {"prompt": [QUESTION, "Sally is a rompus. Is Sally a rompus or a tumpus?"], "max_tokens": 4,
                         "n": 2, "logprobs": 2}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 5}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 4, "n": 2, "logprobs": True, "top_logprobs": 3}),
]


@pytest.mark.parametrize("path, body", OPENAI_BODIES)
def test_openai_json_replies_equal_fastapis(server, http, path, body):
    fast, framework = both_ways(server, lambda: http.post(path, json={"temperature": 0, **body}))
    assert fast.status_code == framework.status_code == 200, (fast.text, framework.text)
    assert same(_stable(fast.json()), _stable(framework.json()))
    assert _blanked(fast.content, numbers=True) == _blanked(framework.content, numbers=True)


STREAMS = [("/v1/reason", {"question": QUESTION, "max_tokens": 6}),
           ("/v1/reason", {"question": QUESTION, "max_tokens": 5, "n": 2}),
           *[(path, {**body, "stream_options": {"include_usage": True}}) for path, body in OPENAI_BODIES]]


@pytest.mark.parametrize("path, body", STREAMS)
def test_streams_equal_fastapis(server, http, path, body):
    def send():
        with http.stream("POST", path, json={"temperature": 0, "stream": True, **body}) as r:
            return r.status_code, dict(r.headers), r.read().decode()

    (fast_status, fast_headers, fast_body), (fw_status, fw_headers, fw_body) = both_ways(server, send)
    assert fast_status == fw_status == 200
    for header in ("content-type", "cache-control", "x-accel-buffering", "transfer-encoding"):
        assert fast_headers.get(header) == fw_headers.get(header), header
    fast_events, fw_events = sse_payloads(fast_body), sse_payloads(fw_body)
    assert fast_events[-1] == fw_events[-1] == "[DONE]"
    assert same(_by_answer(fast_events), _by_answer(fw_events))


def _by_answer(events: list) -> list:
    """The stable events grouped by answer (stable sort on the choice's or event's index):
    answers to several prompts or samples interleave in the order their steps ended."""
    def answer(event):
        if not isinstance(event, dict):
            return math.inf
        choices = event.get("choices")
        return choices[0]["index"] if choices else event.get("index", math.inf if choices == [] else -1)
    return [_stable(e) for e in sorted(events, key=answer)]


REFUSALS = [
    ("malformed JSON", b'{"question": ', {"content-type": "application/json"}),
    ("a field error", json.dumps({"question": QUESTION, "temperature": -1}).encode(),
     {"content-type": "application/json"}),
    ("a boolean seed", json.dumps({"question": QUESTION, "seed": False}).encode(),
     {"content-type": "application/json"}),
    ("a list body", json.dumps([QUESTION]).encode(), {"content-type": "application/json"}),
    ("an empty body", b"", {"content-type": "application/json"}),
    ("a text content type", json.dumps({"question": QUESTION}).encode(), {"content-type": "text/plain"}),
    ("no content type", json.dumps({"question": QUESTION}).encode(), {}),
    ("an unknown model", json.dumps({"question": QUESTION, "model": "gpt-9"}).encode(),
     {"content-type": "application/json"}),
    ("a question the engine refuses", json.dumps({"question": "Tom\x00 is a wumpus."}).encode(),
     {"content-type": "application/json"}),
    ("a body over the limit", json.dumps({"question": QUESTION * 80}).encode(),
     {"content-type": "application/json"}),
]


JSON = {"content-type": "application/json"}
REFUSALS += [
    ("completions: a boolean max_tokens", json.dumps({"prompt": QUESTION, "max_tokens": True}).encode(), JSON,
     "/v1/completions"),
    ("completions: best_of", json.dumps({"prompt": QUESTION, "best_of": 2}).encode(), JSON, "/v1/completions"),
    ("completions: logit_bias", json.dumps({"prompt": QUESTION, "logit_bias": {"5": 1}}).encode(), JSON,
     "/v1/completions"),
    ("completions: logprobs over 5", json.dumps({"prompt": QUESTION, "logprobs": 6}).encode(), JSON,
     "/v1/completions"),
    ("chat: no messages", json.dumps({"messages": []}).encode(), JSON, "/v1/chat/completions"),
    ("chat: a json_object format", json.dumps({"messages": CHAT, "response_format": {"type": "json_object"}}).encode(),
     JSON, "/v1/chat/completions"),
    ("chat: malformed JSON", b'{"messages": [', JSON, "/v1/chat/completions"),
    ("chat: an unknown model", json.dumps({"messages": CHAT, "model": "gpt-9"}).encode(), JSON,
     "/v1/chat/completions"),
]


@pytest.mark.parametrize("what, content, headers, path", [(*r, "/v1/reason") if len(r) == 3 else r for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_refusals_equal_fastapis(server, http, what, content, headers, path):
    fast, framework = both_ways(server, lambda: http.post(path, content=content, headers=headers))
    assert fast.status_code == framework.status_code >= 400, (what, fast.text, framework.text)
    assert _stable(fast.json()) == _stable(framework.json()), what
    assert fast.json()["error"]["request_id"] == fast.headers["x-request-id"]


def test_a_chunked_body_over_the_limit_is_413_both_ways(server, http):
    def send():
        chunks = (json.dumps({"question": QUESTION * 80}).encode()[i:i + 500] for i in range(0, 6000, 500))
        return http.post("/v1/reason", content=chunks, headers={"content-type": "application/json"})

    fast, framework = both_ways(server, send)
    assert fast.status_code == framework.status_code == 413
    assert _stable(fast.json()) == _stable(framework.json())


def test_the_lane_serves_valid_requests_and_hands_the_rest_to_fastapi(server, http, monkeypatch):
    lane = server.app.front.app.app.app.lane     # context -> auth -> body limit -> dispatch
    calls = []
    framework = lane.fallback

    async def watched(scope, receive, send):
        calls.append(scope["path"])
        await framework(scope, receive, send)

    monkeypatch.setattr(lane, "fallback", watched)
    assert http.post("/v1/reason", json={"question": QUESTION, "max_tokens": 2}).status_code == 200
    with http.stream("POST", "/v1/reason", json={"question": QUESTION, "max_tokens": 2, "stream": True}) as r:
        assert r.status_code == 200 and sse_payloads(r.read().decode())[-1] == "[DONE]"
    assert calls == []
    assert http.post("/v1/completions", json={"prompt": QUESTION, "max_tokens": 2}).status_code == 200
    assert http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}).status_code == 200
    assert calls == []
    assert http.post("/v1/reason", json={"question": QUESTION, "top_p": 2}).status_code == 422
    assert http.post("/v1/chat/completions", json={"messages": CHAT, "n": True}).status_code == 422
    assert calls == ["/v1/reason", "/v1/chat/completions"]


def test_the_lane_holds_requests_to_the_api_key(tiny_checkpoint):
    with one_thread_server(tiny_checkpoint("gpt2"), max_batch_size=2, api_key="sesame") as live:
        with httpx.Client(base_url=live.url, timeout=120) as c:
            body = {"question": QUESTION, "max_tokens": 2}
            refused = c.post("/v1/reason", json=body)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert c.post("/v1/reason", json=body, headers={"Authorization": "Bearer sesame"}).status_code == 200


@pytest.mark.parametrize("head", [{"id": "reason-1", "model": "m"}, {"id": "x", "model": "é\"m", "index": 3}])
@pytest.mark.parametrize("delta", [" wumpus", "", "naïve \"quoted\"\n\ttab", "\u2028 \U0001f600", "\\"])
def test_pre_serialised_delta_frames_are_the_encoded_event(head, delta):
    """Oracle: ``json.dumps`` of the whole event, as ``server.sse.encode`` writes every other one."""
    from server.sse import delta_frames
    event = {**head, "delta": delta, "finish_reason": None}
    assert delta_frames(head)(delta) == b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"
