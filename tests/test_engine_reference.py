"""Greedy decoding is token-for-token identical to the naive full-recompute reference.

Architectures cover absolute learned positions (GPT-2), rotary (Llama, Qwen2; GPT-NeoX
with partial rotary) and ALiBi computed from the attention mask with no position ids
(BLOOM), plus Gemma-2 (hybrid sliding-window layers, logit soft-capping).
"""

from __future__ import annotations

import pytest

from engine import Engine, LatentPolicy, SamplingParams
from tests.engine_helpers import QUESTIONS, reference

ARCHS = ["gpt2", "llama", "qwen2", "bloom", "gpt_neox", "gemma2"]


@pytest.fixture(scope="module", params=ARCHS)
def engine(request, tiny_checkpoint):
    return Engine.from_pretrained(tiny_checkpoint(request.param), max_batch_size=16)


@pytest.mark.parametrize("thoughts", [0, 1, 4, 8])
def test_greedy_matches_reference_batched(engine, thoughts):
    questions = QUESTIONS[:8]
    results = engine.generate(questions, SamplingParams(max_tokens=10),
                              LatentPolicy(mode="fixed", thoughts=thoughts))
    for question, result in zip(questions, results):
        expected = reference(engine, question, thoughts, max_tokens=10)
        assert result.token_ids == expected.token_ids, question
        assert result.num_thoughts == thoughts
        assert result.finish_reason == ("length" if len(expected.token_ids) == 10 else "stop")


def test_mode_none_matches_reference(engine):
    results = engine.generate(QUESTIONS[:4], SamplingParams(max_tokens=8), LatentPolicy(mode="none"))
    for question, result in zip(QUESTIONS[:4], results):
        assert result.token_ids == reference(engine, question, 0, 8, mode="none").token_ids
        assert result.num_thoughts == 0


def test_staggered_arrivals_match_reference(engine):
    """Ten requests with different lengths, thought counts and max_tokens join the batch
    at different steps while others are mid-latent or mid-answer."""
    plan = [(QUESTIONS[i], (i * 3) % 9, 4 + (i * 5) % 9) for i in range(10)]
    arrivals = {0: [0, 1], 1: [2], 3: [3, 4, 5], 4: [6], 7: [7, 8], 12: [9]}
    ids, done, step = {}, {}, 0
    while len(done) < len(plan):
        for i in arrivals.get(step, []):
            question, thoughts, max_tokens = plan[i]
            ids[engine.add_request(question, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                   LatentPolicy(mode="fixed", thoughts=thoughts))] = i
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out
        step += 1
        assert step < 500
    for i, (question, thoughts, max_tokens) in enumerate(plan):
        expected = reference(engine, question, thoughts, max_tokens, ignore_eos=True)
        assert done[i].token_ids == expected.token_ids, (i, question)
        assert done[i].num_thoughts == thoughts
        assert done[i].finish_reason == "length"


@pytest.fixture(scope="module", params=ARCHS)
def churn_engine(request, tiny_checkpoint):
    # 4 slots for 16 requests: slots are reused all the time; 7 prompt tokens per step:
    # every prompt is prefilled in chunks while the other rows decode
    return Engine.from_pretrained(tiny_checkpoint(request.param), max_batch_size=4, max_prefill_tokens=7)


def test_churn_every_step_with_chunked_prefill_matches_reference(churn_engine):
    """A request arrives at every step and rows finish at every few steps (short answers,
    thought counts 0-5), with one request aborted mid-answer: every other answer is the
    naive reference's, token for token."""
    check_churn(churn_engine)


@pytest.fixture(scope="module", params=ARCHS)
def compiled_churn_engine(request, tiny_checkpoint):
    return Engine.from_pretrained(tiny_checkpoint(request.param), max_batch_size=4, max_prefill_tokens=7,
                                  compile=True)


def test_compiled_decode_step_under_churn_matches_reference(compiled_churn_engine):
    """The same churn through the compiled decode step, compiled at start-up: for Llama and
    Qwen2 the lean forward's decode-only steps as one graph around the engine's products
    (mixed steps eager), for the others the modules' decode forward with rows padded to
    batch buckets 1, 2, 4. Still the naive reference's tokens, and no compile after warm-up."""
    import torch._dynamo.utils

    engine = compiled_churn_engine
    runner = engine.runner
    if runner.lean_decode:
        assert runner.compiled_decode is not None and runner.decode_buckets is None
        calls = []
        compiled = runner.compiled_decode
        runner.compiled_decode = lambda *a: calls.append(1) or compiled(*a)
    else:
        assert runner.decode_buckets == [1, 2, 4]
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames > 0, "warm-up compiled nothing"
    try:
        check_churn(engine)
    finally:
        if runner.lean_decode:
            runner.compiled_decode = compiled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames, "compiled again while serving"
    if runner.lean_decode:
        assert calls, "the compiled graph ran no decode step"


@pytest.fixture(scope="module", params=ARCHS)
def padded_keys_engine(request, tiny_checkpoint):
    from engine.runner.model_runner import length_buckets

    engine = Engine.from_pretrained(tiny_checkpoint(request.param), max_batch_size=4, max_prefill_tokens=7)
    engine.runner.key_buckets = length_buckets(engine.runner.max_seq_len, smallest=4)
    return engine


def test_decode_keys_padded_to_buckets_under_churn_match_reference(padded_keys_engine):
    """What CUDA graphs need, checked on CPU: every decode step attends to a key length padded
    to a bucket (4, 8, 16, ...), the extra columns holding stale keys of earlier requests in
    the slot; the mask hides them, so the answers are still the naive reference's."""
    assert padded_keys_engine.runner.key_buckets[:3] == [4, 8, 16]
    check_churn(padded_keys_engine)


def check_churn(engine):
    plan = [(QUESTIONS[i % len(QUESTIONS)], i % 6, 1 + (i * 7) % 6) for i in range(16)]
    ids, done, step, aborted = {}, {}, 0, None
    while len(done) < len(plan):
        if step < len(plan):
            question, thoughts, max_tokens = plan[step]
            ids[engine.add_request(question, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                   LatentPolicy(mode="fixed", thoughts=thoughts))] = step
        if step == 9:
            aborted = next(i for i, n in ids.items() if n == 5)
            engine.abort(aborted)
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out
        step += 1
        assert step < 1000
    while engine.has_unfinished():   # the last slots are released at the next step
        engine.step()
    assert engine.runner.num_active_slots == 0
    for i, (question, thoughts, max_tokens) in enumerate(plan):
        if ids.get(aborted) == i:
            assert done[i].finish_reason == "abort"
            continue
        expected = reference(engine, question, thoughts, max_tokens, ignore_eos=True)
        assert done[i].token_ids == expected.token_ids, (i, question)
        assert done[i].num_thoughts == thoughts
