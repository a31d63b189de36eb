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
