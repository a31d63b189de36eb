"""The batched sampler against direct per-row computations."""

from __future__ import annotations

import math

import torch

from engine.params import SamplingParams
from engine.runner.sampler import sample


def naive_allowed(logits: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Tokens a top-k then top-p filter keeps, computed one token at a time."""
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))
    if top_k:
        order = order[:top_k]
    probs = torch.softmax(logits[order], -1).tolist()
    kept, mass = [], 0.0
    for token, p in zip(order, probs):
        if mass >= top_p:
            break
        kept.append(token)
        mass += p
    return set(kept)


def test_greedy_rows_take_argmax_and_random_rows_stay_in_filter():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=0.7, top_p=0.5),
              SamplingParams(temperature=1.3, top_k=10, top_p=0.8), SamplingParams(top_k=5),
              SamplingParams(temperature=2.0, top_k=1)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        out = sample(logits, params, [None] * 6, gen)
        assert out.token_ids[0] == int(logits[0].argmax()) and out.token_ids[4] == int(logits[4].argmax())
        assert out.token_ids[5] == int(logits[5].argmax())
        for row, p in [(1, params[1]), (2, params[2]), (3, params[3])]:
            scaled = logits[row] / p.temperature
            assert out.token_ids[row] in naive_allowed(scaled, p.top_k, p.top_p)


def test_empirical_distribution_follows_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = [SamplingParams(temperature=0.5)]
    gen = torch.Generator().manual_seed(3)
    counts = [0] * 4
    n = 4000
    for _ in range(n):
        counts[sample(logits, params, [None], gen).token_ids[0]] += 1
    expected = torch.softmax(logits[0] / 0.5, -1).tolist()
    for c, p in zip(counts, expected):
        assert abs(c / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3


def test_seeded_rows_ignore_their_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(4, 30)
    seeded = SamplingParams(temperature=1.0, seed=7)
    alone = [sample(logits[2:3], [seeded], [torch.Generator().manual_seed(7)], None).token_ids[0]]
    gens = [None, None, torch.Generator().manual_seed(7), None]
    params = [SamplingParams(temperature=1.0)] * 2 + [seeded, SamplingParams(temperature=0.5)]
    mixed = sample(logits, params, gens, torch.Generator().manual_seed(99)).token_ids[2]
    assert mixed == alone[0]


def test_logprobs_are_of_raw_distribution():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    out = sample(logits, [SamplingParams(logprobs=True)], [None], None)
    assert out.token_ids == [2]
    assert abs(out.logprobs[0] - float(torch.log_softmax(logits[0], -1)[2])) < 1e-6


def test_extreme_temperature_and_top_p_stay_finite():
    """A top_p that rounds to 0 keeps the top token; a tiny temperature is greedy."""
    logits = torch.tensor([[0.5, 3.0, 1.0], [2.0, -1.0, 0.0]])
    params = [SamplingParams(temperature=1.0, top_p=5e-324), SamplingParams(temperature=1e-300)]
    for _ in range(20):
        assert sample(logits, params, [None, None], torch.Generator().manual_seed(0)).token_ids == [1, 0]


def test_top_logprobs_per_row_are_the_raw_distributions_best():
    """Each row gets its own k (0: none) of log_softmax(raw logits), best first, whatever its
    temperature and filters; a token at -inf (suppressed) is never one."""
    torch.manual_seed(0)
    logits = torch.randn(4, 12) * 2
    logits[2, :9] = float("-inf")                # only 3 tokens possible in row 2
    params = [SamplingParams(logprobs=True, top_logprobs=5), SamplingParams(logprobs=True),
              SamplingParams(logprobs=True, top_logprobs=20, temperature=3.0, top_k=2, seed=1),
              SamplingParams(temperature=0.5, top_logprobs=0)]
    out = sample(logits, params, [None, None, torch.Generator().manual_seed(1), None], torch.Generator())
    assert out.top_logprobs[1] is None and out.top_logprobs[3] is None and out.logprobs[3] is None
    for row, k in ((0, 5), (2, 20)):
        lp = [float(v) for v in torch.log_softmax(logits[row].double(), -1)]
        best = sorted((i for i in range(12) if lp[i] != float("-inf")), key=lambda i: -lp[i])[:k]
        ids, values = out.top_logprobs[row]
        assert ids == best
        assert all(abs(v - lp[i]) < 1e-5 for i, v in zip(ids, values))
        assert abs(out.logprobs[row] - lp[out.token_ids[row]]) < 1e-5
    assert len(out.top_logprobs[2][0]) == 3
