"""Curriculum token layout per stage and method, against hand-written expected sequences.

A character tokenizer (one id per character) keeps the expectations readable: in the
strings below ``<`` is ``<bot>``, ``>`` is ``<eot>``, ``L`` a latent placeholder and
``$`` EOS; a ``|`` separates the unlabelled prefix from the labelled rest.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from engine.train.layout import Curriculum, Markers, collate, tokenize_record

MARKERS = Markers(bot=1, eot=2, latent=3, eos=4, pad=0)
SYMBOLS = {"<": 1, ">": 2, "L": 3, "$": 4}


class CharTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def expect(spec: str) -> tuple[list[int], list[int]]:
    prefix, rest = spec.split("|")
    to_ids = lambda s: [SYMBOLS.get(c, ord(c)) for c in s]  # noqa: E731
    ids = to_ids(prefix) + to_ids(rest)
    return ids, [-100] * len(prefix) + to_ids(rest)


RECORD = SimpleNamespace(question="Q?", steps=["a", "b", "c"], answer="X")
TOKENS = tokenize_record(CharTokenizer(), RECORD, eos_id=MARKERS.eos)


def build(stage, **kw):
    sample = Curriculum(**kw).build(TOKENS, stage, MARKERS)
    return sample.input_ids, sample.labels


@pytest.mark.parametrize("stage,spec", [
    (0, "Q?\n<>|a\nb\nc\n### X$"),
    (1, "Q?\n<L>|b\nc\n### X$"),
    (2, "Q?\n<LL>|c\n### X$"),
    (3, "Q?\n<LLL>|### X$"),
    (4, "Q?\n<LLLL>|### X$"),      # pad_latent_to_max: stage thoughts even past the steps
    (5, "Q?\n<LLLL>|### X$"),      # past max_latent_stage=4: thoughts stay at 4
])
def test_coconut_stages_padded(stage, spec):
    assert build(stage, max_latent_stage=4) == expect(spec)


@pytest.mark.parametrize("stage,spec", [
    (2, "Q?\n<LL>|c\n### X$"),
    (4, "Q?\n<LLL>|### X$"),       # capped at the sample's 3 steps
    (9, "Q?\n<LLL>|### X$"),
])
def test_coconut_stages_unpadded(stage, spec):
    assert build(stage, max_latent_stage=4, pad_latent_to_max=False) == expect(spec)


def test_c_thought_multiplies_thoughts():
    assert build(2, c_thought=2) == expect("Q?\n<LLLL>|c\n### X$")
    assert build(7, c_thought=2, max_latent_stage=2) == expect("Q?\n<LLLL>|### X$")


@pytest.mark.parametrize("method,stage,spec", [
    ("cot", 0, "Q?\n|a\nb\nc\n### X$"),
    ("no_cot", 0, "Q?\n|### X$"),
    ("no_thoughts", 2, "Q?\n<>|c\n### X$"),
    ("pause_as_thought", 2, "Q?\n<LL>|c\n### X$"),
])
def test_methods(method, stage, spec):
    assert build(stage, method=method) == expect(spec)


def test_stage_schedule_per_method():
    assert [Curriculum(epochs_per_stage=2).stage(e) for e in range(6)] == [0, 0, 1, 1, 2, 2]
    assert {Curriculum(method="cot").stage(e) for e in range(20)} == {0}
    assert {Curriculum(method="no_cot").stage(e) for e in range(20)} == {0}
    nc = Curriculum(method="no_curriculum", max_latent_stage=2)
    assert {nc.stage(e) for e in range(20)} == {3}
    assert nc.build(TOKENS, nc.stage(0), MARKERS).input_ids == expect("Q?\n<LL>|### X$")[0]
    assert Curriculum(max_latent_stage=6, c_thought=2).eval_thoughts(9) == 12
    assert Curriculum(method="cot").eval_thoughts(3) == 0


def test_uniform_mixing_draws_stages_in_range():
    cur = Curriculum(uniform_prob=1.0, max_latent_stage=6)
    rng = random.Random(0)
    seen = {cur.build(TOKENS, 0, MARKERS, rng).num_thoughts for _ in range(200)}
    assert seen == {0, 1, 2, 3}    # random.choice(range(len(steps) + 1)), as the reference
    assert {Curriculum(uniform_prob=0.0).build(TOKENS, 1, MARKERS, rng).num_thoughts for _ in range(20)} == {1}


def test_needed_thoughts_and_collate():
    a = Curriculum(max_latent_stage=2).build(TOKENS, 1, MARKERS)
    b = Curriculum(max_latent_stage=2).build(TOKENS, 5, MARKERS)
    assert (a.needed_thoughts, b.needed_thoughts) == (2, 2)
    batch = collate([a, b], pad_id=MARKERS.pad)
    width = max(len(a.input_ids), len(b.input_ids))
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"][1].tolist() == [1] * len(b.input_ids) + [0] * (width - len(b.input_ids))
    assert batch["labels"][1, len(b.input_ids):].eq(-100).all()
    assert batch["input_ids"][0].tolist() == a.input_ids


def test_group_by_length_is_a_permutation_of_batches_of_similar_length():
    import random

    from engine.train.trainer import _group_by_length

    rng = random.Random(3)
    lengths = [rng.randrange(10, 200) for _ in range(1000)]
    order = list(range(1000))
    random.Random(4).shuffle(order)
    grouped = _group_by_length(order, lengths, 16, random.Random(5), group_batches=10)
    assert sorted(grouped) == list(range(1000))
    assert grouped == _group_by_length(order, lengths, 16, random.Random(5), group_batches=10)
    spread = lambda o: sum(max(lengths[i] for i in o[k:k + 16]) - min(lengths[i] for i in o[k:k + 16])  # noqa: E731
                           for k in range(0, len(o), 16))
    assert spread(grouped) < spread(order) / 2        # far less padding within a batch


def test_optimizer_resets_at_each_stage_change_until_the_layout_stops_changing():
    from types import SimpleNamespace

    from engine.train.layout import Curriculum
    from engine.train.trainer import Trainer

    fake = SimpleNamespace(config=SimpleNamespace(reset_policy="stage"),
                           curriculum=Curriculum(epochs_per_stage=2, max_latent_stage=3))
    resets = [e for e in range(1, 16) if Trainer._resets(fake, e)]
    assert resets == [2, 4, 6, 8]     # stages 1, 2, 3 and the first past max (all steps latent)
