"""``SamplingParams.n`` > 1 in the engine: n answers that share one prefill and one latent pass.

Oracles, none of them the code under test:

- greedy answers must equal the naive full-recompute reference (``engine.reference``), for
  every answer of a group, in a batch with other requests joining and leaving, for fixed,
  adaptive (entropy) and zero-thought latent policies, and for the soft-embedding operator:
  a fork whose copied cache columns were wrong could not match;
- seeded sampled answers: answer i must equal an independent single request with seed + i
  (its own prefill and thoughts), each run alone;
- the work done: the latent positions fed and the prompt tokens prefilled are counted on the
  runner's plans (one group of n must feed them once, not n times);
- aborts and failures before the fork end every answer, and every batch slot comes back.
"""

from __future__ import annotations

import pytest
import torch

from engine import Engine, LatentPolicy, SamplingParams
from tests.engine_helpers import QUESTIONS, reference


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine.from_pretrained(tiny_checkpoint("llama", seed=5), max_batch_size=12)


class PlanCounter:
    """Counts what the runner is asked to compute: latent positions (decode rows that feed a
    thought), prompt tokens prefilled and prompt tokens taken from the prefix cache."""

    def __init__(self, engine):
        self.latent_rows = self.prefill_tokens = self.forks = self.reused_tokens = 0
        runner = engine.runner
        self._execute = runner.execute

        def counting(plan):
            self.latent_rows += sum(1 for row in plan.decode if row.feed_token is None)
            self.prefill_tokens += sum(len(chunk.token_ids) for chunk in plan.prefill)
            self.forks += len(plan.forks)
            self.reused_tokens += sum(copy.length for copy in plan.prefix_copies)
            return self._execute(plan)

        runner.execute = counting
        self.runner = runner

    def close(self):
        self.runner.execute = self._execute


def _free_slots(engine) -> int:
    return len(engine.core.scheduler._free_slots)


def test_greedy_answers_all_equal_the_reference_in_a_mixed_batch(engine):
    cases = [(QUESTIONS[0], LatentPolicy(mode="fixed", thoughts=3), 4),
             (QUESTIONS[2], LatentPolicy(mode="fixed", thoughts=0), 3),      # starts in language
             (QUESTIONS[3], LatentPolicy(mode="fixed", thoughts=5), 1),
             (QUESTIONS[5], LatentPolicy(mode="fixed", thoughts=2, feedback={"type": "soft_embedding"}), 2)]
    sampling = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, n=n) for _, _, n in cases]
    results = engine.generate([q for q, _, _ in cases], sampling, [p for _, p, _ in cases])
    for (question, policy, n), result in zip(cases, results):
        want = reference(engine, question, policy.thoughts, 6, feedback=policy.feedback and {"type": "soft_embedding"},
                         ignore_eos=True)
        answers = result.samples if n > 1 else [result]
        assert len(answers) == n
        assert [a.index for a in answers] == list(range(n))
        for answer in answers:
            assert answer.token_ids == want.token_ids, (question, answer.index)
            assert answer.num_thoughts == policy.thoughts
            assert answer.finish_reason == "length"
    assert _free_slots(engine) == engine.config.max_batch_size


def test_adaptive_thoughts_are_shared_by_every_answer(engine):
    """With the entropy rule, the answers inherit the leader's thought count (the reference's)."""
    ref = reference(engine, QUESTIONS[1], 6, 1, record_hiddens=True)
    threshold = sorted(ref.thought_entropies)[len(ref.thought_entropies) // 2]
    policy = LatentPolicy(mode="entropy", max_thoughts=6, entropy_threshold=threshold)
    want = reference(engine, QUESTIONS[1], 6, 5, mode="entropy", entropy_threshold=threshold, ignore_eos=True)
    [result] = engine.generate([QUESTIONS[1]], SamplingParams(max_tokens=5, ignore_eos=True, n=3), policy)
    for answer in result.samples:
        assert answer.num_thoughts == want.num_thoughts
        assert answer.token_ids == want.token_ids


def test_seeded_answers_equal_independent_requests_with_seed_plus_index(engine):
    sampling = SamplingParams(max_tokens=8, temperature=1.5, seed=1234, n=4, ignore_eos=True)
    policy = LatentPolicy(mode="fixed", thoughts=2)
    [group] = engine.generate([QUESTIONS[4]], sampling, policy)
    singles = [engine.generate(QUESTIONS[4], SamplingParams(max_tokens=8, temperature=1.5, seed=1234 + i,
                                                             ignore_eos=True), policy)[0] for i in range(4)]
    assert [a.token_ids for a in group.samples] == [s.token_ids for s in singles]
    assert len({tuple(s.token_ids) for s in singles}) > 1      # the seeds do make different answers
    again = engine.generate([QUESTIONS[4]], sampling, policy)[0]
    assert [a.token_ids for a in again.samples] == [a.token_ids for a in group.samples]


def test_one_prefill_and_one_latent_pass_per_group(engine):
    question, thoughts, n = QUESTIONS[7], 4, 5
    prompt = engine.make_request(question, latent=LatentPolicy(mode="fixed", thoughts=thoughts)).num_prompt_tokens
    counter = PlanCounter(engine)
    prefixes, engine.core.scheduler.prefixes = engine.core.scheduler.prefixes, None   # count every prompt's
    try:                                                                              # prefill (no reuse)
        engine.generate([question], SamplingParams(max_tokens=3, n=n, ignore_eos=True),
                        LatentPolicy(mode="fixed", thoughts=thoughts))
        grouped = (counter.latent_rows, counter.prefill_tokens, counter.forks)
        counter.latent_rows = counter.prefill_tokens = counter.forks = 0
        engine.generate([question] * n, SamplingParams(max_tokens=3, ignore_eos=True),
                        LatentPolicy(mode="fixed", thoughts=thoughts))
        independent = (counter.latent_rows, counter.prefill_tokens, counter.forks)
    finally:
        counter.close()
        engine.core.scheduler.prefixes = prefixes
    assert grouped == (thoughts, prompt, n - 1)
    assert independent == (n * thoughts, n * prompt, 0)


def test_more_answers_than_batch_slots_is_refused(engine):
    request = engine.make_request(QUESTIONS[0], SamplingParams(n=13))
    with pytest.raises(ValueError, match="n=13 answers need 13 batch slots"):
        engine.core.check_fits(request)
    with pytest.raises(ValueError, match="n=0 is invalid"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="n=True is invalid"):
        SamplingParams(n=True)


def test_a_group_waits_for_enough_free_slots(engine):
    """Two groups of 8 on 12 slots: the second is admitted only when the first has left."""
    ids = [engine.add_request(q, SamplingParams(max_tokens=4, n=8, ignore_eos=True),
                              LatentPolicy(mode="fixed", thoughts=1)) for q in QUESTIONS[:2]]
    finished, most_running = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        most_running = max(most_running, engine.core.scheduler.num_running)
    assert len(finished) == 16 and all(o.finish_reason == "length" for o in finished.values())
    assert most_running <= 12
    assert {rid.split("#")[0] for rid in finished} == set(ids)
    assert _free_slots(engine) == engine.config.max_batch_size


@pytest.mark.parametrize("who", ["leader", "fork"])
def test_abort_before_the_fork(engine, who):
    leader_id = engine.add_request(QUESTIONS[3], SamplingParams(max_tokens=4, n=3, ignore_eos=True),
                                   LatentPolicy(mode="fixed", thoughts=6))
    engine.step()                       # prefilled, thinking
    engine.abort(leader_id if who == "leader" else f"{leader_id}#2")
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.finish_reason
    if who == "leader":   # the answers cannot go on without the leader's thoughts
        assert finished == {leader_id: "abort", f"{leader_id}#1": "abort", f"{leader_id}#2": "abort"}
    else:
        assert finished == {leader_id: "length", f"{leader_id}#1": "length", f"{leader_id}#2": "abort"}
    assert _free_slots(engine) == engine.config.max_batch_size
    assert not engine.core.scheduler._unforked and not engine.core.scheduler._reserved


def test_a_failing_step_before_the_fork_fails_every_answer(engine):
    leader_id = engine.add_request(QUESTIONS[0], SamplingParams(max_tokens=4, n=3),
                                   LatentPolicy(mode="fixed", thoughts=4))
    engine.step()
    runner, execute = engine.runner, engine.runner.execute

    def boom(plan):
        raise RuntimeError("injected")

    runner.execute = boom
    try:
        outs = engine.step()
    finally:
        runner.execute = execute
    assert sorted((o.request_id, o.finish_reason) for o in outs) == sorted(
        (rid, "error") for rid in (leader_id, f"{leader_id}#1", f"{leader_id}#2"))
    assert engine.step() == [] and not engine.has_unfinished()   # only the freed slots were left
    assert _free_slots(engine) == engine.config.max_batch_size


def test_fork_copies_exactly_the_leaders_positions(tiny_checkpoint):
    """The slot cache's copy: the fork's first `length` columns equal the source's, the rest
    of its columns are untouched."""
    from engine.runner.slot_cache import SlotCache

    cache = SlotCache(num_layers=1, num_slots=3, max_seq_len=8)
    layer = cache.layers[0]
    layer.lazy_initialization(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    layer.keys.copy_(torch.randn_like(layer.keys))
    layer.values.copy_(torch.randn_like(layer.values))
    before = layer.keys.clone(), layer.values.clone()
    cache.copy_positions(0, [1, 2], 5)
    for tensor, old in zip((layer.keys, layer.values), before):
        assert torch.equal(tensor[1:, :, :5], old[0:1, :, :5].expand(2, -1, -1, -1))
        assert torch.equal(tensor[1:, :, 5:], old[1:, :, 5:])
        assert torch.equal(tensor[0], old[0])


def test_bench_samples_counts_one_prefill_and_one_latent_pass_per_question(tmp_path, tiny_checkpoint):
    """``engine bench samples`` end to end: the forked arm prefills each prompt once and feeds
    its thoughts once (1/n of the independent arm's, counted on the plans), and both arms'
    seeded answers are identical."""
    import json
    import subprocess
    import sys

    from engine.data.prosqa import generate

    data = tmp_path / "test.json"
    data.write_text(json.dumps(generate(4, seed=3, size="mini")))
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "samples", "--model", str(tiny_checkpoint("gpt2")),
         "--data", str(data), "--questions", "4", "--n", "3", "--rounds", "1", "--max-tokens", "3",
         "--threads", "1", "--max-batch-size", "12", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["identical_answers"] is True
    forked, independent = report["arms"]["forked"], report["arms"]["independent"]
    assert independent["prefill_tokens"] == 3 * forked["prefill_tokens"] > 0
    assert independent["latent_positions"] == 3 * forked["latent_positions"]
    assert 0.0 <= report["accuracy"]["majority"] <= 1.0
