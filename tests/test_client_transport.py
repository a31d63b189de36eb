"""SDK against ``httpx.MockTransport``: retries, backoff, timeouts, errors, request bodies.

No server and no real waiting: every client gets a scripted transport, a recording
``sleep`` and a ``RetryPolicy`` with fixed randomness and clock, so the expected delays
are plain numbers written out by hand from the documented rule
(``min(0.5 * 2**attempt, 8) * (1 - 0.25 * random())``, or ``Retry-After``). Each test
runs the sync client and the async one (``kind``) through the same adapter.
"""

from __future__ import annotations

import asyncio
import email.utils
import json

import httpx
import pytest

from coconut_client import (APIConnectionError, APIResponseValidationError, APIStatusError,
                            APITimeoutError, AsyncCoconutClient, AuthenticationError,
                            BadRequestError, CoconutClient, InternalServerError, Latent,
                            NotFoundError, OverloadedError, PermissionDeniedError,
                            RateLimitError, ReasonResult, RetryPolicy, ServiceUnavailableError,
                            UnprocessableEntityError)
from coconut_client._retry import parse_retry_after

BASE = "http://coconut.test"

REASON_BODY = {
    "id": "req-1", "model": "tiny-gpt2", "text": "### yumpus", "answer": "yumpus",
    "finish_reason": "stop",
    "usage": {"prompt_tokens": 11, "latent_thoughts": 3, "completion_tokens": 4},
    "timings": {"queue": 0.001, "prefill": 0.01, "latent": 0.02, "decode": 0.03},
    "latent_trace": None,
}


class Script:
    """A MockTransport handler answering from a list of steps (the last one repeats).

    A step is a status code, an ``httpx.Response`` factory, or an exception class/factory
    to raise. Every request is recorded.
    """

    def __init__(self, *steps):
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, int):
            return httpx.Response(step, json={"error": {"message": f"status {step}"}})
        if isinstance(step, type) and issubclass(step, Exception):
            raise step("scripted failure", request=request)
        return step(request)

    @property
    def calls(self) -> int:
        return len(self.requests)


def ok(body=None, headers=None):
    return lambda request: httpx.Response(200, json=REASON_BODY if body is None else body,
                                          headers=headers)


def status(code, body=None, headers=None):
    return lambda request: httpx.Response(code, json=body if body is not None else {"error": {"message": "x"}},
                                          headers=headers)


class Sync:
    """Calls an async client's coroutine methods as if they were blocking."""

    def __init__(self, client):
        self.client = client

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if asyncio.iscoroutinefunction(attr):
            return lambda *a, **k: asyncio.run(attr(*a, **k))
        if name == "with_options":
            return lambda *a, **k: Sync(attr(*a, **k))
        return attr


@pytest.fixture(params=["sync", "async"])
def kind(request):
    return request.param


@pytest.fixture
def make(kind):
    """``make(script, **client_kwargs) -> (client, sleeps)`` for the current ``kind``."""

    def build(script, *, random=lambda: 0.0, clock=lambda: 1_000_000.0, **kwargs):
        sleeps: list[float] = []
        policy = kwargs.pop("retry_policy", None) or RetryPolicy(random=random, clock=clock)
        transport = httpx.MockTransport(script)
        if kind == "sync":
            client = CoconutClient(BASE, http_client=httpx.Client(transport=transport),
                                   sleep=sleeps.append, retry_policy=policy, **kwargs)
            return client, sleeps

        async def fake_sleep(seconds):
            sleeps.append(seconds)

        client = AsyncCoconutClient(BASE, http_client=httpx.AsyncClient(transport=transport),
                                    sleep=fake_sleep, retry_policy=policy, **kwargs)
        return Sync(client), sleeps

    return build


# -- retries -------------------------------------------------------------------------


@pytest.mark.parametrize("code,exc", [(408, APIStatusError), (429, RateLimitError),
                                      (502, InternalServerError), (503, OverloadedError),
                                      (504, InternalServerError)])
def test_retryable_status_is_retried_twice_by_default(make, code, exc):
    script = Script(code)
    client, sleeps = make(script)
    with pytest.raises(exc) as info:
        client.reason("q")
    assert info.value.status_code == code
    assert script.calls == 3  # 1 + the default 2 retries
    assert sleeps == [0.5, 1.0]


def test_success_after_retries_returns_the_result(make):
    script = Script(503, 502, ok())
    client, sleeps = make(script)
    r = client.reason("q")
    assert isinstance(r, ReasonResult) and r.answer == "yumpus"
    assert script.calls == 3 and sleeps == [0.5, 1.0]


@pytest.mark.parametrize("code,exc", [(400, BadRequestError), (401, AuthenticationError),
                                      (403, PermissionDeniedError), (404, NotFoundError),
                                      (413, APIStatusError), (422, UnprocessableEntityError),
                                      (500, InternalServerError), (501, InternalServerError)])
def test_other_statuses_fail_at_once(make, code, exc):
    script = Script(code)
    client, sleeps = make(script, max_retries=5)
    with pytest.raises(exc) as info:
        client.reason("q")
    assert type(info.value) is exc
    assert script.calls == 1 and sleeps == []


def test_connection_errors_are_retried_then_raise_connection_error(make):
    script = Script(httpx.ConnectError)
    client, sleeps = make(script)
    with pytest.raises(APIConnectionError) as info:
        client.reason("q")
    assert not isinstance(info.value, APITimeoutError)
    assert script.calls == 3 and sleeps == [0.5, 1.0]


def test_timeouts_are_retried_then_raise_timeout_error(make):
    script = Script(httpx.ReadTimeout)
    client, _ = make(script)
    with pytest.raises(APITimeoutError):
        client.reason("q")
    assert script.calls == 3


def test_connection_error_then_success(make):
    script = Script(httpx.ConnectError, httpx.RemoteProtocolError, ok())
    client, sleeps = make(script)
    assert client.reason("q").text == "### yumpus"
    assert script.calls == 3 and sleeps == [0.5, 1.0]


def test_errors_of_our_own_making_are_not_retried(make):
    script = Script(httpx.UnsupportedProtocol)
    client, sleeps = make(script)
    with pytest.raises(APIConnectionError):
        client.reason("q")
    assert script.calls == 1 and sleeps == []


def test_max_retries_per_call_and_per_client(make):
    script = Script(503)
    client, sleeps = make(script)
    with pytest.raises(OverloadedError):
        client.reason("q", max_retries=0)
    assert script.calls == 1 and sleeps == []

    with pytest.raises(OverloadedError):
        client.reason("q", max_retries=5)
    assert script.calls == 1 + 6
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 8.0]

    other = client.with_options(max_retries=3)
    sleeps.clear()
    with pytest.raises(OverloadedError):
        other.reason("q")
    assert script.calls == 7 + 4 and sleeps == [0.5, 1.0, 2.0]
    assert client.max_retries == 2 and other.max_retries == 3  # the original is unchanged

    client2, _ = make(Script(503), max_retries=0)
    with pytest.raises(OverloadedError):
        client2.reason("q")


def test_backoff_doubles_to_the_cap_and_jitter_only_shortens(make):
    client, sleeps = make(Script(503), max_retries=7)
    with pytest.raises(OverloadedError):
        client.reason("q")
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]

    client, sleeps = make(Script(503), max_retries=6, random=lambda: 1.0)
    with pytest.raises(OverloadedError):
        client.reason("q")
    assert sleeps == [0.375, 0.75, 1.5, 3.0, 6.0, 6.0]


@pytest.mark.parametrize("header,expected", [("3", 3.0), ("0", 0.0), ("1.5", 1.5),
                                             ("3600", 0.5),   # beyond 60 s: the backoff
                                             ("soon", 0.5), ("-2", 0.5)])
def test_retry_after_seconds_is_honoured(make, header, expected):
    script = Script(status(503, headers={"Retry-After": header}), ok())
    client, sleeps = make(script)
    client.reason("q")
    assert sleeps == [expected]


def test_retry_after_http_date_is_honoured(make):
    now = 1_700_000_000.0
    in_7s = email.utils.formatdate(now + 7, usegmt=True)
    past = email.utils.formatdate(now - 100, usegmt=True)
    script = Script(status(429, headers={"Retry-After": in_7s}),
                    status(503, headers={"Retry-After": past}), ok())
    client, sleeps = make(script, clock=lambda: now)
    client.reason("q")
    assert sleeps == [7.0, 0.0]


def test_retry_after_on_a_non_retryable_status_does_not_retry(make):
    script = Script(status(400, headers={"Retry-After": "1"}))
    client, sleeps = make(script)
    with pytest.raises(BadRequestError):
        client.reason("q")
    assert script.calls == 1 and sleeps == []


def test_parse_retry_after():
    now = 1_700_000_000.0
    assert parse_retry_after("12", now) == 12.0
    assert parse_retry_after(" 2.5 ", now) == 2.5
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:50 -0000", now) == 30.0  # naive = GMT
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("", now) is None
    assert parse_retry_after("nan", now) is None
    assert parse_retry_after("later", now) is None


# -- timeouts ---------------------------------------------------------------------------


def _timeout_of(request):
    return request.extensions["timeout"]


def test_connect_and_read_timeouts_are_separate_and_overridable(make):
    script = Script(ok())
    client, _ = make(script, connect_timeout=1.5, read_timeout=30.0)
    client.reason("q")
    t = _timeout_of(script.requests[-1])
    assert (t["connect"], t["read"]) == (1.5, 30.0)

    client.reason("q", timeout=2.0)
    assert _timeout_of(script.requests[-1]) == {"connect": 2.0, "read": 2.0, "write": 2.0, "pool": 2.0}

    client.with_options(read_timeout=7.0).reason("q")
    t = _timeout_of(script.requests[-1])
    assert (t["connect"], t["read"]) == (1.5, 7.0)

    client.reason("q", timeout=httpx.Timeout(None, connect=3.0))
    t = _timeout_of(script.requests[-1])
    assert (t["connect"], t["read"]) == (3.0, None)


def test_default_timeouts():
    c = CoconutClient(BASE)
    try:
        assert (c.timeout.connect, c.timeout.read) == (5.0, 600.0)
    finally:
        c.close()


# -- request bodies and headers ----------------------------------------------------------


def _body(request):
    return json.loads(request.content)


def test_reason_sends_only_the_given_fields(make):
    script = Script(ok())
    client, _ = make(script)
    client.reason("Is Tom a wumpus?")
    req = script.requests[-1]
    assert req.method == "POST" and req.url == BASE + "/v1/reason"
    assert _body(req) == {"question": "Is Tom a wumpus?"}
    assert "authorization" not in req.headers
    assert req.headers["accept"] == "application/json"
    assert req.headers["user-agent"].startswith("coconut-client/")

    client.reason("q", max_tokens=32, temperature=0, top_p=0.9, top_k=5, seed=7, stop=("\n", "."),
                  ignore_eos=True, latent={"mode": "fixed", "thoughts": 6}, return_latent_trace=True,
                  latent_trace_top_k=3, model="tiny", extra_body={"future_field": 1},
                  extra_headers={"X-Trace": "abc"})
    req = script.requests[-1]
    assert _body(req) == {"question": "q", "max_tokens": 32, "temperature": 0, "top_p": 0.9,
                          "top_k": 5, "seed": 7, "stop": ["\n", "."], "ignore_eos": True,
                          "latent": {"mode": "fixed", "thoughts": 6}, "return_latent_trace": True,
                          "latent_trace_top_k": 3, "model": "tiny", "future_field": 1}
    assert req.headers["x-trace"] == "abc"


def test_latent_accepts_the_typed_model(make):
    script = Script(ok())
    client, _ = make(script)
    client.reason("q", latent=Latent(mode="auto", max_thoughts=8, threshold=0.7), stop="###")
    assert _body(script.requests[-1]) == {"question": "q", "stop": "###",
                                          "latent": {"mode": "auto", "max_thoughts": 8,
                                                     "threshold": 0.7}}
    with pytest.raises(TypeError):
        client.reason("q", latent=["fixed"])


def test_api_key_and_default_headers(make):
    script = Script(ok())
    client, _ = make(script, api_key="sekrit", default_headers={"X-Team": "a"})
    client.reason("q")
    assert script.requests[-1].headers["authorization"] == "Bearer sekrit"
    assert script.requests[-1].headers["x-team"] == "a"
    client.with_options(api_key="other").reason("q")
    assert script.requests[-1].headers["authorization"] == "Bearer other"


def test_environment_defaults(monkeypatch):
    monkeypatch.setenv("COCONUT_BASE_URL", "http://from-env:9/")
    monkeypatch.setenv("COCONUT_API_KEY", "envkey")
    c = CoconutClient()
    try:
        assert c.base_url == "http://from-env:9" and c.api_key == "envkey"
    finally:
        c.close()
    monkeypatch.delenv("COCONUT_BASE_URL")
    monkeypatch.delenv("COCONUT_API_KEY")
    c = CoconutClient()
    try:
        assert c.base_url == "http://127.0.0.1:8000" and c.api_key is None
    finally:
        c.close()


def test_invalid_max_retries_is_refused():
    with pytest.raises(ValueError):
        CoconutClient(BASE, max_retries=-1)


# -- responses ------------------------------------------------------------------------------


def test_reason_result_is_typed_and_keeps_unknown_fields(make):
    trace = [{"thought": 1, "tokens": [{"id": 5, "text": " yes", "prob": 0.5},
                                       {"id": 9, "text": " no", "prob": 0.25}]}]
    body = {**REASON_BODY, "latent_trace": trace, "new_field": [1, 2]}
    client, _ = make(Script(ok(body, headers={"x-request-id": "rid-42"})))
    r = client.reason("q")
    assert (r.id, r.model, r.text, r.answer, r.finish_reason) == ("req-1", "tiny-gpt2", "### yumpus",
                                                                  "yumpus", "stop")
    assert (r.usage.prompt_tokens, r.usage.latent_thoughts, r.usage.completion_tokens) == (11, 3, 4)
    assert r.timings.decode == 0.03
    assert r.latent_trace[0].thought == 1
    assert [(t.id, t.text, t.prob) for t in r.latent_trace[0].tokens] == [(5, " yes", 0.5), (9, " no", 0.25)]
    assert r.new_field == [1, 2]
    assert r.request_id == "rid-42"


def test_a_malformed_success_body_raises_validation_error(make):
    broken = {k: v for k, v in REASON_BODY.items() if k != "text"}
    client, _ = make(Script(ok(broken)))
    with pytest.raises(APIResponseValidationError) as info:
        client.reason("q")
    assert "text" in str(info.value)

    client, _ = make(Script(lambda r: httpx.Response(200, text="<html>proxy</html>")))
    with pytest.raises(APIResponseValidationError):
        client.reason("q")


def test_models_health_ready(make):
    models = {"object": "list", "data": [{"id": "tiny-gpt2", "object": "model", "created": 1,
                                          "owned_by": "coconut"}]}
    script = Script(ok(models))
    client, _ = make(script)
    got = client.models()
    assert [m.id for m in got] == ["tiny-gpt2"] and got[0].owned_by == "coconut"
    assert script.requests[-1].method == "GET" and script.requests[-1].url == BASE + "/v1/models"

    client, _ = make(Script(ok({"status": "ok"})))
    assert client.health().status == "ok"

    script = Script(ok({"status": "ready"}))
    client, _ = make(script)
    assert client.ready() is True

    script = Script(status(503, headers={"Retry-After": "1"}))
    client, sleeps = make(script)
    assert client.ready() is False
    assert script.calls == 1 and sleeps == []  # a probe is never retried

    client, _ = make(Script(401))
    with pytest.raises(AuthenticationError):
        client.ready()


# -- errors ---------------------------------------------------------------------------------


def test_error_carries_status_request_id_body_and_the_field_named():
    # The server's shape (server/errors.py): an OpenAI-style error object + field details.
    body = {"error": {"message": "invalid request: max_tokens: Input should be greater than or equal to 1",
                      "type": "invalid_request_error", "code": 422, "request_id": "rid-body",
                      "param": "max_tokens"},
            "detail": [{"loc": ["body", "max_tokens"], "msg": "Input should be greater than or equal to 1",
                        "type": "greater_than_equal"}]}
    script = Script(status(422, body, headers={"x-request-id": "rid-header"}))
    client = CoconutClient(BASE, http_client=httpx.Client(transport=httpx.MockTransport(script)))
    with pytest.raises(BadRequestError) as info:
        client.reason("q", max_tokens=0)
    err = info.value
    assert isinstance(err, UnprocessableEntityError)
    assert err.status_code == 422 and err.request_id == "rid-header"
    assert err.body == body and err.param == "max_tokens" and err.type == "invalid_request_error"
    assert "max_tokens" in err.message and "max_tokens" in str(err) and "rid-header" in str(err)


@pytest.mark.parametrize("body,expected", [
    ({"detail": [{"loc": ["body", "temperature"], "msg": "Input should be >= 0"}]},
     "body.temperature: Input should be >= 0"),                      # FastAPI's default
    ({"detail": "Not Found"}, "Not Found"),
    ({"message": "plain message"}, "plain message"),
    ({"error": "flat error"}, "flat error"),
    ("upstream exploded", "upstream exploded"),
    ({}, "502 Bad Gateway"),
])
def test_error_message_is_found_in_any_common_shape(body, expected):
    def answer(request):
        if isinstance(body, str):
            return httpx.Response(502, text=body)
        return httpx.Response(502, json=body)

    client = CoconutClient(BASE, max_retries=0, http_client=httpx.Client(transport=httpx.MockTransport(answer)))
    with pytest.raises(InternalServerError) as info:
        client.reason("q")
    assert info.value.message == expected
    assert info.value.request_id is None


def test_request_id_falls_back_to_the_body():
    body = {"error": {"message": "engine failed", "request_id": "rid-in-body"}}
    client = CoconutClient(BASE, http_client=httpx.Client(transport=httpx.MockTransport(status(500, body))))
    with pytest.raises(InternalServerError) as info:
        client.reason("q")
    assert info.value.request_id == "rid-in-body" and info.value.message == "engine failed"


def test_error_hierarchy():
    assert ServiceUnavailableError is OverloadedError
    assert issubclass(OverloadedError, InternalServerError)
    assert issubclass(UnprocessableEntityError, BadRequestError)
    for cls in (BadRequestError, AuthenticationError, PermissionDeniedError, NotFoundError,
                RateLimitError, InternalServerError):
        assert issubclass(cls, APIStatusError)
    assert issubclass(APITimeoutError, APIConnectionError)


# -- lifecycle ------------------------------------------------------------------------------


def test_client_closes_only_what_it_owns():
    with CoconutClient(BASE) as c:
        http = c._http
        copy = c.with_options(max_retries=0)
        copy.close()
        assert not http.is_closed
    assert http.is_closed

    mine = httpx.Client()
    CoconutClient(BASE, http_client=mine).close()
    assert not mine.is_closed
    mine.close()


def test_async_client_context_manager_closes_its_pool():
    async def main():
        async with AsyncCoconutClient(BASE) as c:
            http = c._http
            assert not http.is_closed
        return http

    assert asyncio.run(main()).is_closed
