"""top_logprobs for real (issue 25, item 2): each generated token's most likely
alternatives, from the distribution its own log-probability is of.

The oracle is independent of the engine's runner and sampler: the naive reference decoder
(``engine/reference.py``: the model's own forward over the whole sequence at every step,
its ``log_softmax`` with the checkpoint's suppressed ids at -inf, a stable argsort) or, for
sampled tokens, the full forward of the prompt and the engine's chosen ids. Ids and
log-probabilities must agree within 1e-4:

- through the engine, greedy and sampled, with latent thoughts and without, with
  suppressed tokens (which are never alternatives), several requests of different k in
  one batch; the field survives the engine process's packing;
- through the HTTP routes (the in-process server, whose engine runs in a child process):
  chat ``top_logprobs`` (up to 20) and completions ``logprobs`` (up to 5), JSON and
  streamed alike, the texts and bytes those of the tokens;
- on the bundled symbols model: the tokens of the question's names are written in the
  question's names (``' naj'`` was an internal symbol), in the answer's entries and in
  their alternatives.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from engine.params import LatentPolicy, SamplingParams
from engine.sync_engine import Engine
from tests.engine_helpers import reference
from tests.test_server_harness import InProcessServer, sse_payloads

TOL = 1e-4
QUESTION = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or a zumpus?"
QUESTIONS = [QUESTION, "Max is a tumpus. Every tumpus is a numpus. Is Max a numpus or lempus?",
             "Is Sally a rompus?"]
BUNDLED = Path(__file__).resolve().parents[1] / "models" / "prosqa-coconut"
PROSQA = ("Sally is a kirpus. Every kirpus is a sumpus. Gabriel is a pilpus. Every pilpus is a grulpus. "
          "Every grulpus is a screrpus. Is Gabriel a sumpus or screrpus?")


def assert_same_top(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert len(got) == len(want), (got, want)
    assert [i for i, _ in got] == [i for i, _ in want], (got, want)
    assert all(abs(a - b) < TOL for (_, a), (_, b) in zip(got, want)), (got, want)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("gpt2")


@pytest.fixture(scope="module")
def suppressed(checkpoint):
    """Two tokens the unsuppressed model likes at the first answer position: suppressing
    them changes the distribution the alternatives come from."""
    plain = Engine.from_pretrained(checkpoint)
    first = reference(plain, QUESTION, 2, 1, logprobs_top_k=2, ignore_eos=True).top_logprobs[0]
    return [i for i, _ in first]


@pytest.fixture(scope="module")
def engine(checkpoint, suppressed):
    return Engine.from_pretrained(checkpoint, coconut={"suppress_token_ids": suppressed}, max_batch_size=8)


# ---------------------------------------------------------------- the parameter


@pytest.mark.parametrize("kw", [dict(top_logprobs=21, logprobs=True), dict(top_logprobs=-1, logprobs=True),
                                dict(top_logprobs=True, logprobs=True), dict(top_logprobs=2.0, logprobs=True),
                                dict(top_logprobs=3)])
def test_bad_top_logprobs_are_refused(kw):
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(**kw)


# ---------------------------------------------------------------- the engine


@pytest.mark.parametrize("thoughts", [None, 0, 2])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_greedy_alternatives_equal_a_full_forward(engine, suppressed, thoughts, k):
    latent = LatentPolicy(mode="none") if thoughts is None else LatentPolicy(mode="fixed", thoughts=thoughts)
    [out] = engine.generate([QUESTION], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=True,
                                                       top_logprobs=k), latent)
    want = reference(engine, QUESTION, thoughts or 0, 6, mode="none" if thoughts is None else "fixed",
                     logprobs_top_k=k, ignore_eos=True)
    assert out.token_ids == want.token_ids
    assert len(out.top_logprobs) == len(out.token_ids) == 6
    for position, (got, expected) in enumerate(zip(out.top_logprobs, want.top_logprobs)):
        assert_same_top(got, expected)
        assert got[0][0] == out.token_ids[position]                 # greedy: the chosen one is the best
        assert abs(got[0][1] - out.logprobs[position]) < 1e-6       # the same distribution
        assert not set(suppressed) & {i for i, _ in got}
    assert all(abs(a - b) < TOL for a, b in zip(out.logprobs, want.token_logprobs))


def test_sampled_alternatives_are_of_the_unmodified_distribution(engine, checkpoint, suppressed):
    """At temperature 1.5 with top_k 3, the alternatives are still the raw model's top 20
    (temperature and filters change what is drawn, not what is reported, as vLLM)."""
    [out] = engine.generate([QUESTION], SamplingParams(max_tokens=6, temperature=1.5, top_k=3, seed=5,
                                                       ignore_eos=True, logprobs=True, top_logprobs=20),
                            LatentPolicy(mode="none"))
    ck = engine.checkpoint
    ids = ck.tokenizer(QUESTION + ck.config.question_suffix)["input_ids"]
    with torch.no_grad():
        logits = ck.model(torch.tensor([ids + out.token_ids])).logits[0].float()
    logits[:, suppressed] = float("-inf")
    lps = torch.log_softmax(logits, dim=-1)
    greedy = []
    for position, token in enumerate(out.token_ids):
        row = lps[len(ids) - 1 + position]
        order = torch.argsort(row, descending=True, stable=True)[:20].tolist()
        assert_same_top(out.top_logprobs[position], [(i, float(row[i])) for i in order])
        assert abs(out.logprobs[position] - float(row[token])) < TOL
        greedy.append(order[0])
    assert greedy != out.token_ids, "sampling picked only argmax tokens: not a test of sampled rows"


def test_one_batch_gives_each_request_its_own_k(engine):
    """k of 0 (logprobs only), 3 and 20 and no logprobs at all, in one batch: each request
    gets what it asked, equal to what it gets alone."""
    asks = [dict(logprobs=True), dict(logprobs=True, top_logprobs=3), dict(logprobs=True, top_logprobs=20), {}]
    params = [SamplingParams(max_tokens=5, ignore_eos=True, **a) for a in asks]
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(len(asks))]
    latent = LatentPolicy(mode="fixed", thoughts=1)
    together = engine.generate(questions, params, latent)
    for question, p, out in zip(questions, params, together):
        [alone] = engine.generate([question], p, latent)
        assert out.token_ids == alone.token_ids
        if not p.top_logprobs:
            assert out.top_logprobs is None
            continue
        assert len(out.top_logprobs) == len(out.token_ids)
        assert all(len(entry) == p.top_logprobs for entry in out.top_logprobs)
        for a, b in zip(out.top_logprobs, alone.top_logprobs):
            assert_same_top(a, b)


def test_the_field_survives_the_process_boundary(engine):
    from engine.output import RequestOutput
    from engine.process_engine import _pack

    [out] = engine.generate([QUESTION], SamplingParams(max_tokens=3, ignore_eos=True, logprobs=True,
                                                       top_logprobs=4), LatentPolicy(mode="none"))
    import pickle

    back = RequestOutput(*pickle.loads(pickle.dumps(_pack(out))))
    assert back.top_logprobs == out.top_logprobs and len(back.top_logprobs) == 3


# ---------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def server(checkpoint, suppressed):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with InProcessServer(checkpoint, max_batch_size=8, torch_threads=1,
                             coconut=json.dumps({"suppress_token_ids": suppressed})) as live:
            yield live
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def _text(engine, token_id: int) -> str:
    return engine.checkpoint.tokenizer.decode([token_id], skip_special_tokens=False,
                                              clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_top_logprobs_equal_a_full_forward(http, engine, stream):
    want = reference(engine, QUESTION, 2, 6, logprobs_top_k=20, ignore_eos=True)
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 20, "ignore_eos": True, "latent": {"thoughts": 2}, "stream": stream}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        content = [e for p in sse_payloads(r.text)[:-1] for c in p["choices"] if c.get("logprobs")
                   for e in c["logprobs"]["content"]]
    else:
        content = r.json()["choices"][0]["logprobs"]["content"]
    assert [_text(engine, i) for i in want.token_ids] == [e["token"] for e in content]
    for entry, expected, chosen_lp in zip(content, want.top_logprobs, want.token_logprobs):
        assert abs(entry["logprob"] - chosen_lp) < TOL
        top = entry["top_logprobs"]
        assert [t["token"] for t in top] == [_text(engine, i) for i, _ in expected]
        assert all(abs(t["logprob"] - lp) < TOL for t, (_, lp) in zip(top, expected))
        for t, (i, _) in zip(top, expected):
            assert t["bytes"] == list(_raw_bytes(engine, i))


def _raw_bytes(engine, token_id: int) -> bytes:
    """A byte-level BPE token's exact bytes (GPT-2's byte alphabet, written out here)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    alphabet, extra = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[chr(b)] = b
        else:
            alphabet[chr(256 + extra)] = b
            extra += 1
    piece = engine.checkpoint.tokenizer.convert_ids_to_tokens(token_id)
    if token_id in engine.checkpoint.tokenizer.all_special_ids or not all(c in alphabet for c in piece):
        return _text(engine, token_id).encode()
    return bytes(alphabet[c] for c in piece)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_top_logprobs_equal_a_full_forward(http, engine, stream):
    want = reference(engine, QUESTION, 0, 6, mode="none", logprobs_top_k=5, ignore_eos=True)
    body = {"prompt": QUESTION, "max_tokens": 6, "temperature": 0, "logprobs": 5, "ignore_eos": True,
            "latent": {"mode": "none"}, "stream": stream}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        parts = [c["logprobs"] for p in sse_payloads(r.text)[:-1] for c in p["choices"] if c.get("logprobs")]
        tokens = [t for p in parts for t in p["tokens"]]
        top = [t for p in parts for t in p["top_logprobs"]]
    else:
        tokens, top = r.json()["choices"][0]["logprobs"]["tokens"], r.json()["choices"][0]["logprobs"]["top_logprobs"]
    assert tokens == [_text(engine, i) for i in want.token_ids]
    assert len(top) == 6
    for got, expected in zip(top, want.top_logprobs):
        as_dict: dict[str, float] = {}
        for i, lp in expected:      # texts of different ids may coincide: the first (best) is kept
            as_dict.setdefault(_text(engine, i), lp)
        assert list(got) == list(as_dict)        # greedy: the chosen token is the first of them
        assert all(abs(got[t] - as_dict[t]) < TOL for t in got)


def test_top_logprobs_0_gives_no_alternatives(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}],
                                                "max_tokens": 3, "logprobs": True, "top_logprobs": 0})
    assert r.status_code == 200
    assert all(e["top_logprobs"] == [] for e in r.json()["choices"][0]["logprobs"]["content"])
    r = http.post("/v1/completions", json={"prompt": QUESTION, "max_tokens": 3, "logprobs": 0})
    lp = r.json()["choices"][0]["logprobs"]      # completions: the chosen token always (OpenAI's N + 1)
    assert lp["top_logprobs"] == [{t: v} for t, v in zip(lp["tokens"], lp["token_logprobs"])]


def test_completion_alternatives_include_the_sampled_token(http, engine, suppressed):
    """Sampled at a high temperature: a chosen token outside the top 1 is added to its
    position's alternatives (OpenAI: up to logprobs + 1 entries)."""
    body = {"prompt": QUESTION, "max_tokens": 8, "temperature": 2.0, "seed": 3, "logprobs": 1,
            "ignore_eos": True, "latent": {"mode": "none"}}
    lp = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    outside = 0
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[token] == value and 1 <= len(top) <= 2
        outside += len(top) == 2
    assert outside, "every sampled token was the most likely one: not a test"


# ---------------------------------------------------------------- the bundled symbols model


@pytest.fixture(scope="module")
def bundled():
    if not (BUNDLED / "coconut.json").is_file():
        pytest.skip(f"the bundled model is not at {BUNDLED}")
    return Engine.from_pretrained(BUNDLED)


def _bundled_reference(engine, question: str, k: int, max_tokens: int):
    """The full forward on the engine's own prompt (the question renamed to symbols: what
    is tested here is the alternatives and their names, not the renaming)."""
    from engine.reference import reference_generate

    request = engine.make_request(question, SamplingParams(max_tokens=max_tokens), None)
    ck = engine.checkpoint
    ids = list(request.prompt_token_ids)
    assert ids[-1] == ck.markers.bot
    question_ids = ids[:len(ids) - 1 - len(ck.markers.prefix)]
    result = reference_generate(ck.model, lambda _: {"input_ids": question_ids}, "", question_suffix="",
                                bot_id=ck.markers.bot, eot_id=ck.markers.eot, eos_ids=set(ck.markers.eos),
                                thoughts=request.latent.thoughts, max_tokens=max_tokens,
                                prefix_ids=ck.markers.prefix, suffix_ids=ck.markers.suffix,
                                suppress_ids=tuple(ck.config.suppress_token_ids), logprobs_top_k=k)
    return result, request.renamed_tokens


def test_the_bundled_model_names_tokens_in_the_questions_words(bundled):
    with InProcessServer(BUNDLED, max_batch_size=4, torch_threads=1) as live, \
            httpx.Client(base_url=live.url, timeout=120) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROSQA}],
                                                     "max_tokens": 16, "temperature": 0, "logprobs": True,
                                                     "top_logprobs": 5})
        completion = client.post("/v1/completions", json={"prompt": PROSQA, "max_tokens": 16, "temperature": 0,
                                                          "logprobs": 5})
    assert r.status_code == completion.status_code == 200, (r.text, completion.text)
    want, renamed = _bundled_reference(bundled, PROSQA, 5, 16)
    words = set(PROSQA.replace(".", " ").replace("?", " ").split())

    def name(i: int) -> str:
        return renamed[i] if i in renamed else _text(bundled, i)

    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == [name(i) for i in want.token_ids]
    assert "".join(e["token"] for e in content) == r.json()["choices"][0]["message"]["content"]
    named = [e["token"] for e in content if e["token"].strip() in words]
    assert named, "the answer names nothing of the question: not a test of the renaming"
    for entry, expected in zip(content, want.top_logprobs):
        assert [t["token"] for t in entry["top_logprobs"]] == [name(i) for i, _ in expected]
        assert all(abs(t["logprob"] - lp) < TOL for t, (_, lp) in zip(entry["top_logprobs"], expected))
        for t in entry["top_logprobs"]:
            assert bytes(t["bytes"]).decode() == t["token"]
    alternatives = {t["token"].strip() for e in content for t in e["top_logprobs"]}
    assert alternatives & words - {"Is", "is", "a", "or", "Every"}, alternatives
    legacy = completion.json()["choices"][0]["logprobs"]
    assert legacy["tokens"] == [e["token"] for e in content]
    assert [list(d) for d in legacy["top_logprobs"]] == [[t["token"] for t in e["top_logprobs"]] for e in content]
