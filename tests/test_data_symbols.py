"""Per-question symbols (``engine.data.symbols``): a renamed question is the same graph
under a one-to-one renaming (checked against the original's parsed graph and BFS), the
answer and steps follow, ``restore`` undoes it, the draw is fixed by the seed and spreads
over the whole symbol set, and too many names is an error that says so."""

from __future__ import annotations

from collections import Counter

import pytest

from engine.data.compact import compact_record
from engine.data.question import hop_distances, parse_question
from engine.data.source import resolve_source
from engine.data.symbols import SymbolMap, names_in, rename_record, symbol, symbol_words

QUESTION = "Tom wumpus | wumpus yumpus | Tom rempus | rempus zumpus | ? Tom yumpus zumpus"


def test_symbols_are_distinct_plain_words():
    words = symbol_words(64)
    assert len(set(words)) == 64 and all(w.isalpha() and w.isascii() for w in words)
    with pytest.raises(ValueError):
        symbol(26 * 26)


def test_rename_is_a_graph_isomorphism_and_restore_inverts_it():
    names = SymbolMap.for_text(QUESTION, 16, seed=3)
    renamed = names.rename(QUESTION)
    assert set(names_in(renamed)) <= set(symbol_words(16))
    original, mapped = parse_question(QUESTION), parse_question(renamed)
    assert sorted((names.forward[s], names.forward[t]) for s, t in original.edges) == sorted(mapped.edges)
    assert mapped.name == names.forward["Tom"]
    assert {names.forward[w]: d for w, d in hop_distances(original).items()} == hop_distances(mapped)
    assert names.restore(renamed) == QUESTION
    assert names.restore(f"{names.forward['Tom']} {names.forward['yumpus']}") == "Tom yumpus"
    assert names.restore("nzz") == "nzz"          # a symbol the question did not use stays


def test_records_keep_their_answer_and_path_under_renaming():
    records = resolve_source("prosqa:full?n=40", 0, 0)
    seen = Counter()
    for i, record in enumerate(records):
        compact = compact_record(record, i, steps="path")
        renamed = rename_record(compact, i, 64)
        assert renamed == rename_record(compact, i, 64)                     # deterministic
        graph = parse_question(renamed.question)
        distances = hop_distances(graph)
        name, target = renamed.answer.split()
        assert name == graph.name and target in graph.options
        assert distances[target] == len(renamed.steps) - 1                  # the path is a shortest one
        assert [s.strip() for s in renamed.steps][0] == graph.name
        seen.update(names_in(renamed.question))
    assert len(seen) > 56            # the assignment spreads over (nearly) all 64 symbols


def test_too_many_names_is_a_clear_error():
    with pytest.raises(ValueError, match="at most 3"):
        SymbolMap.for_text(QUESTION, 3, seed=0)
