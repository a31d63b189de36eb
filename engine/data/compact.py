"""A compact rendering of ProsQA-style records: one word per node, ``s t |`` per fact.

Zhu et al. (2025, "Reasoning by Superposition") encode a graph with one token per node
and ``s t |`` per edge: a third of ProsQA's words, and the look-up a step needs becomes
a plain induction pattern (the token after the previous occurrence of the current node).
``compact_record`` rewrites the reference sentences::

    "Every wumpus is a yumpus."   -> "wumpus yumpus |"
    "Tom is a wumpus."            -> "Tom wumpus |"   (a step: the same, or the path " Tom", " wumpus")
    "Is Tom a yumpus or zumpus?"  -> "? Tom yumpus zumpus"
    answer "Tom is a yumpus."     -> "Tom yumpus"

A model trained on compact records must be asked compact questions
(``compact_question``). Sentences of any other shape raise ``ValueError`` naming the
record and the sentence. This module knows the ProsQA sentence shapes, nothing else.
"""

from __future__ import annotations

import re
from dataclasses import replace

from engine.data.question import ASK as _QUESTION  # the ProsQA sentence shapes, defined once
from engine.data.question import FACT as _FACT


def _fact_nodes(sentence: str, where: str) -> tuple[str, str]:
    """(source, target) of a ProsQA fact sentence."""
    m = _FACT.match(sentence.strip())
    if not m:
        raise ValueError(f"{where}: {sentence!r} is not a ProsQA fact ('Every A is a B.' or 'X is a A.')")
    return m.group(1) or m.group(2), m.group(3)


def _fact(sentence: str, where: str) -> str:
    source, target = _fact_nodes(sentence, where)
    return f"{source} {target} |"


def compact_question(question: str, where: str = "question") -> str:
    parts = re.findall(r"[^.?]+[.?]", question)
    if not parts or not parts[-1].strip().endswith("?"):
        raise ValueError(f"{where}: expected facts then 'Is X a A or B?', got {question[-80:]!r}")
    m = _QUESTION.match(parts[-1].strip())
    if not m:
        raise ValueError(f"{where}: {parts[-1].strip()!r} is not 'Is X a A or B?'")
    facts = [_fact(p, where) for p in parts[:-1]]
    return " ".join(facts + [f"? {m.group(1)} {m.group(2)} {m.group(3)}"])


def compact_answer(answer: str, where: str = "answer") -> str:
    return " ".join(_fact_nodes(answer, where))


def compact_record(record, index: int = 0, steps: str = "facts"):
    """A copy of ``record`` (an ``engine.data.records.Record``) in the compact rendering.

    ``steps="facts"`` writes each step as its fact (``"wumpus yumpus |"``). ``steps="path"``
    writes the path node by node, each with a leading space: the start node, then the node
    each fact reaches (``" Tom", " wumpus", " yumpus"``: one step more than facts). Each
    node is then one token (for a tokenizer trained on such text) and one look-up from the
    token before it, and a continuous thought can stand for exactly one token of the chain.
    """
    if steps not in ("facts", "path"):
        raise ValueError(f"steps must be 'facts' or 'path', got {steps!r}")
    where = f"record {index}"
    if steps == "facts":
        rendered = [_fact(s, f"{where} step {i}") for i, s in enumerate(record.steps)]
    else:
        nodes = [_fact_nodes(s, f"{where} step {i}") for i, s in enumerate(record.steps)]
        rendered = [f" {nodes[0][0]}"] + [f" {target}" for _, target in nodes] if nodes else []
    return replace(record, question=compact_question(record.question, where), steps=rendered,
                   answer=compact_answer(record.answer, where))
