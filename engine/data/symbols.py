"""Per-question renaming of ProsQA names to a small fixed set of symbols, and back.

In ProsQA a name means nothing beyond the question it appears in: "Every wumpus is a
yumpus" could as well say "Every nah is a nbf". Zhu et al. (2025, "Reasoning by
Superposition") train on graphs whose nodes are a ~40-token symbolic vocabulary, so that
every node embedding is trained on every graph and stays nearly orthogonal to the others.
A model trained with ``text_format: compact`` and ``symbols: K`` reads the compact
rendering with every distinct name of the question replaced by one of K symbols (``naa``, ``nab``, ...):

    "wumpus yumpus | Tom wumpus | ? Tom yumpus zumpus"   -> "naf nac | naj naf | ? naj nac nbo"

``SymbolMap.for_text(text, K, seed)`` draws the assignment (a random injection of the
question's names into the K symbols, fixed by ``seed``: training draws a fresh one per
sample so no symbol carries meaning; serving uses one fixed seed), ``rename`` applies it to
any compact text and ``restore`` maps the model's output back to the question's names.
A question with more distinct names than K raises ``ValueError`` saying so. This module
knows compact text (space-separated words, ``|`` and ``?``), nothing of tokenizers.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

PUNCTUATION = frozenset({"|", "?", "###"})
_WORD = re.compile(r"\S+")


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def symbol(i: int) -> str:
    """Symbol i: ``n`` and two letters (``naa``, ``nab``, ...), a plain word as ProsQA names are."""
    if not 0 <= i < 26 * 26:
        raise ValueError(f"symbol index {i} is outside 0..675")
    return f"n{_LETTERS[i // 26]}{_LETTERS[i % 26]}"


def symbol_words(count: int) -> tuple[str, ...]:
    return tuple(symbol(i) for i in range(count))


def names_in(text: str) -> list[str]:
    """The distinct names of a compact text, in order of first appearance."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(text):
        if word not in PUNCTUATION:
            seen.setdefault(word, None)
    return list(seen)


@dataclass(frozen=True)
class SymbolMap:
    forward: dict[str, str]     # question name -> symbol
    backward: dict[str, str]    # symbol -> question name

    @classmethod
    def for_text(cls, text: str, count: int, seed: int | str) -> SymbolMap:
        names = names_in(text)
        if len(names) > count:
            raise ValueError(f"the question has {len(names)} distinct names; this model reads at most {count} "
                             f"(it was trained with symbols: {count})")
        chosen = random.Random(seed).sample(range(count), len(names))
        forward = {name: symbol(i) for name, i in zip(names, chosen)}
        return cls(forward, {s: n for n, s in forward.items()})

    def rename(self, text: str) -> str:
        return _WORD.sub(lambda m: self.forward.get(m.group(0), m.group(0)), text)

    def restore(self, text: str) -> str:
        """The model's text with every symbol of this question put back to its name; a
        symbol the question did not use is left as it is."""
        return _WORD.sub(lambda m: self.backward.get(m.group(0), m.group(0)), text)


def rename_record(record, index: int, count: int):
    """A copy of a compact record (``engine.data.compact.compact_record``) with its names
    renamed by a map drawn from ``(index, question)``: the same record always gets the same
    symbols, different records different ones."""
    names = SymbolMap.for_text(record.question, count, f"{index}:{record.question}")
    return replace(record, question=names.rename(record.question), steps=[names.rename(s) for s in record.steps],
                   answer=names.rename(record.answer))
