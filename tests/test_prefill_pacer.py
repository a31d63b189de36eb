"""The prefill pacer's budget, and the scheduler and core obeying it.

Oracles: the budget's arithmetic is checked against figures computed by hand from the
timings fed in; the scheduler's plans are checked by counting the tokens they carry; the
core test runs a real tiny model and compares every answer with the engine's unpaced run
(pacing changes which step prefills what, never what is computed)."""

import pytest

from engine.prefill_pacer import PrefillPacer


def test_budget_is_the_cap_until_measured_and_when_nothing_decodes():
    pacer = PrefillPacer(512, delay_factor=1.0)
    assert pacer.budget(decoding=True) == 512
    pacer.observe(decode_s=0.150, prefill_s=2.0, prefill_tokens=500)   # 4 ms per prompt token
    assert pacer.budget(decoding=False) == 512


def test_budget_bounds_the_prefill_to_the_decode_steps_time():
    pacer = PrefillPacer(512, delay_factor=1.0)
    pacer.observe(decode_s=0.150, prefill_s=2.0, prefill_tokens=500)
    assert pacer.budget(decoding=True) == 37          # 0.150 s / 0.004 s per token
    pacer2 = PrefillPacer(512, delay_factor=2.0)
    pacer2.observe(decode_s=0.150, prefill_s=2.0, prefill_tokens=500)
    assert pacer2.budget(decoding=True) == 75


def test_budget_has_a_floor_a_cap_and_an_off_switch():
    slow = PrefillPacer(512, delay_factor=1.0, min_tokens=16)
    slow.observe(decode_s=0.010, prefill_s=1.0, prefill_tokens=10)     # 0.1 s per token: 0.1 token
    assert slow.budget(decoding=True) == 16
    fast = PrefillPacer(64, delay_factor=1.0)
    fast.observe(decode_s=1.0, prefill_s=0.001, prefill_tokens=100)
    assert fast.budget(decoding=True) == 64
    off = PrefillPacer(512, delay_factor=0.0)
    off.observe(decode_s=0.150, prefill_s=2.0, prefill_tokens=500)
    assert off.budget(decoding=True) == 512
    with pytest.raises(ValueError, match="expected >= 0"):
        PrefillPacer(512, delay_factor=-1)


def test_prompts_that_outnumber_the_decoding_requests_get_a_larger_share():
    """W waiting prompts against D decoding requests: the delay allowed is delay_factor x
    W / D decode steps when W > D (by hand: 1 x 0.150 s x 15 / 1 = 2.25 s at 4 ms per token
    = 562, capped at 512; x 6 / 2 = 0.45 s = 112), the plain bound otherwise."""
    pacer = PrefillPacer(512, delay_factor=1.0)
    pacer.observe(decode_s=0.150, prefill_s=2.0, prefill_tokens=500)
    assert pacer.budget(decoding=1, waiting=15) == 512
    assert pacer.budget(decoding=2, waiting=6) == 112
    assert pacer.budget(decoding=4, waiting=4) == pacer.budget(decoding=4, waiting=1) == 37
    assert pacer.budget(decoding=16, waiting=1) == 37
    assert pacer.budget(decoding=0, waiting=15) == 512          # nothing decodes: the cap


def test_moving_average_of_the_decode_step():
    pacer = PrefillPacer(4096, delay_factor=1.0, smoothing=0.5)
    pacer.observe(decode_s=0.1, prefill_s=None, prefill_tokens=0)
    pacer.observe(decode_s=0.3, prefill_s=0.4, prefill_tokens=100)     # decode avg 0.2, 4 ms per token
    assert pacer.decode_s == pytest.approx(0.2)
    assert pacer.prefill_s_per_token == pytest.approx(0.004)
    assert pacer.budget(decoding=True) == 50


def test_the_prefill_cost_is_fitted_as_fixed_plus_per_token():
    """Forwards of 10 and 100 tokens at 20 ms + 1 ms per token: the fit finds both parts
    (least squares, checked against the line through the points), and the budget leaves
    room for the fixed part: (3 x 50 ms - 20 ms) / 1 ms = 130 tokens. An average per token
    taken from 10-token chunks (3 ms) would allow only 50."""
    pacer = PrefillPacer(4096, delay_factor=3.0)
    pacer.observe(decode_s=0.050, prefill_s=0.020 + 0.001 * 10, prefill_tokens=10)
    pacer.observe(decode_s=0.050, prefill_s=0.020 + 0.001 * 100, prefill_tokens=100)
    pacer.observe(decode_s=0.050, prefill_s=0.020 + 0.001 * 10, prefill_tokens=10)
    fixed, per_token = pacer.prefill_cost()
    assert fixed == pytest.approx(0.020) and per_token == pytest.approx(0.001)
    assert pacer.budget(decoding=True) == 130


def _engine(checkpoint, **options):
    from engine import Engine
    return Engine.from_pretrained(checkpoint, max_batch_size=8, seed=0, **options)


def test_scheduler_takes_the_lower_budget(gpt2_checkpoint):
    from engine.params import LatentPolicy, SamplingParams
    from engine.scheduler import Scheduler

    engine = _engine(gpt2_checkpoint)
    requests = [engine.make_request("a question of several words, long enough " * 3,
                                    SamplingParams(max_tokens=2), LatentPolicy(mode="none")) for _ in range(3)]
    each = requests[0].num_prompt_tokens
    assert each > 40
    scheduler = Scheduler(max_batch_size=8, max_prefill_tokens=each - 10)
    for r in requests:
        scheduler.add(r)
    plan = scheduler.schedule(prefill_budget=30)
    assert sum(len(c.token_ids) for c in plan.prefill) == 30
    assert scheduler.prefill_demand()[0] == 0                      # no prompt is whole yet: no decode row
    plan = scheduler.schedule(prefill_budget=10 ** 6)               # the cap still holds
    assert sum(len(c.token_ids) for c in plan.prefill) == each - 10
    assert scheduler.prefill_demand()[0] == 1                      # the first prompt is in: one decode row


def test_prefill_demand_counts_decode_rows_and_the_prompts_a_step_could_take(gpt2_checkpoint):
    """Counted by hand over a scheduler of 2 slots and 3 requests: nothing decodes before the
    first prompt is whole; the prompts are those prefilling plus the waiting ones a free slot
    could take."""
    from engine.params import LatentPolicy, SamplingParams
    from engine.scheduler import Scheduler

    engine = _engine(gpt2_checkpoint)
    requests = [engine.make_request("a question of several words, long enough " * 3,
                                    SamplingParams(max_tokens=2), LatentPolicy(mode="none")) for _ in range(3)]
    each = requests[0].num_prompt_tokens
    scheduler = Scheduler(max_batch_size=2, max_prefill_tokens=each + 5)
    for r in requests:
        scheduler.add(r)
    assert scheduler.prefill_demand() == (0, 2)                     # two free slots, three waiting
    scheduler.schedule()                                            # the first prompt whole, 5 of the second
    assert scheduler.prefill_demand() == (1, 1)                     # no slot is free for the third
    scheduler.schedule()
    assert scheduler.prefill_demand() == (2, 0)


def test_paced_engine_answers_as_the_unpaced_one(gpt2_checkpoint):
    from engine.params import LatentPolicy, SamplingParams

    questions = [f"question number {i} about something that takes a few tokens" for i in range(6)]
    sampling = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    latent = LatentPolicy(mode="none")
    answers = []
    for factor in (0.0, 0.05):
        engine = _engine(gpt2_checkpoint, max_prefill_tokens=64, prefill_delay_factor=factor)
        ids = [engine.add_request(questions[0], sampling, latent)]
        budgets, out = [], {}
        while engine.has_unfinished():
            if len(ids) < len(questions):             # arrivals while the first decodes
                ids.append(engine.add_request(questions[len(ids)], sampling, latent))
            budgets.append(engine.core.pacer.budget(*engine.core.scheduler.prefill_demand()))
            out.update({o.request_id: list(o.token_ids) for o in engine.step() if o.finished})
        answers.append([out[i] for i in ids])
        assert (min(budgets) < 64) == bool(factor)    # the pacer lowered some step's budget
    assert answers[0] == answers[1]


def test_a_forward_with_decode_rows_counts_what_the_prompts_added():
    """Prompts run in one forward with the decode rows (``with_decode``): their cost is the
    forward's seconds beyond the decode average, as if they had run apart."""
    apart, together = PrefillPacer(4096, 2.0), PrefillPacer(4096, 2.0)
    for pacer in (apart, together):
        pacer.observe(decode_s=0.1, prefill_s=None, prefill_tokens=0)
    apart.observe(decode_s=None, prefill_s=0.05, prefill_tokens=10)
    apart.observe(decode_s=None, prefill_s=0.14, prefill_tokens=100)
    together.observe(decode_s=None, prefill_s=0.15, prefill_tokens=10, with_decode=True)
    together.observe(decode_s=None, prefill_s=0.24, prefill_tokens=100, with_decode=True)
    assert together.prefill_cost() == pytest.approx((0.04, 0.001))     # by hand: 0.09 s over 90 tokens
    assert together.prefill_cost() == pytest.approx(apart.prefill_cost())
    assert together.budget(True) == apart.budget(True)
