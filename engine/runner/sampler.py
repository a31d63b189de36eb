"""Batched token sampling with per-row parameters.

Each row has its own temperature, top-k and top-p. Greedy rows take the argmax. Rows
with a seed draw from their own ``torch.Generator`` one at a time, so a seeded request's
choices depend only on its own logits, never on its neighbours in the batch; the other
random rows share the engine's generator in one batched draw.

Log-probabilities, when asked, are of the model's unmodified distribution
(``log_softmax`` of the raw logits), as vLLM reports them; a row's ``top_logprobs``
alternatives are the most likely tokens of that same distribution, best first (a token
the logits rule out, at -inf, is never one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.params import SamplingParams


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float | None]
    #: per row, (ids, logprobs) of its ``top_logprobs`` most likely tokens, best first (None: not asked)
    top_logprobs: list[tuple[list[int], list[float]] | None] | None = None


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [R, V] with per-row top_k [R] (0 = off) and top_p [R] (1 = off); masked -> -inf."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    remove = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    # Remove a token when the tokens ranked above it already reach top_p. The top-ranked
    # token always stays, whatever rounding does to a tiny top_p.
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= top_p[:, None]
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None], default_generator: torch.Generator | None) -> SampleOutput:
    """logits [R, V] float32 -> one token per row."""
    rows = logits.shape[0]
    chosen = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        index = torch.tensor(random_rows, device=logits.device)
        sub = logits.index_select(0, index)
        temps = torch.tensor([params[i].temperature for i in random_rows], device=logits.device)
        sub = sub / temps[:, None]
        top_k = torch.tensor([params[i].top_k for i in random_rows], device=logits.device)
        top_p = torch.tensor([params[i].top_p for i in random_rows], device=logits.device, dtype=sub.dtype)
        if bool((top_k > 0).any()) or bool((top_p < 1).any()):
            sub = _filter_top_k_top_p(sub, top_k, top_p)
        probs = sub.softmax(dim=-1)
        seeded = [j for j, i in enumerate(random_rows) if generators[i] is not None]
        shared = [j for j, i in enumerate(random_rows) if generators[i] is None]
        picks = torch.empty(len(random_rows), dtype=torch.long, device=logits.device)
        for j in seeded:
            picks[j] = torch.multinomial(probs[j], 1, generator=generators[random_rows[j]])[0]
        if shared:
            shared_index = torch.tensor(shared, device=logits.device)
            draws = torch.multinomial(probs.index_select(0, shared_index), 1, generator=default_generator)
            picks[shared_index] = draws[:, 0]
        chosen[index] = picks
    token_ids = chosen.tolist()
    logprobs: list[float | None] = [None] * rows
    tops: list[tuple[list[int], list[float]] | None] = [None] * rows
    want = [i for i, p in enumerate(params) if p.logprobs]
    if want:
        index = torch.tensor(want, device=logits.device)
        lp = logits.index_select(0, index) if len(want) < rows else logits
        lp = lp.log_softmax(dim=-1)
        picked = lp.gather(-1, chosen.index_select(0, index)[:, None])[:, 0].tolist()
        for i, value in zip(want, picked):
            logprobs[i] = value
        k = max(params[i].top_logprobs for i in want)
        if k:
            top = lp.topk(min(k, lp.shape[-1]), dim=-1)
            values, indices = top.values.tolist(), top.indices.tolist()
            for j, i in enumerate(want):
                kk = params[i].top_logprobs
                if kk:
                    keep = [n for n, v in enumerate(values[j][:kk]) if v != float("-inf")]
                    tops[i] = ([indices[j][n] for n in keep], [values[j][n] for n in keep])
    return SampleOutput(token_ids=token_ids, logprobs=logprobs, top_logprobs=tops)
