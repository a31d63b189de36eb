"""A dense, left-padded KV cache for a continuous batch (the pattern of TGI's CausalLMBatch).

Row i of the batch holds one request. Its cached positions sit right-aligned in the
cache's L columns; the columns to their left are padding, masked out by
``attention_mask``. Every step appends one column to every row, so a row's real
positions stay contiguous and column distance equals position distance (which keeps
sliding-window masks exact). ``positions[i]`` counts the row's real positions: it is the
position id of the row's next input.

- ``filter(rows)`` keeps some rows (finished and aborted requests leave) and drops
  leading columns that became padding everywhere.
- ``concat(other)`` appends another batch's rows (freshly prefilled requests join),
  left-padding whichever side is shorter.

Works for every Hugging Face model whose cache is a ``DynamicCache`` of plain layers
holding ``keys``/``values`` tensors of shape [B, heads, L, head_dim]. It knows nothing of
requests, sampling or latent mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class PaddedBatchCache:
    def __init__(self, cache, attention_mask: torch.Tensor, positions: torch.Tensor):
        self.cache = cache                    # HF DynamicCache, grown in place by forwards
        self.attention_mask = attention_mask  # [B, L] long, 1 = real position
        self.positions = positions            # [B] long, number of real positions per row

    @classmethod
    def for_prefill(cls, cache, prompt_lengths: list[int], device) -> tuple["PaddedBatchCache", torch.Tensor]:
        """The batch state a left-padded prefill of these prompts leaves behind, and the
        prefill's position ids [B, P]. The mask already covers the P prefill columns, so
        it is also the prefill forward's attention mask; the forward fills ``cache``."""
        width = max(prompt_lengths)
        lengths = torch.tensor(prompt_lengths, device=device)
        columns = torch.arange(width, device=device)
        mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return cls(cache, mask, lengths), position_ids

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def width(self) -> int:
        return self.attention_mask.shape[1]

    def mask_for_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Grow by one real column for every row; return (attention_mask [B, L+1], position_ids [B, 1])."""
        position_ids = self.positions[:, None].clone()
        ones = torch.ones((self.batch_size, 1), dtype=self.attention_mask.dtype, device=self.attention_mask.device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        self.positions = self.positions + 1
        return self.attention_mask, position_ids

    def _layers(self):
        return [layer for layer in self.cache.layers if getattr(layer, "is_initialized", True)
                and getattr(layer, "keys", None) is not None and layer.keys.numel() > 0]

    def filter(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then trim all-padding leading columns."""
        index = torch.tensor(rows, dtype=torch.long, device=self.attention_mask.device)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        start = 0
        if len(rows) > 0:
            start = self.width - int(self.positions.max())
        self.attention_mask = self.attention_mask[:, start:]
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def concat(self, other: "PaddedBatchCache") -> None:
        """Append ``other``'s rows after this batch's rows (both must be non-empty)."""
        width = max(self.width, other.width)
        mine, theirs = self._layers(), other._layers()
        if len(mine) != len(theirs):
            raise RuntimeError(f"cannot join caches with {len(mine)} and {len(theirs)} layers")
        for a, b in zip(mine, theirs):
            a.keys = torch.cat([_left_pad(a.keys, width, -2), _left_pad(b.keys, width, -2)], dim=0)
            a.values = torch.cat([_left_pad(a.values, width, -2), _left_pad(b.values, width, -2)], dim=0)
        self.attention_mask = torch.cat([_left_pad(self.attention_mask, width, -1),
                                         _left_pad(other.attention_mask, width, -1)], dim=0)
        self.positions = torch.cat([self.positions, other.positions])


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(tensor, pad)
