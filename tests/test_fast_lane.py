"""``server.fast_lane``: ``POST /v1/reason`` without FastAPI's layers must answer exactly as
FastAPI's own route does.

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
import re

import httpx
import pytest

from tests.test_server_harness import one_thread_server, sse_payloads

QUESTION = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or a zumpus?"
VARYING = {"id", "timings", "request_id"}


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


def _blanked(content: bytes) -> bytes:
    content = re.sub(rb'"id":"[^"]*"', b'"id":""', content)
    return re.sub(rb'"timings":\{[^}]*\}', b'"timings":{}', content)


@pytest.mark.parametrize("body", [{"max_tokens": 6}, {"max_tokens": 5, "n": 2}])
def test_streams_equal_fastapis(server, http, body):
    def send():
        with http.stream("POST", "/v1/reason", json={"question": QUESTION, "temperature": 0, "stream": True,
                                                      **body}) as r:
            return r.status_code, dict(r.headers), r.read().decode()

    (fast_status, fast_headers, fast_body), (fw_status, fw_headers, fw_body) = both_ways(server, send)
    assert fast_status == fw_status == 200
    for header in ("content-type", "cache-control", "x-accel-buffering", "transfer-encoding"):
        assert fast_headers.get(header) == fw_headers.get(header), header
    fast_events, fw_events = sse_payloads(fast_body), sse_payloads(fw_body)
    assert fast_events[-1] == fw_events[-1] == "[DONE]"
    assert [_stable(e) for e in fast_events] == [_stable(e) for e in fw_events]


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


@pytest.mark.parametrize("what, content, headers", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_equal_fastapis(server, http, what, content, headers):
    fast, framework = both_ways(server, lambda: http.post("/v1/reason", content=content, headers=headers))
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
    assert http.post("/v1/reason", json={"question": QUESTION, "top_p": 2}).status_code == 422
    assert calls == ["/v1/reason"]


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
