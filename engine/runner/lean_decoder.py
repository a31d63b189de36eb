"""The decode forward of Llama-family decoders, written as plain tensor code.

A decode step runs one position per row through every layer. Through the Hugging Face
modules that is about 60 operator calls and a dozen module calls per layer, whose Python
and dispatch cost is as large as the products themselves on a small model: on
SmolLM2-135M (30 layers) at batch 1, on this project's 2-core CPU, the step's matrix
products take about 27 ms and everything else about 20. ``LeanDecoder.forward`` computes
the same function with the same weights (the modules' own, packed or not) in about a
third of the operator calls: RMSNorm without the module, rotary embedding applied to the queries
and keys together, attention over the key-value heads with the query heads of each group
as its rows (what transformers does for one query; from ``MATMUL_ATTENTION_MIN_ROWS`` rows
as two matrix products and a softmax, faster there than the CPU's fused kernel), and no
module dispatch.

It is a drop-in for ``DecoderAdapter.forward`` on decode steps only (one new position per
row, 4D additive masks from ``slot_attention_masks``, the slot cache): prompts still go
through the model's own forward. It supports the decoder layers it names
(``SUPPORTED_LAYERS``: Llama and Qwen2, whose layers are pre-norm attention + gated MLP
with RMSNorm and rotary positions, full attention only); ``LeanDecoder.reason_unsupported``
says why another model is refused, and such a model keeps the modules' forward. Results
equal the modules' up to float rounding (the same products and norms; rotary and
attention in other layouts), which the
engine's tests check against the naive reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: decoder layer class -> (attention, MLP, norm) classes the lean forward reproduces
SUPPORTED_LAYERS = {
    "LlamaDecoderLayer": ("LlamaAttention", "LlamaMLP", "LlamaRMSNorm"),
    "Qwen2DecoderLayer": ("Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm"),
}


class LeanDecoder:
    def __init__(self, model: torch.nn.Module):
        reason = self.reason_unsupported(model)
        if reason:
            raise ValueError(f"the lean decode forward does not support this model: {reason}")
        decoder = model.get_decoder()
        self.rotary = decoder.rotary_emb
        self.final_norm = _norm_of(decoder.norm)
        self.layers = []
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                _norm_of(layer.input_layernorm), attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                _norm_of(layer.post_attention_layernorm), mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn))
        first = decoder.layers[0].self_attn
        self.head_dim = first.head_dim
        self.groups = first.num_key_value_groups
        self.scaling = first.scaling

    @staticmethod
    def reason_unsupported(model: torch.nn.Module) -> str | None:
        """None if the lean forward reproduces ``model``'s decoder, else why not."""
        decoder = model.get_decoder()
        layers = getattr(decoder, "layers", None)
        if not layers or not all(hasattr(decoder, name) for name in ("rotary_emb", "norm")):
            return f"{type(decoder).__name__} is not a Llama-style decoder (layers, rotary_emb, norm)"
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
            return f"attention implementation {config._attn_implementation!r} (expected sdpa or eager)"
        inv_freq = getattr(decoder.rotary_emb, "inv_freq", None)
        head_dim = getattr(layers[0].self_attn, "head_dim", None)
        if inv_freq is None or head_dim is None or 2 * inv_freq.numel() != head_dim:
            return "rotary embeddings that do not span the whole head (or no inv_freq)"
        for layer in layers:
            name = type(layer).__name__
            if name not in SUPPORTED_LAYERS:
                return f"decoder layer {name} (supported: {', '.join(SUPPORTED_LAYERS)})"
            attention, mlp, norm = SUPPORTED_LAYERS[name]
            parts = (layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm)
            if [type(p).__name__ for p in parts] != [attention, mlp, norm, norm]:
                return f"{name} with parts {[type(p).__name__ for p in parts]}"
            if getattr(layer.self_attn, "sliding_window", None):
                return "sliding-window attention"
        return None

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache) -> torch.Tensor:
        """inputs_embeds [n, 1, d], attention_mask [n, 1, 1, kv_len] (additive), position_ids
        [n, 1], the slot cache planned for this step -> hidden states [n, 1, d] after the
        final norm."""
        n = inputs_embeds.shape[0]
        head_dim, groups = self.head_dim, self.groups
        cos, sin = self.rotary(inputs_embeds, position_ids)             # [n, 1, head_dim]
        half = head_dim // 2
        x = inputs_embeds[:, 0]                                          # [n, d]
        for i, (norm1, q_proj, k_proj, v_proj, o_proj, norm2, gate, up, down, act) in enumerate(self.layers):
            h = norm1(x)
            q = q_proj(h).view(n, -1, head_dim)
            k = k_proj(h).view(n, -1, head_dim)
            v = v_proj(h).view(n, -1, head_dim)
            heads = q.shape[1]
            qk = torch.cat((q, k), dim=1)                                # rotate queries and keys at once
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            keys, values = cache.layers[i].update(qk[:, heads:, None], v[:, :, None])   # [n, kv, L, hd]
            query = qk[:, :heads].reshape(n, -1, groups, head_dim)       # [n, kv heads, group, hd]
            out = _attention(query, keys, values, attention_mask, self.scaling)
            x = x + o_proj(out.reshape(n, heads * head_dim))
            h = norm2(x)
            x = x + down(act(gate(h)) * up(h))
        return self.final_norm(x)[:, None]


#: From this many rows attention runs as two matrix products and a softmax rather than
#: ``F.scaled_dot_product_attention``, whose CPU kernel is slower on one query per row:
#: SmolLM2's shapes (3 key-value heads of 3 query heads, 64 wide), two threads: 124 against
#: 244 us at 16 rows and 60 keys, 290 against 700 us at 32 rows and 100 keys; 45 against
#: 34 us at 1 row. SmolLM2's whole decode step, same tokens: 64.8 / 86.1 / 134.4 ms against
#: 69.5 / 89.5 / 148.9 at 8 / 16 / 32 rows, equal at 4.
MATMUL_ATTENTION_MIN_ROWS = 8


def _attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
               scale: float) -> torch.Tensor:
    """query [n, kv heads, group, hd], keys and values [n, kv heads, L, hd], mask [n, 1, 1, L]
    (additive) -> [n, kv heads, group, hd]."""
    if query.shape[0] < MATMUL_ATTENTION_MIN_ROWS:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
    scores = torch.matmul(query, keys.transpose(-1, -2)) * scale + mask
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype), values)


def _norm_of(module: torch.nn.Module):
    """An RMSNorm module -> x -> its output, the module's arithmetic in the same order (float32
    math) with no module dispatch. (``F.rms_norm`` is no faster: on CPU it is composite.)"""
    weight, eps = module.weight, module.variance_epsilon

    def norm(x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)
    return norm
