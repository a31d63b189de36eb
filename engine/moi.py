"""Mixture of Inputs (Zhuang et al. 2025), batched over rows: the input that follows a sampled token.

After a row in language mode samples ``y`` from logits ``z`` (the model's ``W h``, with the
checkpoint's suppressed tokens at -inf: the distribution the engine's log-probabilities
are of, before temperature, top-k and top-p), its next input embedding is

    Hn * sum_i w_i E[i] + (1 - Hn) * E[y]

over the ``K`` (``top_k``) most likely tokens of ``z``, with ``p = softmax`` of their
logits (``p`` renormalised over them), ``w = (p + beta * [i == y]) / (1 + beta)`` and
``Hn = H(p) / log K`` (``H`` in nats, ``p log p`` taken as 0 where ``p`` underflows).
When ``y`` is not among the ``K`` (a sampled tail token), no ``w_i`` gets ``beta``: the
weights sum to ``1 / (1 + beta)``, as ``mixinputs/gpu_model_runner.py`` computes them.
``E[i]`` is the model's own input embedding of a token (the module, so a scaled
embedding such as Gemma-3's stays scaled). Rows may differ in ``K`` and ``beta``.

This module knows tensors only; the runner decides which rows mix and feeds the result in
place of ``E[y]`` at the row's next position.
"""

from __future__ import annotations

import math

import torch


def moi_inputs(embed, logits: torch.Tensor, sampled: torch.Tensor, top_k: list[int],
               beta: list[float]) -> torch.Tensor:
    """embed: token ids [...] -> embeddings [..., d]; logits [R, V] float32; sampled [R] ids
    -> [R, d] float32, the rows' next inputs (computed in float32, as mixinputs mixes
    float32 probabilities into the embeddings)."""
    rows, vocab = logits.shape
    dev = logits.device
    k = [min(kk, vocab) for kk in top_k]
    values, ids = logits.topk(max(k), dim=-1)                                  # [R, K]
    ranks = torch.arange(values.shape[1], device=dev)[None, :]
    outside = ranks >= torch.tensor(k, device=dev)[:, None]
    p = values.masked_fill(outside, float("-inf")).softmax(dim=-1)             # 0 past a row's K
    log_p = p.clamp_min(1e-12).log()
    entropy = -(p * log_p).sum(dim=-1)
    normalised = (entropy / torch.tensor([math.log(kk) for kk in k], device=dev, dtype=p.dtype))[:, None]
    b = torch.tensor(beta, device=dev, dtype=p.dtype)[:, None]
    observed = (ids == sampled[:, None]) & ~outside
    w = (p + b * observed) / (1 + b)
    candidates = embed(ids).float()                                            # [R, K, d]
    mixed = torch.einsum("rk,rkd->rd", w, candidates)
    token = embed(sampled).float()                                             # [R, d]
    return normalised * mixed + (1 - normalised) * token
