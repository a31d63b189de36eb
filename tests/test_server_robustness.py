"""Robustness of the real server: a full waiting queue answers 503 with Retry-After and
leaks nothing; the API key guards every route but the probes; an engine failure fails
only its request (500 with the request id) and the server stays up; a dead engine loop
makes /ready and /health tell the truth; SIGTERM stops accepting, finishes the
in-flight requests and exits 0.

The fault cases run the app under uvicorn in a thread of this process
(``InProcessServer``) so that a test can break the engine with monkeypatch; the SIGTERM
case runs ``engine serve`` as a subprocess (settings from environment variables).
"""

from __future__ import annotations

import json
import signal
import socket
import threading

import httpx
import pytest
import torch

from tests.live_server import LiveServer
from tests.test_server_harness import InProcessServer, read_metrics, sse_payloads, wait_for

QUESTION = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or a zumpus?"
LONG = {"question": QUESTION, "max_tokens": 1500, "ignore_eos": True}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("gpt2", max_positions=2048)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small models run fastest on one thread when the CPUs are shared; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _raw_request(port: int, body: dict, headers: str = "") -> socket.socket:
    """Send a request and leave the connection open without reading (a waiting client)."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/reason HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s"
                 b"Content-Length: %d\r\n\r\n%s" % (headers.encode(), len(payload), payload))
    return sock


# ---------------------------------------------------------------- backpressure


def test_full_queue_answers_503_with_retry_after_and_leaks_nothing(checkpoint):
    with InProcessServer(checkpoint, max_batch_size=1, max_queue=2, retry_after_s=2) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/reason", json={**LONG, "stream": True}) as running:
            lines = running.iter_lines()  # keep a reference: a dropped iterator closes the stream
            while not next(lines).startswith("data: "):
                pass
            waiting = [_raw_request(server.port, LONG) for _ in range(2)]
            wait_for(lambda: read_metrics(server.url)["coconut_num_requests_waiting"] == 2, what="2 waiting")
            for body in ({"question": QUESTION}, {"question": QUESTION, "stream": True}):
                r = http.post("/v1/reason", json=body)
                assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
                assert r.json()["error"]["type"] == "overloaded_error" and "full" in r.json()["error"]["message"]
                assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
            r = http.post("/v1/completions", json={"prompt": QUESTION})
            assert r.status_code == 503 and r.headers["retry-after"] == "2"
            for sock in waiting:
                sock.close()
        def settled():
            m = read_metrics(server.url)
            gauges = ("coconut_num_requests_running", "coconut_num_requests_waiting")
            # 1 request in progress: this scrape
            return m if all(m[g] == 0 for g in gauges) and m["coconut_http_requests_in_progress"] == 1 else None

        metrics = wait_for(settled, what="the gauges to return to 0")
        assert metrics['coconut_requests_finished_total{reason="abort"}'] == 3
        assert metrics['coconut_requests_finished_total{reason="rejected"}'] == 3
        assert not any('status="500"' in k for k in metrics), "a 500 was answered"
        assert server.async_engine.num_waiting == 0 and not server.async_engine._streams
        assert http.post("/v1/reason", json={"question": QUESTION, "max_tokens": 4}).status_code == 200


# ---------------------------------------------------------------- auth


def test_api_key_guards_every_route_but_the_probes(checkpoint, monkeypatch):
    import hmac

    import openai

    import server.middleware as middleware

    compared = []
    real_compare = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    with InProcessServer(checkpoint, api_key="s3cret") as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        for path in ("/health", "/ready", "/metrics"):
            assert http.get(path).status_code == 200, path
        body = {"question": QUESTION, "max_tokens": 3}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Bearer s3cret2"}, {"Authorization": "Bearer S3CRET"}):
            r = http.post("/v1/reason", json=body, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
            assert r.json()["error"]["type"] == "authentication_error" and r.headers["x-request-id"]
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                             ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/nowhere")):
            assert http.request(method, path).status_code == 401, path
        ok = http.post("/v1/reason", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        assert (b"Bearer s3cret", b"Bearer s3cret") in compared  # the constant-time comparison decided
        with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0) as good:
            assert len(good.models.list().data) == 1


# ---------------------------------------------------------------- engine faults


def _inject_fault(monkeypatch, engine, when):
    """Make the runner's forward pass raise while ``when(request)`` holds for a request in it."""
    real = engine.runner.execute

    def execute(plan):
        running = engine.core.scheduler.running
        if any(when(running[row.request_id]) for row in plan.decode + plan.prefill):
            raise RuntimeError("injected fault")
        return real(plan)

    monkeypatch.setattr(engine.runner, "execute", execute)


def test_an_engine_error_fails_only_its_request(checkpoint, monkeypatch):
    from engine.sync_engine import Engine
    from engine.params import SamplingParams

    engine = Engine.from_pretrained(checkpoint)
    want = engine.generate(QUESTION, SamplingParams(max_tokens=6))[0].text
    _inject_fault(monkeypatch, engine, lambda r: r.sampling.seed == 666 or (
        r.sampling.seed == 667 and len(r.output_token_ids) >= 3))
    with InProcessServer(checkpoint, engine=engine) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/v1/reason", json={"question": QUESTION, "seed": 666}, headers={"x-request-id": "boom-1"})
        assert r.status_code == 500 and r.headers["x-request-id"] == "boom-1"
        error = r.json()["error"]
        assert error["type"] == "engine_error" and "injected fault" in error["message"]
        assert error["request_id"] == "boom-1"
        r = http.post("/v1/reason", json={"question": QUESTION, "seed": 666, "stream": True})
        assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
        # A failure after the stream started is reported in-band, and the stream has no [DONE].
        with http.stream("POST", "/v1/reason", json={**LONG, "seed": 667, "stream": True}) as s:
            assert s.status_code == 200
            events = sse_payloads(s.read().decode())
        assert "[DONE]" not in events and events[-1]["error"]["type"] == "engine_error"
        assert all("delta" in e and e["finish_reason"] is None for e in events[:-1])
        assert http.get("/ready").status_code == 200 and http.get("/health").status_code == 200
        ok = http.post("/v1/reason", json={"question": QUESTION, "max_tokens": 6})
        assert ok.status_code == 200 and ok.json()["text"] == want
        metrics = read_metrics(server.url)
        assert metrics['coconut_requests_finished_total{reason="error"}'] == 3
        assert metrics["coconut_num_requests_running"] == 0


def test_a_dead_engine_loop_is_reported_and_refused(checkpoint, monkeypatch):
    from engine.sync_engine import Engine

    engine = Engine.from_pretrained(checkpoint)

    def crash():
        raise SystemError("injected loop crash")

    with InProcessServer(checkpoint, engine=engine) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.get("/ready").status_code == 200
        monkeypatch.setattr(engine, "step", crash)
        r = http.post("/v1/reason", json={"question": QUESTION})
        assert r.status_code == 500 and "loop crashed" in r.json()["error"]["message"]
        assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
        ready = http.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "dead"
        assert http.get("/health").status_code == 503
        refused = http.post("/v1/reason", json={"question": QUESTION})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert http.get("/metrics").status_code == 200  # the process itself still answers


# ---------------------------------------------------------------- SIGTERM


SHORTER = {**LONG, "max_tokens": 800}  # still seconds of decoding after the SIGTERM


def test_sigterm_finishes_in_flight_requests_then_exits_0(checkpoint):
    key = {"Authorization": "Bearer env-key"}
    env = {"COCONUT_API_KEY": "env-key", "COCONUT_TORCH_THREADS": "1", "COCONUT_DEVICE": "cpu"}
    with LiveServer(checkpoint, env=env) as server:
        assert httpx.post(server.url + "/v1/reason", json={"question": QUESTION}).status_code == 401
        results: dict = {}
        first_token = threading.Event()

        def stream():
            with httpx.stream("POST", server.url + "/v1/reason", json={**SHORTER, "stream": True}, headers=key,
                              timeout=120) as r:
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    first_token.set()
                results["stream"] = sse_payloads("\n".join(lines) + "\n\n")

        def plain():
            r = httpx.post(server.url + "/v1/reason", json={**SHORTER, "max_tokens": 600}, headers=key, timeout=120)
            results["plain"] = r.json()

        threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
        for t in threads:
            t.start()
        assert first_token.wait(60)
        wait_for(lambda: read_metrics(server.url)["coconut_num_requests_running"] == 2, what="both running")
        server.proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            # refused outright, or (a race while uvicorn stops listening) accepted and closed
            # without an answer: either way no new request is served
            try:
                httpx.get(server.url + "/health", timeout=2)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                return True
            return False

        wait_for(refused, what="new connections to be refused")
        assert "stream" not in results, "the in-flight stream should still be running"
        for t in threads:
            t.join(120)
        assert server.proc.wait(60) == 0, server.output()
        events = results["stream"]
        assert events[-1] == "[DONE]" and events[-2]["finish_reason"] == "length"
        assert events[-2]["usage"]["completion_tokens"] == SHORTER["max_tokens"]
        assert results["plain"]["finish_reason"] == "length"
        assert results["plain"]["usage"]["completion_tokens"] == 600
