"""The lean forward's decode-only steps through ``torch.compile``, on CPU.

A decode step of a small model at a few rows is mostly operator overhead: on SmolLM2-135M
at batch 1, on this project's 2-core CPU, the lean forward's ~20 eager operator calls per
layer around its four matrix products cost about as much time as reading the weights
does. ``CompiledDecode`` runs the same function (``LeanDecoder.forward`` for a flat batch of
decode rows only, no prompt chunks, no long rows attended apart) as one inductor graph:
norms, rotary positions, the cache writes, the softmax and the gated activation become a
few fused C++ loops per layer, and Python runs once per step instead of once per operator.

The matrix products stay the engine's own: each goes through an opaque operator that
calls the lean layer's packed product, so the compiled graph holds no weight. Where every
product is the engine's CPU kernel (``engine.runner.cpu_kernel``) and its torch operators
are built, that operator is ``coconut_kernels::table_linear`` / ``table_linear_add``: the
weights sit in a C++ table (``set_table``, made this thread's by ``activate`` around each
call), so a product goes from the graph into the kernel without Python, and each layer's
attention is the kernel's too (``coconut_kernels::decode_attention``, on the cache in
place; about half the time of torch's batched products and softmax on these small
matrices). Otherwise it is
this module's ``coconut_serve::linear`` / ``linear_add``, whose Python implementation calls
the layer (oneDNN-packed, or ``_linear_plus`` for the residual). That keeps three things:
the products are the engine's (inductor would pick MKL's at a fixed row count, slower at 1
row here: 41 against 26 ms a step); the weights are in memory once; and the graph is the
same for every engine of a model, so inductor's on-disk cache serves later starts
(SmolLM2: about 90 s to compile each graph on 2 cores the first time, about 6 s from the
cache).

Two graphs serve every step: one for 1 row, one for 2 rows or more (the row count and the
key length are dynamic). Which weights an operator index means is set per call
(``_ACTIVE``, thread-local), so that the index, not the tensor, is in the graph.

Results equal the eager lean forward's up to float rounding (fused loops sum in another
order), which the engine's tests check against the naive reference. It knows nothing of
requests, the scheduler or prompt chunks; the runner decides which steps it takes
(``supports``) and falls back to the eager forward for the others.
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
from typing import NamedTuple

import torch

from engine.runner import cpu_kernel
from engine.runner.lean_decoder import LeanDecoder, _linear_plus
from engine.runner.packed_linear import PackedLinear, should_pack

_ACTIVE = threading.local()     # .table: the running engine's linears, by operator index

_LIBRARY = torch.library.Library("coconut_serve", "DEF")
_LIBRARY.define("linear(Tensor x, int index) -> Tensor")
_LIBRARY.define("linear_add(Tensor x, Tensor residual, int index) -> Tensor")


def _linear(x: torch.Tensor, index: int) -> torch.Tensor:
    return _ACTIVE.table[index].product(x)


def _linear_add(x: torch.Tensor, residual: torch.Tensor, index: int) -> torch.Tensor:
    return _ACTIVE.table[index].product_plus(x, residual)


_LIBRARY.impl("linear", _linear, "CPU")
_LIBRARY.impl("linear_add", _linear_add, "CPU")


def _linear_shape(x, index):
    """The output an operator of either library gives, for tracing (its layer by index)."""
    return x.new_empty((x.shape[0], _ACTIVE.table[index].out_features))


def _linear_add_shape(x, residual, index):
    return torch.empty_like(residual)


torch.library.register_fake("coconut_serve::linear", _linear_shape)
torch.library.register_fake("coconut_serve::linear_add", _linear_add_shape)


class _Product:
    """One linear layer as the operators call it, without module dispatch: ``product(x)``
    = linear(x), ``product_plus(x, residual)`` = residual + linear(x) (oneDNN adds the
    residual in its own kernel for a packed weight)."""

    __slots__ = ("product", "product_plus", "out_features")

    def __init__(self, linear: torch.nn.Module):
        self.out_features = getattr(linear, "out_features", None)   # a merged part's slice: never called
        if isinstance(linear, PackedLinear) and linear.rows is not None:
            self.product = self.product_plus = linear.rows       # rows(x), rows(x, residual)
        elif isinstance(linear, PackedLinear):
            weight, bias = linear.packed_weight, linear.bias
            plain, binary = torch.ops.mkldnn._linear_pointwise.default, torch.ops.mkldnn._linear_pointwise.binary
            self.product = lambda x: plain(x, weight, bias, "none", [], "")
            self.product_plus = lambda x, residual: binary(x, residual, weight, bias, "add")
        else:
            self.product = linear
            self.product_plus = lambda x, residual: _linear_plus(linear, x, residual)


class _Spec(NamedTuple):
    """What the compiled function is specialized on: plain numbers, equal for every engine
    of one model, so that every engine reuses one compiled graph."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    eps: float
    merged_qkv: bool
    merged_gate_up: bool
    float32_norms: bool
    kernel_table: bool = False     # products through coconut_kernels' table (C++), not this module's ops


#: the operators' indices of layer i: 7 * i + one of these (unused ones hold None)
_Q, _K, _V, _O, _GATE, _UP, _DOWN = range(7)


def _norm(x, weight, spec):
    if spec.float32_norms:
        return torch.rms_norm(x, (weight.shape[0],), weight, spec.eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + spec.eps)
    return weight * h.to(x.dtype)


def _decode_forward(x, cos, sin, write_index, mask, keys, values, norms1, norms2, final_norm, spec: _Spec):
    """``LeanDecoder.forward`` for n decode rows in the leading slots: x [n, d] input
    embeddings, cos / sin [n, 1, head_dim] (sin with its first half negated), write_index
    [n, kv heads], mask [n, 1, 1, L] additive; keys / values: each layer's cache
    [slots, kv heads, positions, head_dim], written in place -> [n, d] after the final norm."""
    if spec.kernel_table:
        linear, linear_add = torch.ops.coconut_kernels.table_linear, torch.ops.coconut_kernels.table_linear_add
    else:
        linear, linear_add = torch.ops.coconut_serve.linear, torch.ops.coconut_serve.linear_add
    n, heads, kv, hd = x.shape[0], spec.heads, spec.kv_heads, spec.head_dim
    groups, length, half = heads // kv, mask.shape[-1], hd // 2
    for i in range(spec.layers):
        base = 7 * i
        h = _norm(x, norms1[i], spec)
        if spec.merged_qkv:
            qkv = linear(h, base + _Q).view(n, -1, hd)
            qk, v = qkv[:, :heads + kv], qkv[:, heads + kv:]
        else:
            qk = torch.cat((linear(h, base + _Q).view(n, -1, hd), linear(h, base + _K).view(n, -1, hd)), dim=1)
            v = linear(h, base + _V).view(n, -1, hd)
        qk = qk * cos + qk.roll(half, dims=-1) * sin
        layer_keys, layer_values = keys[i], values[i]
        layer_keys.view(-1, hd).index_put_((write_index,), qk[:, heads:].to(layer_keys.dtype))
        layer_values.view(-1, hd).index_put_((write_index,), v.to(layer_values.dtype))
        query = qk[:, :heads].reshape(n, kv, groups, hd)
        if spec.kernel_table:     # the engine's kernel, on the cache in place (float32, as the table's products)
            out = torch.ops.coconut_kernels.decode_attention(query, layer_keys[:n, :, :length],
                                                             layer_values[:n, :, :length], mask, spec.scaling)
            out = out.reshape(n, heads * hd)
        else:
            scores = torch.matmul(query, layer_keys[:n, :, :length].transpose(-1, -2)) * spec.scaling + mask
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(layer_values.dtype)
            out = torch.matmul(weights, layer_values[:n, :, :length]).reshape(n, heads * hd)
        x = linear_add(out, x, base + _O)
        h = _norm(x, norms2[i], spec)
        if spec.merged_gate_up:
            gate_up = linear(h, base + _GATE)
            inner = gate_up.shape[-1] // 2
            gate, up = gate_up[:, :inner], gate_up[:, inner:]
        else:
            gate, up = linear(h, base + _GATE), linear(h, base + _UP)
        x = linear_add(torch.nn.functional.silu(gate) * up, x, base + _DOWN)
    return _norm(x, final_norm, spec)


#: no size or alignment checks of each operator's output in the generated code (two Python
#: calls per product; the products' shapes are fixed by the weights)
_compiled_forward = torch.compile(_decode_forward, dynamic=None,
                                  options={"size_asserts": False, "alignment_asserts": False})


class CompiledDecode:
    """A lean decoder's decode-only steps as one compiled graph (see the module docstring)."""

    def __init__(self, lean: LeanDecoder):
        self.lean = lean
        layers = lean.layers
        modules = []
        for p in layers:
            modules += [p.qkv if p.qkv is not None else p.q_proj, p.k_proj, p.v_proj, p.o_proj,
                        p.gate_up if p.gate_up is not None else p.gate_proj, p.up_proj, p.down_proj]
        self.table = [_Product(m) for m in modules]
        self.norms1 = [p.norm1.weight for p in layers]
        self.norms2 = [p.norm2.weight for p in layers]
        self.final_norm = lean.final_norm.weight
        eps = lean.final_norm.eps
        merged_qkv, merged_gate_up = layers[0].qkv is not None, layers[0].gate_up is not None
        self.kernel_table = _kernel_table(modules, merged_qkv, merged_gate_up)
        self.spec = _Spec(len(layers), lean.heads, lean.kv_heads, lean.head_dim, float(lean.scaling), float(eps),
                          merged_qkv, merged_gate_up, self.final_norm.dtype == torch.float32,
                          self.kernel_table is not None)

    def __del__(self):
        if getattr(self, "kernel_table", None) is not None:
            try:
                torch.ops.coconut_kernels.drop_table(self.kernel_table)
            except Exception:      # interpreter shutting down
                pass

    @staticmethod
    def reason_unsupported(model: torch.nn.Module) -> str | None:
        """None if the compiled step reproduces the lean decode forward of ``model`` (one the
        lean forward supports), else why not: it has SiLU gates and one norm epsilon."""
        decoder = model.get_decoder()
        acts = {type(layer.mlp.act_fn).__name__ for layer in decoder.layers}
        if not acts <= {"SiLU", "SiLUActivation"}:
            return f"activation {', '.join(sorted(acts))} (the compiled step has SiLU)"
        norms = [decoder.norm] + [n for layer in decoder.layers
                                  for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        if len({n.variance_epsilon for n in norms}) > 1:
            return "norms with different epsilons"
        return None

    @staticmethod
    def takes(batch, cache) -> bool:
        """Whether a step's flat batch is one this graph runs: decode rows only, no long
        row attended apart, every cache layer allocated."""
        return (batch.chunks is None and batch.decode is not None and batch.decode.split is None
                and all(layer.is_initialized for layer in cache.layers))

    def __call__(self, x: torch.Tensor, batch, cache) -> torch.Tensor:
        """What ``LeanDecoder.forward(x, batch, cache)`` gives, for a batch ``takes`` accepts."""
        n = x.shape[0]
        cos, sin = self.lean.rotary_tables(x, batch.positions)
        mask = batch.decode.row_mask
        inputs = [x, cos, sin, batch.write_index, mask]
        if n > 1:       # one graph for every row count above 1 (1 is compiled apart)
            for t in inputs:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        if mask.shape[-1] > 1:
            torch._dynamo.maybe_mark_dynamic(mask, 3)
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        _ACTIVE.table = self.table          # for the operators' shapes while tracing, and this module's ops
        if self.kernel_table is not None:
            torch.ops.coconut_kernels.activate(self.kernel_table)
        try:
            return _compiled_forward(*inputs, keys, values, self.norms1, self.norms2, self.final_norm, self.spec)
        finally:
            _ACTIVE.table = None
            if self.kernel_table is not None:
                torch.ops.coconut_kernels.activate(0)


def _kernel_table(modules: list, merged_qkv: bool, merged_gate_up: bool) -> int | None:
    """A ``coconut_kernels`` table of the layers' weights (its handle), where every product
    the graph calls is the engine's CPU kernel and its torch operators are built: the graph
    then calls the kernel through the dispatcher straight into C++, about 15 us a product
    less than this module's Python operators. None otherwise."""
    called = {_Q, _O, _GATE, _DOWN} | (set() if merged_qkv else {_K, _V}) | (set() if merged_gate_up else {_UP})
    if cpu_kernel.operators_reason() is not None:
        return None
    for index, module in enumerate(modules):
        if index % 7 in called and not (isinstance(module, PackedLinear) and module.rows is not None):
            return None
    _register_table_shapes()
    empty = torch.empty(0)
    weights, biases = [], []
    for index, module in enumerate(modules):
        used = index % 7 in called
        weights.append(module.rows.weight if used else empty)
        bias = module.rows.bias if used else None
        biases.append(bias if bias is not None else empty)
    return torch.ops.coconut_kernels.set_table(weights, biases)


@functools.cache
def _register_table_shapes() -> None:
    """The table operators' shapes, once their library is loaded: the same as this module's."""
    torch.library.register_fake("coconut_kernels::table_linear", _linear_shape)
    torch.library.register_fake("coconut_kernels::table_linear_add", _linear_add_shape)



def reason_not_compiled_by_default(model: torch.nn.Module, pack_weights: str = "auto",
                                   lean_decode: bool = True) -> str | None:
    """What ``compile=None`` ("auto", ``engine serve``'s default) decides: None when it
    compiles ``model``'s step, else why not. It compiles where it pays and costs no more
    than a start-up: a model on CPU whose steps the lean forward and this graph take, with
    packed weights (float32, 64 MiB or more, AVX2: a real model, not a tiny one whose step is
    cheap anyway), and a C++ compiler on the PATH (inductor's CPU code needs one)."""
    from engine.runner.lean_decoder import LeanDecoder

    if next(model.parameters()).device.type != "cpu":
        return "not on CPU"
    reason = (LeanDecoder.reason_unsupported(model) if lean_decode else "the lean forward is off") \
        or CompiledDecode.reason_unsupported(model)
    if reason:
        return reason
    if not should_pack(model, pack_weights):
        return "its weights are not packed (float32 models of 64 MiB or more, on a CPU with AVX2)"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        return "no C++ compiler on the PATH ($CXX, g++, c++ or clang++)"
    return None
