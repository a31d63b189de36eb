"""Sizing the slot KV cache: how many positions per request a memory budget holds.

The cache (``engine.runner.slot_cache``) holds keys and values of every decoder layer that
writes its own (layers that reuse another layer's keys, as Gemma-3n's, hold none) for
``max_batch_size`` slots x ``max_seq_len`` positions; sliding-window layers hold every
position too (column p of a slot is position p in every layer). One position of one slot
costs ``kv_bytes_per_position(model_config, dtype)`` = such layers x 2 (keys and values)
x KV heads x head dim x bytes per element.

``kv_cache_memory`` (``EngineConfig``, ``engine serve --kv-cache-memory``), read by
``parse_kv_cache_memory``: ``4GiB``, ``512MiB`` or a plain number of GiB (``4``, ``0.5``);
or ``90%``: that share of the memory free on the engine's device when the cache is sized,
after the weights are loaded (CUDA: ``torch.cuda.mem_get_info``; CPU: ``MemAvailable`` of
``/proc/meminfo``, or ``psutil`` where installed). Units are binary only: ``GB`` is refused
rather than guessed.

``plan_kv_cache`` decides the positions per slot:

- no budget: ``max_seq_len`` if given, else ``DEFAULT_MAX_SEQ_LEN``, at most the model's
  context (the rule from before budgets existed);
- a budget and no ``max_seq_len``: the model's context if it fits, else what fits, no
  4096 cap; fewer than ``MIN_POSITIONS`` is refused (``ValueError`` with the figures);
- both: ``max_seq_len`` (at most the model's context) if it fits the budget, else refused
  with the figures (bytes needed against the budget, slots x positions).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)

# Positions per request when neither the model (ALiBi, or a very long context) nor the
# configuration bounds them: the slot cache holds max_batch_size x max_seq_len positions.
DEFAULT_MAX_SEQ_LEN = 4096
# Fewer positions per request than this from a memory budget is refused as a mistake.
MIN_POSITIONS = 64

EXPECTED = ("expected a size in GiB or MiB (4GiB, 512MiB, or a plain number of GiB such as 4 or 0.5) "
            "or a share of the device's free memory (90%)")
_UNITS = {"gib": 2**30, "mib": 2**20}


@dataclass(frozen=True)
class KVCacheMemory:
    """A parsed budget: ``size_bytes`` (absolute) or ``fraction`` of free memory."""

    text: str
    size_bytes: int | None = None
    fraction: float | None = None


def parse_kv_cache_memory(value: str | float | int) -> KVCacheMemory:
    """``"4GiB"``, ``"512MiB"``, ``4`` / ``"0.5"`` (GiB) or ``"90%"``; ``ValueError`` saying
    what is expected otherwise."""
    problem = f"kv_cache_memory={value!r} is invalid: {EXPECTED}"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(problem)
    text = str(value).strip()
    lower = text.lower().replace(" ", "")
    percent = lower.endswith("%")
    scale = 2**30
    number = lower[:-1] if percent else lower
    for unit, size in _UNITS.items():
        if not percent and lower.endswith(unit):
            number, scale = lower[:-len(unit)], size
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(problem) from None
    if not math.isfinite(amount) or amount <= 0 or (percent and amount > 100):
        raise ValueError(f"{problem}; a size must be > 0 and a share in (0, 100]%")
    if percent:
        return KVCacheMemory(text, fraction=amount / 100)
    return KVCacheMemory(text, size_bytes=int(amount * scale))


def kv_bytes_per_position(model_config, dtype: torch.dtype) -> int:
    """Bytes one cached position of one slot takes, over every layer, keys and values, as
    the slot cache allocates them for a model of ``model_config`` computing in ``dtype``."""
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None)
    if not kv_heads:
        kv_heads = 1 if getattr(config, "multi_query", False) else heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    modes = getattr(config, "kv_sharing_modes", None)
    if modes:
        layers = sum(1 for mode in modes if mode != "reuse")
    else:
        layers = config.num_hidden_layers - (getattr(config, "num_kv_shared_layers", 0) or 0)
    element = torch.empty((), dtype=dtype).element_size()
    return layers * 2 * kv_heads * head_dim * element


def free_memory_bytes(device: torch.device | str) -> int:
    """Memory free for new tensors on ``device`` now (CUDA: the driver's free figure; CPU:
    the kernel's available memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        raise ValueError(f"the free memory of a {device.type} device is not known: give kv_cache_memory "
                         f"in GiB or MiB")
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class KVCachePlan:
    max_seq_len: int
    source: str                    # where the figure came from, for the start-up log
    bytes_per_position: int        # per slot
    budget_bytes: int | None = None


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def plan_kv_cache(model_context: int, slots: int, max_seq_len: int | None,
                  kv_cache_memory: KVCacheMemory | None, bytes_per_position: int,
                  free_memory: Callable[[], int]) -> KVCachePlan:
    """The positions per slot (see the module docstring); ``free_memory()`` is called only
    for a share of free memory."""
    if kv_cache_memory is None:
        limit = min(model_context, max_seq_len or DEFAULT_MAX_SEQ_LEN)
        if limit == model_context:
            source = "the model's context"
        elif max_seq_len is not None:
            source = "max_seq_len"
        else:
            source = f"the default cap of {DEFAULT_MAX_SEQ_LEN}; the model's context is {model_context}"
        return KVCachePlan(limit, source, bytes_per_position)
    if kv_cache_memory.fraction is not None:
        free = free_memory()
        budget = int(kv_cache_memory.fraction * free)
        said = f"kv_cache_memory {kv_cache_memory.text} ({_size(budget)} of {_size(free)} free)"
    else:
        budget = kv_cache_memory.size_bytes
        said = f"kv_cache_memory {kv_cache_memory.text} ({_size(budget)})"
    slot_bytes = slots * bytes_per_position
    fits = budget // slot_bytes
    if max_seq_len is not None:
        wanted = min(model_context, max_seq_len)
        if wanted > fits:
            raise ValueError(
                f"a KV cache of {slots} slots x {wanted} positions needs {wanted * slot_bytes} bytes "
                f"({_size(wanted * slot_bytes)}, {bytes_per_position} bytes per position per slot) but {said} "
                f"holds {budget} bytes: at most {fits} positions per slot; lower max_seq_len or "
                f"max_batch_size, or raise kv_cache_memory")
        return KVCachePlan(wanted, f"max_seq_len, within {said}", bytes_per_position, budget)
    if fits >= model_context:
        return KVCachePlan(model_context, f"the model's context, within {said}", bytes_per_position, budget)
    if fits < MIN_POSITIONS:
        raise ValueError(
            f"{said} holds {budget} bytes: {fits} positions per slot for {slots} slots at "
            f"{bytes_per_position} bytes per position per slot ({MIN_POSITIONS * slot_bytes} bytes needed for "
            f"{MIN_POSITIONS}); raise kv_cache_memory or lower max_batch_size")
    return KVCachePlan(fits, f"what {said} holds; the model's context is {model_context}",
                       bytes_per_position, budget)


def plan_for_model(model: torch.nn.Module, model_context: int, config) -> KVCachePlan:
    """``plan_kv_cache`` for a loaded model (its config, compute dtype and device) and an
    ``EngineConfig``."""
    weight = model.get_input_embeddings().weight
    memory = None if config.kv_cache_memory is None else parse_kv_cache_memory(config.kv_cache_memory)
    return plan_kv_cache(model_context, config.max_batch_size, config.max_seq_len, memory,
                         kv_bytes_per_position(model.config, weight.dtype), lambda: free_memory_bytes(weight.device))


def check_allocation(plan: KVCachePlan, slots: int, allocated_bytes: int) -> None:
    """Warn when a budgeted cache came out another size than planned (an architecture whose
    cache the config formula does not describe)."""
    planned = plan.bytes_per_position * slots * plan.max_seq_len
    if plan.budget_bytes is not None and allocated_bytes != planned:
        log.warning("KV cache: %d bytes allocated where %d were planned (%d bytes per position per slot from "
                    "the model's config): kv_cache_memory is not exact for this architecture",
                    allocated_bytes, planned, plan.bytes_per_position)
