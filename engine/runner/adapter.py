"""A thin adapter over any Hugging Face causal LM: embed, forward one chunk, project.

The runner talks to models only through ``DecoderAdapter``, which hides the few ways
transformers models differ: the name of the cache argument (``cache`` in transformers
5.24+, ``past_key_values`` before), whether ``position_ids`` is accepted (ALiBi models
such as BLOOM derive positions from the attention mask), and logit post-processing
(final soft-capping, logit scale).

``forward`` runs the *decoder* (``model.get_decoder()``) and returns its
``last_hidden_state``, which is the hidden state after the final norm, the same tensor
as ``outputs.hidden_states[-1]`` of the full model. Logits are computed separately and
only for the rows that need them: a row in latent mode never pays for the LM head.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


class DecoderAdapter:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.decoder = model.get_decoder()
        self.embedding = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
        params = inspect.signature(self.decoder.forward).parameters
        if "cache" in params:
            self.cache_kwarg = "cache"
        elif "past_key_values" in params:
            self.cache_kwarg = "past_key_values"
        else:
            raise ValueError(f"{type(self.decoder).__name__}.forward takes no cache argument")
        if "inputs_embeds" not in params:
            raise ValueError(f"{type(self.decoder).__name__}.forward does not accept inputs_embeds")
        self.accepts_position_ids = "position_ids" in params
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        scale = getattr(model, "logit_scale", None)
        self.logit_scale = scale if isinstance(scale, (int, float)) else None
        self.hidden_size = self.embedding.weight.shape[1]
        self.vocab_size = self.lm_head.weight.shape[0]
        self.device = self.embedding.weight.device
        self.dtype = self.embedding.weight.dtype

    def new_cache(self) -> DynamicCache:
        # No config: every layer is a plain growing layer, so rows can be filtered and
        # left-padded uniformly; sliding-window models still get their window from the mask.
        return DynamicCache()

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[...] token ids -> [..., d] input embeddings."""
        return self.embedding(token_ids)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, cache) -> torch.Tensor:
        """inputs_embeds [B, T, d], attention_mask [B, past+T], position_ids [B, T] ->
        last hidden states [B, T, d] (after the final norm). ``cache`` grows by T."""
        kwargs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                  self.cache_kwarg: cache, "use_cache": True}
        if self.accepts_position_ids:
            kwargs["position_ids"] = position_ids
        return self.decoder(**kwargs).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., V] float32 logits, as the model's own head computes them."""
        logits = self.lm_head(hidden)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()
