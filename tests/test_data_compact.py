"""The compact ProsQA rendering ("s t |" per fact, one word per node)."""

from __future__ import annotations

import re

import pytest

from engine.data.records import Record
from engine.data.compact import compact_question, compact_record


def test_compact_rendering_by_hand():
    record = Record(question="Every wumpus is a yumpus. Tom is a wumpus. Every yumpus is a zumpus. "
                             "Is Tom a zumpus or impus?",
                    steps=["Tom is a wumpus.", "Every wumpus is a yumpus.", "Every yumpus is a zumpus."],
                    answer="Tom is a zumpus.", extra={"root": 0})
    out = compact_record(record)
    assert out.question == "wumpus yumpus | Tom wumpus | yumpus zumpus | ? Tom zumpus impus"
    assert out.steps == ["Tom wumpus |", "wumpus yumpus |", "yumpus zumpus |"]
    assert out.answer == "Tom zumpus" and out.extra == {"root": 0}
    assert record.question.startswith("Every")          # the original is untouched
    assert compact_question("Tom is a wumpus. Is Tom a wumpus or an impus?") == "Tom wumpus | ? Tom wumpus impus"
    path = compact_record(record, steps="path")
    assert path.steps == [" Tom", " wumpus", " yumpus", " zumpus"]
    assert (path.question, path.answer) == (out.question, out.answer)
    with pytest.raises(ValueError, match="'facts' or 'path'"):
        compact_record(record, steps="nodes")


def test_generated_samples_all_compact():
    from engine.data.source import resolve_source

    for spec in ("prosqa:linear?n=50", "prosqa:mini?n=50"):
        for i, r in enumerate(resolve_source(spec, 0, 0)):
            c = compact_record(r, i)
            assert c.question.count("|") == r.question.count(".")
            assert len(c.question.split()) < len(r.question.split()) * 0.7


@pytest.mark.parametrize("question,message", [
    ("Every wumpus is a yumpus.", "expected facts then 'Is X a A or B?'"),
    ("Wumpuses are yumpuses. Is Tom a wumpus or impus?", "is not a ProsQA fact"),
    ("Tom is a wumpus. Is Tom wumpus or impus?", "is not 'Is X a A or B?'"),
])
def test_bad_sentences_are_named(question, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        compact_question(question, "record 3")
