"""Any causal LM, no training: a plain Hugging Face directory (no coconut.json) served with
Soft Thinking's feedback from flags, its chat template used by the chat route.

The directory is a tiny random Llama with a tokenizer that knows ``<think>`` and
``</think>`` and has a chat template, saved with ``save_pretrained`` only. The oracle is
the naive reference decoder with its own soft-embedding operator on the rendered prompt.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import httpx
import pytest
import torch

from engine import Engine, LatentPolicy, SamplingParams
from engine.errors import CheckpointError
from engine.reference import reference_generate, soft_embedding_feedback
from tests.test_server_harness import InProcessServer

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}")
# use_chat_template false: the question itself is the prompt (the reference's input)
SOFT = {"latent_feedback": {"type": "soft_embedding", "top_k": 5}, "bot_token": "<think>",
        "eot_token": "</think>", "question_suffix": "", "answer_prefix": "", "use_chat_template": False}
QUESTION = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or zumpus?"


def _plain_model(directory: Path, think_markers: bool) -> Path:
    from transformers import AutoModelForCausalLM

    from engine.tiny import model_config, sample_corpus, train_tokenizer

    tokenizer = train_tokenizer(sample_corpus(), vocab_size=400)
    if think_markers:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]},
                                     replace_extra_special_tokens=False)
    tokenizer.chat_template = TEMPLATE
    config = model_config("llama", len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    assert not (directory / "coconut.json").exists()
    return directory


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> Path:
    return _plain_model(tmp_path_factory.mktemp("plain-llama"), think_markers=True)


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory) -> Path:
    """A plain model whose tokenizer has no think markers."""
    return _plain_model(tmp_path_factory.mktemp("bare-llama"), think_markers=False)


def _reference(engine, prompt: str, thoughts: int, max_tokens: int, **kw):
    ck = engine.checkpoint
    return reference_generate(ck.model, ck.tokenizer, prompt, question_suffix="", bot_id=ck.markers.bot,
                              eot_id=ck.markers.eot, eos_ids=set(ck.markers.eos), thoughts=thoughts,
                              max_tokens=max_tokens, feedback=soft_embedding_feedback(top_k=5), **kw)


def _hf_greedy(engine, ids: list[int], max_tokens: int) -> list[int]:
    """transformers' own greedy decoding of ``ids`` (the oracle), without the EOS."""
    model = engine.checkpoint.model
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_tokens, do_sample=False, pad_token_id=engine.checkpoint.markers.pad,
                         eos_token_id=list(engine.checkpoint.markers.eos))
    new = out[0, len(ids):].tolist()
    return [t for t in new if t not in engine.checkpoint.markers.eos]


@pytest.mark.parametrize("fixture", ["plain_dir", "bare_dir"])
def test_a_plain_directory_is_a_language_model_with_its_chat_template(fixture, request):
    """No coconut.json, no flags: no thoughts, the question rendered as a user message by the
    tokenizer's chat template, the answer all the model says; transformers' generate agrees."""
    engine = Engine.from_pretrained(request.getfixturevalue(fixture))
    assert engine.coconut.method == "no_cot" and engine.coconut.use_chat_template
    rendered = engine.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                                    add_generation_prompt=True, tokenize=False)
    ids = engine.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    [result] = engine.generate([QUESTION], SamplingParams(max_tokens=8))
    assert result.prompt_token_ids == ids and result.num_thoughts == 0
    assert result.token_ids[:len(_hf_greedy(engine, ids, 8))] == _hf_greedy(engine, ids, 8)
    assert result.answer == result.text.strip()


def test_a_plain_model_takes_its_own_think_markers(plain_dir):
    """(A plain model with no markers at all refuses latent requests: tests/test_real_models.py.)"""
    # its own <think> / </think> are the markers of a plain model that has them
    soft = Engine.from_pretrained(plain_dir, coconut={"latent_feedback": {"type": "soft_embedding"}})
    names = soft.tokenizer.convert_ids_to_tokens([soft.checkpoint.markers.bot, soft.checkpoint.markers.eot])
    assert names == ["<think>", "</think>"] and soft.coconut.method == "coconut"
    assert len(soft.tokenizer) == Engine.from_pretrained(plain_dir).checkpoint.model.vocab_size


def test_soft_thinking_on_a_plain_model_matches_reference(plain_dir):
    engine = Engine.from_pretrained(plain_dir, coconut=SOFT)
    assert engine.checkpoint.tokenizer.convert_ids_to_tokens(engine.checkpoint.markers.bot) == "<think>"
    results = engine.generate([QUESTION, "Is Sally a rompus?"], SamplingParams(max_tokens=8, ignore_eos=True),
                              LatentPolicy(mode="fixed", thoughts=4))
    for question, result in zip([QUESTION, "Is Sally a rompus?"], results):
        assert result.token_ids == _reference(engine, question, 4, 8, ignore_eos=True).token_ids


def test_missing_markers_are_added(plain_dir):
    engine = Engine.from_pretrained(plain_dir, coconut={**SOFT, "bot_token": "<reason>", "eot_token": "</reason>"})
    ck = engine.checkpoint
    before = len(Engine.from_pretrained(plain_dir, coconut=SOFT).tokenizer)
    rows = ck.model.get_input_embeddings().weight.shape[0]
    assert len(ck.tokenizer) == rows == before + 2 and {ck.markers.bot, ck.markers.eot} == {before, before + 1}
    [result] = engine.generate([QUESTION], SamplingParams(max_tokens=6, ignore_eos=True),
                               LatentPolicy(mode="fixed", thoughts=3))
    assert result.token_ids == _reference(engine, QUESTION, 3, 6, ignore_eos=True).token_ids
    # a frontend (the server process of engine serve: no weights) gives the same prompt ids
    front = Engine.frontend(plain_dir, coconut={**SOFT, "bot_token": "<reason>", "eot_token": "</reason>"})
    policy = LatentPolicy(mode="fixed", thoughts=3)
    assert front.make_request(QUESTION, latent=policy).prompt_token_ids == \
        engine.make_request(QUESTION, latent=policy).prompt_token_ids


def test_server_serves_a_plain_model_with_its_chat_template(plain_dir):
    oracle = Engine.from_pretrained(plain_dir, coconut=SOFT)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}]
    rendered = oracle.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<s>system: Answer briefly.")
    # the rendered prompt has its own <s> tokens; the tokenizer adds none (no post-processor)
    expected = _reference(oracle, rendered, 3, 6, ignore_eos=True)
    # /v1/reason: a plain model with a chat template renders the question as one user message
    asked = oracle.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                                 tokenize=False)
    with InProcessServer(plain_dir, latent_feedback="soft_embedding", bot_token="<think>", eot_token="</think>",
                         coconut='{"question_suffix": "", "answer_prefix": "", '
                                 '"latent_feedback": {"type": "soft_embedding", "top_k": 5}}') as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            r = http.post("/v1/chat/completions", json={
                "messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "latent": {"mode": "fixed", "thoughts": 3}})
            assert r.status_code == 200, r.text
            content = r.json()["choices"][0]["message"]["content"]
            assert content == oracle.tokenizer.decode(expected.token_ids)
            assert r.json()["usage"]["latent_thoughts"] == 3
            # the soft-embedding parameters are the request's to change, per request
            r = http.post("/v1/reason", json={"question": QUESTION, "max_tokens": 6, "ignore_eos": True,
                                              "latent": {"thoughts": 3, "feedback": {"type": "soft_embedding",
                                                                                      "top_k": 2}}})
            assert r.status_code == 200, r.text
            want = reference_generate(oracle.checkpoint.model, oracle.tokenizer, asked, question_suffix="",
                                      bot_id=oracle.checkpoint.markers.bot, eot_id=oracle.checkpoint.markers.eot,
                                      eos_ids=set(oracle.checkpoint.markers.eos), thoughts=3, max_tokens=6,
                                      feedback=soft_embedding_feedback(top_k=2), ignore_eos=True)
            assert r.json()["text"] == oracle.tokenizer.decode(want.token_ids)
            r = http.post("/v1/reason", json={"question": QUESTION, "latent": {"feedback": {"type": "projection"}}})
            assert r.status_code == 422 and "projection" in r.json()["error"]["message"]
            # the entropy stop and the trace's mixture, over HTTP, as the reference decides them
            threshold = statistics.median(_reference(oracle, asked, 6, 1, record_hiddens=True).thought_entropies)
            r = http.post("/v1/reason", json={
                "question": QUESTION, "max_tokens": 4, "ignore_eos": True, "return_latent_trace": True,
                "latent": {"mode": "entropy", "entropy_threshold": threshold, "max_thoughts": 6}})
            assert r.status_code == 200, r.text
            want = _reference(oracle, asked, 6, 4, ignore_eos=True, mode="entropy", entropy_threshold=threshold)
            body = r.json()
            assert body["usage"]["latent_thoughts"] == want.num_thoughts
            assert body["text"] == oracle.tokenizer.decode(want.token_ids)
            trace = body["latent_trace"]
            assert len(trace) == want.num_thoughts and trace[0]["feed"]["type"] == "soft_embedding"
            assert len(trace[0]["feed"]["tokens"]) == 5 and trace[0]["entropy"] > 0
            r = http.post("/v1/reason", json={"question": QUESTION, "latent": {"mode": "token", "patience": 2}})
            assert r.status_code == 422 and "patience" in r.json()["error"]["message"]


def test_latent_mode_none_is_a_default_not_a_request_for_latent_mode(plain_dir, tiny_checkpoint):
    plain = Engine.from_pretrained(plain_dir, coconut={"latent_mode": "none"})
    assert plain.coconut.method == "no_cot"
    [result] = plain.generate([QUESTION], SamplingParams(max_tokens=3))
    assert result.num_thoughts == 0
    # a COCONUT checkpoint told to answer without thoughts by default; a request may still ask
    coconut = Engine.from_pretrained(tiny_checkpoint(), coconut={"latent_mode": "none"})
    default, asked = coconut.generate([QUESTION, QUESTION], SamplingParams(max_tokens=3),
                                      [None, LatentPolicy(mode="fixed", thoughts=2)])
    assert (default.num_thoughts, asked.num_thoughts) == (0, 2)
