"""The engine's own matrix product on x86-64 CPUs with AVX2: ``linear(x, weight, bias, add)``.

On a 2-core AMD EPYC (float32, two threads) a decode step's products are bound by reading
the weights at 1 row, and neither library kernel torch offers reads them at the machine's
rate; at 16-32 rows they are bound by the multiplications. Two layouts of the weight
(``RowsProduct(layout=...)``):

- ``"rows"`` (``kernels/linear_rows.c``): the weight as the model holds it ([out, in],
  row-major), nothing copied (for a head tied to the embedding). At 1 row each thread reads
  its share as four long sequential streams; at more rows blocks of 4 weight rows meet 3
  input rows at a time from cache. Over SmolLM2-135M's 120 decoder products and its head,
  cold weights: 11.4-16.5 ms at 1 row (up to 47 GB/s, the machine's best read rate)
  against oneDNN's packed 20-25 and MKL's 35-38.
- ``"blocks"`` (``kernels/linear_blocked.c``): a copy laid out once in blocks of 16 outputs
  ([out / 16, in, 16]); tiles of 16 outputs x 6 rows in registers, no horizontal sums.
  The same at 1 row, faster from 2 on: SmolLM2's decoder products 27.5 against 34.7 ms at
  16 rows, 45.0 against 55.3 at 32 (oneDNN's AVX-512 packed copy: 26.7, 41.5).

The torch operators also hold ``coconut_kernels::decode_attention``
(``kernels/decode_attention.c``), one decode step's attention on the cache in place, which
the compiled step calls.

The C sources are compiled once per machine with the C compiler on the PATH (``CC`` or
``cc``; ``-O3 -mavx2 -mfma -fopenmp``) into ``COCONUT_KERNEL_DIR`` (default
``~/.cache/coconut-serve/kernels``, else the temp directory), keyed by the source's hash,
and loaded with ``ctypes``. With a C++ compiler it is also built as torch operators
(``kernels/linear_rows_op.cpp``: ``coconut_kernels::linear_rows`` and the layer tables the
compiled step uses), which ``RowsProduct`` prefers (fewer microseconds a call). Its OpenMP
threads are torch's own (the same ``libgomp``), as many as ``torch.get_num_threads()``.
``unavailable_reason()`` says why it cannot be used here (not x86-64 with AVX2, no
compiler, the build or its self-check failed, ``COCONUT_CPU_KERNEL=off``); callers then
use oneDNN or MKL. It computes in float32 only, holds no state beyond the loaded
libraries, and knows nothing of models or autograd (inference only: no gradient flows
through it). Results equal ``F.linear``'s up to float rounding (another summation order);
a row's result does not depend on the thread count (nor, in blocks, on the batch).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = (Path(__file__).with_name("kernels") / "linear_rows.c", Path(__file__).with_name("kernels") / "linear_blocked.c")
OP_SOURCE = Path(__file__).with_name("kernels") / "linear_rows_op.cpp"
#: built into the operators' library only (C, with the kernels' flags)
OP_C_SOURCES = (Path(__file__).with_name("kernels") / "decode_attention.c",)
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC")


def _cache_dirs() -> list[Path]:
    chosen = os.environ.get("COCONUT_KERNEL_DIR")
    if chosen:
        return [Path(chosen)]
    return [Path.home() / ".cache" / "coconut-serve" / "kernels", Path(tempfile.gettempdir()) / "coconut-serve-kernels"]


def _build(name: str, sources: bytes, commands) -> Path:
    """``commands(output_path, scratch_dir) -> [argv, ...]`` run once per ``sources`` (their
    bytes and the command lines) -> the built library's path, in the first writable cache
    directory. Intermediate files go to the scratch directory, removed whatever happens."""
    key = hashlib.sha256(sources + repr(commands("OUT", "SCRATCH")).encode()).hexdigest()[:16]
    errors = []
    for directory in _cache_dirs():
        target = directory / f"{name}-{key}.so"
        if target.exists():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
            log.info("building the engine's CPU kernel %s into %s (once per machine)", name, directory)
            with tempfile.TemporaryDirectory(dir=directory) as scratch:
                partial = os.path.join(scratch, f"{name}.so")
                for argv in commands(partial, scratch):
                    run = subprocess.run(argv, capture_output=True, text=True)
                    if run.returncode != 0:
                        raise RuntimeError(f"{argv[0]} failed: {run.stderr.strip()[-500:]}")
                os.replace(partial, target)       # atomic: a concurrent build writes the same bytes
            return target
        except OSError as e:
            errors.append(f"{directory}: {e}")
    raise RuntimeError("no writable directory for the kernel: " + "; ".join(errors))


def _sources() -> bytes:
    return b"".join(path.read_bytes() for path in SOURCES)


@functools.cache
def _library():
    """-> ({"rows": the C function of [out, in] weights, "blocks": of blocked ones}, None),
    or (None, why not)."""
    if os.environ.get("COCONUT_CPU_KERNEL", "").lower() in ("0", "off", "false", "no"):
        return None, "COCONUT_CPU_KERNEL=off"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the kernel is for x86-64, this is {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return None, f"the kernel needs AVX2 and FMA; torch reports {capability}"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler on the PATH (CC or cc) to build the kernel"
    try:
        path = _build("linear_rows", _sources(),
                      lambda out, scratch: [[compiler, *FLAGS, "-shared", *map(str, SOURCES), "-o", out]])
        library = ctypes.CDLL(str(path))
        functions = {"rows": library.coconut_linear_rows, "blocks": library.coconut_linear_blocked}
        _add_avx512_switch(library)
    except (RuntimeError, OSError, AttributeError) as e:
        return None, f"the kernel could not be built or loaded: {e}"
    for function in functions.values():
        function.restype = None
        function.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 3 + [ctypes.c_int]
    return functions, None


#: each loaded library's ``coconut_blocked_avx512`` (the ctypes one, the operators' one)
_AVX512_SWITCHES: list = []


def _add_avx512_switch(library: ctypes.CDLL) -> None:
    switch = library.coconut_blocked_avx512
    switch.restype, switch.argtypes = ctypes.c_int, [ctypes.c_int]
    _AVX512_SWITCHES.append(switch)


def blocked_avx512(use: bool | None = None) -> bool:
    """Whether the blocks layout multiplies 2 rows or more with AVX-512 tiles (16 outputs
    x 12 rows) instead of AVX2's (16 x 6): by default where the CPU has AVX-512F. ``use``
    sets it (False: AVX2's everywhere, for tests and comparisons; True: AVX-512's where the
    CPU has it) in every loaded copy of the kernel. Results are the same bits either way."""
    if _library()[0] is None:
        return False
    _operators()
    value = -1 if use is None else int(use)
    return bool([switch(value) for switch in _AVX512_SWITCHES][-1])


@functools.cache
def _operators() -> str | None:
    """Build and load ``coconut_kernels`` (the kernel as torch operators) -> None, or why
    not (then ``RowsProduct`` calls the kernel through ctypes)."""
    if _library()[0] is None:
        return _library()[1]
    c_compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        return "no C++ compiler on the PATH (CXX or c++) to build the kernel's torch operators"
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    includes = [f"-I{p}" for p in include_paths()]

    def commands(out, scratch):
        sources = SOURCES + OP_C_SOURCES
        objects = [os.path.join(scratch, source.stem + ".o") for source in sources]
        return [*([c_compiler, *FLAGS, "-c", str(source), "-o", obj] for source, obj in zip(sources, objects)),
                [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", *includes, str(OP_SOURCE), *objects,
                 f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-o", out]]
    try:
        path = _build("linear_rows_op", _sources() + b"".join(p.read_bytes() for p in OP_C_SOURCES)
                      + OP_SOURCE.read_bytes() + torch.__version__.encode(), commands)
        torch.ops.load_library(str(path))
        _add_avx512_switch(ctypes.CDLL(str(path)))
    except (RuntimeError, OSError, AttributeError) as e:
        return f"the kernel's torch operators could not be built or loaded: {e}"

    @torch.library.register_fake("coconut_kernels::linear_rows")
    def _linear_rows_shape(x, weight, bias=None, add=None):
        out = weight.shape[0] * weight.shape[2] if weight.dim() == 3 else weight.shape[0]
        return x.new_empty(x.shape[:-1] + (out,))

    @torch.library.register_fake("coconut_kernels::decode_attention")
    def _decode_attention_shape(query, keys, values, mask, scaling):
        return torch.empty_like(query, memory_format=torch.contiguous_format)
    return None


def operators_reason() -> str | None:
    """None where the kernel's torch operators (``coconut_kernels::...``) are loaded here,
    else why not."""
    return _operators()


def build_reason() -> str | None:
    """None where the kernel is built and loaded here, else why not (the machine, the
    compiler, ``COCONUT_CPU_KERNEL``); ``unavailable_reason`` checks its results too."""
    return _library()[1]


def unavailable_reason() -> str | None:
    """None where ``linear`` can run here, else why not (a sentence). Builds the kernel on
    first call and checks it against ``F.linear`` on shapes with every tail."""
    reason = build_reason()
    if reason is None and not _self_check():
        return "the kernel's results differ from F.linear's here"
    return reason


@functools.cache
def _self_check() -> bool:
    generator = torch.Generator().manual_seed(0)
    for rows, m, n in ((1, 7, 13), (5, 9, 24), (4, 64, 100), (1, 64, 40), (7, 48, 33)):
        x, w = torch.randn(rows, n, generator=generator), torch.randn(m, n, generator=generator)
        bias, add = torch.randn(m, generator=generator), torch.randn(rows, m, generator=generator)
        want = torch.nn.functional.linear(x, w, bias) + add
        for layout in ("rows", "blocks") if m % BLOCK == 0 else ("rows",):
            if not torch.allclose(linear(x, w, bias, add, layout=layout), want, rtol=1e-4, atol=1e-4):
                return False
    return True


def available() -> bool:
    return unavailable_reason() is None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           add: torch.Tensor | None = None, *, through: str = "auto", layout: str = "rows") -> torch.Tensor:
    """x [..., in] @ weight[out, in]^T (+ bias [out]) (+ add [..., out]) -> [..., out], float32
    on CPU. Raises RuntimeError where the kernel is unavailable (``through``, ``layout``: see
    ``RowsProduct``)."""
    return RowsProduct(weight, bias, through=through, layout=layout)(x, add)


#: outputs per block of the "blocks" layout (linear_blocked.c)
BLOCK = 16


def blocked(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [out / 16, in, 16]: weight rows 16 b .. 16 b + 15 interleaved, so that
    each block of 16 outputs is one contiguous run (``out`` a multiple of 16)."""
    out, inner = weight.shape
    return weight.reshape(out // BLOCK, BLOCK, inner).transpose(1, 2).contiguous()


def unblocked(packed: torch.Tensor) -> torch.Tensor:
    """``blocked``'s inverse: [out / 16, in, 16] -> [out, in] (a copy)."""
    blocks, inner, width = packed.shape
    return packed.transpose(1, 2).reshape(blocks * width, inner)


class RowsProduct:
    """A weight (and bias) bound once, for the many calls of a decode loop:
    ``product(x, add=None)`` = ``linear(x, weight, bias, add)`` with less per-call work.
    ``through``: "operators" (the ``coconut_kernels`` torch operators: about 5 us a call
    with the dispatcher), "ctypes" (about 8 us), or "auto" (operators where they built).
    ``layout``: "rows" multiplies the weight as given (``self.weight`` is it, not a copy);
    "blocks" lays out a copy in blocks of 16 outputs once (``self.weight`` is that copy,
    [out / 16, in, 16]; ``out`` must be a multiple of 16): faster from 2 rows on (16 rows of
    SmolLM2-135M's products: 27.5 against 34.7 ms), the same at 1. ``dense_weight()`` gives
    [out, in] either way. Bad input raises ValueError (ctypes) or RuntimeError
    (operators), saying what was expected."""

    __slots__ = ("weight", "bias", "out_features", "in_features", "layout", "_function", "_pointers", "_operator")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, through: str = "auto",
                 layout: str = "rows"):
        if through not in ("auto", "operators", "ctypes"):
            raise ValueError(f"through={through!r}: expected auto, operators or ctypes")
        if layout not in ("rows", "blocks"):
            raise ValueError(f"layout={layout!r}: expected rows or blocks")
        functions, reason = _library()
        if functions is None:
            raise RuntimeError(f"the engine's CPU kernel is unavailable: {reason}")
        if weight.dtype != torch.float32 or weight.ndim != 2 or weight.device.type != "cpu":
            raise TypeError(f"the engine's CPU kernel takes a float32 [out, in] weight on CPU, "
                            f"got {weight.dtype} {tuple(weight.shape)} on {weight.device}")
        self.out_features, self.in_features = weight.shape
        if layout == "blocks" and self.out_features % BLOCK:
            raise ValueError(f"the blocks layout needs a multiple of {BLOCK} outputs, got {self.out_features}")
        self.layout = layout
        self.weight = weight.detach().contiguous() if layout == "rows" else blocked(weight.detach())
        if bias is not None:
            bias = bias.detach().to(torch.float32).contiguous()
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
        self.bias = bias
        self._function = functions[layout]
        self._pointers = (self.weight.data_ptr(), None if bias is None else bias.data_ptr())
        self._operator = None
        if through != "ctypes":
            reason = _operators()
            if reason is None:
                self._operator = torch.ops.coconut_kernels.linear_rows.default
            elif through == "operators":
                raise RuntimeError(f"the engine's CPU kernel operators are unavailable: {reason}")

    def dense_weight(self) -> torch.Tensor:
        """The weight as [out, in]: the one given ("rows", not to be written) or a copy."""
        return self.weight if self.layout == "rows" else unblocked(self.weight)

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        if self._operator is not None:      # the same kernel through the dispatcher: fewer us a call
            return self._operator(x, self.weight, self.bias, add)
        n = self.in_features
        if x.dtype != torch.float32 or x.shape[-1] != n:
            raise ValueError(f"expected float32 [..., {n}] input, got {x.dtype} {tuple(x.shape)}")
        rows_in = x if x.ndim == 2 and x.is_contiguous() else x.reshape(-1, n).contiguous()
        out = torch.empty(x.shape[:-1] + (self.out_features,), dtype=torch.float32)
        if add is not None:
            if add.shape != out.shape or add.dtype != torch.float32:
                raise ValueError(f"add must be float32 {tuple(out.shape)}, got {add.dtype} {tuple(add.shape)}")
            add = add.contiguous()
        weight, bias = self._pointers
        self._function(weight, rows_in.data_ptr(), out.data_ptr(), bias, None if add is None else add.data_ptr(),
                       rows_in.shape[0], self.out_features, n, torch.get_num_threads())
        return out
