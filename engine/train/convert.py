"""Converting a checkpoint saved by the reference implementation into our format.

The reference saves ``torch.save(model.state_dict())`` of its ``Coconut`` wrapper, whose
keys start with ``base_causallm.``, after adding ``<|start-latent|>``,
``<|end-latent|>`` and ``<|latent|>`` (in that order) to the base tokenizer and resizing
the embeddings. ``convert_reference`` rebuilds that model from the base model directory,
loads the weights (``torch.load(weights_only=True)``: tensors only, never arbitrary
pickles; every key must match a parameter of the right shape) and writes a servable
checkpoint. It knows nothing of training.
"""

from __future__ import annotations

from pathlib import Path

from engine.checkpoint import CoconutConfig, save_checkpoint
from engine.train.modeling import REFERENCE_PREFIX, add_markers, load_pretrained, load_reference_state_dict


def convert_reference(checkpoint: str | Path, base: str | Path, out: str | Path, *, num_thoughts: int = 6,
                      c_thought: int = 1, max_latent_stage: int = 6, method: str = "coconut") -> Path:
    import torch

    model, tokenizer = load_pretrained(base)
    coconut = CoconutConfig(num_thoughts=num_thoughts, c_thought=c_thought, max_latent_stage=max_latent_stage,
                            method=method, training={"converted_from": str(checkpoint), "base": str(base)})
    add_markers(model, tokenizer, coconut, init_token="<<")
    state = load_reference_state_dict(checkpoint)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ValueError(f"{checkpoint}: keys {unexpected[:5]} match no parameter of the base model from {base} "
                         f"(expected keys like {REFERENCE_PREFIX}{next(iter(own))})")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{checkpoint}: '{key}' has shape {tuple(value.shape)}, the base model's (with the "
                             f"three markers added) has {tuple(own[key].shape)}")
    missing = sorted(set(own) - set(state))
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)}
    if set(missing) - tied:
        raise ValueError(f"{checkpoint}: missing weights {sorted(set(missing) - tied)[:5]}")
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    return save_checkpoint(out, model, tokenizer, coconut)
