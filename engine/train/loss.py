"""The COCONUT objective, batched over a KV cache: ``coconut_loss(model, batch, latent_token_id)``.

``batch`` holds ``input_ids`` [B, T] (latent placeholders where thoughts go),
``attention_mask`` [B, T] (1 = real position; rows may be right- or left-padded),
``labels`` [B, T] (-100 = no loss) and optionally ``position_ids`` [B, T] (default: the
count of real positions before each one). The loss is the mean next-token
cross-entropy over all labelled positions (the label at t is predicted from position
t - 1, as in Hugging Face models; a label whose previous column is padding, such as a
row's first token, has nothing to predict it and is ignored), where every placeholder's
input embedding is replaced by the continuous thought: the model's last hidden state
(after the final norm) at the previous position, computed from everything before it
(or a learned ``projection`` of it, CODI's ``prj``), gradients flowing through the thoughts.

How (n = the most placeholders in one row): the rows are shifted right inside the
function so that every row's first placeholder sits in the same column F (the
reference collator does this with padding); then pass 0 runs columns [0, F), pass k
(1 <= k < n) runs the single column F + k - 1 whose input is thought k for rows that
have one, and the last pass runs the rest; n + 1 passes in all, each over every row,
reusing the KV cache. Logits are computed only at the positions whose next label is
not -100 (the LM head over the whole vocabulary at every position costs more than the
rest of a small model).

Placeholders must be contiguous within a row (one block of thoughts, as the curriculum
writes them) and must not be a row's first real position. ``latent_token_id=None`` or a
batch without placeholders is the plain language-model loss in one pass. This module
knows nothing of tokenizers, curricula or optimisers; ``naive_coconut_loss`` in
``engine.train.naive`` is its test oracle.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from engine.runner.adapter import DecoderAdapter

_ADAPTERS: "weakref.WeakKeyDictionary[torch.nn.Module, DecoderAdapter]" = weakref.WeakKeyDictionary()


def _adapter(model: torch.nn.Module) -> DecoderAdapter:
    adapter = _ADAPTERS.get(model)
    if adapter is None:
        adapter = _ADAPTERS[model] = DecoderAdapter(model)
    return adapter


def _check_batch(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    for key in ("input_ids", "attention_mask", "labels"):
        if key not in batch:
            raise ValueError(f"batch is missing '{key}' (expected input_ids, attention_mask, labels "
                             f"and optionally position_ids, each [B, T])")
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if ids.dim() != 2:
        raise ValueError(f"batch['input_ids'] has shape {tuple(ids.shape)}: expected [B, T]")
    for key in ("attention_mask", "labels", "position_ids"):
        if batch.get(key) is not None and batch[key].shape != ids.shape:
            raise ValueError(f"batch['{key}'] has shape {tuple(batch[key].shape)}: expected "
                             f"{tuple(ids.shape)} like input_ids")
    return ids, mask.bool(), labels


def _decoder_pass(adapter: DecoderAdapter, embeds, mask, positions, cache) -> torch.Tensor:
    """[B, t, d] inputs -> [B, t, d] last hidden states; ``cache`` (or None) grows by t."""
    kwargs = {"inputs_embeds": embeds, "attention_mask": mask.long(),
              adapter.cache_kwarg: cache, "use_cache": cache is not None}
    if adapter.accepts_position_ids:
        kwargs["position_ids"] = positions
    return adapter.decoder(**kwargs).last_hidden_state


class LatentForward(NamedTuple):
    """The last hidden states with thoughts fed back, and the batch aligned with them.

    Rows may be shifted right by up to T' - T columns (the order of each row's positions
    is kept). ``labels`` is -100 wherever the previous column is not a real position
    (nothing predicts a row's first token)."""

    hidden: torch.Tensor          # [B, T', d]
    labels: torch.Tensor          # [B, T']
    input_ids: torch.Tensor       # [B, T']
    attention_mask: torch.Tensor  # [B, T'] bool


def _predictable(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    previous_real = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)
    return labels.masked_fill(~(previous_real & mask), -100)


def coconut_hidden_states(model: torch.nn.Module, batch: dict, latent_token_id: int | None,
                          min_passes: int = 0, projection: torch.nn.Module | None = None) -> LatentForward:
    """One forward with thoughts fed back (see the module docstring). ``min_passes``
    forces at least that many passes (extra ones each run one ordinary column, which
    changes nothing numerically): sharded data parallelism (FSDP) needs every rank to
    run the same number of forwards. ``projection``: a thought is ``projection(h)``
    (CODI's ``prj``, trained through the same passes) instead of ``h``."""
    feed = projection if projection is not None else (lambda h: h)
    ids, mask, labels = _check_batch(batch)
    adapter = _adapter(model)
    positions = batch.get("position_ids")
    B, T = ids.shape
    is_latent = (ids == latent_token_id) & mask if latent_token_id is not None else torch.zeros_like(mask)
    counts = is_latent.sum(dim=1)                                              # [B]
    n = int(counts.max()) if B else 0
    if n == 0 and min_passes <= 1:
        if positions is None:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = _decoder_pass(adapter, adapter.embed(ids), mask, positions, None)
        return LatentForward(hidden, _predictable(labels, mask), ids, mask)

    columns = torch.arange(T, device=ids.device)
    has = counts > 0
    first = torch.where(has, is_latent.long().argmax(dim=1), torch.zeros_like(counts))       # [B]
    block = (columns[None] >= first[:, None]) & (columns[None] < (first + counts)[:, None])
    if not torch.equal(block, is_latent):
        bad = int((block != is_latent).any(dim=1).nonzero()[0])
        raise ValueError(f"row {bad}: latent placeholders (id {latent_token_id}) must form one "
                         f"contiguous block; got them at columns "
                         f"{is_latent[bad].nonzero().flatten().tolist()}")
    starts = mask.long().argmax(dim=1)                                         # first real column
    if bool((has & (first <= starts)).any()):
        bad = int((has & (first <= starts)).nonzero()[0])
        raise ValueError(f"row {bad}: a latent placeholder is the first real position; a thought "
                         f"needs at least one position before it")

    # Align every row's first placeholder at column F (rows without thoughts stay put).
    F_col = int(first[has].max()) if n else 1
    n = max(n, min_passes - 1)
    shift = torch.where(has, F_col - first, torch.zeros_like(first))           # [B]
    width = max(T + int(shift.max()), F_col + n)                                # room for every pass
    src = torch.arange(width, device=ids.device)[None] - shift[:, None]        # [B, T']
    inside = (src >= 0) & (src < T)
    src = src.clamp(0, T - 1)
    ids_s = ids.gather(1, src)
    mask_s = mask.gather(1, src) & inside
    labels_s = labels.gather(1, src).masked_fill(~inside, -100)
    if positions is None:
        pos_s = (mask_s.long().cumsum(-1) - 1).clamp(min=0)
    else:
        pos_s = positions.gather(1, src).masked_fill(~inside, 0)
    embeds = adapter.embed(ids_s)                                              # [B, T', d]

    cache = adapter.new_cache()
    hiddens = [_decoder_pass(adapter, embeds[:, :F_col], mask_s[:, :F_col], pos_s[:, :F_col], cache)]
    thought = feed(hiddens[0][:, -1])                                          # thought 1: [B, d]
    for k in range(1, n):                                                      # column F + k - 1
        col = F_col + k - 1
        x = torch.where((counts >= k)[:, None], thought.to(embeds.dtype), embeds[:, col])
        h = _decoder_pass(adapter, x[:, None], mask_s[:, :col + 1], pos_s[:, col:col + 1], cache)
        hiddens.append(h)
        thought = feed(h[:, -1])                                               # thought k + 1
    col = F_col + n - 1
    x = torch.where((counts >= n)[:, None], thought.to(embeds.dtype), embeds[:, col])
    rest = torch.cat([x[:, None], embeds[:, col + 1:]], dim=1)
    hiddens.append(_decoder_pass(adapter, rest, mask_s, pos_s[:, col:], cache))
    return LatentForward(torch.cat(hiddens, dim=1), _predictable(labels_s, mask_s), ids_s, mask_s)


def lm_loss_from_hidden(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, with logits only where a label needs them."""
    targets = labels[:, 1:]
    selected = targets != -100
    if not bool(selected.any()):
        raise ValueError("the batch has no labelled positions (every label is -100): nothing to learn")
    logits = _adapter(model).logits(hidden[:, :-1][selected])                 # [N, V] float32
    return F.cross_entropy(logits, targets[selected])


def frontier_loss_from_hidden(model: torch.nn.Module, out: LatentForward, frontier_ids: torch.Tensor,
                              latent_token_id: int) -> torch.Tensor | None:
    """The auxiliary frontier loss (``frontier_loss_weight``): the mean over (row, thought position) of the
    cross-entropy between the LM head's distribution on the hidden state at <bot> (d = 0)
    or at placeholder d (d >= 1) and the uniform distribution over ``frontier_ids[b, d]``
    (the nodes at BFS distance d; -1 = padding), i.e. -mean_{t in frontier} log p(t).

    ``out`` is ``coconut_hidden_states``'s result: every row with thoughts has its first
    placeholder at the same column F, so <bot> is at F - 1 and placeholder d at F + d - 1.
    Only a row's own positions count (d <= its number of placeholders), and positions whose
    frontier is empty are skipped. None when no position has a frontier."""
    ids, mask = out.input_ids, out.attention_mask
    is_latent = (ids == latent_token_id) & mask
    counts = is_latent.sum(dim=1)                                              # [B]
    first = is_latent.long().argmax(dim=1)                                     # F for rows with thoughts
    P = frontier_ids.shape[1]
    d = torch.arange(P, device=ids.device)
    valid = (counts[:, None] > 0) & (d[None] <= counts[:, None])               # [B, P]
    targets = frontier_ids.to(ids.device)
    keep = targets >= 0                                                        # [B, P, M]
    valid = valid & keep.any(dim=-1)
    if not bool(valid.any()):
        return None
    rows, dist = valid.nonzero(as_tuple=True)                                  # [N]
    cols = first[rows] - 1 + dist
    logp = torch.log_softmax(_adapter(model).logits(out.hidden[rows, cols]), dim=-1)   # [N, V]
    tgt, kp = targets[rows, dist], keep[rows, dist]                            # [N, M]
    picked = logp.gather(1, tgt.clamp(min=0)) * kp
    per_position = -picked.sum(dim=1) / kp.sum(dim=1)
    return per_position.mean()


def coconut_loss(model: torch.nn.Module, batch: dict, latent_token_id: int | None,
                 projection: torch.nn.Module | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, thoughts fed back (through
    ``projection`` when given)."""
    out = coconut_hidden_states(model, batch, latent_token_id, projection=projection)
    return lm_loss_from_hidden(model, out.hidden, out.labels)


def teacher_thought_hidden_states(model: torch.nn.Module, batch: dict, latent_token_id: int,
                                  frontier_ids: torch.Tensor) -> LatentForward:
    """Teacher-forced superposition (``teacher_thoughts_epochs``): one forward in which placeholder d's input is
    not the model's own thought but the ground-truth superposition of frontier d - 1: the
    mean embedding of its nodes, rescaled to the mean norm of the batch's token embeddings
    (``frontier_ids`` [B, P, M] as ``collate`` writes it, -1 padding). Every step's
    look-up is then learned in parallel, without sequential passes."""
    ids, mask, labels = _check_batch(batch)
    adapter = _adapter(model)
    embeds = adapter.embed(ids)                                                # [B, T, d]
    is_latent = (ids == latent_token_id) & mask
    counts = is_latent.sum(dim=1)
    first = is_latent.long().argmax(dim=1)
    targets = frontier_ids.to(ids.device)
    keep = (targets >= 0).to(embeds.dtype)                                     # [B, P, M]
    node_embeds = adapter.embed(targets.clamp(min=0)) * keep[..., None]        # [B, P, M, d]
    mean = node_embeds.sum(dim=2) / keep.sum(dim=2).clamp(min=1)[..., None]    # [B, P, d]
    scale = embeds[mask].detach().norm(dim=-1).mean()
    teacher = (mean / mean.norm(dim=-1, keepdim=True).clamp(min=1e-6) * scale).detach()
    B, T = ids.shape
    columns = torch.arange(T, device=ids.device)
    d = (columns[None] - first[:, None] + 1).clamp(min=1)                     # placeholder index, 1-based
    src = (d - 1).clamp(max=teacher.shape[1] - 1)                              # frontier d - 1
    picked = teacher.gather(1, src[..., None].expand(B, T, teacher.shape[-1]))
    usable = is_latent & (counts[:, None] > 0)
    x = torch.where(usable[..., None], picked.to(embeds.dtype), embeds)
    positions = batch.get("position_ids")
    if positions is None:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = _decoder_pass(adapter, x, mask, positions, None)
    return LatentForward(hidden, _predictable(labels, mask), ids, mask)
