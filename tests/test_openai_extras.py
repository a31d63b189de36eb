"""The OpenAI-compatible routes as the official ``openai`` package uses them, against the
real server (``engine serve`` subprocess) with a tiny random GPT-2:

- log-probabilities: /v1/completions ``logprobs: N`` and /v1/chat/completions
  ``logprobs: true`` / ``top_logprobs: N`` (the alternatives' values against a full forward
  are ``tests/test_top_logprobs.py``'s). The oracle is independent of the engine: a
  full forward of the model (transformers, every position recomputed at every step) on
  the prompt the README specifies (``tokenizer.json`` encoding of question + "\\n",
  ``<bot>``, each thought the last hidden state of the previous position, ``<eot>``),
  greedy, with each chosen token's ``log_softmax`` of the logits; they must agree
  within 1e-4, token by token and in sum. Streamed log-probabilities equal the
  non-streamed ones;
- ``prompt`` as a list of strings (lm-eval's batches): one choice per prompt, with its
  ``index``, each equal to the same prompt sent alone; streamed too;
- ``n`` beyond the batch and bad ``logprobs`` values are a clear 422.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest

from tests.live_server import LiveServer
from tests.test_server_harness import finished_count, post_on_raw_socket, read_metrics, sse_payloads, wait_for

openai = pytest.importorskip("openai")

QUESTION = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or a zumpus?"
QUESTIONS = [QUESTION, "Sally is a rompus. Every rompus is a lempus. Is Sally a lempus or a tumpus?",
             "Max is a gorpus. Is Max a gorpus or a brimpus?"]
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("gpt2")


@pytest.fixture(scope="module")
def server(checkpoint):
    with LiveServer(checkpoint, "--max-batch-size", "8", "--torch-threads", "1", "--device", "cpu",
                    "--dtype", "float32") as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


class FullForward:
    """Greedy decoding by full recomputation, straight from the checkpoint files."""

    def __init__(self, directory):
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.coconut = json.loads((directory / "coconut.json").read_text())

    def greedy(self, question: str, max_tokens: int, thoughts: int | None) -> tuple[list[int], list[float]]:
        """thoughts None: latent mode 'none' (no markers)."""
        torch, model, tok = self.torch, self.model, self.tokenizer
        embed = model.get_input_embeddings()
        ids = tok.encode(question + self.coconut["question_suffix"]).ids
        if thoughts is not None:
            ids.append(tok.token_to_id(self.coconut["bot_token"]))
        with torch.no_grad():
            seq = embed(torch.tensor([ids]))
            for _ in range(thoughts or 0):
                last = model.base_model(inputs_embeds=seq).last_hidden_state[:, -1:]
                seq = torch.cat([seq, last], dim=1)
            if thoughts is not None:
                seq = torch.cat([seq, embed(torch.tensor([[tok.token_to_id(self.coconut["eot_token"])]]))], dim=1)
            out, logprobs = [], []
            for _ in range(max_tokens):
                logits = model(inputs_embeds=seq).logits[0, -1].float()
                lp = torch.log_softmax(logits, dim=-1)
                token = int(torch.argmax(logits))
                out.append(token)
                logprobs.append(float(lp[token]))
                seq = torch.cat([seq, embed(torch.tensor([[token]]))], dim=1)
        return out, logprobs

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


@pytest.fixture(scope="module")
def oracle(checkpoint):
    return FullForward(checkpoint)


LATENTS = {"none": ({"mode": "none"}, None), "fixed-2": ({"mode": "fixed", "thoughts": 2}, 2),
           "fixed-0": ({"mode": "fixed", "thoughts": 0}, 0)}


# ---------------------------------------------------------------- logprobs: completions


@pytest.mark.parametrize("latent", list(LATENTS))
@pytest.mark.parametrize("k", [0, 1, 5])
def test_completion_logprobs_equal_a_full_forward(client, checkpoint, oracle, latent, k):
    body, thoughts = LATENTS[latent]
    want_ids, want_lps = oracle.greedy(QUESTION, 8, thoughts)
    got = client.completions.create(model=checkpoint.name, prompt=QUESTION, max_tokens=8, temperature=0,
                                    logprobs=k, extra_body={"latent": body, "ignore_eos": True})
    choice = got.choices[0]
    lp = choice.logprobs
    assert got.usage.completion_tokens == 8
    assert lp.tokens == [oracle.token_text(i) for i in want_ids]
    assert len(lp.token_logprobs) == 8
    for g, w in zip(lp.token_logprobs, want_lps):
        assert abs(g - w) < TOL, (lp.token_logprobs, want_lps)
    assert abs(sum(lp.token_logprobs) - sum(want_lps)) < TOL
    assert all(v <= 0 for v in lp.token_logprobs)
    # every position's alternatives: the k most likely and the chosen one, which greedy makes the
    # first (their values against the full forward: tests/test_top_logprobs.py)
    for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert next(iter(top)) == t and top[t] == v and 1 <= len(top) <= max(k, 1)
        assert list(top.values()) == sorted(top.values(), reverse=True)
    offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.text_offset == offsets


def test_completion_logprobs_stop_at_eos_and_omit_it(client, checkpoint, oracle):
    """Without ignore_eos: one log-probability per generated token (usage), no EOS entry."""
    eos = oracle.tokenizer.token_to_id("<|endoftext|>")
    got = client.completions.create(model=checkpoint.name, prompt=QUESTION, max_tokens=24, temperature=0,
                                    logprobs=1, extra_body={"latent": {"mode": "none"}})
    want_ids, want_lps = oracle.greedy(QUESTION, 24, None)
    if eos in want_ids:
        want_ids, want_lps = want_ids[:want_ids.index(eos)], want_lps[:want_ids.index(eos)]
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == got.usage.completion_tokens == len(want_ids)
    assert abs(sum(lp.token_logprobs) - sum(want_lps)) < TOL


def test_completion_logprobs_streamed_equal_non_streamed(client, checkpoint):
    kw = dict(model=checkpoint.name, prompt=QUESTION, max_tokens=10, temperature=0, logprobs=2,
              extra_body={"latent": {"thoughts": 2}, "ignore_eos": True})
    whole = client.completions.create(**kw).choices[0]
    tokens, values, offsets, text = [], [], [], ""
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert text == whole.text
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert all(abs(a - b) < TOL for a, b in zip(values, whole.logprobs.token_logprobs))


def test_sampled_completion_logprobs_are_of_the_unmodified_distribution(client, checkpoint, oracle):
    """With temperature, the chosen tokens' logprobs are still the raw model's (as vLLM):
    the sampled ids (from the offline engine with the same seed, which gives the same
    text) rescored by the full forward."""
    import torch

    from engine.sync_engine import Engine
    from engine.params import LatentPolicy, SamplingParams

    got = client.completions.create(model=checkpoint.name, prompt=QUESTION, max_tokens=6, temperature=1.5,
                                    seed=11, logprobs=1, extra_body={"latent": {"mode": "none"}, "ignore_eos": True})
    [offline] = Engine.from_pretrained(checkpoint).generate(
        [QUESTION], SamplingParams(max_tokens=6, temperature=1.5, seed=11, ignore_eos=True), LatentPolicy(mode="none"))
    assert got.choices[0].text == offline.text
    assert got.choices[0].logprobs.tokens == [oracle.token_text(i) for i in offline.token_ids]
    ids = oracle.tokenizer.encode(QUESTION + "\n").ids
    with torch.no_grad():
        logits = oracle.model(torch.tensor([ids + offline.token_ids])).logits[0].float()
    lps = torch.log_softmax(logits, dim=-1)
    want = [float(lps[len(ids) - 1 + i, t]) for i, t in enumerate(offline.token_ids)]
    assert all(abs(a - b) < TOL for a, b in zip(got.choices[0].logprobs.token_logprobs, want))
    greedy = [int(lps[len(ids) - 1 + i].argmax()) for i in range(len(offline.token_ids))]
    assert greedy != offline.token_ids, "sampling at temperature 1.5 picked only argmax tokens: not a test"


# ---------------------------------------------------------------- logprobs: chat


@pytest.mark.parametrize("top", [None, 0, 3])
def test_chat_logprobs_equal_a_full_forward(client, checkpoint, oracle, top):
    want_ids, want_lps = oracle.greedy(QUESTION, 8, 2)
    kw = {} if top is None else {"top_logprobs": top}
    got = client.chat.completions.create(model=checkpoint.name, messages=[{"role": "user", "content": QUESTION}],
                                         max_tokens=8, temperature=0, logprobs=True,
                                         extra_body={"latent": {"thoughts": 2}, "ignore_eos": True}, **kw)
    content = got.choices[0].logprobs.content
    assert [e.token for e in content] == [oracle.token_text(i) for i in want_ids]
    assert abs(sum(e.logprob for e in content) - sum(want_lps)) < TOL
    for e, w in zip(content, want_lps):
        assert abs(e.logprob - w) < TOL
        if top:   # the `top` most likely, best first: greedy makes the chosen one the first
            assert len(e.top_logprobs) == top
            assert (e.top_logprobs[0].token, e.top_logprobs[0].logprob, e.top_logprobs[0].bytes) == \
                (e.token, e.logprob, e.bytes)
            assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        else:
            assert e.top_logprobs == []
    # the bytes are exact: together they are the answer's UTF-8 (special tokens aside)
    special = {"<|endoftext|>", "<|pad|>", "<|start-latent|>", "<|end-latent|>", "<|latent|>", "<s>"}
    raw = b"".join(bytes(e.bytes) for e in content if e.token not in special)
    assert raw.decode("utf-8", errors="replace") == got.choices[0].message.content


def test_chat_logprobs_streamed_equal_non_streamed(client, checkpoint):
    kw = dict(model=checkpoint.name, messages=[{"role": "user", "content": QUESTION}], max_tokens=8,
              temperature=0, logprobs=True, top_logprobs=1, extra_body={"latent": {"thoughts": 1}})
    whole = client.chat.completions.create(**kw).choices[0]
    entries = [e for chunk in client.chat.completions.create(stream=True, **kw) for c in chunk.choices
               if c.logprobs is not None for e in c.logprobs.content]
    assert [(e.token, e.bytes) for e in entries] == [(e.token, e.bytes) for e in whole.logprobs.content]
    assert all(abs(a.logprob - b.logprob) < TOL for a, b in zip(entries, whole.logprobs.content))


def test_no_logprobs_unless_asked(client, checkpoint):
    got = client.completions.create(model=checkpoint.name, prompt=QUESTION, max_tokens=3, temperature=0)
    assert got.choices[0].logprobs is None
    chat = client.chat.completions.create(model=checkpoint.name, messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=3, temperature=0)
    assert chat.choices[0].logprobs is None


@pytest.mark.parametrize("route, body, field", [
    ("/v1/completions", {"prompt": QUESTION, "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": QUESTION, "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": QUESTION, "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": QUESTION, "logprobs": "2"}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}], "logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}], "top_logprobs": 2}, None),
])
def test_bad_logprobs_fields_are_422(http, route, body, field):
    r = http.post(route, json=body)
    assert r.status_code == 422, r.text
    if field:
        assert r.json()["error"]["param"] == field
    else:
        assert "top_logprobs needs logprobs" in r.json()["error"]["message"]


# ---------------------------------------------------------------- prompt lists


def test_a_list_of_prompts_gives_one_choice_per_prompt(client, checkpoint):
    kw = dict(model=checkpoint.name, max_tokens=8, temperature=0, extra_body={"latent": {"thoughts": 2}})
    alone = [client.completions.create(prompt=q, **kw) for q in QUESTIONS]
    batch = client.completions.create(prompt=QUESTIONS, logprobs=1, **kw)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    for c, one in zip(batch.choices, alone):
        assert c.text == one.choices[0].text and c.finish_reason == one.choices[0].finish_reason
        assert len(c.logprobs.tokens) == one.usage.completion_tokens
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert batch.usage.total_tokens == batch.usage.prompt_tokens + batch.usage.completion_tokens
    assert batch.usage.latent_thoughts == 6


def test_a_list_of_prompts_equals_the_offline_engine(client, checkpoint):
    from engine.sync_engine import Engine
    from engine.params import LatentPolicy, SamplingParams

    engine = Engine.from_pretrained(checkpoint)
    want = engine.generate(QUESTIONS, SamplingParams(max_tokens=8), LatentPolicy(mode="fixed", thoughts=2))
    got = client.completions.create(model=checkpoint.name, prompt=QUESTIONS, max_tokens=8, temperature=0,
                                    extra_body={"latent": {"thoughts": 2}})
    assert [c.text for c in got.choices] == [w.text for w in want]


def test_a_streamed_list_of_prompts(client, checkpoint):
    kw = dict(model=checkpoint.name, prompt=QUESTIONS, max_tokens=8, temperature=0,
              extra_body={"latent": {"thoughts": 2}})
    whole = client.completions.create(**kw)
    texts, reasons, usage = {}, {}, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    assert [texts[i] for i in range(3)] == [c.text for c in whole.choices]
    assert [reasons[i] for i in range(3)] == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_one_list_of_one_prompt_is_a_single_choice(client, checkpoint):
    got = client.completions.create(model=checkpoint.name, prompt=[QUESTION], max_tokens=4, temperature=0)
    assert len(got.choices) == 1 and got.choices[0].index == 0


@pytest.mark.parametrize("prompt", [[], [""], [QUESTION, ""], [QUESTION, 3], ["x"] * 257])
def test_bad_prompt_lists_are_422(http, prompt):
    r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"].startswith("prompt")


def test_a_prompt_too_long_fails_the_list_and_leaves_nothing_running(http, server):
    r = http.post("/v1/completions", json={"prompt": [QUESTION, "wumpus " * 600, QUESTION], "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["type"] == "context_length_exceeded"
    wait_for(lambda: (lambda m: m if m["coconut_num_requests_running"] == 0 and
                      m["coconut_num_requests_waiting"] == 0 else None)(read_metrics(server.url)), what="idle")
    streamed = http.post("/v1/completions", json={"prompt": [QUESTION, "wumpus " * 600], "max_tokens": 4,
                                                  "stream": True})
    assert streamed.status_code == 400
    assert http.post("/v1/completions", json={"prompt": [QUESTION, QUESTION], "max_tokens": 2}).status_code == 200


def test_n_beyond_the_batch_is_a_clear_422(client, checkpoint):
    with pytest.raises(openai.UnprocessableEntityError, match=r"n=9 answers need 9 batch slots"):
        client.completions.create(model=checkpoint.name, prompt=QUESTION, n=9)
    with pytest.raises(openai.UnprocessableEntityError, match=r"n"):
        client.chat.completions.create(model=checkpoint.name, messages=[{"role": "user", "content": QUESTION}], n=0)


def test_logprobs_are_finite_json(http):
    r = http.post("/v1/completions", json={"prompt": QUESTION, "max_tokens": 4, "logprobs": 1, "stream": True})
    for payload in sse_payloads(r.text)[:-1]:
        for c in payload["choices"]:
            assert all(math.isfinite(v) for v in c["logprobs"]["token_logprobs"])


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_latent_trace_equals_the_json_one(http, route):
    body = {"prompt": QUESTION} if route == "/v1/completions" else {"messages": [{"role": "user", "content": QUESTION}]}
    body |= {"max_tokens": 4, "temperature": 0, "return_latent_trace": True, "latent": {"thoughts": 2}}
    whole = http.post(route, json=body).json()["choices"][0]["latent_trace"]
    events = [p for p in sse_payloads(http.post(route, json={**body, "stream": True}).text)[:-1]]
    traces = [c["latent_trace"] for p in events for c in p["choices"] if "latent_trace" in c]
    assert traces == [whole] and len(whole) == 2


def _idle(url):
    m = read_metrics(url)
    return m if m["coconut_num_requests_running"] == 0 and m["coconut_num_requests_waiting"] == 0 else None


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_leaving_a_prompt_list_aborts_every_request(server, stream):
    wait_for(lambda: _idle(server.url), what="idle")
    aborted, completed = finished_count(server.url, "abort"), finished_count(server.url, "length")
    body = {"prompt": QUESTIONS, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": stream}
    sock = post_on_raw_socket(server.port, "/v1/completions", body)
    wait_for(lambda: read_metrics(server.url)["coconut_num_requests_running"] == 3, what="the 3 requests to run")
    sock.close()
    wait_for(lambda: _idle(server.url), what="every slot to free")
    wait_for(lambda: finished_count(server.url, "abort") == aborted + 3, what="3 aborts")
    assert finished_count(server.url, "length") == completed, "a generation ran to the end instead"
