"""engine.train.widen: a wider model computes what the narrow one did.

The oracle is the unwidened model itself: a tiny random Llama (tied embeddings, random
norm weights so that the RMSNorm rescaling matters) is run on the same tokens, in a token
forward and in a COCONUT forward where the last hidden state after the final norm is fed
back as the next input embedding (our own loop here, independent of engine.train.loss),
and the widened model's logits and thoughts are compared with it. The widened model's
new parameters must then receive gradients."""

from __future__ import annotations

import pytest
import torch

from engine.train.widen import widen_checkpoint, widen_model

VOCAB = 40


def tiny_llama(tied: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      tie_word_embeddings=tied, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.3, 1.7)
            else:
                p.normal_(0.0, 0.3)
    return model.eval()


def widen(model, noise=0.0):
    return widen_model(model, hidden_size=64, num_heads=8, intermediate_size=160, noise=noise, seed=1).eval()


def token_logits(model, ids):
    return model(input_ids=ids).logits


def coconut_forward(model, ids, thoughts: int):
    """Question tokens, then ``thoughts`` continuous thoughts (last hidden state after the
    final norm fed back as the next input embedding), then the answer tokens; returns the
    logits over the whole sequence and the thoughts."""
    question, answer = ids[:, :6], ids[:, 6:]
    embed = model.get_input_embeddings()
    embeds = embed(question)
    fed = []
    for _ in range(thoughts):
        hidden = model.model(inputs_embeds=embeds).last_hidden_state[:, -1:]
        fed.append(hidden)
        embeds = torch.cat([embeds, hidden], dim=1)
    embeds = torch.cat([embeds, embed(answer)], dim=1)
    return model(inputs_embeds=embeds).logits, torch.cat(fed, dim=1)


def _rmsnorm_in_input_dtype(self, hidden):
    """LlamaRMSNorm's formula without its cast to float32 (so float64 stays float64)."""
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture
def float64_norms(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(LlamaRMSNorm, "forward", _rmsnorm_in_input_dtype)


@pytest.fixture
def ids():
    return torch.randint(2, VOCAB, (3, 10), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("tied", [True, False])
def test_widened_model_without_noise_computes_the_same_logits_and_thoughts(ids, tied, float64_norms):
    # float64 throughout (norms included): the widened model may differ by rounding only
    narrow = tiny_llama(tied).double()
    wide = widen(narrow)
    assert wide.config.hidden_size == 64 and wide.config.num_attention_heads == 8
    assert wide.config.num_key_value_heads == 4 and wide.config.head_dim == 8
    assert wide.config.tie_word_embeddings == tied
    if tied:
        assert wide.get_output_embeddings().weight is wide.get_input_embeddings().weight
    with torch.no_grad():
        ref = token_logits(narrow, ids)
        assert ref.abs().max() > 1.0            # a non-trivial function
        torch.testing.assert_close(token_logits(wide, ids), ref, atol=1e-9, rtol=0)
        ref_logits, ref_thoughts = coconut_forward(narrow, ids, thoughts=4)
        logits, thoughts = coconut_forward(wide, ids, thoughts=4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-9, rtol=0)
    torch.testing.assert_close(thoughts[..., :32], ref_thoughts, atol=1e-9, rtol=0)
    assert thoughts[..., 32:].abs().max() == 0


@pytest.mark.parametrize("tied", [True, False])
def test_widened_model_in_float32_agrees_to_float32_rounding(ids, tied):
    narrow = tiny_llama(tied)
    wide = widen(narrow)
    with torch.no_grad():
        torch.testing.assert_close(token_logits(wide, ids), token_logits(narrow, ids), atol=1e-4, rtol=0)
        ref_logits, ref_thoughts = coconut_forward(narrow, ids, thoughts=4)
        logits, thoughts = coconut_forward(wide, ids, thoughts=4)
    torch.testing.assert_close(logits, ref_logits, atol=2e-4, rtol=0)
    torch.testing.assert_close(thoughts[..., :32], ref_thoughts, atol=2e-4, rtol=0)


def test_the_comparison_can_fail(ids, float64_norms):
    """Without the RMSNorm rescaling the widened model is a different function."""
    narrow = tiny_llama().double()
    wide = widen(narrow)
    with torch.no_grad():
        for name, p in wide.named_parameters():
            if name.endswith("norm.weight"):
                p.mul_(2 ** 0.5)        # undo sqrt(32 / 64)
        assert (token_logits(wide, ids) - token_logits(narrow, ids)).abs().max() > 1e-2
        for name, p in wide.named_parameters():
            if name.endswith("norm.weight"):
                p.div_(2 ** 0.5)
        assert (token_logits(wide, ids) - token_logits(narrow, ids)).abs().max() < 1e-9


def test_small_noise_moves_logits_little_and_every_new_parameter_learns(ids):
    narrow = tiny_llama()
    wide = widen(narrow, noise=1e-6)     # this random model amplifies a change ~40x through 4 thoughts
    with torch.no_grad():
        ref_logits, _ = coconut_forward(narrow, ids, thoughts=4)
        logits, _ = coconut_forward(wide, ids, thoughts=4)
    change = (logits - ref_logits).abs().max()
    assert 0 < change < 1e-2
    wide.train()
    logits, _ = coconut_forward(wide, ids, thoughts=4)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), torch.cat(
        [ids[:, 1:6], ids[:, 5:6].expand(-1, 4), ids[:, 6:]], dim=1).reshape(-1))
    loss.backward()
    params = dict(wide.named_parameters())
    new_blocks = {"model.embed_tokens.weight": (slice(None), slice(32, None))}
    for layer in range(2):
        p = f"model.layers.{layer}."
        new_blocks.update({
            p + "self_attn.o_proj.weight": (slice(32, None), slice(None)),      # writes new dims
            p + "self_attn.q_proj.weight": (slice(32, None), slice(None)),      # new heads
            p + "self_attn.k_proj.weight": (slice(16, None), slice(None)),
            p + "self_attn.v_proj.weight": (slice(16, None), slice(None)),
            p + "mlp.gate_proj.weight": (slice(64, None), slice(None)),         # new units
            p + "mlp.up_proj.weight": (slice(64, None), slice(None)),
            p + "mlp.down_proj.weight": (slice(None), slice(64, None)),
            p + "input_layernorm.weight": (slice(32, None),),
            p + "post_attention_layernorm.weight": (slice(32, None),),
        })
    new_blocks["model.norm.weight"] = (slice(32, None),)
    for name, index in new_blocks.items():
        grad = params[name].grad
        assert grad is not None, name
        block = grad[index]
        assert (block != 0).float().mean() > 0.5, f"{name}: new entries get no gradient"


def test_widen_checkpoint_round_trip(tmp_path, ids):
    from transformers import AutoModelForCausalLM

    narrow = tiny_llama()
    narrow.save_pretrained(tmp_path / "narrow")
    out = widen_checkpoint(tmp_path / "narrow", tmp_path / "wide", hidden_size=64, num_heads=8,
                           intermediate_size=160, noise=0.0)
    wide = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(token_logits(wide, ids), token_logits(narrow, ids), atol=2e-5, rtol=1e-5)


def test_nothing_may_shrink():
    with pytest.raises(ValueError, match="shrink"):
        widen_model(tiny_llama(), hidden_size=16, num_heads=4, intermediate_size=64)
