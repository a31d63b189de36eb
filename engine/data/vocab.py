"""Names for ProsQA-style graphs: person names for parentless nodes, made-up "-pus"
concept words for the others.

Concept words are built procedurally as onset + vowel + coda + "pus" ("w"+"u"+"m" ->
"wumpus", "scr"+"o"+"m" -> "scrompus"), in the style of ProntoQA/ProsQA. The onsets,
vowels and codas were read off the published ProsQA validation split, so every concept
word of that split is in ``concept_words()`` (a test checks it); a few extra onsets widen
the pool. Person names are the ordinary first names that split uses.

This module knows spelling only, nothing of graphs.
"""

from __future__ import annotations

import functools
import random

PERSON_NAMES: tuple[str, ...] = (
    "Alex", "Bob", "Carol", "Davis", "Eva", "Fae", "Gabriel", "Jack", "Max", "Oliver",
    "Polly", "Rex", "Sally", "Sam", "Stella", "Tom", "Wren",
)

# Onsets seen in the real split ("" as in "impus"), then a few extra ones of the same style.
_ONSETS = ("", "b", "br", "ch", "d", "f", "g", "gr", "gw", "h", "j", "k", "l", "n", "qu", "r",
           "scr", "sh", "st", "t", "v", "w", "y", "z", "zh",
           "bl", "cr", "dr", "fl", "m", "p", "pl", "s", "sk", "sp", "th", "tr")
_VOWELS = ("e", "i", "o", "oo", "u")
_CODAS = ("m", "r", "l")
SUFFIX = "pus"


@functools.cache
def concept_words() -> tuple[str, ...]:
    """Every concept word, in a fixed pseudo-random order (the same on every machine), so
    that a prefix ``concept_words()[:k]`` mixes onsets rather than running alphabetically."""
    words = sorted({o + v + c + SUFFIX for o in _ONSETS for v in _VOWELS for c in _CODAS})
    random.Random("prosqa-concept-words").shuffle(words)
    return tuple(words)
