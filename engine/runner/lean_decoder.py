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
as two batched matrix products and a softmax, faster there than the CPU's fused kernel),
and no module dispatch. What every layer shares is made once per forward
(``_DecodeAttention``): the flat cache index the new keys and values are written at (one
``index_put_`` each), and the mask laid out for ``baddbmm``, which adds it to the scores'
product. Rotary positions are ``x * cos + x.roll(half) * sin'`` (sin' = sin with its first
half negated, one ``addcmul``); a oneDNN-packed output or down projection adds the
residual in its own kernel. Those last changes together made SmolLM2's step 3% / 1% / 1%
faster at 1 / 16 / 32 rows (paired, in the engine process's environment): the step is
bound by its products.

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

from engine.runner.packed_linear import PackedLinear

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
        # rotate_half(x) * sin == x.roll(half) * (sin with its first half negated): three
        # operations per layer instead of seven
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        write = cache.write
        kv_len = write.kv_len
        x = inputs_embeds[:, 0]                                          # [n, d]
        attend = None
        for i, (norm1, q_proj, k_proj, v_proj, o_proj, norm2, gate, up, down, act) in enumerate(self.layers):
            h = norm1(x)
            q = q_proj(h).view(n, -1, head_dim)
            k = k_proj(h).view(n, -1, head_dim)
            v = v_proj(h).view(n, -1, head_dim)
            heads = q.shape[1]
            qk = torch.cat((q, k), dim=1)                                # rotate queries and keys at once
            qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), sin)
            layer = cache.layers[i]
            if attend is None or not layer.is_initialized:
                keys, values = layer.update(qk[:, heads:, None], v[:, :, None])      # [n, kv, L, hd]
                if write.rows_are_leading and attend is None:
                    attend = _DecodeAttention(attention_mask, write, n, k.shape[1], groups, layer.keys.shape,
                                              self.scaling)
            else:
                keys, values = attend.write(layer, qk[:, heads:], v)
            out = attend(qk[:, :heads], keys, values) if attend is not None else _attention(
                qk[:, :heads].reshape(n, -1, groups, head_dim), keys, values, attention_mask, self.scaling)
            x = _linear_plus(o_proj, out.reshape(n, heads * head_dim), x)
            h = norm2(x)
            x = _linear_plus(down, act(gate(h)) * up(h), x)
        return self.final_norm(x)[:, None]


class _DecodeAttention:
    """What every layer of one decode forward shares: where its new keys go in the slot
    cache (one flat index for every layer, whose caches have one shape) and the mask laid
    out for the attention's batched products. For writes where row i is slot i
    (``rows_are_leading``), which is every decode forward's."""

    def __init__(self, mask: torch.Tensor, write, n: int, kv_heads: int, groups: int, cache_shape, scaling: float):
        _, _, max_len, head_dim = cache_shape
        self.n, self.kv_heads, self.groups, self.kv_len, self.scaling = n, kv_heads, groups, write.kv_len, scaling
        # row i, kv head j, position p -> flat row (i * kv_heads + j) * max_len + p of a [-1, head_dim] view
        heads = torch.arange(kv_heads, device=mask.device)
        rows = torch.arange(n, device=mask.device)[:, None] * kv_heads + heads[None, :]
        self.index = rows * max_len + write.positions[:, :1]                          # [n, kv heads]
        self.matmul = n >= MATMUL_ATTENTION_MIN_ROWS
        self.mask = mask
        if self.matmul:   # [n * kv heads, group, L]: one addition with the scores' product
            self.mask = mask.expand(n, kv_heads, groups, self.kv_len).reshape(n * kv_heads, groups, self.kv_len)

    def write(self, layer, keys: torch.Tensor, values: torch.Tensor):
        """keys, values [n, kv heads, hd] -> the layer's cached keys and values [n, kv, L, hd]."""
        head_dim = keys.shape[-1]
        layer.keys.view(-1, head_dim).index_put_((self.index,), keys.to(layer.keys.dtype))
        layer.values.view(-1, head_dim).index_put_((self.index,), values.to(layer.values.dtype))
        return layer.keys[:self.n, :, :self.kv_len], layer.values[:self.n, :, :self.kv_len]

    def __call__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """query [n, heads, hd], keys and values [n, kv heads, L, hd] -> [n, heads, hd]."""
        n, kv, groups, length = self.n, self.kv_heads, self.groups, self.kv_len
        head_dim = query.shape[-1]
        if not self.matmul:
            return F.scaled_dot_product_attention(query.reshape(n, kv, groups, head_dim), keys, values,
                                                  attn_mask=self.mask, scale=self.scaling)
        scores = torch.baddbmm(self.mask, query.reshape(n * kv, groups, head_dim),
                               keys.reshape(n * kv, length, head_dim).transpose(1, 2), alpha=self.scaling)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        return torch.bmm(weights, values.reshape(n * kv, length, head_dim))


def _linear_plus(linear: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + linear(x); a oneDNN-packed linear adds the residual in its own kernel."""
    if isinstance(linear, PackedLinear):
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, linear.packed_weight, linear.bias, "add")
    return residual + linear(x)


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
    """An RMSNorm module -> x -> its output, with no module dispatch. In float32 that is
    ``torch.rms_norm`` (fewer operator calls: 19 against 26 us at SmolLM2's [16, 576]); in
    other dtypes the module's own arithmetic in its order (float32 math, then the weight)."""
    weight, eps = module.weight, module.variance_epsilon
    if weight.dtype == torch.float32:
        shape = (weight.shape[0],)
        return lambda x: torch.rms_norm(x, shape, weight, eps)

    def norm(x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)
    return norm
