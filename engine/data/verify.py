"""Checks one ProsQA-style sample against its own graph.

``verify_sample`` raises ``SampleError`` (a ``ValueError``) naming the first check that
fails: the graph fields are well formed; the question states exactly the graph's edges as
facts and ends "Is X a A or B?" with {A, B} = {target, neg_target}; the target is
reachable from the root and the distractor is not; the steps read "X is a Y.", "Every Y is
a Z.", ..., follow edges from X to the target, are as short as the shortest path, and each
one is a fact stated in the question; the answer is "X is a A.".

It reads the sample only (no generator state), so it also checks the published split.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from engine.data.graphs import bfs_distances, children_lists

_QUESTION_TAIL = re.compile(r"^(?P<facts>.*) Is (?P<x>\S+) a (?P<a>\S+) or (?P<b>\S+)\?$", re.S)
_FACT = re.compile(r"(?:Every )?\S+ is a \S+\.")


class SampleError(ValueError):
    """A generated sample breaks one of the checks."""


def _fact(sym: list[str], parentless: set[int], a: int, b: int) -> str:
    return f"{sym[a]} is a {sym[b]}." if a in parentless else f"Every {sym[a]} is a {sym[b]}."


def verify_sample(sample: Mapping[str, Any]) -> None:
    def fail(msg: str) -> None:
        raise SampleError(f"ProsQA sample check failed: {msg}")

    for key in ("question", "steps", "answer", "idx_to_symbol", "edges", "root", "target", "neg_target"):
        if key not in sample:
            fail(f"missing field '{key}'")
    sym, edges = list(sample["idx_to_symbol"]), [tuple(e) for e in sample["edges"]]
    n, root, target, neg = len(sym), sample["root"], sample["target"], sample["neg_target"]
    if len(set(sym)) != n:
        fail("idx_to_symbol has repeated names")
    if any(len(e) != 2 or not all(isinstance(v, int) and 0 <= v < n for v in e) for e in edges):
        fail("edges must be [parent, child] pairs of node indices")
    if len(set(edges)) != len(edges):
        fail("repeated edge")
    if not all(isinstance(v, int) and 0 <= v < n for v in (root, target, neg)):
        fail("root, target and neg_target must be node indices")
    has_parent = {b for _, b in edges}
    parentless = set(range(n)) - has_parent
    if root not in parentless:
        fail(f"root {sym[root]!r} has a parent")

    m = _QUESTION_TAIL.match(sample["question"])
    if m is None:
        fail("question does not end with 'Is X a A or B?'")
    if m["x"] != sym[root] or {m["a"], m["b"]} != {sym[target], sym[neg]} or m["a"] == m["b"]:
        fail(f"question asks {m['x']}/{m['a']}/{m['b']}, graph says root {sym[root]}, "
             f"options {sym[target]} and {sym[neg]}")
    stated = _FACT.findall(m["facts"])
    if " ".join(stated) != m["facts"]:
        fail("question facts are not a run of 'X is a Y.' / 'Every Y is a Z.' sentences")
    expected = sorted(_fact(sym, parentless, a, b) for a, b in edges)
    if sorted(stated) != expected:
        fail("question facts differ from the graph's edges")

    dist = bfs_distances(children_lists(n, edges), root)
    if target not in dist:
        fail(f"target {sym[target]!r} is not reachable from {sym[root]!r}")
    if neg in dist:
        fail(f"distractor {sym[neg]!r} is reachable from {sym[root]!r}")

    steps, index = sample["steps"], {name: i for i, name in enumerate(sym)}
    if len(steps) != dist[target]:
        fail(f"{len(steps)} steps, but the shortest path is {dist[target]} hops")
    edge_set, stated_set, cur = set(edges), set(stated), root
    for k, step in enumerate(steps):
        words = step[:-1].split(" ") if step.endswith(".") else []
        want_len, head = (4, sym[cur]) if k == 0 else (5, f"Every {sym[cur]}")
        if len(words) != want_len or " ".join(words[:-3]) != head or words[-3:-1] != ["is", "a"]:
            fail(f"step {k} {step!r} should read '{head} is a ...'")
        nxt = index.get(words[-1])
        if nxt is None or (cur, nxt) not in edge_set:
            fail(f"step {k} {step!r} is not an edge of the graph")
        if step not in stated_set:
            fail(f"step {k} {step!r} is not stated in the question")
        cur = nxt
    if cur != target:
        fail(f"steps end at {sym[cur]!r}, not at the target {sym[target]!r}")
    if sample["answer"] != f"{sym[root]} is a {sym[target]}.":
        fail(f"answer {sample['answer']!r} should be '{sym[root]} is a {sym[target]}.'")
