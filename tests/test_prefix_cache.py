"""Prefix caching: a prompt's leading tokens that a slot already holds are copied, not prefilled.

The index (``engine.prefix_cache``) against a plain loop; the scheduler's copies on plain
data (what is reused, from which slot, and what never may be: columns not yet written,
a slot admitted into in the same plan, anything after a failed step); and the engine
against the naive full-recompute reference on prompts that share long prefixes, arriving
while others decode, through chunked prefill, on several architectures (sliding windows
and ALiBi included), with the prefilled tokens counted from outside.
"""

from __future__ import annotations

import random

import pytest

from engine import Engine, LatentPolicy, SamplingParams
from engine.params import ResolvedLatent
from engine.prefix_cache import SlotPrefixes, common_prefix_length
from engine.request import Request
from engine.scheduler import Scheduler
from tests.engine_helpers import reference, run_staggered


def test_common_prefix_length_matches_a_plain_loop():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randrange(0, 40)
        a = [rng.randrange(3) for _ in range(n)]
        b = a[:rng.randrange(0, n + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 10))]
        expected = 0
        while expected < min(len(a), len(b)) and a[expected] == b[expected]:
            expected += 1
        assert common_prefix_length(a, b) == common_prefix_length(b, a) == expected


def test_index_finds_the_longest_holder_and_keeps_the_last_token_to_compute():
    index = SlotPrefixes(num_slots=4, max_positions=100)
    index.assign(0, [1, 2, 3])
    index.assign(2, [1, 2, 3, 4, 5, 6])
    assert index.match([1, 2, 3, 4, 9]) == (2, 4)
    assert index.match([1, 2, 3, 4, 5, 6]) == (2, 5)          # the whole prompt held: all but its last
    assert index.match([1, 2, 3, 4, 9], exclude={2}) == (0, 3)
    assert index.match([7, 1, 2]) == (None, 0)
    assert index.match([1]) == (None, 0)                       # a one-token prompt has nothing to reuse
    index.copy(2, 3, 2)
    assert index.tokens[3] == [1, 2]
    small = SlotPrefixes(num_slots=1, max_positions=3)
    small.assign(0, [1, 2, 3, 4, 5])
    assert small.tokens[0] == [1, 2, 3]                        # never past the scratch column
    index.clear()
    assert index.match([1, 2, 3, 4, 9]) == (None, 0)


def make(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=4), ResolvedLatent(mode="none", thoughts=0),
                   eot_token_id=900, starts_in_language=True)


def test_scheduler_copies_what_a_running_request_holds_and_prefills_the_rest():
    scheduler = Scheduler(max_batch_size=4, max_prefill_tokens=100, prefix_positions=63, min_reused_tokens=1)
    a = make("a", list(range(10)))
    scheduler.add(a)
    plan = scheduler.schedule()
    assert plan.prefix_copies == [] and plan.prefill[0].start == 0
    b = make("b", list(range(6)) + [50, 51, 52])
    twin = make("twin", list(range(10)))
    scheduler.add(b)
    scheduler.add(twin)
    plan = scheduler.schedule()
    copies = {(c.source_slot, c.slot, c.length) for c in plan.prefix_copies}
    assert copies == {(a.slot, b.slot, 6), (a.slot, twin.slot, 9)}
    chunks = {c.request_id: c for c in plan.prefill}
    assert (chunks["b"].start, chunks["b"].token_ids) == (6, (50, 51, 52))
    assert (chunks["twin"].start, chunks["twin"].token_ids) == (9, (9,))    # the last token is computed
    assert b.cached_prompt_tokens == 6 and scheduler.cached_tokens == 6 + 9


def test_prefixes_shorter_than_the_floor_are_not_taken():
    scheduler = Scheduler(max_batch_size=4, max_prefill_tokens=100, prefix_positions=63, min_reused_tokens=4)
    scheduler.add(make("a", list(range(10))))
    scheduler.schedule()
    short, long = make("short", [0, 1, 2, 50]), make("long", [0, 1, 2, 3, 50])
    scheduler.add(short)
    scheduler.add(long)
    plan = scheduler.schedule()
    assert [(c.slot, c.length) for c in plan.prefix_copies] == [(long.slot, 4)]
    assert [c.start for c in plan.prefill] == [0, 4]


def test_scheduler_never_copies_columns_that_are_not_written_yet():
    scheduler = Scheduler(max_batch_size=4, max_prefill_tokens=4, prefix_positions=63, min_reused_tokens=1)
    a, b = make("a", list(range(10))), make("b", list(range(10)))
    scheduler.add(a)
    scheduler.add(b)
    plan = scheduler.schedule()           # a's first 4 tokens; b waits for budget
    assert [c.request_id for c in plan.prefill] == ["a"] and plan.prefix_copies == []
    plan = scheduler.schedule()           # a's next chunk is written by this plan: b copies only the first 4
    assert [(c.request_id, c.start) for c in plan.prefill] == [("a", 4)]
    c = make("c", list(range(10)))
    scheduler = Scheduler(max_batch_size=4, max_prefill_tokens=100, prefix_positions=63, min_reused_tokens=1)
    scheduler.add(c)
    scheduler.add(make("d", list(range(10))))
    plan = scheduler.schedule()           # admitted together: neither holds anything yet
    assert plan.prefix_copies == [] and [ch.start for ch in plan.prefill] == [0, 0]


def test_a_slot_admitted_into_is_no_source_in_the_same_plan():
    """Copies run in plan order before the forwards: a slot that takes a copy in this plan
    no longer holds what the index says it held, so nothing may copy from it in this plan."""
    scheduler = Scheduler(max_batch_size=3, max_prefill_tokens=100, prefix_positions=63, min_reused_tokens=1)
    old, running = make("old", [1, 2, 3, 4, 5, 6]), make("running", [7, 7, 7, 7, 7, 7])
    scheduler.add(old)
    scheduler.add(running)
    scheduler.schedule()
    scheduler.remove(old)                 # slot 0 is free and holds [1..6]
    first, second = make("first", [7, 7, 7, 7, 8]), make("second", [1, 2, 3, 4, 5, 9])
    scheduler.add(first)
    scheduler.add(second)
    plan = scheduler.schedule()
    assert (first.slot, second.slot) == (old.slot, 2)
    assert [(c.source_slot, c.slot, c.length) for c in plan.prefix_copies] == [(running.slot, first.slot, 4)]
    assert [c.start for c in plan.prefill] == [4, 0]


def test_a_slot_admitted_into_without_a_copy_still_serves_the_same_plan():
    """Its old columns stay until the forward, after every copy: a burst of prompts that
    share what one ended request held all take it, the first from its own slot."""
    scheduler = Scheduler(max_batch_size=4, max_prefill_tokens=100, prefix_positions=63, min_reused_tokens=1)
    old = make("old", [1, 2, 3, 4, 5, 6])
    scheduler.add(old)
    scheduler.schedule()
    scheduler.remove(old)
    burst = [make(f"b{i}", [1, 2, 3, 4, 10 + i]) for i in range(3)]
    for request in burst:
        scheduler.add(request)
    plan = scheduler.schedule()
    assert [(c.source_slot, c.slot, c.length) for c in plan.prefix_copies] == [
        (old.slot, old.slot, 4), (old.slot, burst[1].slot, 4), (old.slot, burst[2].slot, 4)]
    assert [c.start for c in plan.prefill] == [4, 4, 4]


def test_scheduler_copies_from_a_slot_mid_prefill_only_its_written_chunks():
    scheduler = Scheduler(max_batch_size=4, max_prefill_tokens=4, prefix_positions=63, min_reused_tokens=1)
    a = make("a", list(range(10)))
    scheduler.add(a)
    scheduler.schedule()                  # a: tokens 0..3 written by this plan
    b = make("b", list(range(10)))
    scheduler.add(b)
    plan = scheduler.schedule(prefill_budget=4)   # a continues with all 4 tokens of budget: b waits
    assert [c.request_id for c in plan.prefill] == ["a"]
    scheduler.max_prefill_tokens = 100
    plan = scheduler.schedule()           # a's last chunk (8..9) is in this plan: b takes 0..7
    assert [(c.source_slot, c.slot, c.length) for c in plan.prefix_copies] == [(a.slot, b.slot, 8)]
    assert [(c.request_id, c.start) for c in plan.prefill] == [("a", 8), ("b", 8)]


def test_an_ended_requests_slot_serves_its_successor_and_a_failed_step_forgets_everything():
    scheduler = Scheduler(max_batch_size=2, max_prefill_tokens=100, prefix_positions=63, min_reused_tokens=1)
    a = make("a", [5, 6, 7, 8])
    scheduler.add(a)
    scheduler.schedule()
    scheduler.remove(a)                   # ended: its slot is free, its columns intact
    b = make("b", [5, 6, 7, 9])
    scheduler.add(b)
    plan = scheduler.schedule()
    assert b.slot == a.slot
    assert [(c.source_slot, c.slot, c.length) for c in plan.prefix_copies] == [(b.slot, b.slot, 3)]
    assert plan.prefill[0].start == 3 and plan.released[0].slot == a.slot
    scheduler.forget_prefixes()
    c = make("c", [5, 6, 7, 9])
    scheduler.add(c)
    plan = scheduler.schedule()
    assert plan.prefix_copies == [] and plan.prefill[0].start == 0
    off = Scheduler(max_batch_size=2, max_prefill_tokens=100)
    for name in ("x", "y"):
        off.add(make(name, [5, 6, 7, 8]))
        off.schedule()
    assert off.prefixes is None and off.cached_tokens == 0


# ---------------------------------------------------------------- the engine, against the oracle

STEM = ("Every wumpus is a yumpus. Every yumpus is a zumpus. Every zumpus is a rompus. Every rompus is a "
        "numpus. Every numpus is a gorpus. ")
ENDINGS = ["Tom is a wumpus. Is Tom a gorpus or lempus?", "Sally is a yumpus. Is Sally a numpus?",
           "Tom is a wumpus. Is Tom a gorpus or lempus?", "Max is a zumpus. Is Max a rompus or a tumpus?",
           "Alex is a wumpus. Is Alex a rompus?", "Sally is a yumpus. Is Sally a numpus?"]


class PrefillCounter:
    """Counts, from outside the engine, the prompt tokens each plan prefills and copies."""

    def __init__(self, engine):
        self.prefilled = self.copied = 0
        self.runner = engine.runner
        self._execute = self.runner.execute

        def counting(plan):
            self.prefilled += sum(len(chunk.token_ids) for chunk in plan.prefill)
            self.copied += sum(copy.length for copy in plan.prefix_copies)
            return self._execute(plan)

        self.runner.execute = counting

    def close(self):
        self.runner.execute = self._execute


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma2", "bloom"])
def engine(request, tiny_checkpoint):
    # 3 slots and 9 prompt tokens a step: prompts come in chunks, slots are reused all the time
    return Engine.from_pretrained(tiny_checkpoint(request.param), max_batch_size=3, max_prefill_tokens=9)


def test_shared_prefixes_arriving_while_others_decode_match_the_reference(engine):
    """Prompts that share a long stem (some identical) join one or two per step while
    others think and answer; every answer is the naive reference's, token for token, and
    most of the stem is copied rather than prefilled."""
    plan = [(STEM + ENDINGS[i % len(ENDINGS)], (0, 2, 3)[i % 3], 3 + i % 4) for i in range(9)]
    counter = PrefillCounter(engine)
    def add(k):
        question, thoughts, max_tokens = plan[k]
        return engine.add_request(question, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                  LatentPolicy(mode="fixed", thoughts=thoughts))

    try:
        done = run_staggered(engine, len(plan), add)
    finally:
        counter.close()
    prompt_tokens = sum(engine.make_request(q, latent=LatentPolicy(mode="fixed", thoughts=t)).num_prompt_tokens
                        for q, t, _ in plan)
    assert counter.prefilled + counter.copied == prompt_tokens
    stem = len(engine.prompt_format.question_ids(STEM)) - 2
    assert counter.copied >= 4 * stem, (counter.copied, stem)     # most requests found the stem held
    for i, (question, thoughts, max_tokens) in enumerate(plan):
        expected = reference(engine, question, thoughts, max_tokens, ignore_eos=True)
        assert done[i].token_ids == expected.token_ids, (i, question)
        assert done[i].num_thoughts == thoughts


def test_copied_columns_equal_a_full_prefills(tiny_checkpoint):
    """The keys and values a request holds after taking a prefix from another (running)
    slot equal those of the same prompt prefilled whole by an engine without prefix caching."""
    import torch

    checkpoint = tiny_checkpoint("llama")
    cached = Engine.from_pretrained(checkpoint, max_batch_size=2, prefix_caching=True)
    plain = Engine.from_pretrained(checkpoint, max_batch_size=2, prefix_caching=False)
    question = STEM + ENDINGS[3]
    policy = LatentPolicy(mode="none")
    cached.add_request(STEM + ENDINGS[0], SamplingParams(max_tokens=20, ignore_eos=True), policy)
    cached.step()                          # slot 0 holds the first prompt, and goes on decoding
    counter = PrefillCounter(cached)
    try:
        cached.add_request(question, SamplingParams(max_tokens=1), policy)
        cached.step()                      # admitted into slot 1: copies the stem from slot 0
    finally:
        counter.close()
    length = cached.make_request(question, latent=policy).num_prompt_tokens
    assert 0 < counter.copied < length and counter.prefilled == length - counter.copied
    plain.add_request(question, SamplingParams(max_tokens=1), policy)
    plain.step()
    for mine, theirs in zip(cached.runner.cache.layers, plain.runner.cache.layers):
        torch.testing.assert_close(mine.keys[1, :, :length], theirs.keys[0, :, :length], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.values[1, :, :length], theirs.values[0, :, :length], rtol=1e-5, atol=1e-5)
