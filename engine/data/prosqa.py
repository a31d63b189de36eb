"""A ProsQA-style generator (COCONUT, arXiv 2412.06769, Appendix), verified sample by sample.

The process, per sample (``grow_graph``):

1. Grow a DAG node by node from two roots, 0 and 1. Each new node draws
   ``k ~ Poisson(mean_parents)`` parents (none: a new person); with probability
   ``p_one_side / 2`` only from the nodes descended from root 0 alone, with the same
   probability only from root 1's side, otherwise from all nodes; parents are drawn
   without replacement with weight ``depth * depth_weight + 1``, depth being the hop
   distance from the nearest parentless node, which favours long chains. Labels follow
   by descent: bit 1 for root 0, bit 2 for root 1 (a bitwise OR over parents).
2. Drop nodes left isolated (no parents, no children) and renumber.
3. The question's entity X is the root whose own-side leaves (nodes with its label only
   and no children) lie deepest (ties at random); the target A is the deepest such leaf,
   the distractor B a random leaf of the other side only, so A is reachable and B is not.
   Graphs whose target depth falls outside ``[min_hops, max_hops]`` are regrown.
   (``linear``: X is either chain's person at random; the longer chain would give the
   answer away.)
4. Parentless nodes get person names, the rest "-pus" concept words (``engine.data.vocab``).
   The question states every edge as a fact ("Tom is a terpus." for a person parent,
   "Every terpus is a brimpus." otherwise) in random order, then "Is X a A or B?" with
   the two options in random order. The steps are one shortest path X..A drawn uniformly
   among the shortest paths ("X is a Y.", "Every Y is a Z.", ...); answer "X is a A.".

The paper gives the outline; the details were fitted to the published validation split
(300 graphs): there the target is always the deepest own-side leaf, the distractor always
a leaf, no node is isolated, and one-side draws that exclude other people's nodes with
``p_one_side = 0.8`` reproduce its nodes, edges, people, parent counts, label mix and
step histogram (``engine data stats`` prints the comparison). The split's root is node 1
twice as often as node 0; ours is symmetric (the index means nothing to a model).

``linear`` settings replace step 1 with disjoint chains (every node at most one parent
and one child): X's chain to A, the other root's chain to B, plus distractor chains from
other people, grown interleaved so that parents precede children.

Every sample is checked by ``verify_sample`` before it is returned, and sample ``i`` of
``generate(n, seed, ...)`` depends only on ``(seed, i, settings)``, so runs are
reproducible and a longer run extends a shorter one. This module knows nothing of
tokenizers or files (see ``engine.data.records``, ``engine.data.source``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from engine.data.graphs import bfs_distances, children_lists, poisson, random_shortest_path, weighted_sample
from engine.data.verify import verify_sample
from engine.data.vocab import PERSON_NAMES, concept_words


@dataclass(frozen=True)
class ProsQASettings:
    """Generator settings; ``PRESETS`` holds the named ones."""

    n_nodes: int = 28            # nodes grown (roots included) before isolated ones are dropped
    min_hops: int = 3            # shortest path length X..A, inclusive range
    max_hops: int = 6
    mean_parents: float = 1.5    # Poisson mean of a new node's number of parents
    depth_weight: float = 1.5    # a candidate parent's weight is depth * depth_weight + 1
    p_one_side: float = 0.8      # probability that a new node takes parents from one side only
    linear: bool = False         # disjoint chains instead of a branching DAG
    n_concepts: int | None = None  # concept words drawn from concept_words()[:n_concepts]
    max_tries: int = 10_000      # regrowths allowed for one sample before giving up

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"ProsQASettings: {msg}")

        if not 1 <= self.min_hops <= self.max_hops:
            bad(f"need 1 <= min_hops <= max_hops, got min_hops={self.min_hops}, max_hops={self.max_hops}")
        if self.n_nodes < self.min_hops + 3:
            bad(f"n_nodes={self.n_nodes} is too small for min_hops={self.min_hops} "
                f"(need at least min_hops + 3 nodes)")
        if self.linear and self.n_nodes < 2 * self.min_hops + 2:
            bad(f"linear: n_nodes={self.n_nodes} cannot hold two chains of {self.min_hops} hops")
        if self.mean_parents <= 0 or self.depth_weight < 0 or not 0 <= self.p_one_side <= 1:
            bad("need mean_parents > 0, depth_weight >= 0 and 0 <= p_one_side <= 1")
        pool = len(concept_words())
        if self.n_concepts is not None and not self.n_nodes - 2 <= self.n_concepts <= pool:
            bad(f"n_concepts={self.n_concepts} must lie in [n_nodes - 2, {pool}] "
                f"(the graph may need n_nodes - 2 distinct words; the pool has {pool})")
        if self.max_tries < 1:
            bad(f"max_tries must be >= 1, got {self.max_tries}")


PRESETS: dict[str, ProsQASettings] = {
    "full": ProsQASettings(),                                           # the published distribution
    "mini": ProsQASettings(n_nodes=12, min_hops=2, max_hops=4),         # about 10 nodes, CPU scale
    "linear": ProsQASettings(n_nodes=12, min_hops=2, max_hops=4, linear=True),
}


def resolve_settings(size: str | ProsQASettings) -> ProsQASettings:
    if isinstance(size, ProsQASettings):
        return size
    if size not in PRESETS:
        raise ValueError(f"unknown ProsQA size {size!r} (known: {', '.join(PRESETS)})")
    return PRESETS[size]


def grow_graph(rng: random.Random, s: ProsQASettings) -> list[list[int]]:
    """Step 1: each node's parent list, nodes in growth order (0 and 1 are the roots)."""
    parents: list[list[int]] = [[], []]
    depth, label = [0, 0], [1, 2]
    groups: dict[int, list[int]] = {0: [], 1: [0], 2: [1], 3: []}
    for idx in range(2, s.n_nodes):
        k = poisson(rng, s.mean_parents)
        r = rng.random()
        if r < s.p_one_side / 2:
            candidates = list(groups[1])  # root 0's side only
        elif r < s.p_one_side:
            candidates = list(groups[2])  # root 1's side only
        else:
            candidates = list(range(idx))
        chosen = weighted_sample(rng, candidates, [depth[c] * s.depth_weight + 1 for c in candidates], k)
        lab = 0
        for p in chosen:
            lab |= label[p]
        parents.append(chosen)
        depth.append(1 + min(depth[p] for p in chosen) if chosen else 0)
        label.append(lab)
        groups[lab].append(idx)
    return parents


def grow_chains(rng: random.Random, s: ProsQASettings) -> list[list[int]]:
    """Step 1 for ``linear``: chains from roots 0 and 1 and from other people, interleaved."""
    first = rng.randint(s.min_hops, min(s.max_hops, s.n_nodes - 2 - s.min_hops))
    second = rng.randint(s.min_hops, min(s.max_hops, s.n_nodes - 2 - first))
    todo = [first, second]  # nodes still to add per chain (never more than n_nodes in all)
    room = s.n_nodes - sum(todo) - 2
    while room >= 2:  # distractor chains: a person (counted in todo) and 1..max_hops concepts
        hops = rng.randint(1, min(s.max_hops, room - 1))
        todo.append(hops + 1)
        room -= hops + 1
    parents: list[list[int]] = [[], []]
    last: list[int | None] = [0, 1] + [None] * (len(todo) - 2)  # current end of each chain
    while any(todo):
        c = rng.choice([i for i, left in enumerate(todo) if left])
        parents.append([] if last[c] is None else [last[c]])
        last[c] = len(parents) - 1
        todo[c] -= 1
    return parents


def _drop_isolated(parents: list[list[int]]) -> list[list[int]]:
    has_child = [False] * len(parents)
    for ps in parents:
        for p in ps:
            has_child[p] = True
    keep = [i for i, ps in enumerate(parents) if i < 2 or ps or has_child[i]]
    new_index = {old: new for new, old in enumerate(keep)}
    return [[new_index[p] for p in parents[i]] for i in keep]


def _pick_question(rng: random.Random, parents: list[list[int]], s: ProsQASettings):
    """Step 3: (root, target, neg_target, hops) or None when the graph does not qualify."""
    n = len(parents)
    edges = [(p, c) for c, ps in enumerate(parents) for p in ps]
    children = children_lists(n, edges)
    label = [1, 2] + [0] * (n - 2)
    for i in range(2, n):
        for p in parents[i]:
            label[i] |= label[p]
    sides = []
    for root in (0, 1):
        dist = bfs_distances(children, root)
        leaves = [i for i in range(n) if label[i] == label[root] and not children[i] and i != root]
        if not leaves:
            return None
        deepest = max(dist[i] for i in leaves)
        sides.append((deepest, [i for i in leaves if dist[i] == deepest], leaves))
    if sides[0][0] != sides[1][0] and not s.linear:
        root = 0 if sides[0][0] > sides[1][0] else 1
    else:  # linear: either chain, else the longer one would give the answer away
        root = rng.randrange(2)
    hops, deepest_leaves, _ = sides[root]
    if not s.min_hops <= hops <= s.max_hops:
        return None
    return root, rng.choice(deepest_leaves), rng.choice(sides[1 - root][2]), edges


def _render(rng: random.Random, parents: list[list[int]], edges, root: int, target: int, neg: int,
            s: ProsQASettings) -> dict[str, Any]:
    """Step 4: names, facts, question, steps, answer."""
    n = len(parents)
    people = [i for i in range(n) if not parents[i]]
    if len(people) > len(PERSON_NAMES):
        raise ValueError(f"a graph has {len(people)} parentless nodes; only {len(PERSON_NAMES)} person names exist")
    pool = concept_words()[: s.n_concepts] if s.n_concepts else concept_words()
    person_names = rng.sample(PERSON_NAMES, len(people))
    concept_names = iter(rng.sample(pool, n - len(people)))
    names_of_people = dict(zip(people, person_names))
    sym = [names_of_people[i] if i in names_of_people else next(concept_names) for i in range(n)]

    def fact(a: int, b: int) -> str:
        return f"{sym[a]} is a {sym[b]}." if not parents[a] else f"Every {sym[a]} is a {sym[b]}."

    facts = [fact(a, b) for a, b in edges]
    rng.shuffle(facts)
    options = [sym[target], sym[neg]]
    rng.shuffle(options)
    children = children_lists(n, edges)
    path = random_shortest_path(children, parents, root, target, rng)
    return {
        "question": " ".join(facts) + f" Is {sym[root]} a {options[0]} or {options[1]}?",
        "answer": f"{sym[root]} is a {sym[target]}.",
        "steps": [fact(a, b) for a, b in zip(path, path[1:])],
        "idx_to_symbol": sym,
        "edges": [[a, b] for a, b in edges],
        "root": root,
        "target": target,
        "neg_target": neg,
    }


def make_sample(seed: int, index: int, settings: str | ProsQASettings = "full") -> dict[str, Any]:
    """Sample ``index`` of the stream for ``seed``: a verified record dict."""
    s = resolve_settings(settings)
    rng = random.Random(f"prosqa:{seed}:{index}")
    for _ in range(s.max_tries):
        parents = grow_chains(rng, s) if s.linear else _drop_isolated(grow_graph(rng, s))
        picked = _pick_question(rng, parents, s)
        if picked is not None:
            sample = _render(rng, parents, picked[3], *picked[:3], s)
            verify_sample(sample)
            return sample
    raise ValueError(f"no graph with a target {s.min_hops}..{s.max_hops} hops away in {s.max_tries} tries "
                     f"with {s}; widen the hop range or change n_nodes")


def iter_samples(n: int, seed: int, size: str | ProsQASettings = "full") -> Iterator[dict[str, Any]]:
    """Samples 0..n-1 for ``seed``, one at a time (for progress bars)."""
    if n < 0:
        raise ValueError(f"number of samples must be >= 0, got {n}")
    s = resolve_settings(size)
    for i in range(n):
        yield make_sample(seed, i, s)


def generate(n: int, seed: int, size: str | ProsQASettings = "full") -> list[dict[str, Any]]:
    """``n`` verified samples in the reference record format (dicts with the graph fields)."""
    return list(iter_samples(n, seed, size))

