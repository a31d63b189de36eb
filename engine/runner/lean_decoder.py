"""The forward of Llama-family decoders, written as plain tensor code over a flat batch.

Through the Hugging Face modules a layer is about 60 operator calls and a dozen module
calls, whose Python and dispatch cost is as large as the products themselves on a small
model: on SmolLM2-135M (30 layers) at batch 1, on this project's 2-core CPU, the step's
matrix products take about 27 ms and everything else about 20. ``LeanDecoder.forward``
computes the same function with the same weights (the modules' own, packed or not) in about
a third of the operator calls: RMSNorm as ``torch.rms_norm`` (float32) without the module,
rotary positions applied to the queries and keys together as ``x * cos + x.roll(half) *
sin'`` (sin' = sin with its first half negated; the modules' rounding, where one ``addcmul``
would round differently), the new keys and values
written at one flat index per row (one ``index_put_`` each), a oneDNN-packed output or down
projection adding the residual in its own kernel, and no module dispatch.

It runs a whole engine step: the decode rows and the prompt chunks as one flat batch of N
rows of one position each (``engine.runner.flat_batch``), so that every product reads its
weights once per step; the batch's attentions keep the two kinds apart (decode rows over
their slots' columns, chunks causally over their own slot's). The runner uses it for every
step of a model it supports; ``DecoderAdapter.forward`` (the modules) serves the others.

It supports the decoder layers it names (``SUPPORTED_LAYERS``: Llama and Qwen2, whose layers
are pre-norm attention + gated MLP with RMSNorm and rotary positions, full attention only);
``LeanDecoder.reason_unsupported`` says why another model is refused. Results equal the
modules' up to float rounding (the same products and norms; rotary and attention in other
layouts), which the engine's tests check against the modules and the naive reference.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from engine.runner.flat_batch import FlatBatch
from engine.runner.packed_linear import PackedLinear, merge_in_place

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
            # packed projections that read one input become one product (q, k, v; gate, up)
            qkv = merge_in_place(attn, ["q_proj", "k_proj", "v_proj"])
            gate_up = merge_in_place(mlp, ["gate_proj", "up_proj"])
            self.layers.append(_Layer(
                _norm_of(layer.input_layernorm), qkv, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                _norm_of(layer.post_attention_layernorm), gate_up, mlp.gate_proj, mlp.up_proj, mlp.down_proj,
                mlp.act_fn))
        first = decoder.layers[0].self_attn
        self.head_dim = first.head_dim
        self.groups = first.num_key_value_groups
        self.kv_heads = first.k_proj.out_features // first.head_dim
        self.heads = first.q_proj.out_features // first.head_dim
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

    def rotary_tables(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d], positions [N] -> (cos, sin') [N, 1, head_dim] for ``q * cos +
        q.roll(half) * sin'``: rotate_half(q) * sin == q.roll(half) * sin', exactly, with
        sin' = sin with its first half negated (four operations per layer instead of seven)."""
        cos, sin = self.rotary(x[None], positions[None])                # [1, N, head_dim]
        cos, sin = cos[0, :, None], sin[0, :, None]                      # [N, 1, head_dim]
        half = self.head_dim // 2
        return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    def forward(self, x: torch.Tensor, batch: FlatBatch, cache) -> torch.Tensor:
        """x [N, d]: the input embeddings of a flat batch (``engine.runner.flat_batch``: decode
        rows, then prompt chunks' tokens, one position each), ``cache`` the slot cache ->
        hidden states [N, d] after the final norm. Each row's key and value are written into
        the cache at ``batch.write_index`` before the layer's attention reads it."""
        n = x.shape[0]
        head_dim = self.head_dim
        cos, sin = self.rotary_tables(x, batch.positions)
        half = head_dim // 2
        heads = self.heads
        for i, p in enumerate(self.layers):
            h = p.norm1(x)
            if p.qkv is not None:                                        # one product: [q | k | v]
                qkv = p.qkv(h).view(n, -1, head_dim)
                qk, v = qkv[:, :heads + self.kv_heads], qkv[:, heads + self.kv_heads:]
            else:
                qk = torch.cat((p.q_proj(h).view(n, -1, head_dim), p.k_proj(h).view(n, -1, head_dim)), dim=1)
                v = p.v_proj(h).view(n, -1, head_dim)
            qk = qk * cos + qk.roll(half, dims=-1) * sin                # queries and keys at once, as the modules round it
            layer = cache.layers[i]
            if not layer.is_initialized:
                layer.lazy_initialization(qk[:1, heads:, None], v[:1, :, None])
            batch.write(layer.keys, qk[:, heads:])
            batch.write(layer.values, v)
            out = batch.attend(qk[:, :heads], layer.keys, layer.values)  # [N, heads * head_dim]
            x = _linear_plus(p.o_proj, out, x)
            h = p.norm2(x)
            if p.gate_up is not None:                                    # one product: [gate | up]
                gate_up = p.gate_up(h)
                inner = gate_up.shape[-1] // 2
                x = _linear_plus(p.down_proj, p.act(gate_up[:, :inner]) * gate_up[:, inner:], x)
            else:
                x = _linear_plus(p.down_proj, p.act(p.gate_proj(h)) * p.up_proj(h), x)
        return self.final_norm(x)


class _Layer(NamedTuple):
    """A decoder layer as the lean forward calls it. ``qkv`` / ``gate_up``: the merged
    product of a packed model (None: the separate projections)."""

    norm1: Callable
    qkv: PackedLinear | None
    q_proj: torch.nn.Module
    k_proj: torch.nn.Module
    v_proj: torch.nn.Module
    o_proj: torch.nn.Module
    norm2: Callable
    gate_up: PackedLinear | None
    gate_proj: torch.nn.Module
    up_proj: torch.nn.Module
    down_proj: torch.nn.Module
    act: Callable


def _linear_plus(linear: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + linear(x); a packed linear adds the residual in its own kernel."""
    if isinstance(linear, PackedLinear):
        return linear.plus(x, residual)
    return residual + linear(x)


def _norm_of(module: torch.nn.Module) -> "_Norm":
    """An RMSNorm module -> its function, with no module dispatch (``_Norm``)."""
    return _Norm(module.weight, module.variance_epsilon)


class _Norm:
    """x -> RMSNorm(x) with ``weight`` and ``eps``. In float32 that is ``torch.rms_norm``
    (fewer operator calls: 19 against 26 us at SmolLM2's [16, 576]); in other dtypes the
    module's own arithmetic in its order (float32 math, then the weight)."""

    __slots__ = ("weight", "eps", "shape", "fused")

    def __init__(self, weight: torch.Tensor, eps: float):
        self.weight, self.eps, self.shape = weight, eps, (weight.shape[0],)
        self.fused = weight.dtype == torch.float32     # decided once, not per call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return torch.rms_norm(x, self.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)
