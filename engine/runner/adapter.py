"""A thin adapter over any Hugging Face causal LM: embed, forward one chunk, project.

The runner talks to models only through ``DecoderAdapter``, which hides the few ways
transformers models differ: the name of the cache argument (``cache`` in transformers
5.24+, ``past_key_values`` before), whether ``position_ids`` is accepted (ALiBi models
such as BLOOM derive positions from the attention mask), and logit post-processing
(final soft-capping, logit scale).

Attention masks: the runner builds exact 4D masks for its slot cache, and
``mask_argument`` passes them as the model expects: one tensor, or for models that mix
full and sliding-window layers (Gemma-2) a dict keyed by layer type. ALiBi models
(BLOOM) derive their position bias from a 2D mask; given a 4D mask, the adapter makes the
bias from the key column instead, which is the key's position in a slot cache.

``forward`` runs the *decoder* (``model.get_decoder()``) and returns its
``last_hidden_state``, which is the hidden state after the final norm, the same tensor
as ``outputs.hidden_states[-1]`` of the full model. Logits are computed separately and
only for the rows that need them: a row in latent mode never pays for the LM head.

With ``inference=True`` on CPU the adapter keeps a copy of the LM head's weight laid out
[d, V] (the head's matrix-vector product streams it about 1.7x faster than the [V, d]
layout at batch 1: 5.8 against 9.7 ms for GPT-2's 50,257 x 768 head on one thread), at
the cost of V x d more memory, used up to ``HEAD_COLUMNS_MAX_ROWS`` rows; more rows
multiply the [V, d] weight in row blocks (``HEAD_BLOCK_ROWS``). The copy does not follow
later changes to the weight, so the trainer (which updates it) uses the default.

With ``pack=True`` (inference on CPU, ``engine.runner.packed_linear``) every ``nn.Linear``
of the decoder is replaced by a ``PackedLinear`` and the head is multiplied the same way
(the engine's CPU kernel on a copy in blocks of 16 outputs, or oneDNN's packed copy) at
every row count, instead of the two layouts above; like the [d, V] copy, the head's copy
costs V x d more memory (a tied embedding keeps the weight). The model is then for
inference only.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from engine.runner.packed_linear import PackedLinear, pack_linears

#: On CPU the LM head's product takes one of two layouts by the number of rows (measured
#: on SmolLM2's 49,152 x 576 head, one thread, this project's 2-core AMD EPYC): up to 3
#: rows the [d, V] copy (a matrix-vector product that streams it: 5.3 against 9.0 ms at 1
#: row), from 4 rows the [V, d] weight in blocks of 512 rows (BLAS packs each block in
#: cache instead of the whole head per call: 22.4 against 36.0 ms for [d, V] and 30.3 for
#: the whole [V, d] at 16 rows).
#: A head smaller than ``HEAD_BLOCKS_MIN_BYTES`` (it stays in cache) keeps the [d, V] copy
#: at every row count: the blocks' extra calls cost the bundled 1,024 x 256 head more than
#: they save.
HEAD_COLUMNS_MAX_ROWS = 3
HEAD_BLOCK_ROWS = 512
HEAD_BLOCKS_MIN_BYTES = 16 * 2 ** 20


class DecoderAdapter:
    def __init__(self, model: torch.nn.Module, *, inference: bool = False, pack: bool = False):
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
        layer_types = set(getattr(config, "layer_types", None) or [])
        window = getattr(config, "sliding_window", None)
        self.sliding_window = window if "sliding_attention" in layer_types and window else None
        self.mixed_layer_types = self.sliding_window is not None and "full_attention" in layer_types
        if hasattr(self.decoder, "build_alibi_tensor"):
            self.decoder.build_alibi_tensor = _alibi_for_any_mask(self.decoder.build_alibi_tensor)
        scale = getattr(model, "logit_scale", None)
        self.logit_scale = scale if isinstance(scale, (int, float)) else None
        self.hidden_size = self.embedding.weight.shape[1]
        self.vocab_size = self.lm_head.weight.shape[0]
        self.device = self.embedding.weight.device
        self.dtype = self.embedding.weight.dtype
        self.head_columns = None         # [d, V]: the head's weight, column-major, for inference on CPU
        self.head_blocks: list[torch.Tensor] = []    # row blocks (views) of the [V, d] weight
        self.head_packed: PackedLinear | None = None     # the head, prepared like the linears (pack=True)
        self.packed_linears = 0          # decoder linears replaced by PackedLinear
        if pack:
            if not inference:
                raise ValueError("packed weights are for inference only")
            self.packed_linears = pack_linears(self.decoder)
            if type(self.lm_head) is torch.nn.Linear:
                # the engine's kernel takes a copy in blocks of 16 outputs where it can (the
                # head's product at 2-16 rows is 1.4-1.8x faster than on the weight as held);
                # the weight itself stays, as the (tied) embedding reads it
                self.head_packed = PackedLinear(self.lm_head)
        elif inference and self.device.type == "cpu" and type(self.lm_head) is torch.nn.Linear:
            self.head_columns = self.lm_head.weight.detach().t().contiguous()
            weight = self.lm_head.weight.detach()
            if weight.numel() * weight.element_size() >= HEAD_BLOCKS_MIN_BYTES:
                self.head_blocks = [weight[i:i + HEAD_BLOCK_ROWS] for i in range(0, weight.shape[0], HEAD_BLOCK_ROWS)]

    def new_cache(self) -> DynamicCache:
        # For the trainer's batched passes (the engine uses the slot cache): no config, so
        # every layer is a plain growing layer; sliding windows come from the mask.
        return DynamicCache()

    def mask_argument(self, full: torch.Tensor, sliding: torch.Tensor | None):
        """The ``attention_mask`` argument for 4D masks from ``slot_attention_masks``."""
        if self.mixed_layer_types:
            return {"full_attention": full, "sliding_attention": sliding}
        return sliding if self.sliding_window is not None else full

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[...] token ids -> [..., d] input embeddings."""
        return self.embedding(token_ids)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask,
                position_ids: torch.Tensor, cache) -> torch.Tensor:
        """inputs_embeds [B, T, d], attention_mask (2D [B, past+T], or 4D masks as
        ``mask_argument`` gives them), position_ids [B, T] -> last hidden states [B, T, d]
        (after the final norm). ``cache`` takes the T new positions."""
        kwargs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                  self.cache_kwarg: cache, "use_cache": True}
        if self.accepts_position_ids:
            kwargs["position_ids"] = position_ids
        return self.decoder(**kwargs).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., V] float32 logits, as the model's own head computes them."""
        columns = self.head_columns is not None and hidden.numel() // hidden.shape[-1] <= HEAD_COLUMNS_MAX_ROWS
        if self.head_packed is not None:
            logits = self.head_packed(hidden)
        elif columns or self.head_blocks:
            logits = (hidden @ self.head_columns if columns else
                      torch.cat([torch.nn.functional.linear(hidden, block) for block in self.head_blocks], dim=-1))
            if self.lm_head.bias is not None:
                logits = logits + self.lm_head.bias
        else:
            logits = self.lm_head(hidden)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()


def _alibi_for_any_mask(build):
    """Wrap a BLOOM-style ``build_alibi_tensor(mask, num_heads, dtype)``: a 4D mask
    [B, 1, T, K] gets the bias slope x key column, [B * heads, 1, K] as the model expects."""
    def build_alibi_tensor(attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
        if attention_mask.ndim != 4:
            return build(attention_mask, num_heads, dtype)
        batch, kv_len = attention_mask.shape[0], attention_mask.shape[-1]
        ones = torch.ones((batch, kv_len), dtype=torch.long, device=attention_mask.device)
        return build(ones, num_heads, dtype)      # positions 0..K-1 = the key columns
    return build_alibi_tensor
