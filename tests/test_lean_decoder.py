"""The lean decode forward (``engine.runner.lean_decoder``): which models take it, and that
one decode step through it gives the hidden states the model's own modules give from the
same cache (the token-level oracle, the naive full-recompute reference, runs over it in
``test_engine_reference``'s llama and qwen2 engines, which take this path by default)."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, LatentPolicy, SamplingParams
from engine.runner import lean_decoder
from engine.runner.lean_decoder import LeanDecoder
from engine.runner.model_runner import ModelRunner
from engine.runner.plan import DecodeRow, PrefillChunk
from tests.engine_helpers import QUESTIONS, reference


@pytest.mark.parametrize("arch, supported", [("llama", True), ("qwen2", True), ("gpt2", False),
                                             ("gemma2", False), ("gpt_neox", False)])
def test_which_models_take_the_lean_path(tiny_checkpoint, arch, supported):
    engine = Engine.from_pretrained(tiny_checkpoint(arch), max_batch_size=2)
    reason = LeanDecoder.reason_unsupported(engine.checkpoint.model)
    assert (reason is None) is supported, reason
    assert engine.runner.lean_decode is supported
    if not supported:
        with pytest.raises(ValueError, match="does not support this model"):
            LeanDecoder(engine.checkpoint.model)


def test_off_switch_and_compile_use_the_modules(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    assert Engine.from_pretrained(path, max_batch_size=2, lean_decode=False).runner.lean_decode is False
    model = Engine.from_pretrained(path, max_batch_size=2).checkpoint.model
    assert ModelRunner(model, 0, num_slots=2, max_seq_len=64, compile=True).lean_decode is False


@pytest.mark.parametrize("matmul_rows", [1, 10 ** 9], ids=["matmul-attention", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_one_decode_step_equals_the_modules(tiny_checkpoint, arch, matmul_rows, monkeypatch):
    """Two runners on one checkpoint prefill the same three prompts of different lengths
    into slots 0, 1 and 3, then decode one position of slots 0, 1 and 3 (slot 2 free): the
    lean forward's hidden states and cache equal the modules', with either attention."""
    monkeypatch.setattr(lean_decoder, "MATMUL_ATTENTION_MIN_ROWS", matmul_rows)
    path = tiny_checkpoint(arch)
    runners = []
    for lean in (True, False):
        model = Engine.from_pretrained(path, max_batch_size=1, lean_decode=False).checkpoint.model
        runners.append(ModelRunner(model, 0, num_slots=4, max_seq_len=64, lean_decode=lean))
    lean, plain = runners
    assert lean.lean_decode and not plain.lean_decode
    prompts = {0: [5, 9, 2, 7], 1: [3, 3, 8, 1, 6, 2, 4], 3: [11, 4]}
    hidden = []
    for runner in runners:
        runner._prefill([PrefillChunk(request_id=str(s), slot=s, token_ids=tuple(ids), start=0, last=True)
                         for s, ids in prompts.items()])
        _, out = runner._decode([DecodeRow(request_id=str(s), slot=s, feed_token=10 + s) for s in prompts])
        hidden.append(out)
    torch.testing.assert_close(hidden[0], hidden[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(lean.cache.layers, plain.cache.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)


def test_lean_path_in_latent_mode_matches_reference(tiny_checkpoint):
    engine = Engine.from_pretrained(tiny_checkpoint("qwen2"), max_batch_size=4)
    assert engine.runner.lean_decode
    questions = QUESTIONS[:4]
    results = engine.generate(questions, SamplingParams(max_tokens=8), LatentPolicy(mode="fixed", thoughts=5))
    for question, result in zip(questions, results):
        assert result.token_ids == reference(engine, question, 5, max_tokens=8).token_ids, question
