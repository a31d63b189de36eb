"""Weights packed by oneDNN (``engine.runner.packed_linear``): the products equal
``F.linear``'s on the dense weight up to rounding, and an engine that packs its model
decodes token for token as the naive full-recompute reference does on an unpacked copy of
the same checkpoint (language and latent mode, chunked prefill, staggered arrivals)."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, EngineConfig, LatentPolicy, SamplingParams
from engine.runner import packed_linear
from engine.runner.model_runner import ModelRunner
from engine.runner.packed_linear import PackedLinear, pack_linears, should_pack
from tests.engine_helpers import QUESTIONS, reference, run_staggered

pytestmark = pytest.mark.skipif(not packed_linear.can_pack(torch.float32, torch.device("cpu")),
                                reason="this torch build cannot pack float32 weights with oneDNN")


def _kernel(monkeypatch, kernel: str):
    """Make PackedLinear take ``kernel`` ("engine" where it builds here, or "onednn")."""
    if kernel == "onednn":
        if not packed_linear.onednn_can_pack(torch.float32, torch.device("cpu")):
            pytest.skip("this torch build cannot pack float32 weights with oneDNN")
        monkeypatch.setattr(packed_linear, "_engine_kernel_takes", lambda weight: False)
    elif packed_linear.engine_kernel_unavailable() is not None:
        pytest.skip(f"the engine's CPU kernel is unavailable here: {packed_linear.engine_kernel_unavailable()}")


@pytest.mark.parametrize("kernel,out", [("engine", 24), ("engine", 48), ("onednn", 24)],
                         ids=["engine-rows", "engine-blocks", "onednn"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 40), (5, 40), (2, 3, 40), (33, 40)])
def test_packed_linear_equals_dense_product(bias, shape, kernel, out, monkeypatch):
    _kernel(monkeypatch, kernel)
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, out, bias=bias)
    x = torch.randn(*shape)
    expected = torch.nn.functional.linear(x, linear.weight, linear.bias)
    packed = PackedLinear(linear)
    assert packed.kernel == kernel
    with torch.inference_mode():
        got = packed(x)
        transposed = packed(x.transpose(-1, -2).contiguous().transpose(-1, -2))   # a strided input
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(transposed, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.dense_weight(), linear.weight.detach())


def test_pack_linears_replaces_exactly_linear_modules():
    class Marked(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Linear(8, 4), Marked(4, 4)))
    assert pack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
    assert type(model[2][1]) is Marked                  # a subclass may change forward: left alone
    assert not any(name.endswith("packed_weight") for name, _ in model.named_parameters())


def test_merged_linears_equal_their_parts():
    """Three linears reading one input, one with a bias, merged into one packed product: the
    merged output is the parts' outputs side by side, and each slice left in a part's place
    gives that part's output; parts that are not all packed are left alone."""
    torch.manual_seed(0)
    parts = [torch.nn.Linear(40, 24, bias=False), torch.nn.Linear(40, 8, bias=True), torch.nn.Linear(40, 8, bias=False)]
    holder = torch.nn.Module()
    for name, part in zip("qkv", parts):
        setattr(holder, name, PackedLinear(part))
    x = torch.randn(5, 40)
    expected = [torch.nn.functional.linear(x, p.weight, p.bias) for p in parts]
    with torch.inference_mode():
        merged = packed_linear.merge_in_place(holder, ["q", "k", "v"])
        assert merged is not None and merged.out_features == 40
        torch.testing.assert_close(merged(x), torch.cat(expected, dim=-1), rtol=1e-5, atol=1e-5)
        for name, want in zip("qkv", expected):
            piece = getattr(holder, name)
            assert isinstance(piece, packed_linear.PackedSlice) and piece.merged is merged
            torch.testing.assert_close(piece(x), want, rtol=1e-5, atol=1e-5)
    plain = torch.nn.Module()
    plain.a, plain.b = PackedLinear(parts[0]), torch.nn.Linear(40, 8)
    assert packed_linear.merge_in_place(plain, ["a", "b"]) is None
    assert type(plain.a) is PackedLinear and type(plain.b) is torch.nn.Linear


def test_a_packed_lean_model_holds_each_weight_once(tiny_checkpoint):
    """The lean forward merges a packed layer's q, k, v and its gate, up: the decoder then
    holds four packed products per layer (merged ones once), no dense copies."""
    engine = Engine.from_pretrained(tiny_checkpoint("llama"), max_batch_size=2, pack_weights="on")
    assert engine.runner.lean_decode
    decoder = engine.checkpoint.model.get_decoder()
    packed = [m for m in decoder.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 4 * len(decoder.layers)
    assert not any(isinstance(m, torch.nn.Linear) for m in decoder.modules())
    attention = decoder.layers[0].self_attn
    assert attention.q_proj.merged is attention.k_proj.merged is attention.v_proj.merged


def test_should_pack_choices(monkeypatch):
    small = torch.nn.Linear(16, 16)
    assert should_pack(small, "off") is False
    assert should_pack(small, "on") is True
    assert should_pack(small, "auto") is False          # below PACK_MIN_BYTES
    monkeypatch.setattr(packed_linear, "PACK_MIN_BYTES", 16 * 16 * 4)
    assert should_pack(small, "auto") is True
    with pytest.raises(ValueError, match="expected one of auto, on, off"):
        should_pack(small, "yes")
    with pytest.raises(ValueError, match="needs float32"):
        should_pack(torch.nn.Linear(16, 16).half(), "on")
    assert should_pack(torch.nn.Linear(16, 16).half(), "auto") is False


def test_config_and_compile_refuse_bad_combinations(tiny_checkpoint):
    with pytest.raises(ValueError, match="pack_weights='sometimes' is invalid"):
        EngineConfig(pack_weights="sometimes")
    # a model compiled through its modules (GPT-2: not the lean path, whose compiled step packs)
    engine = Engine.from_pretrained(tiny_checkpoint("gpt2"), max_batch_size=2, pack_weights="off")
    with pytest.raises(ValueError, match="do not go together"):
        ModelRunner(engine.checkpoint.model, 0, compile=True, pack_weights="on")


@pytest.fixture(scope="module", params=[("llama", "engine"), ("llama", "onednn"), ("gpt2", "engine"),
                                        ("gemma2", "engine"), ("llama", "engine", 368)],
                ids=lambda p: "-".join(map(str, p)))
def engines(request, tiny_checkpoint):
    """(packed engine, an unpacked engine of the same checkpoint for the oracle); the packed
    one multiplies with the kernel named in the parameter. A third value widens the
    vocabulary to that many rows (368 = 23 x 16: the head's product in blocks of 16; the
    tokenizer's 361 tokens leave the others to the product alone)."""
    arch, kernel, *vocab = request.param
    path = tiny_checkpoint(arch, model_vocab_size=vocab[0]) if vocab else tiny_checkpoint(arch)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _kernel(monkeypatch, kernel)
        packed = Engine.from_pretrained(path, max_batch_size=4, max_prefill_tokens=7, pack_weights="on")
    adapter = packed.runner.adapter
    assert {m.kernel for m in adapter.decoder.modules() if isinstance(m, PackedLinear)} | {adapter.head_packed.kernel} \
        == {kernel}
    plain = Engine.from_pretrained(path, max_batch_size=1, pack_weights="off")
    return packed, plain


def test_packed_engine_packs(engines):
    packed, plain = engines
    adapter = packed.runner.adapter
    assert adapter.head_packed is not None
    head = adapter.lm_head.weight
    if adapter.head_packed.kernel == "engine":    # a copy in blocks where the vocabulary allows
        assert adapter.head_packed.rows.layout == ("blocks" if head.shape[0] % 16 == 0 else "rows")
    assert torch.equal(adapter.head_packed.dense_weight(), head)      # and the model's head stays
    linears = [m for m in adapter.decoder.modules() if type(m) is torch.nn.Linear]
    assert not linears and adapter.packed_linears == sum(
        1 for m in plain.runner.adapter.decoder.modules() if type(m) is torch.nn.Linear)
    assert plain.runner.adapter.packed_linears == 0 and plain.runner.adapter.head_packed is None


@pytest.mark.parametrize("thoughts", [0, 3])
def test_packed_greedy_matches_reference(engines, thoughts):
    packed, plain = engines
    questions = QUESTIONS[:6]
    results = packed.generate(questions, SamplingParams(max_tokens=10), LatentPolicy(mode="fixed", thoughts=thoughts))
    for question, result in zip(questions, results):
        assert result.token_ids == reference(plain, question, thoughts, max_tokens=10).token_ids, question


def test_packed_staggered_arrivals_match_reference(engines):
    packed, plain = engines
    plan = [(QUESTIONS[k], k % 4, 3 + k % 5) for k in range(8)]

    def add(k):
        question, thoughts, max_tokens = plan[k]
        return packed.add_request(question, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                  LatentPolicy(mode="fixed", thoughts=thoughts))

    for k, out in enumerate(run_staggered(packed, len(plan), add)):
        question, thoughts, max_tokens = plan[k]
        assert out.token_ids == reference(plain, question, thoughts, max_tokens, ignore_eos=True).token_ids, k
