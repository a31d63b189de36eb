"""A preallocated slot KV cache: one slot per request, written in place, never reshaped.

The cache holds, for every decoder layer, keys and values of shape
[num_slots, heads, max_seq_len, head_dim], allocated on the first forward (when heads,
head size and dtype are known). A request keeps one slot from admission to finish; its
position p lives at column p of its slot, so a request that joins or leaves copies nothing
of any other row, and nothing grows by concatenation.

Before each forward the runner states where the new keys go (``plan_write``): the slot of
each batch row and the position of each of its T new tokens. A layer's ``update`` writes
them in place and returns the keys and values the attention reads:

- ``rows_are_leading``: batch row i is slot i for i < B (the decode forward, which runs
  over the leading slots, free ones included): a view of the first B slots, no copy;
- ``fresh`` (prompt chunks that all start at position 0): the new keys themselves, which
  are all the rows hold, no copy;
- otherwise (prompt chunks of some slots that continue earlier chunks): those slots'
  columns, gathered (a copy of those rows' first ``kv_len`` columns only).

Both are cut to ``kv_len`` columns. Which columns a query may see is the attention mask's
business (``slot_attention_masks``): the cache has no notion of lengths, padding,
requests or sliding windows. It is a ``transformers`` ``Cache`` so that every model's
attention calls it as it would call a ``DynamicCache``.
"""

from __future__ import annotations

import math
import mmap

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On CPU it lies in an anonymous memory map, whose pages the kernel
    backs (with zeros) only when they are first touched: a slot's columns cost memory only
    once a request has written them, so slots x positions bounds the cache's address space,
    not the memory it holds. Elsewhere, ``torch.zeros``."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if size == 0:
        return torch.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):   # where transparent huge pages are "always", a first
        memory.madvise(mmap.MADV_NOHUGEPAGE)   # write would back 2 MiB: a slot-head's columns are less
    # the tensor keeps the map alive (torch.frombuffer holds a reference to the buffer)
    return torch.frombuffer(memory, dtype=dtype).view(shape)


class SlotLayer(CacheLayerMixin):
    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: "SlotCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (self.owner.num_slots, key_states.shape[1], self.owner.max_seq_len)
        self.keys = zeroed(shape + (key_states.shape[-1],), key_states.dtype, key_states.device)
        self.values = zeroed(shape + (value_states.shape[-1],), value_states.dtype, value_states.device)
        self.device = key_states.device
        if self.device.type == "cuda":   # written in place by CUDA graphs: a fixed address
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states [B, heads, T, head_dim] -> the keys and values to attend to."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        write = self.owner.write
        slots, positions = write.slots[:, None], write.positions                    # [B, 1], [B, T]
        # advanced indices around a slice: the indexed view is [B, T, heads, head_dim]
        self.keys[slots, :, positions] = key_states.transpose(1, 2).to(self.keys.dtype)
        self.values[slots, :, positions] = value_states.transpose(1, 2).to(self.values.dtype)
        if write.rows_are_leading:
            rows = key_states.shape[0]
            return self.keys[:rows, :, :write.kv_len], self.values[:rows, :, :write.kv_len]
        if write.fresh:
            return key_states, value_states
        return (self.keys[:, :, :write.kv_len].index_select(0, write.slots),
                self.values[:, :, :write.kv_len].index_select(0, write.slots))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.write.kv_len, 0

    def get_seq_length(self) -> int:
        return self.owner.write.kv_len if self.owner.write is not None else 0

    def get_max_length(self) -> int:
        return self.owner.max_seq_len

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()


class SlotWrite:
    """Where one forward's new keys go: ``slots`` [B], ``positions`` [B, T], ``kv_len``;
    ``fresh``: the T new tokens of every row are its positions 0..T-1 (kv_len == T)."""

    def __init__(self, slots: torch.Tensor, positions: torch.Tensor, kv_len: int, rows_are_leading: bool,
                 fresh: bool = False):
        self.slots = slots
        self.positions = positions
        self.kv_len = kv_len
        self.rows_are_leading = rows_are_leading
        self.fresh = fresh


class SlotCache(Cache):
    def __init__(self, num_layers: int, num_slots: int, max_seq_len: int):
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.write: SlotWrite | None = None
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    def plan_write(self, slots: torch.Tensor, positions: torch.Tensor, kv_len: int,
                   rows_are_leading: bool, fresh: bool = False) -> None:
        if kv_len > self.max_seq_len:
            raise ValueError(f"kv_len {kv_len} exceeds the cache's {self.max_seq_len} positions")
        if fresh and kv_len != positions.shape[1]:
            raise ValueError(f"a fresh write of {positions.shape[1]} tokens per row must have kv_len "
                             f"{positions.shape[1]}, got {kv_len}")
        self.write = SlotWrite(slots, positions.clamp(max=self.max_seq_len - 1), kv_len, rows_are_leading, fresh)

    def copy_positions(self, source: int, targets: list[int], length: int) -> None:
        """Copy slot ``source``'s first ``length`` positions into each of ``targets`` (every
        layer's keys and values), in place."""
        if not targets or length <= 0:
            return
        for layer in self.layers:
            if layer.is_initialized:
                index = torch.tensor(targets, device=layer.keys.device)
                layer.keys[index, :, :length] = layer.keys[source, :, :length]
                layer.values[index, :, :length] = layer.values[source, :, :length]

    @property
    def memory_bytes(self) -> int:
        return sum(layer.keys.numel() * layer.keys.element_size() * 2
                   for layer in self.layers if layer.is_initialized)


def slot_attention_masks(query_positions: torch.Tensor, query_valid: torch.Tensor, kv_len: int,
                         dtype: torch.dtype, sliding_window: int | None):
    """Additive 4D masks [B, 1, T, kv_len] for queries at ``query_positions`` [B, T] of rows
    whose key at column c is position c: a query sees the columns 0..its own position (and,
    with ``sliding_window`` w, only the last w of them). A padding query (``query_valid``
    False) sees column 0 only, so its row stays finite. Returns (full, sliding or None)."""
    columns = torch.arange(kv_len, device=query_positions.device)[None, None, :]     # [1, 1, K]
    q = torch.where(query_valid, query_positions, torch.zeros_like(query_positions))[:, :, None]
    visible = columns <= q                                                            # [B, T, K]
    minimum = torch.finfo(dtype).min

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.full((), minimum, dtype=dtype, device=allowed.device))[:, None]

    full = additive(visible)
    sliding = None
    if sliding_window is not None:
        sliding = additive(visible & (columns > q - sliding_window))
    return full, sliding
