"""ProsQA questions as graphs (engine.data.question): both wordings parse to the same
graph, breadth-first hop counts agree with an independent reachability fixpoint over the
generator's own index graph, and questions a compact model cannot read are refused with a
message that says what it reads."""

from __future__ import annotations

import re

import pytest

from engine.data.compact import compact_question
from engine.data.prosqa import generate
from engine.data.question import hop_distances, parse_question


def reachable_within(edges: list[tuple[int, int]], root: int, k: int) -> set[int]:
    """Independent oracle: the set reached after k rounds of 'add every child of the set'."""
    reached = {root}
    for _ in range(k):
        reached |= {b for a, b in edges if a in reached}
    return reached


@pytest.mark.parametrize("size", ["full", "mini"])
def test_both_wordings_give_the_generators_graph_and_hops_match_a_fixpoint(size):
    for sample in generate(40, seed=11, size=size):
        sym = sample["idx_to_symbol"]
        graph = parse_question(sample["question"])
        assert graph == parse_question(compact_question(sample["question"]))
        assert graph.name == sym[sample["root"]]
        assert set(graph.options) == {sym[sample["target"]], sym[sample["neg_target"]]}
        assert sorted(graph.edges) == sorted((sym[a], sym[b]) for a, b in sample["edges"])
        dist = hop_distances(graph)
        edges = [tuple(e) for e in sample["edges"]]
        for k in range(8):
            assert {w for w, d in dist.items() if d <= k} == {sym[i] for i in reachable_within(edges, sample["root"], k)}
        assert dist[sym[sample["target"]]] == len(sample["steps"])
        assert sym[sample["neg_target"]] not in dist


def test_hand_written_question_and_variants():
    graph = parse_question("Every wumpus is a yumpus.  Tom is an impus. Every impus is a wumpus.\n"
                           "Is Tom a yumpus or a zumpus?")
    assert graph.edges == (("wumpus", "yumpus"), ("Tom", "impus"), ("impus", "wumpus"))
    assert graph.options == ("yumpus", "zumpus")
    assert hop_distances(graph) == {"Tom": 0, "impus": 1, "wumpus": 2, "yumpus": 3}
    assert graph.compact() == "wumpus yumpus | Tom impus | impus wumpus | ? Tom yumpus zumpus"


@pytest.mark.parametrize("question, message", [
    ("Is Tom a yumpus or a zumpus?", "states no facts"),
    ("? Tom yumpus zumpus", "states no facts"),
    ("Every wumpus is a yumpus. Tom is a wumpus.", "must end with 'Is X a A or B?'"),
    ("What is the capital of France?", "must end with 'Is X a A or B?'"),
    ("Zoë is a wumpus. Is Zoë a wumpus or zumpus?", "'Zoë' is not a plain ASCII word"),
    ("Sam is a wumpus.\x00 Is Sam a wumpus or zumpus?", "control character (U+0000"),
    ("Tom is a wumpus. Is Sam a wumpus or zumpus?", "no fact mentions 'Sam'"),
    ("Tom is a wumpus. Is Tom a wumpus or wumpus?", "the two options are the same"),
    ("Tom is a wumpus. Every wumpus is yumpus. Is Tom a yumpus or zumpus?", "is not a ProsQA fact"),
    ("   ", "empty"),
])
def test_unreadable_questions_are_refused_with_what_is_expected(question, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_question(question)


@pytest.mark.parametrize("question, generated, answer", [
    ("Every cat is a mammal. Every mammal is an animal. Rex is a cat. Is Rex an animal or a fish?",
     " ### Rex animal", "Rex is an animal."),
    ("Every cat is a mammal. Rex is a cat. Is Rex a mammal or an eel?", " ### Rex mammal", "Rex is a mammal."),
    # ProsQA writes "a" before every concept, vowel or not; the answer keeps the question's article
    ("Every ompus is a yumpus. Tom is a ompus. Is Tom a ompus or zumpus?", " ### Tom ompus", "Tom is a ompus."),
    ("ompus yumpus | Tom ompus | ? Tom yumpus zumpus", " ### Tom yumpus", "Tom is a yumpus."),
])
def test_the_answer_is_written_with_the_article_the_question_used(question, generated, answer):
    from engine.checkpoint import CoconutConfig
    from engine.prompt import PromptFormat

    fmt = PromptFormat(None, CoconutConfig(text_format="compact", answer_prefix=" ### "), None)
    assert fmt.answer(generated, parse_question(question)) == answer
