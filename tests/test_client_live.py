"""The SDK against the real server (``engine serve`` on 127.0.0.1, tiny random GPT-2).

What is checked, each against an independent oracle rather than the SDK's own output:

- ``reason`` returns a typed result whose counts are the ones asked for (``thoughts``
  in fixed mode, ``max_tokens`` with ``ignore_eos``) and whose model is ``/v1/models``'s;
- ``stream`` deltas concatenate to the non-streamed ``text`` of the same greedy request,
  and its last event's ``usage``/``finish_reason``/``answer`` equal the non-streamed ones;
- 8 concurrent async requests (``reason`` and ``stream``) give the answers the same
  requests give one at a time through the sync client;
- errors: 422 -> ``BadRequestError`` naming the field (request id from the server), 400
  for a question longer than the model allows, 401 -> ``AuthenticationError`` with a
  wrong key (a second server started with ``--api-key``), connection refused ->
  ``APIConnectionError`` after the retries.
"""

from __future__ import annotations

import asyncio

import pytest

from coconut_client import (APIConnectionError, AsyncCoconutClient, AuthenticationError,
                            BadRequestError, CoconutClient, Latent, ReasonResult, StreamEvent,
                            UnprocessableEntityError)
from tests.live_server import LiveServer, free_port

pytestmark = pytest.mark.slow

QUESTION = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or a zumpus?"
QUESTIONS = [f"Question {i}: every wumpus is a yumpus; is object {i} a yumpus?" for i in range(8)]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with LiveServer(tiny_checkpoint("gpt2"), "--max-batch-size", "8") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with CoconutClient(server.url, max_retries=0) as c:
        yield c


def test_health_ready_models(client):
    assert client.health().status == "ok"
    assert client.ready() is True
    models = client.models()
    assert len(models) == 1 and models[0].id


def test_reason_returns_a_typed_result(client):
    model_id = client.models()[0].id
    r = client.reason(QUESTION, max_tokens=5, temperature=0, ignore_eos=True,
                      latent={"mode": "fixed", "thoughts": 3})
    assert isinstance(r, ReasonResult)
    assert r.model == model_id and r.id and r.request_id
    assert r.usage.latent_thoughts == 3
    assert r.usage.completion_tokens == 5 and r.finish_reason == "length"  # ignore_eos: all 5
    assert r.usage.prompt_tokens > 0
    assert isinstance(r.text, str) and isinstance(r.answer, str)
    assert r.timings is not None and r.timings.decode >= 0 and r.timings.queue >= 0
    assert r.latent_trace is None

    typed = client.reason(QUESTION, max_tokens=5, temperature=0, ignore_eos=True,
                          latent=Latent(mode="fixed", thoughts=3))
    assert typed.text == r.text  # greedy: the typed Latent is the same request as the dict

    none = client.reason(QUESTION, max_tokens=3, latent={"mode": "none"})
    assert none.usage.latent_thoughts == 0


def test_latent_trace_has_one_entry_per_thought(client):
    r = client.reason(QUESTION, max_tokens=2, latent={"mode": "fixed", "thoughts": 4},
                      return_latent_trace=True, latent_trace_top_k=3)
    assert [t.thought for t in r.latent_trace] == [1, 2, 3, 4]
    for thought in r.latent_trace:
        probs = [tok.prob for tok in thought.tokens]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert all(0.0 <= p <= 1.0 for p in probs)


@pytest.mark.parametrize("params", [
    dict(max_tokens=12, latent={"mode": "fixed", "thoughts": 2}),
    dict(max_tokens=12, ignore_eos=True, latent={"mode": "none"}),
    dict(max_tokens=10, seed=3, temperature=0.8, top_k=20, latent={"mode": "fixed", "thoughts": 1}),
])
def test_stream_deltas_concatenate_to_the_non_streamed_text(client, params):
    whole = client.reason(QUESTION, **params)
    stream = client.stream(QUESTION, **params)
    events = list(stream)
    assert events and all(isinstance(e, StreamEvent) for e in events)
    assert "".join(e.delta for e in events) == whole.text
    final = events[-1]
    assert final.finish_reason == whole.finish_reason
    assert [e for e in events if e.finish_reason is not None] == [final]
    assert final.usage.model_dump() == whole.usage.model_dump()
    assert final.answer == whole.answer == stream.answer
    assert stream.request_id and stream.response.is_closed


def test_stream_early_break_leaves_the_server_serving(client):
    for ev in client.stream(QUESTION, max_tokens=40, ignore_eos=True):
        break
    # The aborted request must not wedge the engine: the next one completes.
    assert client.reason(QUESTION, max_tokens=2, ignore_eos=True).usage.completion_tokens == 2


def test_async_concurrent_requests_match_sequential_ones(client, server):
    params = [dict(max_tokens=6 + i % 3, temperature=0, ignore_eos=True,
                   latent={"mode": "fixed", "thoughts": i % 4})
              for i in range(len(QUESTIONS))]
    sequential = [client.reason(q, **p) for q, p in zip(QUESTIONS, params)]
    assert all(r.usage.completion_tokens == p["max_tokens"] for r, p in zip(sequential, params))

    async def main():
        async with AsyncCoconutClient(server.url, max_retries=0) as ac:
            results = await asyncio.gather(*(ac.reason(q, **p) for q, p in zip(QUESTIONS, params)))

            async def streamed(q, p):
                return "".join([ev.delta async for ev in ac.stream(q, **p)])

            texts = await asyncio.gather(*(streamed(q, p) for q, p in zip(QUESTIONS, params)))
            return results, texts

    concurrent, streamed_texts = asyncio.run(main())
    assert [r.text for r in concurrent] == [r.text for r in sequential]
    # the prompt tokens found in the prefix cache depend on what ran before: not compared
    assert ([r.usage.model_dump(exclude={"prompt_tokens_details"}) for r in concurrent]
            == [r.usage.model_dump(exclude={"prompt_tokens_details"}) for r in sequential])
    assert streamed_texts == [r.text for r in sequential]
    assert len({r.id for r in concurrent}) == len(QUESTIONS)


def test_invalid_input_is_a_bad_request_naming_the_field(client):
    with pytest.raises(BadRequestError) as info:
        client.reason(QUESTION, max_tokens=0)
    err = info.value
    assert isinstance(err, UnprocessableEntityError) and err.status_code == 422
    assert "max_tokens" in err.message and err.request_id

    with pytest.raises(BadRequestError) as info:
        client.reason(QUESTION, latent={"mode": "fixed", "thoughts": -1})
    assert "thoughts" in info.value.message

    with pytest.raises(BadRequestError) as info:
        list(client.stream(QUESTION, temperature=-1))
    assert "temperature" in info.value.message

    with pytest.raises(BadRequestError) as info:  # the server forbids unknown fields
        client.reason(QUESTION, extra_body={"no_such_field": 1})
    assert "no_such_field" in info.value.message


def test_a_question_longer_than_the_model_allows_is_a_400(client):
    with pytest.raises(BadRequestError) as info:
        client.reason("wumpus " * 5000, max_tokens=2)
    assert info.value.status_code == 400


def test_wrong_api_key_is_an_authentication_error(tiny_checkpoint):
    with LiveServer(tiny_checkpoint("gpt2"), "--api-key", "right-key") as s:
        sleeps = []
        with CoconutClient(s.url, api_key="wrong-key", sleep=sleeps.append) as c:
            with pytest.raises(AuthenticationError) as info:
                c.reason(QUESTION, max_tokens=2)
            assert info.value.status_code == 401 and info.value.request_id
            assert sleeps == []  # 401 is never retried
            with pytest.raises(AuthenticationError):
                list(c.stream(QUESTION, max_tokens=2))
            assert c.health().status == "ok"  # /health needs no key
            right = c.with_options(api_key="right-key")
            assert right.reason(QUESTION, max_tokens=2, ignore_eos=True).usage.completion_tokens == 2

        async def no_key():
            async with AsyncCoconutClient(s.url, api_key=None) as ac:
                await ac.reason(QUESTION, max_tokens=2)

        with pytest.raises(AuthenticationError):
            asyncio.run(no_key())


def test_connection_refused_is_retried_then_raised():
    sleeps = []
    port = free_port()  # nothing listens there
    with CoconutClient(f"http://127.0.0.1:{port}", sleep=sleeps.append, connect_timeout=2.0) as c:
        with pytest.raises(APIConnectionError):
            c.reason(QUESTION)
    assert len(sleeps) == 2
