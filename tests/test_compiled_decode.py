"""The compiled lean decode step (``engine.runner.compiled_decode``): which models and steps
take it, and that its steps leave the output states and caches the model's own modules
leave (the oracle: a second runner on the same checkpoint that runs every step through the
modules). The naive full-recompute reference runs over it in ``test_engine_reference``'s
compiled churn test."""

from __future__ import annotations

import pytest
import torch

from engine import Engine
from engine.runner.compiled_decode import CompiledDecode
from engine.runner import packed_linear
from engine.runner.packed_linear import PackedLinear
from engine.runner.model_runner import ModelRunner
from engine.runner.plan import DecodeRow, PrefillChunk, StepPlan
from tests.engine_helpers import assert_same_slot_state


def _runners(path, pack: str):
    """(compiled runner, runner through the modules) on one checkpoint, 5 slots each."""
    runners = []
    for compiled in (True, False):
        model = Engine.from_pretrained(path, max_batch_size=1, lean_decode=False).checkpoint.model
        runners.append(ModelRunner(model, 0, num_slots=5, max_seq_len=64, compile=compiled,
                                   pack_weights=pack if compiled else "off", lean_decode=compiled))
    assert runners[0].compiled_decode is not None and not runners[1].lean_decode
    return runners


@pytest.mark.parametrize("pack", ["off", "on", "onednn"],
                         ids=["separate-products", "packed-merged-products", "onednn-merged-products"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compiled_steps_equal_the_modules(tiny_checkpoint, arch, pack, monkeypatch):
    """Three prompts into slots 0, 1 and 3 (eager: a step with prompts), then decode-only
    steps through the compiled graph: slots 0-3 with slot 2 free (a padding row), one row in
    latent mode (fed its last state), rows of different lengths; then slot 0 alone (the
    one-row graph). Output states and caches agree with the modules' after every step, and
    every decode-only step ran compiled."""
    if pack == "onednn":     # oneDNN's packed products instead of the engine's kernel
        if not packed_linear.onednn_can_pack(torch.float32, torch.device("cpu")):
            pytest.skip("this torch build cannot pack float32 weights with oneDNN")
        monkeypatch.setattr(packed_linear, "_engine_kernel_takes", lambda weight: False)
    compiled, plain = _runners(tiny_checkpoint(arch), "off" if pack == "off" else "on")
    kernels = {m.kernel for m in compiled.adapter.decoder.modules() if isinstance(m, PackedLinear)}
    assert kernels == {"off": set(), "on": {"engine"} if packed_linear.engine_kernel_unavailable() is None
                       else {"onednn"}, "onednn": {"onednn"}}[pack]
    if kernels == {"engine"}:   # the decoder's weights in blocks of 16 outputs (the tiny model's are multiples)
        assert {m.rows.layout for m in compiled.adapter.decoder.modules() if isinstance(m, PackedLinear)} == {"blocks"}
    # the engine's kernel is called from the graph through its C++ table where its operators built
    from engine.runner import cpu_kernel
    through_table = kernels == {"engine"} and cpu_kernel.operators_reason() is None
    assert (compiled.compiled_decode.kernel_table is not None) == through_table
    assert compiled.compiled_decode.spec.kernel_table == through_table
    calls = []
    graph = compiled.compiled_decode
    compiled.compiled_decode = lambda *a: calls.append(a[0].shape[0]) or graph(*a)
    prompts = {0: (5, 9, 2, 7), 1: (3, 3, 8, 1, 6, 2, 4), 3: (11, 4)}
    plans = [StepPlan(prefill=[PrefillChunk(request_id=str(s), slot=s, token_ids=ids, start=0, last=True)
                               for s, ids in prompts.items()])]
    plans += [StepPlan(decode=[DecodeRow(request_id=str(s), slot=s, feed_token=None if (s, k) == (1, 1) else 10 + s + k)
                               for s in prompts]) for k in range(3)]
    plans += [StepPlan(decode=[DecodeRow(request_id="0", slot=0, feed_token=6)]) for _ in range(2)]
    for plan in plans:
        outputs = [runner.execute(plan) for runner in (compiled, plain)]
        assert outputs[0].keys() == outputs[1].keys()
        assert_same_slot_state(compiled, plain, sorted({r.slot for r in plan.decode} | {c.slot for c in plan.prefill}))
    assert calls == [4, 4, 4, 1, 1]


def test_which_models_and_steps_take_the_compiled_step(tiny_checkpoint):
    from transformers.activations import ACT2FN

    path = tiny_checkpoint("llama")
    model = Engine.from_pretrained(path, max_batch_size=2).checkpoint.model
    assert CompiledDecode.reason_unsupported(model) is None
    # the lean forward off, or a model it does not take: the modules' compiled step
    assert ModelRunner(model, 0, num_slots=2, max_seq_len=64, compile=True, lean_decode=False).compile_modules
    gpt2 = Engine.from_pretrained(tiny_checkpoint("gpt2"), max_batch_size=2).checkpoint.model
    runner = ModelRunner(gpt2, 0, num_slots=2, max_seq_len=64, compile=True)
    assert runner.compile_modules and runner.compiled_decode is None and runner.decode_buckets == [1, 2]
    # a gate the graph does not have
    gelu = Engine.from_pretrained(path, max_batch_size=2, lean_decode=False).checkpoint.model
    for layer in gelu.get_decoder().layers:
        layer.mlp.act_fn = ACT2FN["gelu"]
    assert "activation" in CompiledDecode.reason_unsupported(gelu)
    assert ModelRunner(gelu, 0, num_slots=2, max_seq_len=64, compile=True).compile_modules
    # a step with a prompt chunk, or a long row attended apart, stays eager
    runner = ModelRunner(model, 0, num_slots=2, max_seq_len=64)
    runner.execute(StepPlan(prefill=[PrefillChunk(request_id="a", slot=0, token_ids=(4, 2), start=0, last=True)]))
    from engine.runner.flat_batch import flat_layout

    def batch_of(rows, chunks):
        layout = flat_layout(rows, chunks, runner.lengths, 64, 0)
        return layout.batch(runner.lean.kv_heads, runner.lean.groups, runner.lean.scaling, torch.float32,
                            torch.device("cpu"))

    row = DecodeRow(request_id="a", slot=0, feed_token=3)
    chunk = PrefillChunk(request_id="b", slot=1, token_ids=(7,), start=0, last=True)
    assert CompiledDecode.takes(batch_of([row], []), runner.cache)
    assert not CompiledDecode.takes(batch_of([row], [chunk]), runner.cache)
    split = batch_of([row], [])
    split.decode.split = (1, [0])
    assert not CompiledDecode.takes(split, runner.cache)


def test_compiled_where_it_pays_by_default(tiny_checkpoint, monkeypatch):
    """compile=None (engine serve's default) compiles a Llama model's step on CPU when its
    weights are packed (a real model's size) and a C++ compiler is on the PATH, else says
    why not."""
    from engine.runner import compiled_decode, packed_linear

    reason = compiled_decode.reason_not_compiled_by_default

    def model(arch="llama"):
        return Engine.from_pretrained(tiny_checkpoint(arch), max_batch_size=1, lean_decode=False).checkpoint.model

    tiny = model()
    assert "not packed" in reason(tiny)
    runner = ModelRunner(tiny, 0, num_slots=2, max_seq_len=64, compile=None)
    assert runner.compiled_decode is None and not runner.compile_modules and "not packed" in runner.compile_reason
    monkeypatch.setattr(packed_linear, "PACK_MIN_BYTES", 0)      # as big as a real model
    assert reason(model()) is None
    runner = ModelRunner(model(), 0, num_slots=2, max_seq_len=64, compile=None)
    assert runner.compiled_decode is not None and runner.compile_reason is None
    assert isinstance(runner.lean.layers[0].o_proj, PackedLinear)
    assert "not packed" in reason(model(), "off")
    assert "lean forward is off" in reason(model(), lean_decode=False)
    assert "Llama-style" in reason(model("gpt2")) or "decoder" in reason(model("gpt2"))
    monkeypatch.setattr(compiled_decode.shutil, "which", lambda name: None)
    assert "C++ compiler" in reason(model())


def test_one_slot_runner_warms_up_and_decodes_compiled(tiny_checkpoint):
    """An engine of one slot (max_batch_size=1) compiles only the one-row graph at start
    (warming the two-row graph needs a second slot), then decodes through it: the same
    states as the modules' runner."""
    path = tiny_checkpoint("llama")
    compiled, plain = [ModelRunner(Engine.from_pretrained(path, max_batch_size=1, lean_decode=False).checkpoint.model,
                                   0, num_slots=1, max_seq_len=64, compile=c, pack_weights="off", lean_decode=c)
                       for c in (True, False)]
    assert compiled.warm_up() > 0 and compiled.lengths == [0]
    calls = []
    graph = compiled.compiled_decode
    compiled.compiled_decode = lambda *a: calls.append(a[0].shape[0]) or graph(*a)
    plans = [StepPlan(prefill=[PrefillChunk(request_id="a", slot=0, token_ids=(5, 9, 2), start=0, last=True)])]
    plans += [StepPlan(decode=[DecodeRow(request_id="a", slot=0, feed_token=10 + k)]) for k in range(3)]
    for plan in plans:
        compiled.execute(plan)
        plain.execute(plan)
        assert_same_slot_state(compiled, plain, [0])
    assert calls == [1, 1, 1]
