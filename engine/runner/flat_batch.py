"""One engine step's rows as one flat batch: the decode rows, then every prompt chunk's tokens.

The lean forward (``engine.runner.lean_decoder``) runs a whole step, decode rows and prompt
chunks together, as one batch of N rows of one position each: every matrix product reads
its weights once per step for all of them, instead of once for the decode forward and once
more for the prefill forward (what vLLM's and SGLang's mixed batches do). On SmolLM2-135M
on 2 CPU cores, 16 decode rows and one 12-token chunk take about as long as the products at
28 rows, against a decode step plus a separate 12-token forward that reads the weights
again. Only the attention sees the two kinds apart:

- the decode rows are the leading slots 0..n-1 (free slots ride along as padding rows that
  see one key and write into the slot's scratch column, as in the runner's decode forward);
  they attend over their slots' first ``kv_len`` columns in the cache (``DecodeAttention``),
  except that a few rows whose keys run far past the others' are attended apart
  (``split_rows``): every row over the others' columns, each such row over the rest of
  its own, so that one long conversation does not make every row read its length;
- the chunks' tokens attend, chunk by chunk, causally over their own slot's columns up to
  their own position (``ChunkAttention``): one chunk reads its slot's columns in place,
  several are padded to the longest and read their slots' columns gathered.

Every row writes its new key and value before the layer's attention reads the cache, at one
flat index per row and key-value head (``write_index``) into the cache's
[slots, heads, positions, head size] tensors viewed as [-1, head size]; the same index
serves every layer, since the layers' caches have one shape.

This module builds the index, the masks and the attention from plain lists; it knows nothing
of requests or models beyond head counts, nor of the scheduler's rules (which rows and
chunks a step has).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.runner.slot_cache import slot_attention_masks

#: From this many decode rows their attention runs as two batched matrix products and a
#: softmax rather than ``F.scaled_dot_product_attention``, whose CPU kernel is slower on one
#: query per row: SmolLM2's shapes (3 key-value heads of 3 query heads, 64 wide), two
#: threads: 157 (baddbmm) / 241 (matmul) against 303 us at 16 rows and 100 keys, 272 against
#: 630 at 32 rows; 39 against 37 us at 1 row.
MATMUL_ATTENTION_MIN_ROWS = 8

#: Decode rows whose keys run far past the others' ("long rows") are attended apart when
#: that reads at most this share of the key columns that cutting every row at the longest
#: one reads (``split_rows``).
SPLIT_MAX_SHARE = 0.5
#: At most this many long rows: each costs two more products per layer.
MAX_LONG_ROWS = 4
#: What one long row's own products cost, counted as key columns read (their overhead).
LONG_ROW_COLUMNS = 256


def split_rows(lengths: list[int]) -> tuple[int, list[int]] | None:
    """The decode rows' key counts (a row sees its slot's first ``lengths[i]`` columns) ->
    ``(short, long_rows)``: every row attends over the first ``short`` columns and each long
    row over the rest of its own, the split that reads the fewest columns (a long row's own
    products count as ``LONG_ROW_COLUMNS``); None when the best split reads more than
    ``SPLIT_MAX_SHARE`` of what cutting every row at the longest reads."""
    n = len(lengths)
    if n < 2:
        return None
    order = sorted(range(n), key=lambda i: -lengths[i])
    best = None
    for k in range(1, min(MAX_LONG_ROWS, n - 1) + 1):
        short = lengths[order[k]]
        cost = n * short + sum(lengths[i] - short + LONG_ROW_COLUMNS for i in order[:k])
        if best is None or cost < best[0]:
            best = (cost, short, sorted(order[:k]))
    if best[0] > SPLIT_MAX_SHARE * n * lengths[order[0]]:
        return None
    return best[1], best[2]


class DecodeAttention:
    """The decode rows' attention: n rows, row i in slot i, one query each; ``mask`` [n, 1,
    1, kv_len] additive (``slot_attention_masks``). Given the rows' key counts
    (``lengths``), rows whose keys run far past the others' are attended apart
    (``split_rows``): every row over the first ``short`` columns, each long row's scores
    then completed with the rest of its own keys, and its softmax taken over both, so that
    one long conversation does not make every row read its length."""

    def __init__(self, mask: torch.Tensor, kv_heads: int, groups: int, scaling: float,
                 lengths: list[int] | None = None):
        self.n, self.kv_len = mask.shape[0], mask.shape[-1]
        self.kv_heads, self.groups, self.scaling = kv_heads, groups, scaling
        self.split = split_rows(lengths) if lengths is not None else None
        self.matmul = self.n >= MATMUL_ATTENTION_MIN_ROWS or self.split is not None
        self.row_mask = self.mask = mask        # row_mask: as given, [n, 1, 1, kv_len]
        if self.split is not None:
            self.kv_len = self.split[0]
            self.long_rows = [(row, lengths[row]) for row in self.split[1]]
        if self.matmul:   # [n * kv heads, group, L]: added by baddbmm to the scores' product
            self.mask = mask[..., :self.kv_len].expand(self.n, kv_heads, groups, self.kv_len).reshape(
                self.n * kv_heads, groups, self.kv_len)

    def __call__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """query [n, heads, hd]; keys and values: a layer's whole cache [slots, kv, positions,
        hd] -> [n, heads * hd]."""
        n, kv, groups, length = self.n, self.kv_heads, self.groups, self.kv_len
        head_dim = query.shape[-1]
        cache_keys, cache_values = keys, values
        keys, values = keys[:n, :, :length], values[:n, :, :length]
        if not self.matmul:
            out = F.scaled_dot_product_attention(query.reshape(n, kv, groups, head_dim), keys, values,
                                                 attn_mask=self.mask, scale=self.scaling)
            return out.reshape(n, -1)
        grouped = query.reshape(n * kv, groups, head_dim)
        scores = torch.baddbmm(self.mask, grouped, keys.reshape(n * kv, length, head_dim).transpose(1, 2),
                               alpha=self.scaling)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        out = torch.bmm(weights, values.reshape(n * kv, length, head_dim)).reshape(n, -1)
        if self.split is None:
            return out
        for row, total in self.long_rows:      # its first columns' scores, then the rest of its keys'
            heads = slice(row * kv, (row + 1) * kv)
            tail_keys, tail_values = cache_keys[row, :, length:total], cache_values[row, :, length:total]
            tail = torch.bmm(grouped[heads], tail_keys.transpose(1, 2)).mul_(self.scaling)
            row_weights = torch.softmax(torch.cat((scores[heads], tail), dim=-1), dim=-1,
                                        dtype=torch.float32).to(values.dtype)
            row_out = torch.bmm(row_weights[..., :length], values[row]).add_(
                torch.bmm(row_weights[..., length:], tail_values))
            out[row] = row_out.reshape(-1)
        return out


class ChunkAttention:
    """The prompt chunks' attention. ``slots``, ``starts``, ``sizes``: each chunk's slot, first
    position and token count, in the order their tokens follow each other in the batch."""

    def __init__(self, slots: list[int], starts: list[int], sizes: list[int], scaling: float,
                 dtype: torch.dtype, device: torch.device):
        self.scaling = scaling
        self.kv_len = max(s + t for s, t in zip(starts, sizes))
        self.single = len(slots) == 1
        width = max(sizes)
        offsets = torch.arange(width, device=device)[None, :]
        size = torch.tensor(sizes, device=device)[:, None]
        valid = offsets < size                                                        # [b, T]
        positions = torch.tensor(starts, device=device)[:, None] + offsets
        self.mask, _ = slot_attention_masks(positions, valid, self.kv_len, dtype, None)  # [b, 1, T, L]
        self.slot = slots[0]
        if not self.single:
            self.slots = torch.tensor(slots, device=device)
            # padded row (chunk i, token t) <- the chunk's token t in the batch (padding: its last)
            first = torch.tensor([0] + sizes[:-1], device=device).cumsum(0)[:, None]
            self.gather = (first + torch.minimum(offsets, size - 1)).reshape(-1)       # [b * T]
            self.scatter = valid.reshape(-1).nonzero().squeeze(1)                       # valid padded rows
            self.shape = (len(slots), width)

    def __call__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """query [P, heads, hd] (the chunks' tokens); keys and values: a layer's whole cache,
        already holding the chunks' new keys -> [P, heads * hd]."""
        length = self.kv_len
        if self.single:
            out = F.scaled_dot_product_attention(
                query.transpose(0, 1)[None], keys[self.slot:self.slot + 1, :, :length],
                values[self.slot:self.slot + 1, :, :length], attn_mask=self.mask, scale=self.scaling,
                enable_gqa=True)                                                         # [1, heads, P, hd]
            return out[0].transpose(0, 1).reshape(query.shape[0], -1)
        b, width = self.shape
        padded = query.index_select(0, self.gather).view(b, width, *query.shape[1:]).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            padded, keys[:, :, :length].index_select(0, self.slots), values[:, :, :length].index_select(0, self.slots),
            attn_mask=self.mask, scale=self.scaling, enable_gqa=True)                    # [b, heads, T, hd]
        return out.transpose(1, 2).reshape(b * width, -1).index_select(0, self.scatter)


@dataclass
class FlatBatch:
    """What a lean forward needs besides the input embeddings: each row's position
    (``positions`` [N]), where its key and value go (``write_index`` [N, kv heads]), and the
    two attentions (None where the step has no such rows): the first ``decode.n`` rows are
    decode rows, the rest the chunks' tokens. ``ordered_writes`` = k: rows k.. write after
    rows ..k (two writes instead of one, where both write one column)."""

    positions: torch.Tensor
    write_index: torch.Tensor
    decode: DecodeAttention | None
    chunks: ChunkAttention | None
    ordered_writes: int | None = None

    def write(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        """new [N, kv heads, hd] into a layer's keys or values [slots, kv heads, positions, hd]."""
        flat = cache.view(-1, cache.shape[-1])
        new = new.to(cache.dtype)
        k = self.ordered_writes
        if k is None:
            flat.index_put_((self.write_index,), new)
        else:
            flat.index_put_((self.write_index[:k],), new[:k])
            flat.index_put_((self.write_index[k:],), new[k:])

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """query [N, heads, hd] -> [N, heads * hd]."""
        if self.chunks is None:
            return self.decode(query, keys, values)
        if self.decode is None:
            return self.chunks(query, keys, values)
        n = self.decode.n
        return torch.cat((self.decode(query[:n], keys, values), self.chunks(query[n:], keys, values)))


@dataclass
class FlatLayout:
    """A step's rows laid out flat, as plain lists: ``tokens`` (a padding or latent row's is
    the pad token), ``latent`` (per decode row: fed from its slot's buffer), each row's slot,
    position and write position, the decode rows' query positions and validity, the chunks,
    and ``outputs``: the rows whose states the step returns (decode rows, then each chunk
    that ends a prompt: its last token)."""

    decode_rows: int
    tokens: list[int]
    latent: list[bool]
    slots: list[int]
    positions: list[int]
    write_positions: list[int]
    valid: list[bool]
    chunks: list
    outputs: list[int]
    max_len: int

    def batch(self, kv_heads: int, groups: int, scaling: float, dtype: torch.dtype,
              device: torch.device) -> FlatBatch:
        n = self.decode_rows
        decode = chunks = None
        if n:
            query = torch.tensor(self.positions[:n], device=device)[:, None]
            mask, _ = slot_attention_masks(query, torch.tensor(self.valid, device=device)[:, None],
                                           max(self.positions[:n]) + 1, dtype, None)
            # a row sees its columns 0..its position (a padding row: column 0)
            decode = DecodeAttention(mask, kv_heads, groups, scaling, [p + 1 for p in self.positions[:n]])
        if self.chunks:
            chunks = ChunkAttention([c.slot for c in self.chunks], [c.start for c in self.chunks],
                                    [len(c.token_ids) for c in self.chunks], scaling, dtype, device)
        batch = FlatBatch(torch.tensor(self.positions, device=device),
                          write_index(torch.tensor(self.slots, device=device),
                                      torch.tensor(self.write_positions, device=device), kv_heads, self.max_len),
                          decode, chunks)
        # a padding row writes its slot's last column, which a chunk of a prompt that fills
        # its slot writes too: the chunks' writes must then come after the decode rows' (the
        # CPU's index_put_ writes in order; a parallel scatter, as on CUDA, need not)
        if any(c.start + len(c.token_ids) == self.max_len and c.slot < n and not self.valid[c.slot]
               for c in self.chunks):
            batch.ordered_writes = n
        return batch


def flat_layout(rows, chunks, lengths: list[int], max_len: int, pad_token_id: int) -> FlatLayout:
    """Decode rows (``DecodeRow``: slot, feed_token, feed_mixture) and prompt chunks
    (``PrefillChunk``: slot, token_ids, start, last) -> their flat layout, given each slot's
    written ``lengths``. The decode rows take the leading slots 0..n-1 (n: the highest decode
    slot + 1); a slot without a decode row there is a padding row that reads column 0 and
    writes the slot's last column (its scratch). Raises RuntimeError for a full slot or a
    chunk that does not continue its slot."""
    n = max(r.slot for r in rows) + 1 if rows else 0
    tokens, latent = [pad_token_id] * n, [False] * n
    positions, write_positions, valid = [0] * n, [max_len - 1] * n, [False] * n
    for r in rows:
        if lengths[r.slot] >= max_len:
            raise RuntimeError(f"slot {r.slot} ({r.request_id}) is full ({max_len} positions)")
        positions[r.slot] = write_positions[r.slot] = lengths[r.slot]
        valid[r.slot] = True
        if r.feed_token is None or r.feed_mixture:
            latent[r.slot] = True          # a thought, or a mixture of inputs, from the slot's buffer
        else:
            tokens[r.slot] = r.feed_token
    slots = list(range(n))
    outputs = [r.slot for r in rows]
    for c in chunks:
        if lengths[c.slot] != c.start:
            raise RuntimeError(f"chunk of {c.request_id} starts at {c.start} but slot {c.slot} "
                               f"holds {lengths[c.slot]} positions")
        if c.start + len(c.token_ids) > max_len:
            raise RuntimeError(f"chunk of {c.request_id} ends past slot {c.slot}'s {max_len} positions")
        span = list(range(c.start, c.start + len(c.token_ids)))
        tokens += c.token_ids
        slots += [c.slot] * len(span)
        positions += span
        write_positions += span
        if c.last:
            outputs.append(len(tokens) - 1)
    return FlatLayout(n, tokens, latent, slots, positions, write_positions, valid, list(chunks), outputs, max_len)


def write_index(slots: torch.Tensor, positions: torch.Tensor, kv_heads: int, max_len: int) -> torch.Tensor:
    """slots [N], positions [N] -> [N, kv heads]: the row of each (row, head)'s new key in a
    cache [slots, kv heads, max_len, hd] viewed as [-1, hd]."""
    heads = torch.arange(kv_heads, device=slots.device)
    return (slots[:, None] * kv_heads + heads[None, :]) * max_len + positions[:, None]
