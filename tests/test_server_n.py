"""``n`` > 1 over HTTP: ``/v1/reason`` (JSON and SSE), ``/v1/completions`` and
``/v1/chat/completions`` through the official ``openai`` package, on a real server.

Oracles, none of them the code under test:

- each answer i of a seeded request must equal an independent ``n: 1`` request with
  ``seed + i`` (its own prefill and thoughts); greedy answers all equal the greedy answer;
- the vote is recounted here with ``collections.Counter`` over the returned answers;
- usage: the prompt and its thoughts once (``n: 1``'s counts), the completion tokens the
  sum of every answer's;
- a stream's deltas, grouped by ``index``, concatenate to the JSON reply's texts;
- n beyond the server's batch is a 422 that says so, and the server stays up;
- a client that leaves mid-stream ends every answer: then a request for every slot is served.
"""

from __future__ import annotations

import collections

import httpx
import pytest

from tests.test_server_harness import (one_thread_server, post_on_raw_socket, read_metrics, sse_payloads,
                                       wait_for)

QUESTION = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or a zumpus?"
OTHER = "Sally is a rompus. Every rompus is a lempus. Is Sally a lempus or a tumpus?"
SAMPLED = {"temperature": 1.0, "top_k": 0, "max_tokens": 6, "seed": 11}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("gpt2")


@pytest.fixture(scope="module")
def server(checkpoint):
    with one_thread_server(checkpoint, max_batch_size=6) as live:
        yield live


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def reason(http, **body) -> dict:
    r = http.post("/v1/reason", json={"question": QUESTION, **body})
    assert r.status_code == 200, r.text
    return r.json()


def vote(answers: list[str]) -> tuple[str, int]:
    counts = collections.Counter(a for a in answers if a)
    if not counts:
        return "", len(answers)
    top = max(counts.values())
    return next(a for a in answers if a and counts[a] == top), top


def test_each_seeded_answer_equals_its_own_request(http):
    got = reason(http, n=4, **SAMPLED)
    singles = [reason(http, **{**SAMPLED, "seed": SAMPLED["seed"] + i}) for i in range(4)]
    assert [s["index"] for s in got["samples"]] == [0, 1, 2, 3]
    assert [s["text"] for s in got["samples"]] == [s["text"] for s in singles]
    assert [s["answer"] for s in got["samples"]] == [s["answer"] for s in singles]
    assert got["text"] == singles[0]["text"] and got["answer"] == singles[0]["answer"]
    assert len({s["text"] for s in singles}) > 1, "the seeds should give different answers on a random model"
    answer, count = vote([s["answer"] for s in singles])
    assert got["majority"] == {"answer": answer, "count": count, "of": 4}
    assert got["usage"]["prompt_tokens"] == singles[0]["usage"]["prompt_tokens"]
    assert got["usage"]["latent_thoughts"] == singles[0]["usage"]["latent_thoughts"]
    assert got["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in singles)
    assert got["usage"]["completion_tokens"] == sum(s["completion_tokens"] for s in got["samples"])


def test_greedy_answers_agree_and_n1_has_no_samples(http):
    one = reason(http, max_tokens=5)
    assert "samples" not in one or one["samples"] is None
    many = reason(http, max_tokens=5, n=3)
    assert [s["text"] for s in many["samples"]] == [one["text"]] * 3
    assert many["majority"]["count"] == 3 or not one["answer"]


def test_the_stream_interleaves_answers_and_ends_with_the_vote(http):
    want = reason(http, n=3, **SAMPLED)
    r = http.post("/v1/reason", json={"question": QUESTION, "n": 3, "stream": True, **SAMPLED})
    assert r.status_code == 200
    events = sse_payloads(r.text)
    assert events[-1] == "[DONE]"
    events = events[:-1]
    ids = {e["id"] for e in events}
    assert len(ids) == 1 and "#" not in ids.pop()
    texts = collections.defaultdict(str)
    finals = {}
    for e in events[:-1]:
        texts[e["index"]] += e["delta"]
        if e["finish_reason"]:
            finals[e["index"]] = e
    assert dict(texts) == {s["index"]: s["text"] for s in want["samples"]}
    assert {i: f["answer"] for i, f in finals.items()} == {s["index"]: s["answer"] for s in want["samples"]}
    assert events[-1]["majority"] == want["majority"] and events[-1]["delta"] == ""


def test_n_beyond_the_batch_is_a_clear_422_and_the_server_stays_up(http):
    r = http.post("/v1/reason", json={"question": QUESTION, "n": 7})
    assert r.status_code == 422 and "n=7 answers need 7 batch slots" in r.text, r.text
    r = http.post("/v1/reason", json={"question": QUESTION, "n": 0})
    assert r.status_code == 422 and "n" in r.json()["error"]["param"]
    r = http.post("/v1/reason", json={"question": QUESTION, "n": True})
    assert r.status_code == 422
    assert reason(http, max_tokens=2, n=2)["majority"]["of"] == 2


def test_openai_chat_n_choices_equal_seeded_single_requests(server, checkpoint, http):
    openai = pytest.importorskip("openai")
    messages = [{"role": "user", "content": QUESTION}]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        got = client.chat.completions.create(model=checkpoint.name, messages=messages, n=3, max_tokens=6,
                                             temperature=1.0, seed=5)
        singles = [client.chat.completions.create(model=checkpoint.name, messages=messages, max_tokens=6,
                                                  temperature=1.0, seed=5 + i) for i in range(3)]
        assert [c.index for c in got.choices] == [0, 1, 2]
        assert [c.message.content for c in got.choices] == [s.choices[0].message.content for s in singles]
        assert got.usage.prompt_tokens == singles[0].usage.prompt_tokens
        assert got.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
        extra = got.model_extra
        answers = [c.model_extra["answer"] for c in got.choices]
        answer, count = vote(answers)
        assert extra["majority"] == {"answer": answer, "count": count, "of": 3}
        chunks = list(client.chat.completions.create(model=checkpoint.name, messages=messages, n=3, max_tokens=6,
                                                     temperature=1.0, seed=5, stream=True,
                                                     stream_options={"include_usage": True}))
    texts = collections.defaultdict(str)
    roles = collections.Counter()
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            roles[c.index] += c.delta.role == "assistant"
    assert dict(texts) == {c.index: c.message.content for c in got.choices}
    assert roles == {0: 1, 1: 1, 2: 1}
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_openai_completions_list_times_n_orders_choices_by_prompt(server, checkpoint):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        got = client.completions.create(model=checkpoint.name, prompt=[QUESTION, OTHER], n=2, max_tokens=5,
                                        temperature=1.0, seed=3)
        want = [client.completions.create(model=checkpoint.name, prompt=p, max_tokens=5, temperature=1.0,
                                          seed=3 + i).choices[0].text for p in (QUESTION, OTHER) for i in range(2)]
        assert [c.index for c in got.choices] == [0, 1, 2, 3]
        assert [c.text for c in got.choices] == want
        assert len(got.model_extra["majority"]) == 2
        streamed = collections.defaultdict(str)
        for chunk in client.completions.create(model=checkpoint.name, prompt=[QUESTION, OTHER], n=2, max_tokens=5,
                                               temperature=1.0, seed=3, stream=True):
            for c in chunk.choices:
                streamed[c.index] += c.text
        assert [streamed[i] for i in range(4)] == want


def test_the_sdk_passes_n(server):
    from coconut_client import CoconutClient

    with CoconutClient(server.url, max_retries=0) as client:
        result = client.reason(QUESTION, n=3, **SAMPLED)
        assert [s.index for s in result.samples] == [0, 1, 2]
        assert result.majority.of == 3
        events = list(client.stream(QUESTION, n=3, **SAMPLED))
    by_index = collections.defaultdict(str)
    for e in events:
        if e.majority is None:
            by_index[e.index] += e.delta
    assert [by_index[i] for i in range(3)] == [s.text for s in result.samples]
    assert events[-1].majority.answer == result.majority.answer


def test_a_client_leaving_mid_stream_ends_every_answer_and_frees_every_slot(server, http):
    """A stream of n=3 closed after its first bytes: all three answers are aborted, and a
    request for n=6 (every slot of this 6-slot server at once) is then answered."""
    sock = post_on_raw_socket(server.port, "/v1/reason", {"question": QUESTION, "n": 3, "stream": True,
                                                           "max_tokens": 200, "ignore_eos": True})
    assert sock.recv(64)
    sock.close()
    wait_for(lambda: (lambda m: m if m["coconut_num_requests_running"] == 0 and
                      m["coconut_num_requests_waiting"] == 0 else None)(read_metrics(server.url)), what="idle")
    full = reason(http, n=6, max_tokens=3, temperature=1.0, seed=1)
    assert [s["index"] for s in full["samples"]] == list(range(6))
