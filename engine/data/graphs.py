"""Small graph helpers shared by the ProsQA generator and its verifier.

A graph is ``n`` nodes numbered 0..n-1 and a list of ``(parent, child)`` edges. Nothing
here knows names, sentences or randomness beyond the ``rng`` passed in.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def children_lists(n: int, edges: Sequence[Sequence[int]]) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        out[a].append(b)
    return out


def bfs_distances(children: Sequence[Sequence[int]], source: int) -> dict[int, int]:
    """Hop distance from ``source`` to every node it reaches (itself at 0)."""
    dist = {source: 0}
    queue = [source]
    for u in queue:
        for v in children[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def random_shortest_path(children: Sequence[Sequence[int]], parents: Sequence[Sequence[int]],
                         source: int, target: int, rng: random.Random) -> list[int]:
    """One shortest path ``source .. target``, uniform over all shortest paths."""
    dist = bfs_distances(children, source)
    if target not in dist:
        raise ValueError(f"node {target} is not reachable from node {source}")
    count = {source: 1}  # number of shortest paths from source, in BFS order
    for v in sorted(dist, key=dist.__getitem__):
        if v != source:
            count[v] = sum(count[p] for p in parents[v] if dist.get(p) == dist[v] - 1)
    path = [target]
    while path[-1] != source:
        cur = path[-1]
        preds = [p for p in parents[cur] if dist.get(p) == dist[cur] - 1]
        r = rng.random() * count[cur]
        for p in preds:
            r -= count[p]
            if r < 0:
                break
        path.append(p)
    return path[::-1]


def poisson(rng: random.Random, mean: float) -> int:
    """A Poisson(mean) draw (Knuth's method: fine for the small means used here)."""
    limit, k, prod = pow(2.718281828459045, -mean), 0, rng.random()
    while prod > limit:
        k += 1
        prod *= rng.random()
    return k


def weighted_sample(rng: random.Random, items: Sequence[int], weights: Sequence[float], k: int) -> list[int]:
    """``k`` distinct items drawn one after another with probability proportional to weight."""
    items, weights = list(items), list(weights)
    chosen = []
    for _ in range(min(k, len(items))):
        r = rng.random() * sum(weights)
        for j, w in enumerate(weights):
            r -= w
            if r < 0:
                break
        chosen.append(items.pop(j))
        weights.pop(j)
    return chosen
