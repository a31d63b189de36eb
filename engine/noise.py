"""Randomness in soft thoughts: Gumbel-Softmax and Dirichlet noise on a mixture's weights.

A soft thought (``engine.feedback.soft_mixture``) mixes the kept tokens with weights ``p``
(``softmax(W h / T)`` kept to top-k, then top-p, renormalised). With a request's
``latent.feedback.noise`` (``engine.params.FeedbackNoise``) the weights become a draw:

- ``gumbel``: ``softmax((log p_i + g_i) / tau)``, ``g_i ~ Gumbel(0, 1)`` drawn as
  ``-log(E_i)``, ``E_i ~ Exp(1)`` (arXiv 2508.03440; Soft Thinking's
  ``add_noise_gumbel_softmax``). Its argmax is distributed as ``p``, whatever ``tau``.
- ``dirichlet``: ``Dirichlet(alpha * p)``, drawn as ``G_i / sum G``, ``G_i ~ Gamma(alpha p_i, 1)``
  (Soft Thinking's ``add_noise_dirichlet``); computed as ``softmax(log G)``, which cannot
  divide by zero when every ``G_i`` underflows (tiny ``alpha p_i``).

Tokens outside the kept set keep weight 0; the mixture keeps its tokens in the order of
``p`` (a row's weights are not re-sorted). Rows without noise are left as they are, bit
for bit.

Where the random numbers come from is ``NoiseDraws``: each row's own generator (a seeded
request's, so its thoughts do not depend on its neighbours: it always draws exactly its own
``k`` numbers per thought, ``k`` its ``top_k``, the vocabulary for 0), the others one
batched draw from the engine's generator. Gamma variates are drawn with Marsaglia and
Tsang's method (2000), in float64, from a ``torch.Generator`` (``torch._standard_gamma``
takes none); ``alpha p < 1`` is boosted (``G(a) = G(a + 1) U^(1/a)``). Tests replace
``NoiseDraws`` to inject the same draws into the engine and the reference decoder (keyed by
token id, which near-equal probabilities cannot reorder between the two).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.feedback import SoftMixture
from engine.params import FeedbackNoise

_TINY = 1e-30     # the smallest Exp(1) draw used (-log of it: a Gumbel of at most 69)


@dataclass(frozen=True)
class NoiseRow:
    """One row that needs noise: its request, its generator (None: the engine's shared one)
    and how many numbers it draws (its mixture's ``top_k``)."""

    request_id: str
    generator: torch.Generator | None
    width: int


class NoiseDraws:
    """The random numbers of the noise, per row (see the module's docstring)."""

    def __init__(self, shared: torch.Generator):
        self.shared = shared

    def gumbel(self, rows: list[NoiseRow], token_ids: torch.Tensor) -> torch.Tensor:
        """[R, W] Gumbel(0, 1) draws for the rows' mixtures of ``token_ids`` [R, W] (-1: dropped;
        the ids are for injected draws: these are drawn by rank, row r's first ``rows[r].width``
        its own)."""
        width, device = token_ids.shape[1], token_ids.device
        out = torch.zeros((len(rows), width), dtype=torch.float32, device=device)
        shared = [r for r, row in enumerate(rows) if row.generator is None]
        if shared:
            draws = torch.empty((len(shared), width), device=device).exponential_(generator=self.shared)
            out[torch.tensor(shared, device=device)] = -draws.clamp_min_(_TINY).log_()
        for r, row in enumerate(rows):
            if row.generator is not None:
                draws = torch.empty(row.width, device=device).exponential_(generator=row.generator)
                out[r, :row.width] = -draws.clamp_min_(_TINY).log_()
        return out

    def log_gamma(self, rows: list[NoiseRow], concentration: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """concentration [R, W] (> 0 in each row's first ``width`` columns) of the mixtures of
        ``token_ids`` -> [R, W] float64 ``log G``, ``G ~ Gamma(concentration, 1)``; columns past
        a row's width are -inf. A seeded row's proposals come from its generator, the math of
        all rows is one batch."""
        dev = concentration.device
        out = torch.full(concentration.shape, float("-inf"), dtype=torch.float64, device=dev)
        shared = [r for r, row in enumerate(rows) if row.generator is None]
        if shared:
            index = torch.tensor(shared, device=dev)
            out[index] = log_standard_gamma(concentration[index], self.shared)
        seeded = [r for r, row in enumerate(rows) if row.generator is not None]
        if seeded:
            a = torch.cat([concentration[r, :rows[r].width] for r in seeded]).double()
            drawn = [_proposals(rows[r].width, rows[r].generator, dev) for r in seeded]
            log_g, ok = _marsaglia(a, torch.cat([x for x, _ in drawn]), torch.cat([u for _, u in drawn]))
            at = 0
            for r in seeded:
                width = rows[r].width
                part = slice(at, at + width)
                out[r, :width] = _finish(a[part], log_g[part], ok[part], rows[r].generator)
                at += width
        return out


#: Marsaglia-Tsang proposals drawn per variate at once (each is accepted with probability
#: >= 0.95 for the shapes >= 1 drawn, so all four fail about once in 10^5 variates)
CANDIDATES = 4


def _proposals(n: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For n variates: normals [n, CANDIDATES] and uniforms [n, CANDIDATES + 1] (the last: the boost's)."""
    x = torch.randn((n, CANDIDATES), dtype=torch.float64, device=device, generator=generator)
    u = torch.rand((n, CANDIDATES + 1), dtype=torch.float64, device=device, generator=generator)
    return x, u


def _marsaglia(a: torch.Tensor, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a [N] > 0 and its proposals -> log G [N] (the first accepted proposal) and whether one was."""
    boost = a < 1
    d = torch.where(boost, a + 1, a) - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    v = (1.0 + c[:, None] * x) ** 3
    positive = v > 0
    log_v = torch.where(positive, v, torch.ones_like(v)).log()
    accept = positive & (u[:, :CANDIDATES].log() < 0.5 * x * x + d[:, None] * (1 - v + log_v))
    first = accept.to(torch.int8).argmax(dim=1, keepdim=True)           # the first accepted (0 if none)
    log_g = d.log() + log_v.gather(1, first)[:, 0]
    log_g = torch.where(boost, log_g + u[:, CANDIDATES].clamp_min(1e-300).log() / a, log_g)
    return log_g, accept.any(dim=1)


def _finish(a: torch.Tensor, log_g: torch.Tensor, ok: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Redraw, from ``generator``, the variates none of whose proposals was accepted."""
    while not bool(ok.all()):
        redo = (~ok).nonzero().flatten()
        again, fine = _marsaglia(a[redo], *_proposals(redo.numel(), generator, a.device))
        log_g, ok = log_g.clone(), ok.clone()
        log_g[redo], ok[redo] = again, fine
    return log_g


def log_standard_gamma(concentration: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``log G`` with ``G ~ Gamma(a, 1)`` elementwise for ``a = concentration`` (> 0), float64,
    every number drawn from ``generator`` (Marsaglia and Tsang; ``a < 1`` boosted)."""
    a = concentration.double().flatten()
    log_g, ok = _marsaglia(a, *_proposals(a.numel(), generator, a.device))
    return _finish(a, log_g, ok, generator).view(concentration.shape)


def add_noise(mixture: SoftMixture, noises: list[FeedbackNoise | None], rows: list[NoiseRow],
              draws: NoiseDraws) -> SoftMixture:
    """The mixture with each noisy row's weights redrawn (``noises[r]`` None or ``none``: row r
    unchanged). ``rows`` names the noisy rows only, in order."""
    noisy = [r for r, noise in enumerate(noises) if noise is not None and noise.active]
    if not noisy:
        return mixture
    dev = mixture.weights.device
    index = torch.tensor(noisy, device=dev)
    weights = mixture.weights.index_select(0, index)                     # [N, W] kept: > 0, else 0
    kept = weights > 0
    new = torch.empty_like(weights)
    for kind in ("gumbel", "dirichlet"):
        mine = [j for j, r in enumerate(noisy) if noises[r].type == kind]
        if not mine:
            continue
        sub = torch.tensor(mine, device=dev)
        w, keep = weights.index_select(0, sub), kept.index_select(0, sub)
        picked = [rows[j] for j in mine]
        ids = mixture.token_ids.index_select(0, index.index_select(0, sub))
        if kind == "gumbel":
            tau = torch.tensor([noises[noisy[j]].tau for j in mine], device=dev, dtype=w.dtype)[:, None]
            g = draws.gumbel(picked, ids)
            scores = (w.log() + g) / tau                                  # log 0 = -inf: dropped stays 0
        else:
            alpha = torch.tensor([noises[noisy[j]].alpha for j in mine], device=dev, dtype=torch.float64)[:, None]
            concentration = torch.where(keep, w.double() * alpha, torch.ones_like(alpha))   # dropped: any a > 0
            scores = draws.log_gamma(picked, concentration, ids).masked_fill(~keep, float("-inf"))
        new[sub] = scores.softmax(dim=-1).to(w.dtype)
    out = mixture.weights.clone()
    out[index] = new
    return SoftMixture(token_ids=mixture.token_ids, weights=out)
