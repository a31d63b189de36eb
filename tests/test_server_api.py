"""The real server (``engine serve`` under uvicorn, a subprocess on 127.0.0.1) with a tiny
random GPT-2: /v1/reason as JSON and SSE, the OpenAI-compatible routes through the
official ``openai`` package, operations routes, 32 concurrent requests, and the input /
disconnect robustness cases. The oracle is ``Engine.generate`` run in this process on
the same checkpoint (and, for batching, the same requests served one at a time).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.live_server import LiveServer
from tests.test_server_harness import finished_count, post_on_raw_socket, read_metrics, sse_payloads, wait_for

MAX_BODY = 65536
QUESTION = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or a zumpus?"


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("gpt2", max_positions=2048)


@pytest.fixture(scope="module")
def server(checkpoint):
    with LiveServer(checkpoint, "--max-batch-size", "32", "--max-body-bytes", str(MAX_BODY), "--torch-threads", "1",
                    "--device", "cpu", "--dtype", "float32") as live:
        yield live


@pytest.fixture(scope="module")
def oracle(checkpoint):
    from engine.sync_engine import Engine
    return Engine.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def offline(oracle, question=QUESTION, **kw):
    from engine.params import LatentPolicy, SamplingParams
    latent = kw.pop("latent", None)
    trace = kw.pop("trace_top_k", 0)
    policy = LatentPolicy(**(latent or {}), trace_top_k=trace) if latent or trace else None
    return oracle.generate([question], SamplingParams(**kw), policy)[0]


def reason(http, **body):
    r = http.post("/v1/reason", json={"question": QUESTION, **body})
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------- /v1/reason


@pytest.mark.parametrize("latent", [None, {"mode": "fixed", "thoughts": 2}, {"mode": "fixed", "thoughts": 0},
                                    {"mode": "none"}])
def test_reason_json_equals_the_engine(http, oracle, checkpoint, latent):
    body = {"max_tokens": 12} | ({"latent": latent} if latent else {})
    got = reason(http, **body)
    want = offline(oracle, max_tokens=12, latent=latent)
    assert got["text"] == want.text and got["answer"] == want.answer
    assert got["finish_reason"] == want.finish_reason
    cached = got["usage"].pop("prompt_tokens_details")["cached_tokens"]   # what earlier tests left in the slots
    assert got["usage"] == {"prompt_tokens": len(want.prompt_token_ids), "latent_thoughts": want.num_thoughts,
                            "completion_tokens": len(want.token_ids)}
    assert 0 <= cached < len(want.prompt_token_ids)
    assert set(got["timings"]) == {"queue", "prefill", "latent", "decode"}
    assert all(v >= 0 for v in got["timings"].values())
    assert got["id"].startswith("reason-") and got["model"] == checkpoint.name
    assert "latent_trace" not in got


def test_reason_latent_trace_is_one_entry_per_thought(http, oracle):
    got = reason(http, max_tokens=4, latent={"mode": "fixed", "thoughts": 3}, return_latent_trace=True,
                 latent_trace_top_k=4)
    want = offline(oracle, max_tokens=4, latent={"mode": "fixed", "thoughts": 3}, trace_top_k=4)
    trace = got["latent_trace"]
    assert got["usage"]["latent_thoughts"] == 3 and len(trace) == 3
    for i, (entry, expected) in enumerate(zip(trace, want.latent_trace), 1):
        assert entry["thought"] == i
        assert [t["id"] for t in entry["tokens"]] == expected["token_ids"]
        assert [t["text"] for t in entry["tokens"]] == expected["texts"]
        probs = [t["prob"] for t in entry["tokens"]]
        assert probs == pytest.approx(expected["probs"], abs=1e-5) and probs == sorted(probs, reverse=True)
    assert reason(http, max_tokens=2, latent={"mode": "none"}, return_latent_trace=True)["latent_trace"] == []


def _stream(http, path="/v1/reason", **body) -> list:
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"]
        return sse_payloads(r.read().decode())


@pytest.mark.parametrize("extra", [{}, {"return_latent_trace": True}, {"stop_from_text": True}])
def test_reason_stream_concatenates_to_the_json_text(http, oracle, extra):
    body = {"question": QUESTION, "max_tokens": 16, "ignore_eos": True}
    extra = dict(extra)
    if extra.pop("stop_from_text", False):  # a stop string inside the answer: held back, then cut
        full = reason(http, **{k: v for k, v in body.items() if k != "question"})["text"]
        body["stop"] = [full[5:8], "never-there"]
    body |= extra
    json_reply = reason(http, **{k: v for k, v in body.items() if k != "question"})
    events = _stream(http, stream=True, **body)
    assert events[-1] == "[DONE]"
    events = events[:-1]
    assert all(e["delta"] for e in events[:-1]), "only the last event may have an empty delta"
    assert all(e["finish_reason"] is None and "usage" not in e for e in events[:-1])
    last = events[-1]
    assert "".join(e["delta"] for e in events) == json_reply["text"]
    assert last["finish_reason"] == json_reply["finish_reason"] and last["usage"] == json_reply["usage"]
    assert last["answer"] == json_reply["answer"]
    assert set(last["timings"]) == {"queue", "prefill", "latent", "decode"}
    assert (last.get("latent_trace") == json_reply.get("latent_trace"))
    if "stop" in body:
        assert json_reply["finish_reason"] == "stop"
        assert json_reply["text"] == offline(oracle, max_tokens=16, ignore_eos=True, stop=tuple(body["stop"])).text


def test_seeded_sampling_equals_the_engine(http, oracle):
    got = reason(http, max_tokens=12, temperature=1.0, seed=7)
    assert got["text"] == offline(oracle, max_tokens=12, temperature=1.0, seed=7).text


def test_extreme_temperature_and_top_p_stay_numerically_safe(http):
    """Found by schemathesis: top_p=5e-324 rounds to 0 in float32 and masked every token
    (a 500). Below 1e-5 a temperature is greedy; a top_p below 1/vocab keeps the top token."""
    greedy = reason(http, max_tokens=8)["text"]
    assert reason(http, max_tokens=8, temperature=1e-40)["text"] == greedy
    assert reason(http, max_tokens=8, temperature=1.0, top_p=5e-324, seed=1)["text"] == greedy


# ---------------------------------------------------------------- OpenAI-compatible


@pytest.fixture(scope="module")
def openai_client(server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0) as client:
        yield client


def test_openai_models(openai_client, checkpoint):
    models = openai_client.models.list().data
    assert [m.id for m in models] == [checkpoint.name]


def test_openai_completions_equal_reason(openai_client, http, checkpoint):
    want = reason(http, max_tokens=10, temperature=0.0, latent={"thoughts": 2})
    kw = dict(model=checkpoint.name, prompt=QUESTION, max_tokens=10, temperature=0.0,
              extra_body={"latent": {"thoughts": 2}})
    got = openai_client.completions.create(**kw)
    assert got.choices[0].text == want["text"] and got.choices[0].finish_reason == want["finish_reason"]
    assert got.usage.completion_tokens == want["usage"]["completion_tokens"]
    streamed = "".join(c.choices[0].text for c in openai_client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == want["text"]
    # Default temperature follows OpenAI (1.0), seeded so both sides draw the same tokens.
    sampled = openai_client.completions.create(model=checkpoint.name, prompt=QUESTION, max_tokens=10, seed=3)
    assert sampled.choices[0].text == reason(http, max_tokens=10, temperature=1.0, seed=3)["text"]


def test_openai_chat_equals_reason(openai_client, http, checkpoint):
    want = reason(http, max_tokens=10)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "ignored"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": QUESTION}]
    got = openai_client.chat.completions.create(model=checkpoint.name, messages=messages, max_tokens=10,
                                                temperature=0)
    assert got.choices[0].message.content == want["text"] and got.choices[0].message.role == "assistant"
    chunks = list(openai_client.chat.completions.create(
        model=checkpoint.name, messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want["text"]
    assert chunks[-1].usage.completion_tokens == want["usage"]["completion_tokens"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want["finish_reason"]


def test_openai_errors_are_typed(openai_client, checkpoint):
    import openai
    with pytest.raises(openai.NotFoundError, match="not served"):
        openai_client.completions.create(model="no-such-model", prompt=QUESTION)
    with pytest.raises(openai.UnprocessableEntityError, match="best_of"):
        openai_client.completions.create(model=checkpoint.name, prompt=QUESTION, best_of=2)
    with pytest.raises(openai.UnprocessableEntityError, match="user message"):
        openai_client.chat.completions.create(model=checkpoint.name, messages=[{"role": "system", "content": "x"}])


# ---------------------------------------------------------------- operations


def test_health_ready_metrics_and_request_ids(http):
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("coconut_http_requests_total", "coconut_num_requests_waiting", "coconut_num_requests_running",
                 "coconut_batch_size_bucket", "coconut_time_to_first_token_seconds_bucket",
                 "coconut_inter_token_latency_seconds_bucket", "coconut_e2e_request_latency_seconds_bucket",
                 "coconut_request_queue_time_seconds_bucket", "coconut_prompt_tokens_total",
                 "coconut_latent_thoughts_total", "coconut_generation_tokens_total",
                 "coconut_thoughts_per_request_bucket", "coconut_stop_classifier_early_exits_total",
                 "coconut_prefix_cache_hits_total"):
        assert name in r.text, name
    assert 'route="/v1/reason"' in r.text and 'status="200"' in r.text
    assert http.get("/health", headers={"x-request-id": "trace-42.a"}).headers["x-request-id"] == "trace-42.a"
    generated = http.get("/health", headers={"x-request-id": "bad id\twith spaces"}).headers["x-request-id"]
    assert generated != "bad id\twith spaces" and len(generated) == 32
    err = http.post("/v1/reason", json={}, headers={"x-request-id": "err-1"})
    assert err.status_code == 422 and err.headers["x-request-id"] == "err-1"
    assert err.json()["error"]["request_id"] == "err-1"


def test_a_repeated_question_takes_its_prompt_from_the_prefix_cache(server, http):
    body = {"question": QUESTION, "max_tokens": 2, "latent": {"thoughts": 2}}
    first = reason(http, **body)
    before = read_metrics(server.url)
    again = reason(http, **body)
    hits = read_metrics(server.url)["coconut_prefix_cache_hits_total"] - before["coconut_prefix_cache_hits_total"]
    assert again["text"] == first["text"]
    assert hits == again["usage"]["prompt_tokens"] - 1      # all but the last prompt token were held
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": hits}


def test_one_structured_log_line_per_request(server, http):
    r = http.post("/v1/reason", json={"question": QUESTION, "max_tokens": 3}, headers={"x-request-id": "log-me-1"})
    assert r.status_code == 200

    def line_for(request_id):
        for line in server.output().splitlines():
            if line.startswith("{") and f'"request_id": "{request_id}"' in line:
                return json.loads(line)
        return None

    entry = wait_for(lambda: line_for("log-me-1"), what="the access-log line")
    assert entry["event"] == "request" and entry["status"] == 200 and entry["path"] == "/v1/reason"
    assert entry["engine_request_id"] == r.json()["id"] and entry["completion_tokens"] == 3
    assert entry["latent_thoughts"] == r.json()["usage"]["latent_thoughts"] and entry["duration_s"] > 0
    assert sum(1 for line in server.output().splitlines() if '"log-me-1"' in line) == 1


def test_32_concurrent_requests_answer_as_if_alone_and_share_forwards(server, http):
    from engine.tiny import sample_corpus
    questions = [line.split("\n")[0] for line in sample_corpus(32, seed=11)]
    body = {"max_tokens": 16, "ignore_eos": True, "latent": {"thoughts": 3}}
    alone = [reason(http, **body, question=q)["text"] for q in questions]
    before = read_metrics(server.url)

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as client:
            replies = await asyncio.gather(*(client.post("/v1/reason", json={**body, "question": q})
                                             for q in questions))
        return [r.json() for r in replies]

    together = asyncio.run(all_at_once())
    after = read_metrics(server.url)
    assert [r["text"] for r in together] == alone
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    positions = sum(r["usage"]["latent_thoughts"] + r["usage"]["completion_tokens"] for r in together)
    assert delta["coconut_engine_steps_total"] < positions / 4, (delta["coconut_engine_steps_total"], positions)
    batched_steps = delta["coconut_batch_size_count"] - delta['coconut_batch_size_bucket{le="1.0"}']
    assert batched_steps > 0 and delta["coconut_batch_size_sum"] / delta["coconut_batch_size_count"] > 4
    assert after["coconut_num_requests_running"] == 0 and after["coconut_num_requests_waiting"] == 0


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("body, field", [
    ({}, "question"),
    ({"question": ""}, "question"),
    ({"question": QUESTION, "temperature": -1}, "temperature"),
    ({"question": QUESTION, "top_p": 0}, "top_p"),
    ({"question": QUESTION, "max_tokens": 0}, "max_tokens"),
    ({"question": QUESTION, "max_tokens": "many"}, "max_tokens"),
    ({"question": QUESTION, "latent": {"mode": "sideways"}}, "latent.mode"),
    ({"question": QUESTION, "latent": {"thoughts": -2}}, "latent.thoughts"),
    ({"question": QUESTION, "stop": ["x"] * 17}, "stop"),
    ({"question": QUESTION, "temprature": 0.5}, "temprature"),
    ({"question": QUESTION, "latent_trace_top_k": 99}, "latent_trace_top_k"),
])
def test_invalid_fields_answer_422_naming_the_field(http, body, field):
    r = http.post("/v1/reason", json=body)
    assert r.status_code == 422, r.text
    error = r.json()
    assert error["error"]["param"] == field and field in error["error"]["message"]
    assert any(".".join(map(str, d["loc"][1:])) == field for d in error["detail"])


@pytest.mark.parametrize("body, words", [
    ({"question": "   "}, "non-empty"),                                        # the engine's check
    ({"question": QUESTION, "latent": {"mode": "none", "thoughts": 3}}, "only meaningful"),
    ({"question": QUESTION, "latent": {"mode": "auto"}}, "stop classifier"),   # none in this checkpoint
    ({"question": QUESTION, "latent": {"threshold": 0.3}}, "stop classifier"),  # implies mode auto
])
def test_engine_validation_errors_answer_422_with_the_message(http, body, words):
    r = http.post("/v1/reason", json=body)
    assert r.status_code == 422 and words in r.json()["error"]["message"], r.text


def test_malformed_json_answers_400(http):
    r = http.post("/v1/reason", content=b'{"question": "Is', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = http.post("/v1/reason", content=b'["not", "an", "object"]', headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_too_long_answers_400_with_the_limit(http):
    r = http.post("/v1/reason", json={"question": "Tom is a wumpus. " * 700})
    assert r.status_code == 400 and "2048" in r.json()["error"]["message"], r.text
    r = http.post("/v1/reason", json={"question": QUESTION, "max_tokens": 5000})
    assert r.status_code == 400 and "limit is 2048" in r.json()["error"]["message"]


def test_body_size_is_capped(http):
    big = json.dumps({"question": "x" * (MAX_BODY + 10)}).encode()
    r = http.post("/v1/reason", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and str(MAX_BODY) in r.json()["error"]["message"]
    chunks = (big[i:i + 4096] for i in range(0, len(big), 4096))  # no Content-Length: chunked
    r = http.post("/v1/reason", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert http.get("/ready").status_code == 200


# ---------------------------------------------------------------- disconnects

LONG = {"question": QUESTION, "max_tokens": 2000, "ignore_eos": True}


def test_streaming_client_disconnect_aborts_the_request(server, http):
    aborted, completed = finished_count(server.url, "abort"), finished_count(server.url, "length")
    with http.stream("POST", "/v1/reason", json={**LONG, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one token arrived: the request is running; now hang up
    wait_for(lambda: finished_count(server.url, "abort") == aborted + 1, what="the abort")
    metrics = read_metrics(server.url)
    assert metrics["coconut_num_requests_running"] == 0 and metrics["coconut_num_requests_waiting"] == 0
    assert finished_count(server.url, "length") == completed, "the generation ran to the end instead"


def test_non_streaming_client_disconnect_aborts_the_request(server):
    aborted, completed = finished_count(server.url, "abort"), finished_count(server.url, "length")
    sock = post_on_raw_socket(server.port, "/v1/reason", LONG)
    wait_for(lambda: read_metrics(server.url)["coconut_num_requests_running"] == 1, what="the request to run")
    sock.close()
    wait_for(lambda: read_metrics(server.url)["coconut_num_requests_running"] == 0, what="the slot to free")
    wait_for(lambda: finished_count(server.url, "abort") == aborted + 1, what="the abort")
    assert finished_count(server.url, "length") == completed
    assert 'status="499"' in httpx.get(server.url + "/metrics").text


# ---------------------------------------------------------------- benchmark script


def test_bench_serve_compares_two_servers_side_by_side(server, capsys, tmp_path):
    """`--compare-url` drives a second server (here the same one) at every level: both rows
    complete every request, the ratio is the one their figures give, and the plot is written."""
    from engine.cli import main
    argv = ["bench", "serve", "--url", server.url, "--compare-url", server.url, "--concurrency", "2",
            "--num-prompts", "4", "--max-tokens", "3", "--json", "--plot", str(tmp_path / "serve.png")]
    assert main(argv) == 0
    row = json.loads(capsys.readouterr().out)["results"][0]
    for side in ("http", "compare"):
        assert row[side]["completed"] == 4 and row[side]["failed"] == 0 and row[side]["total_output_tokens"] == 12
    assert row["compare_ratio"] == pytest.approx(row["http"]["request_throughput"]
                                                 / row["compare"]["request_throughput"])
    assert (tmp_path / "serve.png").stat().st_size > 0


def test_bench_serve_drives_the_server_and_the_engine(server, checkpoint, capsys):
    """`engine bench serve` end to end on a tiny run: every request completes on both
    sides with the same token count, and the ratio is reported (its value is not judged)."""
    from engine.cli import main
    argv = ["bench", "serve", "--url", server.url, "--concurrency", "1,4", "--num-prompts", "4",
            "--max-tokens", "5", "--thoughts", "2", "--model", str(checkpoint), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["concurrency"] for row in report["results"]] == [1, 4]
    for row in report["results"]:
        for side in ("http", "offline"):
            r = row[side]
            assert r["completed"] == 4 and r["failed"] == 0 and r["total_output_tokens"] == 20
            assert r["ttft_ms"]["median"] > 0 and r["e2e_ms"]["p99"] >= r["e2e_ms"]["median"]
        assert row["ratio"] > 0


def test_bench_serve_spreads_answer_lengths_alike_on_both_sides(server, checkpoint, capsys):
    """`--spread-tokens`: each request asks its own answer length, the same over HTTP and
    offline; with ignore_eos every request produces exactly its length (counted here from
    the generator's seed, not from the benchmark's report)."""
    import random

    from engine.cli import main
    rng = random.Random(7)
    want = sum(rng.randint(3, 9) for _ in range(6))      # [6/2, 3*6/2] for --max-tokens 6
    argv = ["bench", "serve", "--url", server.url, "--concurrency", "3", "--num-prompts", "6", "--seed", "7",
            "--max-tokens", "6", "--thoughts", "1", "--model", str(checkpoint), "--spread-tokens", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["spread_tokens"] is True
    for side in ("http", "offline"):
        r = report["results"][0][side]
        assert r["completed"] == 6 and r["total_output_tokens"] == want, (side, r["total_output_tokens"], want)


@pytest.mark.parametrize("client", ["raw", "httpx"])
def test_bench_serve_streams_and_json_with_cpu_per_request(server, capsys, client):
    """`--mode stream,json` drives both kinds of request with either client: every request
    completes with its tokens, and the local server's CPU per request is read from /proc
    (its own process and its engine child)."""
    from engine.bench.serve import listening_pid
    from engine.cli import main
    argv = ["bench", "serve", "--url", server.url, "--concurrency", "2", "--num-prompts", "4",
            "--max-tokens", "3", "--mode", "stream,json", "--client", client, "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["server_pid"] == listening_pid(server.url) is not None
    row = report["results"][0]
    for side in ("http", "http_json"):
        r = row[side]
        assert r["completed"] == 4 and r["failed"] == 0 and r["total_output_tokens"] == 12, r["errors"]
        assert r["server_cpu_ms_per_request"] >= 0 and r["engine_cpu_ms_per_request"] >= 0
    # /proc counts in 10 ms ticks: a few tiny requests may fall within one; both sides together do not
    assert sum(row[side][k] for side in ("http", "http_json")
               for k in ("server_cpu_ms_per_request", "engine_cpu_ms_per_request")) > 0
    assert 0 < row["http"]["itl_count"] <= 4 * 2 and row["http_json"]["itl_count"] == 0   # gaps: streamed only


@pytest.mark.parametrize("route", ["/v1/reason", "/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("field, value", [("temperature", "1e400"), ("temperature", "NaN"), ("top_p", "Infinity"),
                                          ("top_p", "-Infinity"), ("latent.threshold", "NaN"),
                                          ("latent.threshold", "1e400")])
def test_non_finite_numbers_are_422_naming_the_field(http, route, field, value):
    """JSON allows neither NaN nor Infinity, but Python's parser reads them (and 1e400 is inf):
    each float field must refuse them with a 422 (before: 500, the error body failed to encode)."""
    question = {"/v1/reason": '"question": "Tom is a wumpus. Is Tom a wumpus or zumpus?"',
                "/v1/chat/completions": '"messages": [{"role": "user", "content": "Is Tom a wumpus?"}]',
                "/v1/completions": '"prompt": "Is Tom a wumpus?"'}[route]
    if field == "latent.threshold":
        extra = f'"latent": {{"mode": "auto", "threshold": {value}}}'
    else:
        extra = f'"{field}": {value}'
    r = http.post(route, content=f"{{{question}, {extra}}}", headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"]["param"] == field and "finite" in body["error"]["message"]
