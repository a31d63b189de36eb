"""Linear layers prepared ahead of time for inference on CPU ("packed" weights).

``torch.nn.functional.linear`` on CPU calls MKL's GEMM, which re-packs the weight into its
own blocked layout on every call. For a decode step that is most of the work: at a few rows
the product is bound by reading the weight, and the weight is read, packed and read again.
A ``PackedLinear`` multiplies with one of two kernels that do not:

- **the engine's own** (``kernel == "engine"``; ``engine.runner.cpu_kernel``): float32 on
  x86-64 with AVX2 where a C compiler builds it. A layer whose output count is a multiple
  of 16 gets a copy of its weight in blocks of 16 outputs, in anonymous memory; the dense
  one is dropped, but where it came from a memory-mapped file that stays mapped (the tied
  embedding holds the map) its pages stay resident as clean page cache until the OS
  reclaims them (SmolLM2-135M, packed / not: 877 / 460 MB anonymous, 525 / 633 MB file-
  backed resident). The LM head gets its copy too (the adapter's; a tied embedding keeps
  the weight itself: V x d more memory, 113 MB for SmolLM2-135M, 671 MB for Gemma-3-270M;
  its product 6.4 against 9.0 ms at 16 rows, 3.2 against 5.2 at 2, 3.1 at 1 row either
  way). Odd shapes are read as the model holds them. Over SmolLM2-135M's 120 decoder
  products (two threads, a 2-core AMD EPYC): 13.5 ms at 1 row (oneDNN's packed copy 20.7),
  27.5 at 16 (26.7), 45.0 at 32 (41.5).
- **oneDNN's** on a copy it packed once (``torch.ops.mkldnn._reorder_linear_weight``, then
  ``_linear_pointwise``), what ``torch.compile``'s CPU backend does with frozen weights:
  elsewhere (bfloat16 on a CPU with AVX-512, no compiler, ``COCONUT_CPU_KERNEL=off``).
  Against MKL on the same products: 29.5 against 36.7 ms at 1 row, 56.0 against 68.9 at 16.

Each call costs either more than MKL's (about 8 us for the engine's, 20 us for oneDNN's,
against 3), so ``should_pack`` packs only models whose linear weights reach
``PACK_MIN_BYTES``.

``PackedLinear`` replaces an ``nn.Linear`` module in place and holds only what its kernel
reads (oneDNN's packed copy frees the dense weight unless something else, e.g. a tied
embedding, holds it): the model is then for inference only. Results equal ``F.linear``'s
up to float rounding (a different summation order), not bit for bit. This module knows
nothing of which modules a model has beyond their type, nor of compiled graphs.
"""

from __future__ import annotations

import torch

from engine.runner.cpu_kernel import BLOCK, RowsProduct
from engine.runner.cpu_kernel import unavailable_reason as engine_kernel_unavailable

#: Pack only when a model's ``nn.Linear`` weights (head included) take at least this many
#: bytes: below it the per-call overhead outweighs the saving (the bundled 11 MB model).
PACK_MIN_BYTES = 64 * 2 ** 20

PACK_CHOICES = ("auto", "on", "off")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] dense weight -> oneDNN's packed copy (an ``mkldnn``-layout tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ packed weight (+ bias) -> [..., out], as ``F.linear`` would give."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(torch.nn.Module):
    """An ``nn.Linear`` for inference, its weight prepared for the fastest product here:
    the engine's own kernel on the dense weight (``kernel == "engine"``, float32 where
    ``engine.runner.cpu_kernel`` builds) or oneDNN's packed copy (``"onednn"``)."""

    def __init__(self, linear: torch.nn.Linear, layout: str = "auto"):
        """``layout`` of the engine's kernel (``RowsProduct``): "blocks" (a copy laid out in
        blocks of 16 outputs, faster from 2 rows on), "rows" (the weight itself: for a head
        tied to the embedding, which must stay one tensor) or "auto" (blocks where the
        output count is a multiple of 16)."""
        super().__init__()
        if layout not in ("auto", "rows", "blocks"):
            raise ValueError(f"layout={layout!r}: expected auto, rows or blocks")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)
        self.rows: RowsProduct | None = None
        if _engine_kernel_takes(linear.weight):
            if layout == "auto":
                layout = "blocks" if self.out_features % BLOCK == 0 else "rows"
            self.rows = RowsProduct(linear.weight, bias, layout=layout)
            self.register_buffer("kernel_weight", self.rows.weight, persistent=False)
            self.packed_weight = None
            self.kernel = "engine"
        else:
            self.register_buffer("packed_weight", pack_weight(linear.weight), persistent=False)
            self.kernel = "onednn"

    @classmethod
    def merged(cls, parts: list["PackedLinear"]) -> "PackedLinear":
        """One packed linear whose outputs are ``parts``' outputs side by side (one product
        for several that read the same input: a layer's q, k and v). A part without a bias
        gets zeros where the others have one."""
        weight = torch.cat([p.dense_weight() for p in parts])
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if any(p.bias is not None for p in parts):
            linear.bias = torch.nn.Parameter(torch.cat([
                p.bias if p.bias is not None else weight.new_zeros(p.out_features) for p in parts]),
                requires_grad=False)
        return cls(linear)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense [out, in] tensor (a copy, except for the engine kernel's
        "rows" layout: the weight itself, not to be written)."""
        return self.rows.dense_weight() if self.rows is not None else self.packed_weight.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            return self.rows(x)
        return packed_product(x, self.packed_weight, self.bias)

    def plus(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + self(x), the residual added in the product's own kernel."""
        if self.rows is not None:
            return self.rows(x, residual)
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed_weight, self.bias, "add")

    def extra_repr(self) -> str:
        layout = f" ({self.rows.layout})" if self.rows is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernel={self.kernel}{layout}")


class PackedSlice(torch.nn.Module):
    """What is left of a linear merged into another (``PackedLinear.merged``): its outputs,
    columns ``start:stop`` of the merged product. It computes the whole merged product, so
    the modules that still call it (anything beside the engine's lean forward, which calls
    the merged one once) stay right but pay for the others' columns too."""

    def __init__(self, merged: PackedLinear, start: int, stop: int):
        super().__init__()
        self.merged = merged
        self.start, self.stop = start, stop
        self.in_features, self.out_features = merged.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merged(x)[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.stop} of a merged product"


def merge_in_place(parent: torch.nn.Module, names: list[str]) -> PackedLinear | None:
    """Merge ``parent``'s linears ``names`` (packed, reading one input) into one
    ``PackedLinear``, leaving a ``PackedSlice`` of it in each place. Returns the merged linear,
    or None (nothing changed) where they are not all ``PackedLinear`` or differ in input."""
    parts = [getattr(parent, name) for name in names]
    if not all(type(p) is PackedLinear for p in parts) or len({p.in_features for p in parts}) != 1:
        return None
    merged = PackedLinear.merged(parts)
    start = 0
    for name, part in zip(names, parts):
        setattr(parent, name, PackedSlice(merged, start, start + part.out_features))
        start += part.out_features
    return merged


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights of ``model``'s ``nn.Linear`` modules (a tied weight once)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            w = module.weight
            seen[w.data_ptr()] = w.numel() * w.element_size()
    return sum(seen.values())


def _engine_kernel_takes(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and engine_kernel_unavailable() is None


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether weights of ``dtype`` on ``device`` can be prepared here: the engine's kernel
    takes them, or oneDNN packs them."""
    if device.type == "cpu" and dtype == torch.float32 and engine_kernel_unavailable() is None:
        return True
    return onednn_can_pack(dtype, device)


def onednn_can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN packs weights of ``dtype`` on ``device`` here (tried on a small one)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        packed_product(torch.ones(1, 16, dtype=dtype), pack_weight(torch.ones(16, 16, dtype=dtype)))
    except RuntimeError:     # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw ..."
        return False
    return True


def should_pack(model: torch.nn.Module, choice: str) -> bool:
    """``choice`` ("auto", "on", "off") -> whether to pack ``model``'s linear layers. "on"
    raises ValueError where oneDNN cannot pack this dtype or device."""
    if choice not in PACK_CHOICES:
        raise ValueError(f"pack_weights={choice!r} is invalid: expected one of {', '.join(PACK_CHOICES)}")
    if choice == "off":
        return False
    first = next(model.parameters())
    if choice == "auto":     # the size first: a small model never builds or tries a kernel
        return linear_bytes(model) >= PACK_MIN_BYTES and can_pack(first.dtype, first.device)
    if not can_pack(first.dtype, first.device):
        raise ValueError(f"pack_weights='on' needs float32 (or bfloat16 on a CPU with AVX-512) weights on a CPU "
                         f"with oneDNN; got {first.dtype} on {first.device}")
    return True


def pack_linears(module: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` below ``module`` (exactly that type, not subclasses)
    with a ``PackedLinear``, in place. Returns how many were replaced."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count
