"""The engine's CPU matrix product (``engine.runner.cpu_kernel``), both layouts of the
weight, against a float64 oracle: every tail of the blocked loops (rows not a multiple of
3 or 6, outputs not a multiple of 4, inputs not a multiple of 8), bias and residual, strided
and batched inputs, one thread against two, a row alone against the same row in a batch
(blocks), and its refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engine.runner import cpu_kernel, packed_linear

# skip only where the machine cannot build it: a kernel that builds but computes wrong fails here
REASON = cpu_kernel.build_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"the engine's CPU kernel cannot be built here: {REASON}")


@pytest.fixture(params=["ctypes", "operators"])
def through(request):
    """Both ways in: ctypes, and the torch operators (where a C++ compiler builds them)."""
    if request.param == "operators" and cpu_kernel.operators_reason() is not None:
        pytest.skip(f"the kernel's torch operators cannot be built here: {cpu_kernel.operators_reason()}")
    return request.param


def test_its_self_check_passes():
    """What the engine asks before using it: built, and right on a few shapes."""
    assert cpu_kernel.unavailable_reason() is None


def _oracle(x, w, bias=None, add=None):
    out = x.double() @ w.double().T
    if bias is not None:
        out = out + bias.double()
    if add is not None:
        out = out + add.double()
    return out.float()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 33])
@pytest.mark.parametrize("m,n", [(1, 1), (3, 7), (4, 8), (5, 9), (13, 100), (64, 576), (70, 1536), (9, 1031),
                                 (16, 1), (48, 7), (80, 1031)])
def test_equals_the_float64_product_at_every_tail(rows, m, n, through):
    generator = torch.Generator().manual_seed(rows * 1000 + m * 10 + n)
    x, w = torch.randn(rows, n, generator=generator), torch.randn(m, n, generator=generator)
    bias, add = torch.randn(m, generator=generator), torch.randn(rows, m, generator=generator)
    tolerance = dict(rtol=1e-5, atol=1e-5 * n ** 0.5)
    for layout, avx512 in _layouts(m):
        cpu_kernel.blocked_avx512(avx512)
        for b, a in ((None, None), (bias, None), (bias, add), (None, add)):
            got = cpu_kernel.linear(x, w, b, a, through=through, layout=layout)
            torch.testing.assert_close(got, _oracle(x, w, b, a), **tolerance)
    cpu_kernel.blocked_avx512(True)


def _layouts(m: int) -> list[tuple[str, bool]]:
    """(layout, AVX-512 tiles) pairs to check for m outputs: the blocks layout with AVX2's
    tiles, and with AVX-512's where this CPU has them."""
    if m % cpu_kernel.BLOCK:
        return [("rows", True)]
    return [("rows", True), ("blocks", False)] + [("blocks", True)] * _HAS_AVX512


_HAS_AVX512 = REASON is None and cpu_kernel.blocked_avx512()


def test_avx2_and_avx512_tiles_give_the_same_bits(through):
    """Both instruction sets sum each output over the input in order, one fused
    multiply-add at a time: the same bits, so a server's answers do not depend on the CPU."""
    if not _HAS_AVX512:
        pytest.skip("this CPU has no AVX-512F: only AVX2's tiles run here")
    generator = torch.Generator().manual_seed(4)
    w, x = torch.randn(112, 300, generator=generator), torch.randn(29, 300, generator=generator)
    bias, add = torch.randn(112, generator=generator), torch.randn(29, 112, generator=generator)
    product = cpu_kernel.RowsProduct(w, bias, through=through, layout="blocks")
    try:
        assert cpu_kernel.blocked_avx512(False) is False
        avx2 = product(x, add)
        assert cpu_kernel.blocked_avx512(True) is True
        avx512 = product(x, add)
    finally:
        cpu_kernel.blocked_avx512(True)
    assert torch.equal(avx2, avx512)
    torch.testing.assert_close(avx512, _oracle(x, w, bias, add), rtol=1e-5, atol=1e-4)


def test_blocks_layout_round_trips_and_does_not_depend_on_the_batch(through):
    """The blocked copy gives the weight back; a row's result is the same bits alone, in a
    batch of 7 (a tile of 6 and one of 1) or of 13, whichever tile it lands in."""
    generator = torch.Generator().manual_seed(3)
    w, x = torch.randn(96, 200, generator=generator), torch.randn(13, 200, generator=generator)
    product = cpu_kernel.RowsProduct(w, torch.randn(96, generator=generator), through=through, layout="blocks")
    assert product.weight.shape == (6, 200, 16) and product.weight.data_ptr() != w.data_ptr()
    assert torch.equal(product.dense_weight(), w)
    together = product(x)
    for r in (0, 5, 6, 12):
        assert torch.equal(product(x[r:r + 1])[0], together[r])
    assert torch.equal(product(x[:7]), together[:7])


def test_batched_and_strided_inputs(through):
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(12, 40, generator=generator)
    x = torch.randn(2, 3, 40, generator=generator)
    strided = torch.randn(40, 5, generator=generator).t()           # [5, 40], not contiguous
    product = cpu_kernel.RowsProduct(w, through=through)
    assert product(x).shape == (2, 3, 12)
    torch.testing.assert_close(product(x), _oracle(x, w))
    torch.testing.assert_close(product(strided), _oracle(strided, w))
    add = torch.randn(2, 3, 12, generator=generator)
    torch.testing.assert_close(product(x, add), _oracle(x, w, None, add))


@pytest.mark.parametrize("layout", ["rows", "blocks"])
@pytest.mark.parametrize("rows,n", [(1, 576), (1, 1536), (5, 576)])
def test_one_thread_and_two_give_the_same_bits(rows, n, layout, through):
    """Each output is one thread's dot product in a fixed order, whatever the split."""
    generator = torch.Generator().manual_seed(2)
    x, w = torch.randn(rows, n, generator=generator), torch.randn(962 if layout == "rows" else 976, n, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernel.linear(x, w, through=through, layout=layout)
        torch.set_num_threads(2)
        two = cpu_kernel.linear(x, w, through=through, layout=layout)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_refuses_what_it_cannot_multiply(through):
    w = torch.randn(4, 8)
    errors = (ValueError, RuntimeError)
    with pytest.raises(errors, match=r"\[\.\.\., 8\] input"):
        cpu_kernel.linear(torch.randn(2, 9), w, through=through)
    with pytest.raises(errors, match="float32"):
        cpu_kernel.linear(torch.randn(2, 8, dtype=torch.float64), w, through=through)
    with pytest.raises(errors, match="add must be float32"):
        cpu_kernel.linear(torch.randn(2, 8), w, add=torch.randn(3, 4), through=through)
    with pytest.raises(TypeError, match="float32"):
        cpu_kernel.RowsProduct(w.double())
    with pytest.raises(ValueError, match="through="):
        cpu_kernel.RowsProduct(w, through="somehow")
    with pytest.raises(ValueError, match="bias must be"):
        cpu_kernel.RowsProduct(w, torch.randn(5))
    with pytest.raises(ValueError, match="multiple of 16 outputs"):
        cpu_kernel.RowsProduct(w, layout="blocks")
    with pytest.raises(ValueError, match="layout="):
        cpu_kernel.RowsProduct(w, layout="columns")


def test_switched_off_by_the_environment():
    code = ("from engine.runner import cpu_kernel, packed_linear; import torch;"
            "print(cpu_kernel.unavailable_reason());"
            "print(packed_linear.PackedLinear(torch.nn.Linear(8, 4)).kernel if torch.backends.mkldnn.is_available()"
            " else 'onednn')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "COCONUT_CPU_KERNEL": "off"}, check=True)
    lines = run.stdout.split("\n")
    assert lines[0] == "COCONUT_CPU_KERNEL=off"
    assert lines[1] == "onednn"


def test_packed_linear_takes_the_engine_kernel_in_float32():
    """8 outputs: the weight as held (not copied); 32: blocks of 16, unless told "rows" (a
    head tied to the embedding)."""
    for out, layout, expected in ((8, "auto", "rows"), (32, "auto", "blocks"), (32, "rows", "rows")):
        linear = torch.nn.Linear(16, out)
        packed = packed_linear.PackedLinear(linear, layout=layout)
        assert packed.kernel == "engine" and packed.packed_weight is None and packed.rows.layout == expected
        assert (packed.dense_weight().data_ptr() == linear.weight.data_ptr()) == (expected == "rows")
        assert torch.equal(packed.dense_weight(), linear.weight.detach())
        x, residual = torch.randn(3, 16), torch.randn(3, out)
        with torch.inference_mode():
            torch.testing.assert_close(packed.plus(x, residual), _oracle(x, linear.weight, linear.bias, residual))


@pytest.mark.parametrize("n,heads,groups,dim,length", [(1, 1, 1, 8, 1), (3, 3, 3, 64, 37), (16, 2, 4, 12, 9),
                                                       (2, 4, 1, 64, 64)])
def test_decode_attention_equals_the_float64_softmax(n, heads, groups, dim, length):
    """Each row's query heads (``groups`` per key/value head) against that row's keys and
    values, read in place from a cache slice (rows and heads strided), under an additive
    mask that hides some keys (-inf) and shifts others: the float64 softmax attention."""
    if cpu_kernel.operators_reason() is not None:
        pytest.skip(f"the kernel's torch operators cannot be built here: {cpu_kernel.operators_reason()}")
    generator = torch.Generator().manual_seed(n * 100 + length)
    cache_k = torch.randn(n + 2, heads, length + 5, dim, generator=generator)
    cache_v = torch.randn(n + 2, heads, length + 5, dim, generator=generator)
    query = torch.randn(n, heads, groups, dim, generator=generator)
    mask = torch.randn(n, 1, 1, length, generator=generator)
    mask[0, ..., length // 2 + 1:] = float("-inf")          # a shorter row
    keys, values = cache_k[:n, :, :length], cache_v[:n, :, :length]
    got = torch.ops.coconut_kernels.decode_attention(query, keys, values, mask, 0.3)
    scores = query.double() @ keys.double().transpose(-1, -2) * 0.3 + mask.double()
    want = (torch.softmax(scores, dim=-1) @ values.double()).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="keys and values must be"):
        torch.ops.coconut_kernels.decode_attention(query, keys[:, :, :, :1], values, mask, 0.3)
