"""What this CPU multiplies natively: the default serving dtype on CPU follows it.

``native_bfloat16()`` is True when the CPU has AVX-512 BF16 or AMX-BF16 (Linux
``/proc/cpuinfo`` flags ``avx512_bf16``, ``amx_bf16``): there bfloat16 matrix products run
about twice float32's rate (oneDNN's kernels), and ``engine serve --dtype auto`` takes
bfloat16 as vLLM's CPU backend does. Elsewhere (AVX2 only, as on this project's 2-core
test machines) bfloat16 is converted in software and is slower than float32, so ``auto``
stays float32. It reads only the flags; it does not time anything. Outside Linux it
answers False.
"""

from __future__ import annotations

from functools import lru_cache

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of the first processor in a ``/proc/cpuinfo`` text."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@lru_cache(maxsize=1)
def native_bfloat16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo_path) as f:
            flags = cpu_flags(f.read())
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def default_cpu_dtype() -> str:
    """``--dtype auto`` on CPU: bfloat16 where the CPU multiplies it natively, else float32."""
    return "bfloat16" if native_bfloat16() else "float32"
