"""The lean forward (``engine.runner.lean_decoder``, ``flat_batch``): which models take it,
and that its steps (decode rows and prompt chunks in one flat batch) leave the output
states and caches the model's own modules leave (the token-level oracle, the naive full-recompute reference, runs over it in
``test_engine_reference``'s llama and qwen2 engines, which take this path by default)."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, LatentPolicy, SamplingParams
from engine.runner import flat_batch
from engine.runner.lean_decoder import LeanDecoder
from engine.runner.model_runner import ModelRunner
from engine.runner.plan import DecodeRow, PrefillChunk, StepPlan
from tests.engine_helpers import QUESTIONS, assert_same_slot_state, reference


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


def test_off_switch_uses_the_modules_and_compile_keeps_the_lean_path(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    assert Engine.from_pretrained(path, max_batch_size=2, lean_decode=False).runner.lean_decode is False
    model = Engine.from_pretrained(path, max_batch_size=2).checkpoint.model
    runner = ModelRunner(model, 0, num_slots=2, max_seq_len=64, compile=True)
    assert runner.lean_decode and runner.compiled_decode is not None   # on CPU (test_compiled_decode)


def _runner_pair(path):
    runners = []
    for lean in (True, False):
        model = Engine.from_pretrained(path, max_batch_size=1, lean_decode=False).checkpoint.model
        runners.append(ModelRunner(model, 0, num_slots=5, max_seq_len=64, lean_decode=lean))
    assert runners[0].lean_decode and not runners[1].lean_decode
    return runners


@pytest.mark.parametrize("matmul_rows", [1, 10 ** 9], ids=["matmul-attention", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_steps_equal_the_modules(tiny_checkpoint, arch, matmul_rows, monkeypatch):
    """Two runners on one checkpoint run the same plans, one through the lean flat forward
    and one through the modules (a decode forward, then a prefill forward): the slots' output
    states and caches agree after each. The plans: three prompts of different lengths into
    slots 0, 1 and 3; a decode step of those slots (slot 2 free: a padding row) together with
    a new prompt's first chunk into slot 2 and another's into slot 4; then decode rows with
    slot 2's second chunk and slot 4's last, with either attention of the decode rows."""
    monkeypatch.setattr(flat_batch, "MATMUL_ATTENTION_MIN_ROWS", matmul_rows)
    lean, plain = _runner_pair(tiny_checkpoint(arch))
    prompts = {0: (5, 9, 2, 7), 1: (3, 3, 8, 1, 6, 2, 4), 3: (11, 4)}
    plans = [
        lambda: StepPlan(prefill=[PrefillChunk(request_id=str(s), slot=s, token_ids=ids, start=0, last=True)
                                  for s, ids in prompts.items()]),
        lambda: StepPlan(decode=[DecodeRow(request_id=str(s), slot=s, feed_token=10 + s) for s in prompts],
                         prefill=[PrefillChunk(request_id="2", slot=2, token_ids=(7, 7, 1), start=0, last=False),
                                  PrefillChunk(request_id="4", slot=4, token_ids=(2, 6), start=0, last=False)]),
        lambda: StepPlan(decode=[DecodeRow(request_id=str(s), slot=s, feed_token=12 - s) for s in (0, 3)],
                         prefill=[PrefillChunk(request_id="2", slot=2, token_ids=(9, 5, 3, 8), start=3, last=True),
                                  PrefillChunk(request_id="4", slot=4, token_ids=(1,), start=2, last=True)]),
    ]
    for make in plans:
        plan = make()
        outputs = [runner.execute(plan) for runner in (lean, plain)]
        assert outputs[0].keys() == outputs[1].keys()
        assert_same_slot_state(lean, plain, sorted({r.slot for r in plan.decode} | {c.slot for c in plan.prefill}))


def test_a_prompt_that_fills_its_slot_beside_a_padding_row(tiny_checkpoint):
    """A chunk that writes a slot's last column while that slot rides along as a padding row
    of the decode rows (which write their slot's last column too): the chunk's key wins."""
    lean, plain = _runner_pair(tiny_checkpoint("llama"))
    for runner in (lean, plain):
        runner.execute(StepPlan(prefill=[PrefillChunk(request_id="b", slot=1, token_ids=(4, 2), start=0, last=True)]))
    full = tuple(range(3, 3 + 64))
    plan = StepPlan(decode=[DecodeRow(request_id="b", slot=1, feed_token=5)],
                    prefill=[PrefillChunk(request_id="a", slot=0, token_ids=full, start=0, last=True)])
    for runner in (lean, plain):
        runner.execute(plan)
    assert_same_slot_state(lean, plain, [0, 1])


def test_lean_path_in_latent_mode_matches_reference(tiny_checkpoint):
    engine = Engine.from_pretrained(tiny_checkpoint("qwen2"), max_batch_size=4)
    assert engine.runner.lean_decode
    questions = QUESTIONS[:4]
    results = engine.generate(questions, SamplingParams(max_tokens=8), LatentPolicy(mode="fixed", thoughts=5))
    for question, result in zip(questions, results):
        assert result.token_ids == reference(engine, question, 5, max_tokens=8).token_ids, question


def test_split_rows_reads_the_fewest_columns():
    """By hand: 15 rows of 100 keys and one of 4000 read 1,500 + 4,000 + one long row's
    overhead columns split, against 64,000 cut at the longest: split at 100 with row 15
    long; rows of one length, or too few rows, are not split; two long rows of 3000 and
    2000 beside ten of 50 are both taken apart at 50 (6,012 columns against 25,256 for one)."""
    split_rows = flat_batch.split_rows
    assert split_rows([100] * 15 + [4000]) == (100, [15])
    assert split_rows([100] * 16) is None
    assert split_rows([4000]) is None
    assert split_rows([50] * 10 + [3000, 2000]) == (50, [10, 11])
    assert split_rows([3000] + [50] * 10 + [2000]) == (50, [0, 11])
    assert split_rows([100, 120, 130]) is None                   # a long row's overhead outweighs


@pytest.mark.parametrize("slots", [9, 4], ids=["matmul-rows", "few-rows"])
def test_long_rows_attended_apart_equal_the_modules(tiny_checkpoint, slots, monkeypatch):
    """Decode rows of very different lengths: two long prompts beside short ones, so that
    the lean step attends every row over the short rows' columns and each long row over the
    rest of its own (``split_rows``, its overhead set to nothing so that these tiny lengths
    split); the states and caches equal the modules' after each of two decode steps."""
    monkeypatch.setattr(flat_batch, "LONG_ROW_COLUMNS", 0)
    splits = []
    original = flat_batch.split_rows
    monkeypatch.setattr(flat_batch, "split_rows", lambda lengths: splits.append(original(lengths)) or splits[-1])
    runners = []
    for lean in (True, False):
        model = Engine.from_pretrained(tiny_checkpoint("llama"), max_batch_size=1, lean_decode=False).checkpoint.model
        runners.append(ModelRunner(model, 0, num_slots=slots, max_seq_len=64, lean_decode=lean))
    lean, plain = runners
    long = {1: tuple(range(3, 33)), slots - 1: tuple(range(5, 50))}
    prompts = {s: long.get(s, (4 + s, 9, 2)) for s in range(slots)}
    prefill = StepPlan(prefill=[PrefillChunk(request_id=str(s), slot=s, token_ids=ids, start=0, last=True)
                                for s, ids in prompts.items()])
    for runner in (lean, plain):
        runner.execute(prefill)
    for step in range(2):
        plan = StepPlan(decode=[DecodeRow(request_id=str(s), slot=s, feed_token=10 + s + step) for s in prompts])
        for runner in (lean, plain):
            runner.execute(plan)
        assert_same_slot_state(lean, plain, list(prompts))
    assert [s for s in splits if s is not None] == [(4 + step, [1, slots - 1]) for step in range(2)]
