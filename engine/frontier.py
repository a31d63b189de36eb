"""The superposition view of a continuous thought: how its mass spreads over a graph's frontier.

For a graph question (``engine.data.question``) and thought k (1-based), the *frontier*
is the set of nodes reachable from the asked name within k hops (breadth-first over the
question's facts). The mass a thought puts on a node is ``softmax(W h)`` at that node's
token, as the paper's Figure 8 reads a thought through the LM head. ``thought_frontier``
splits one thought's mass into the frontier, the nodes exactly one hop past it, and the
rest (every other token, the graph's unreachable nodes included); the three sum to 1.

This module knows distances and probabilities, nothing of models, tokenizers or servers.
"""

from __future__ import annotations

from collections.abc import Mapping


def thought_frontier(thought: int, distances: Mapping[str, int], node_probs: Mapping[str, float]) -> dict:
    """Thought ``thought``'s split of mass (``node_probs``: every graph node's probability)."""
    if thought < 1:
        raise ValueError(f"thought indices start at 1, got {thought}")
    nodes = [{"concept": w, "hops": distances.get(w), "prob": float(p)} for w, p in node_probs.items()]
    frontier = sum(n["prob"] for n in nodes if n["hops"] is not None and n["hops"] <= thought)
    beyond = sum(n["prob"] for n in nodes if n["hops"] == thought + 1)
    return {"hops": thought, "frontier_mass": frontier, "next_mass": beyond,
            "rest_mass": max(0.0, 1.0 - frontier - beyond), "nodes": nodes}


def mean_masses(traces: list[list[dict]]) -> list[dict]:
    """Per thought index, the mean frontier / next / rest mass over questions' traces
    (each trace a list of ``thought_frontier`` dicts, thought 1 first)."""
    longest = max((len(t) for t in traces), default=0)
    out = []
    for k in range(longest):
        here = [t[k] for t in traces if len(t) > k]
        out.append({"thought": k + 1, "n": len(here),
                    **{key: sum(f[key] for f in here) / len(here)
                       for key in ("frontier_mass", "next_mass", "rest_mass")}})
    return out
