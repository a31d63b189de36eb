"""``rescale_thoughts``: thoughts shrink to the token-embedding scale, every logit stays put."""

from __future__ import annotations

import pytest
import torch

from engine.tiny import model_config
from engine.train.modeling import rescale_thoughts


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rescale_keeps_logits_and_matches_embedding_norm(arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(arch, 64, hidden=32, layers=2, heads=2, init_std=0.02,
                                                          bos_token_id=None, eos_token_id=None)).eval()
    ids = torch.randint(0, 64, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    alpha = rescale_thoughts(model, ids, mask)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    assert torch.allclose(before.logits[real], after.logits[real], atol=1e-4)
    assert torch.allclose(after.hidden_states[-1][real], alpha * before.hidden_states[-1][real], atol=1e-5)
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)[real].norm(dim=-1).mean()
    assert after.hidden_states[-1][real].norm(dim=-1).mean() == pytest.approx(float(emb), rel=1e-4)
    assert alpha < 0.5                                   # thoughts were much larger than embeddings


def test_rescale_refuses_tied_heads():
    from transformers import AutoModelForCausalLM

    config = model_config("gpt2", 64, hidden=32, layers=1, heads=2, bos_token_id=None, eos_token_id=None)
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="untied LM head"):
        rescale_thoughts(model, torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))


def test_scratch_init_sets_embedding_std_and_final_norm():
    from types import SimpleNamespace

    from engine.train.config import load_config
    from engine.train.modeling import build_scratch, final_norm

    config = load_config(None, ["init=scratch", "model.model_type=llama", "model.hidden_size=64",
                                "model.num_hidden_layers=1", "model.num_attention_heads=2",
                                "model.intermediate_size=64", "init_embedding_std=0.5", "init_final_norm=0.25",
                                "tokenizer_vocab_size=300"])
    records = [SimpleNamespace(question=f"Is Tom a wumpus{i}?", steps=["Tom is a wumpus."], answer="Tom is a wumpus.")
               for i in range(20)]
    model, _ = build_scratch(config, records)
    assert float(model.get_input_embeddings().weight.detach().std()) == pytest.approx(0.5, rel=0.1)
    assert torch.all(final_norm(model).weight == 0.25)
