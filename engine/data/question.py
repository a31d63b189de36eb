"""A ProsQA question as a graph: parse it, check that a compact model can read it, BFS it.

``parse_question(text)`` reads either wording of the same question:

* the reference sentences: ``"Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus
  or zumpus?"`` (facts in any order, then ``Is X a A or B?``, ``an`` and ``or a B`` allowed);
* the compact rendering (``engine.data.compact``): ``"wumpus yumpus | Tom wumpus | ? Tom
  yumpus zumpus"``.

and returns a ``QuestionGraph``: the asked name, the two options and the facts as
(source, target) edges in the order stated. Anything else raises ``ValueError`` that says
what was wrong and what a ProsQA question looks like: a question without facts, without
``Is X a A or B?``, naming someone no fact mentions, with a control character (a NUL byte)
or a word that is not plain ASCII letters.

``node_token_ids(graph, tokenizer)`` gives each node's single token id (None for a word a
model reading compact facts has no single token for: it would read it as pieces of others). ``hop_distances(graph)`` is
the breadth-first distance of every node from the asked name (unreachable nodes absent).

This module knows the ProsQA sentence shapes and graphs; nothing of models or serving.
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque
from dataclasses import dataclass

_WORD = r"[A-Za-z]+"
FACT = re.compile(rf"^(?:Every ({_WORD})|({_WORD})) is an? ({_WORD})\.$")   # "Every A is a B." or "X is a B."
ASK = re.compile(rf"^Is ({_WORD}) an? ({_WORD}) or (?:an? )?({_WORD})\?$")   # "Is X a A or B?"
_WITH_AN = re.compile(rf"\ban ({_WORD})\b")
_COMPACT_FACT = re.compile(rf"^({_WORD}) ({_WORD})$")
_COMPACT_ASK = re.compile(rf"^\? ({_WORD}) ({_WORD}) ({_WORD})$")

SHAPE = ("a ProsQA question: facts such as 'Every wumpus is a yumpus.' or 'Tom is a wumpus.', "
         "then 'Is Tom a yumpus or zumpus?'")


@dataclass(frozen=True)
class QuestionGraph:
    name: str                               # the asked entity (X in "Is X a A or B?")
    options: tuple[str, str]                # A and B, in the order asked
    edges: tuple[tuple[str, str], ...]      # (source, target) per fact, in the order stated
    # the words the question wrote after "an" ("an animal"), so an answer can say it alike
    with_an: frozenset[str] = frozenset()

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node once, in order of first mention (facts, then the question)."""
        seen: dict[str, None] = {}
        for a, b in self.edges:
            seen.setdefault(a)
            seen.setdefault(b)
        for w in (self.name, *self.options):
            seen.setdefault(w)
        return tuple(seen)

    def compact(self) -> str:
        """The compact rendering a compact-trained model reads."""
        facts = [f"{a} {b} |" for a, b in self.edges]
        return " ".join(facts + [f"? {self.name} {self.options[0]} {self.options[1]}"])


# Printable ASCII, newlines and tabs: what every valid question is spelt in (one regex scan;
# anything else takes the character loop below, which says what is wrong and where).
_PLAIN_TEXT = re.compile(r"[\x20-\x7e\n\t]*")


def _check_characters(text: str) -> None:
    if _PLAIN_TEXT.fullmatch(text):
        return
    for i, ch in enumerate(text):
        if ch in "\n\t":
            continue
        if unicodedata.category(ch).startswith("C"):
            raise ValueError(f"the question contains a control character (U+{ord(ch):04X} at position {i}); "
                             f"expected {SHAPE}")
        if not ch.isascii():
            word = re.search(r"\S*\Z", text[:i]).group(0) + re.match(r"\S*", text[i:]).group(0)
            raise ValueError(f"{word!r} is not a plain ASCII word (at position {i}): this model reads names and "
                             f"concepts spelled with the letters A-Z only; expected {SHAPE}")


def _ask(sentence: str, pattern: re.Pattern, shown: str) -> tuple[str, tuple[str, str]]:
    m = pattern.match(sentence)
    if not m:
        raise ValueError(f"the question must end with {shown!r}; got {sentence[-80:]!r}. Expected {SHAPE}")
    if m.group(2) == m.group(3):
        raise ValueError(f"the two options are the same ({m.group(2)!r}): ask 'Is {m.group(1)} a A or B?' "
                         f"with two different concepts")
    return m.group(1), (m.group(2), m.group(3))


def _parse_compact(text: str) -> tuple[str, tuple[str, str], list[tuple[str, str]]]:
    parts = [p.strip() for p in text.split("|")]
    name, options = _ask(parts[-1], _COMPACT_ASK, "? X A B")
    edges = []
    for p in parts[:-1]:
        m = _COMPACT_FACT.match(p)
        if not m:
            raise ValueError(f"{p!r} is not a compact fact ('source target |'). Expected {SHAPE}, "
                             f"or its compact form 'wumpus yumpus | Tom wumpus | ? Tom yumpus zumpus'")
        edges.append((m.group(1), m.group(2)))
    return name, options, edges


def _parse_sentences(text: str) -> tuple[str, tuple[str, str], list[tuple[str, str]]]:
    sentences = [s.strip() for s in re.findall(r"[^.?]+[.?]|[^.?]+$", text) if s.strip()]
    if not sentences:
        raise ValueError(f"the question is empty; expected {SHAPE}")
    name, options = _ask(sentences[-1], ASK, "Is X a A or B?")
    edges = []
    for s in sentences[:-1]:
        m = FACT.match(s)
        if not m:
            raise ValueError(f"{s!r} is not a ProsQA fact ('Every A is a B.' or 'X is a A.'); expected {SHAPE}")
        edges.append((m.group(1) or m.group(2), m.group(3)))
    return name, options, edges


def parse_question(text: str) -> QuestionGraph:
    """The graph of a ProsQA question in either wording (see the module docstring)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the question is empty; expected {SHAPE}")
    _check_characters(text)
    stripped = " ".join(text.split())
    compact = "|" in stripped or stripped.lstrip().startswith("?")
    name, options, edges = (_parse_compact if compact else _parse_sentences)(stripped)
    if not edges:
        raise ValueError(f"the question states no facts, so nothing can be reasoned about: expected {SHAPE}")
    mentioned = {w for e in edges for w in e}
    if name not in mentioned:
        raise ValueError(f"no fact mentions {name!r}, the one the question asks about: state facts such as "
                         f"'{name} is a wumpus.' before 'Is {name} a {options[0]} or {options[1]}?'")
    with_an = frozenset() if compact else frozenset(_WITH_AN.findall(stripped))
    return QuestionGraph(name=name, options=options, edges=tuple(edges), with_an=with_an)


def node_token_ids(graph: QuestionGraph, tokenizer) -> list[int | None]:
    """Each node's token id (``graph.nodes`` order, with the leading space the compact text
    gives), or None where the word does not encode as exactly one token."""
    return word_token_ids(graph.nodes, tokenizer)


def word_token_ids(words, tokenizer) -> list[int | None]:
    """Each word's token id with a leading space, or None where it is not exactly one token."""
    encoded = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    return [ids[0] if len(ids) == 1 else None for ids in encoded]


def hop_distances(graph: QuestionGraph) -> dict[str, int]:
    """Breadth-first hop count from the asked name to every node it reaches (itself: 0)."""
    children: dict[str, list[str]] = {}
    for a, b in graph.edges:
        children.setdefault(a, []).append(b)
    dist = {graph.name: 0}
    queue = deque([graph.name])
    while queue:
        node = queue.popleft()
        for child in children.get(node, ()):
            if child not in dist:
                dist[child] = dist[node] + 1
                queue.append(child)
    return dist
