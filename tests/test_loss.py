"""``coconut_loss`` (n + 1 cached passes, batched) against ``naive_coconut_loss`` (per sample,
full recompute): loss and the gradients of every parameter, on tiny GPT-2 and Llama models."""

from __future__ import annotations

import pytest
import torch

from engine.tiny import model_config
from engine.train import coconut_loss, naive_coconut_loss

LATENT = 97
VOCAB = 100


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread avoids OpenMP waits on a busy 2-core machine (and the
    trainer's num_threads setting does not leak into other tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = model_config(arch, VOCAB, hidden=32, layers=2, heads=4, init_std=0.1,
                          bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config).eval()  # eval: no dropout, gradients still flow


def make_batch(rows: list[tuple[int, int, int]], width: int, seed: int = 1) -> dict:
    """rows: (real length, first placeholder column, number of placeholders); right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (len(rows), width), generator=g)
    mask = torch.zeros_like(ids)
    for i, (length, first, count) in enumerate(rows):
        mask[i, :length] = 1
        ids[i, first:first + count] = LATENT
        ids[i, length:] = 0
    labels = ids.masked_fill((ids == LATENT) | (mask == 0), -100)
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(loss, model):
    return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def assert_matches(model, batch, latent=LATENT):
    fast = coconut_loss(model, batch, latent)
    slow = naive_coconut_loss(model, batch, latent)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-6), (fast.item(), slow.item())
    names = [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, grads(fast, model), grads(slow, model)):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (name, (a - b).abs().max().item())
    return fast


MIXED_ROWS = [
    (16, 4, 3),    # full row, thoughts at columns 4..6
    (12, 7, 2),    # right-padded, later offset, fewer thoughts
    (10, 0, 0),    # no thoughts at all, padded
    (14, 2, 1),    # earliest offset, one thought
]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_mixed_offsets_counts_and_padding(arch):
    model = tiny_model(arch)
    assert_matches(model, make_batch(MIXED_ROWS, width=16))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batch_without_placeholders_is_the_plain_lm_loss(arch):
    model = tiny_model(arch)
    batch = make_batch([(9, 0, 0), (12, 0, 0)], width=12)
    loss = assert_matches(model, batch)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    # Hugging Face's own loss (right padding, default positions) is an independent check
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(coconut_loss(model, batch, None), ref, rtol=1e-5, atol=1e-6)


def test_left_padded_rows_with_explicit_position_ids():
    """The reference collator's layout: rows left-padded so that thoughts already align."""
    model = tiny_model("gpt2")
    batch = make_batch([(16, 6, 2), (13, 3, 2), (16, 5, 1)], width=16)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # left-pad row 1 by 3 columns (drop its right padding) and give explicit position ids
    row = ids[1, :13]
    ids[1] = torch.cat([torch.zeros(3, dtype=torch.long), row])
    mask[1] = torch.cat([torch.zeros(3, dtype=torch.long), torch.ones(13, dtype=torch.long)])
    batch["labels"] = ids.masked_fill((ids == LATENT) | (mask == 0), -100)
    batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    assert_matches(model, batch)


def test_many_thoughts_and_single_row():
    model = tiny_model("llama", seed=3)
    assert_matches(model, make_batch([(20, 3, 6)], width=20))


def test_thoughts_change_the_loss():
    """The oracle must be able to fail: feeding placeholders as tokens is a different loss."""
    model = tiny_model("gpt2")
    batch = make_batch(MIXED_ROWS, width=16)
    pause = coconut_loss(model, batch, None)    # placeholders fed as the latent token's embedding
    assert not torch.allclose(pause, naive_coconut_loss(model, batch, LATENT), rtol=1e-4)


def test_bad_batches_are_named():
    model = tiny_model("gpt2")
    batch = make_batch([(10, 3, 2)], width=10)
    batch["input_ids"][0, 7] = LATENT
    with pytest.raises(ValueError, match="row 0: latent placeholders .* contiguous"):
        coconut_loss(model, batch, LATENT)
    batch = make_batch([(10, 0, 2)], width=10)
    with pytest.raises(ValueError, match="first real position"):
        coconut_loss(model, batch, LATENT)
    batch = make_batch([(10, 3, 2)], width=10)
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no labelled positions"):
        coconut_loss(model, batch, LATENT)
    with pytest.raises(ValueError, match="missing 'labels'"):
        coconut_loss(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, LATENT)


def test_extra_passes_change_nothing():
    """FSDP pads every rank to the same number of passes; the loss and gradients must not move."""
    model = tiny_model("gpt2")
    from engine.train.loss import coconut_hidden_states, lm_loss_from_hidden

    for rows in (MIXED_ROWS, [(10, 0, 0), (12, 0, 0)]):
        batch = make_batch(rows, width=16)
        plain = coconut_loss(model, batch, LATENT)
        out = coconut_hidden_states(model, batch, LATENT, min_passes=6)
        padded = lm_loss_from_hidden(model, out.hidden, out.labels)
        assert torch.allclose(plain, padded, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads(plain, model), grads(padded, model)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_projected_thoughts_match_naive(arch):
    """``latent_projection``: thoughts fed as CODI's prj(h); loss and the gradients of the model's
    and the projection's parameters against the naive loss with the same projection."""
    from engine.feedback import LatentProjection

    model = tiny_model(arch)
    torch.manual_seed(2)
    prj = LatentProjection(32, 48).eval()
    batch = make_batch(MIXED_ROWS, 16)
    fast = coconut_loss(model, batch, LATENT, projection=prj)
    slow = naive_coconut_loss(model, batch, LATENT, projection=prj)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-6), (fast.item(), slow.item())
    assert not torch.allclose(fast, coconut_loss(model, batch, LATENT), rtol=1e-4)
    params = list(model.parameters()) + list(prj.parameters())
    for a, b in zip(torch.autograd.grad(fast, params, allow_unused=True),
                    torch.autograd.grad(slow, params, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max().item()
    prj_grads = torch.autograd.grad(coconut_loss(model, batch, LATENT, projection=prj), list(prj.parameters()))
    assert all(g.abs().sum() > 0 for g in prj_grads)
