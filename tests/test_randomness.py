"""Randomness in continuous thought: Gumbel and Dirichlet noise on soft thoughts, and Mixture
of Inputs (MoI) on answer tokens, in the engine.

Oracles, none of them the code under test:

- exactness: with the noise's random numbers injected (the same per-request streams into
  the engine and into the naive full-recompute reference, ``engine.reference``, whose noisy
  soft thought and MoI are written there on their own), every request's greedy answer,
  thought count and fed mixture (tokens and weights, from the trace) equal the
  reference's, on every architecture, with requests joining at every step, noisy and
  noiseless thoughts and rows with and without MoI in one batch;
- statistics: the Gumbel-max choice over the engine's noisy weights follows ``p`` (a
  chi-square test against a critical value from the table, which a wrong noise fails: the
  test also runs a uniform noise and requires it to fail); the Dirichlet draws have the
  mean ``p`` and the variance ``p (1 - p) / (alpha + 1)``; the Gamma sampler the mean and
  variance ``a``;
- seeds: a seeded noisy request gives the same thoughts and answer alone and in a batch; the
  n answers of one prompt equal n single requests with seed + i, fork at the first thought
  (the plans show one prefill and fork copies of the prompt but its <bot>), and differ
  from their first thought on;
- noise absent: the noise code is never called, and rows without noise keep their weights
  bit for bit.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from engine import Engine, LatentPolicy, SamplingParams
from engine.feedback import soft_mixture
from engine.noise import NoiseDraws, NoiseRow, add_noise, log_standard_gamma
from engine.params import FeedbackNoise, InputMixture
from engine.reference import moi_input, soft_embedding_feedback
from tests.engine_helpers import QUESTIONS, reference, run_staggered

ARCHS = ["gpt2", "llama", "qwen2", "bloom", "gpt_neox", "gemma2"]
#: chi-square critical values at p = 0.001 (tables), by degrees of freedom
CHI2_999 = {9: 27.877, 4: 18.467}


# ---------------------------------------------------------------- injected draws


VOCAB = 4096  # above the tiny models' vocabulary: one uniform per token id per thought


def _uniforms(stream: torch.Generator, ids: list[int]) -> torch.Tensor:
    """One draw of a table of uniforms per thought, read at the mixed tokens' ids (so
    near-equal probabilities ranked differently by the two decoders take the same numbers)."""
    table = torch.rand(VOCAB, generator=stream, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    return table[torch.tensor(ids, dtype=torch.long)]


def _gumbel(stream, ids) -> torch.Tensor:
    return -(-_uniforms(stream, ids).log()).log()


def _log_gamma(stream, ids, concentration: torch.Tensor) -> torch.Tensor:
    """Not a Gamma draw: a fixed function of the concentration that is not a multiple of
    it (so alpha does not cancel in the normalisation) and of the stream's uniforms."""
    return (concentration.double().cpu() + _uniforms(stream, ids)).log()


class InjectedDraws(NoiseDraws):
    """Each request's draws come from its own stream, in the order its thoughts are made."""

    def __init__(self):
        self.streams: dict[str, torch.Generator] = {}

    def gumbel(self, rows, token_ids):
        out = torch.zeros(token_ids.shape)
        for r, row in enumerate(rows):
            ids = token_ids[r].clamp(min=0).tolist()
            out[r] = _gumbel(self.streams[row.request_id], ids).float()
        return out.to(token_ids.device)

    def log_gamma(self, rows, concentration, token_ids):
        out = torch.empty(concentration.shape, dtype=torch.float64)
        for r, row in enumerate(rows):
            ids = token_ids[r].clamp(min=0).tolist()
            out[r] = _log_gamma(self.streams[row.request_id], ids, concentration[r])
        return out.to(concentration.device)


def reference_draws(stream: torch.Generator):
    return lambda kind, ids, c: _gumbel(stream, ids) if kind == "gumbel" else _log_gamma(stream, ids, c)


def noisy_reference(engine, question, thoughts, max_tokens, feedback: dict, stream, mixture=None, **kw):
    """The reference with the request's soft operator, its noise fed from ``stream``, and
    the mixtures it fed recorded (``.fed``)."""
    own = {"temperature": 1.0, "top_k": 10, "top_p": 1.0}
    own.update({k: v for k, v in feedback.items() if k in own})
    spec = feedback.get("noise")
    noise = None if spec is None else (spec["type"], spec.get("tau", spec.get("alpha", 1.0)))
    fed: list = []
    ck = engine.checkpoint
    from engine.reference import reference_generate

    result = reference_generate(
        ck.model, ck.tokenizer, question, question_suffix=ck.config.question_suffix, bot_id=ck.markers.bot,
        eot_id=ck.markers.eot, eos_ids=set(ck.markers.eos), thoughts=thoughts, max_tokens=max_tokens,
        feedback=soft_embedding_feedback(**own, noise=noise, draws=reference_draws(stream), record=fed),
        prefix_ids=ck.markers.prefix, suffix_ids=ck.markers.suffix, suppress_ids=tuple(ck.config.suppress_token_ids),
        mixture=mixture, **kw)
    result.fed = fed
    return result


# ---------------------------------------------------------------- exactness under churn

NOISY = [{"type": "soft_embedding", "noise": {"type": "gumbel", "tau": 0.5}},
         {"type": "soft_embedding", "top_k": 3, "temperature": 0.7, "noise": {"type": "gumbel", "tau": 2.0}},
         {"type": "soft_embedding", "top_k": 0, "top_p": 0.8, "noise": {"type": "gumbel", "tau": 1.0}},
         {"type": "soft_embedding", "noise": {"type": "dirichlet", "alpha": 1.0}},
         {"type": "soft_embedding", "top_k": 4, "noise": {"type": "dirichlet", "alpha": 30.0}},
         {"type": "soft_embedding"}]                                     # noiseless, in the same batch
MIXTURES = [None, {"type": "moi", "beta": 1.0, "top_k": 5}, {"type": "moi", "beta": 0.0, "top_k": 20}]


@pytest.fixture(scope="module", params=ARCHS)
def engine(request, tiny_checkpoint):
    return Engine.from_pretrained(tiny_checkpoint(request.param, seed=3), max_batch_size=32)


def _plan(threshold: float) -> list[dict]:
    plan = []
    for i, feedback in enumerate(NOISY):
        plan.append({"feedback": feedback, "policy": {"mode": "fixed", "thoughts": 3}, "ref": {},
                     "thoughts": 3, "mixture": MIXTURES[i % 3]})
        plan.append({"feedback": feedback, "policy": {"mode": "entropy", "entropy_threshold": threshold,
                                                      "max_thoughts": 4},
                     "ref": {"mode": "entropy", "entropy_threshold": threshold}, "thoughts": 4,
                     "mixture": MIXTURES[(i + 1) % 3]})
    for mixture in MIXTURES[1:]:                                         # MoI with the hidden state, and alone
        plan.append({"feedback": None, "policy": {"mode": "fixed", "thoughts": 2}, "ref": {}, "thoughts": 2,
                     "mixture": mixture})
        plan.append({"feedback": None, "policy": {"mode": "none"}, "ref": {"mode": "none"}, "thoughts": 0,
                     "mixture": mixture})
    return plan


def test_noise_and_moi_match_the_reference_under_churn(engine):
    values = []
    for question in QUESTIONS[:3]:
        values += reference(engine, question, 4, 1, record_hiddens=True).thought_entropies
    plan = _plan(statistics.median(values))
    draws = engine.runner.noise = InjectedDraws()
    try:
        def add(k):
            case = plan[k]
            trace = 1 if case["policy"]["mode"] != "none" else 0
            rid = engine.add_request(
                QUESTIONS[k % len(QUESTIONS)],
                SamplingParams(max_tokens=3 + k % 3, ignore_eos=True, mixture=case["mixture"]),
                LatentPolicy(feedback=case["feedback"], trace_top_k=trace, **case["policy"]))
            draws.streams[rid] = torch.Generator().manual_seed(1000 + k)
            return rid

        done = run_staggered(engine, len(plan), add)
    finally:
        engine.runner.noise = NoiseDraws(engine.runner.generator)
    for k, case in enumerate(plan):
        question, max_tokens = QUESTIONS[k % len(QUESTIONS)], 3 + k % 3
        mixture = None if case["mixture"] is None else (case["mixture"]["beta"], case["mixture"]["top_k"])
        if case["feedback"] is None:
            want = reference(engine, question, case["thoughts"], max_tokens, ignore_eos=True, mixture=mixture,
                             **case["ref"])
            fed = None
        else:
            want = noisy_reference(engine, question, case["thoughts"], max_tokens, case["feedback"],
                                   torch.Generator().manual_seed(1000 + k), mixture=mixture, ignore_eos=True,
                                   **case["ref"])
            fed = want.fed
        got = done[k]
        assert got.token_ids == want.token_ids, (k, case)
        assert got.num_thoughts == want.num_thoughts, (k, case)
        if fed is not None:
            assert len(got.latent_trace) == len(fed) == got.num_thoughts
            for entry, (tokens, weights) in zip(got.latent_trace, fed):
                assert entry["feed"]["token_ids"] == tokens, (k, case)
                assert entry["feed"]["weights"] == pytest.approx(weights, abs=2e-5), (k, case)
    assert engine.core.scheduler.num_running == 0


def test_noise_changes_the_thoughts(engine):
    """The injected noise is not the identity: the noisy mixtures differ from the noiseless."""
    plain = noisy_reference(engine, QUESTIONS[0], 2, 1, {"type": "soft_embedding"}, torch.Generator())
    for feedback in NOISY[0], NOISY[3]:
        noisy = noisy_reference(engine, QUESTIONS[0], 2, 1, feedback, torch.Generator().manual_seed(5))
        assert noisy.fed[0][0] == plain.fed[0][0]                    # the same tokens ...
        assert max(abs(a - b) for a, b in zip(noisy.fed[0][1], plain.fed[0][1])) > 1e-2   # ... other weights


# ---------------------------------------------------------------- MoI against its definition


@torch.inference_mode()
def test_moi_inputs_equal_the_naive_definition_also_for_a_tail_token(tiny_checkpoint):
    from engine.moi import moi_inputs

    model = Engine.from_pretrained(tiny_checkpoint("gemma2", seed=3)).checkpoint.model
    embed = model.get_input_embeddings()
    torch.manual_seed(0)
    logits = torch.randn(4, embed.weight.shape[0]) * 3
    logits[3, 7] = float("-inf")                                       # a suppressed token
    top = logits.argsort(dim=-1, descending=True)
    sampled = torch.stack([top[0, 0], top[1, 2], top[2, 40], top[3, 1]])   # row 2: outside its top 5
    k, beta = [5, 10, 5, 2], [1.0, 0.5, 2.0, 0.0]
    got = moi_inputs(embed, logits, sampled, k, beta)
    for r in range(4):
        want = moi_input(model, logits[r], int(sampled[r]), beta[r], k[r]).view(-1).float()
        assert torch.allclose(got[r], want, atol=1e-5), r
    # the tail token's row: the weights sum to 1 / (1 + beta), the sample's embedding weighs 1 - Hn
    p = logits[2, top[2, :5]].softmax(-1)
    hn = float(-(p * p.log()).sum()) / math.log(5)
    E = embed(torch.arange(embed.weight.shape[0])).float()             # the module: Gemma scales its embeddings
    expected = hn * (p[:, None] * E[top[2, :5]]).sum(0) / 3.0 + (1 - hn) * E[sampled[2]]
    assert torch.allclose(got[2], expected, atol=1e-5)


# ---------------------------------------------------------------- statistics


def _chi_square(counts: torch.Tensor, p: torch.Tensor) -> float:
    expected = p * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


class UniformDraws(NoiseDraws):
    """A wrong noise (uniform instead of Gumbel), which the chi-square test must catch."""

    def gumbel(self, rows, token_ids):
        return torch.rand(token_ids.shape, generator=self.shared, device=token_ids.device)


@pytest.mark.parametrize("tau", [0.3, 1.0, 3.0])
def test_the_gumbel_max_choice_follows_p(tau):
    torch.manual_seed(1)
    logits = torch.randn(1, 100) * 1.5
    rows = 20000
    base = soft_mixture(logits.expand(rows, -1).contiguous(), [1.0] * rows, [10] * rows, [1.0] * rows)
    p = base.weights[0]
    noise = [FeedbackNoise("gumbel", tau=tau)] * rows
    noisy = [NoiseRow(f"r{i}", None, 10) for i in range(rows)]
    good = add_noise(base, noise, noisy, NoiseDraws(torch.Generator().manual_seed(2)))
    bad = add_noise(base, noise, noisy, UniformDraws(torch.Generator().manual_seed(2)))
    for mixture, passes in ((good, True), (bad, False)):
        assert torch.allclose(mixture.weights.sum(-1), torch.ones(rows), atol=1e-5)
        assert torch.equal(mixture.token_ids, base.token_ids)
        counts = torch.bincount(mixture.weights.argmax(-1), minlength=10).double()
        assert (_chi_square(counts, p.double()) < CHI2_999[9]) == passes, (tau, passes, counts, p)


def test_seeded_gumbel_rows_follow_p_each_from_its_own_generator():
    torch.manual_seed(3)
    logits = torch.randn(1, 50)
    rows = 3000
    base = soft_mixture(logits.expand(rows, -1).contiguous(), [1.0] * rows, [5] * rows, [1.0] * rows)
    noisy = [NoiseRow(f"r{i}", torch.Generator().manual_seed(100 + i), 5) for i in range(rows)]
    mixture = add_noise(base, [FeedbackNoise("gumbel", tau=0.5)] * rows, noisy, NoiseDraws(torch.Generator()))
    counts = torch.bincount(mixture.weights.argmax(-1), minlength=5).double()
    assert _chi_square(counts, base.weights[0].double()) < CHI2_999[4]
    # a row's draws are its generator's first 5 exponentials, whatever the other rows
    g = -torch.empty(5).exponential_(generator=torch.Generator().manual_seed(100 + 7)).log()
    want = ((base.weights[7].log() + g) / 0.5).softmax(-1)
    assert torch.allclose(mixture.weights[7], want, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 50.0])
def test_dirichlet_weights_have_the_mean_p_and_the_dirichlet_variance(alpha):
    torch.manual_seed(4)
    rows = 20000
    logits = torch.randn(1, 80)
    base = soft_mixture(logits.expand(rows, -1).contiguous(), [1.0] * rows, [6] * rows, [1.0] * rows)
    p = base.weights[0].double()
    mixture = add_noise(base, [FeedbackNoise("dirichlet", alpha=alpha)] * rows,
                        [NoiseRow(f"r{i}", None, 6) for i in range(rows)], NoiseDraws(torch.Generator().manual_seed(5)))
    w = mixture.weights.double()
    assert torch.allclose(w.sum(-1), torch.ones(rows, dtype=torch.float64), atol=1e-5)
    variance = p * (1 - p) / (alpha + 1)
    assert ((w.mean(0) - p).abs() < 5 * (variance / rows).sqrt()).all(), (w.mean(0), p)
    assert torch.allclose(w.var(0), variance, rtol=0.1), (w.var(0), variance)


@pytest.mark.parametrize("a, candidates", [(0.05, 4), (0.7, 4), (1.0, 4), (4.0, 4), (300.0, 4), (1.0, 1), (0.3, 1)])
def test_the_gamma_sampler_has_the_mean_and_variance_a(a, candidates, monkeypatch):
    import engine.noise

    monkeypatch.setattr(engine.noise, "CANDIDATES", candidates)   # 1: many variates are redrawn
    draws = log_standard_gamma(torch.full((40000,), a), torch.Generator().manual_seed(6)).exp()
    assert abs(float(draws.mean()) - a) < 5 * math.sqrt(a / 40000)
    assert float(draws.var()) == pytest.approx(a, rel=0.1 if a < 0.1 else 0.05)
    again = log_standard_gamma(torch.full((40000,), a), torch.Generator().manual_seed(6)).exp()
    assert torch.equal(draws, again)                                   # every number from the generator


# ---------------------------------------------------------------- seeds, forks, noise absent

GUMBEL = {"type": "soft_embedding", "noise": {"type": "gumbel", "tau": 0.7}}


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    return Engine.from_pretrained(tiny_checkpoint("llama", seed=5), max_batch_size=12)


def _fed(out) -> list[list[float]]:
    return [entry["feed"]["weights"] for entry in out.latent_trace]


def test_a_seeded_noisy_request_does_not_depend_on_the_batch(llama):
    policy = LatentPolicy(mode="fixed", thoughts=3, trace_top_k=1, feedback=GUMBEL)
    sampling = SamplingParams(max_tokens=5, temperature=1.0, seed=77, ignore_eos=True)
    [alone] = llama.generate(QUESTIONS[1], sampling, policy)
    crowd = llama.generate([QUESTIONS[0], QUESTIONS[1], QUESTIONS[1], QUESTIONS[2]],
                           [SamplingParams(max_tokens=3, temperature=1.0), sampling,
                            SamplingParams(max_tokens=5, temperature=1.0, ignore_eos=True),
                            SamplingParams(max_tokens=4, seed=3)],
                           [policy, policy, policy, LatentPolicy(mode="fixed", thoughts=1, feedback=GUMBEL)])
    assert crowd[1].token_ids == alone.token_ids
    for a, b in zip(_fed(crowd[1]), _fed(alone)):     # the same draws (other batches round otherwise)
        assert a == pytest.approx(b, abs=1e-5)
    assert _fed(crowd[2])[0] != pytest.approx(_fed(alone)[0], abs=1e-3)   # unseeded: another draw


def test_n_answers_fork_at_the_first_thought_and_equal_seed_plus_i(llama):
    from tests.test_n_samples import PlanCounter

    policy = LatentPolicy(mode="fixed", thoughts=3, trace_top_k=2, feedback=GUMBEL)
    sampling = SamplingParams(max_tokens=4, temperature=1.0, seed=500, n=3, ignore_eos=True)
    prompt = llama.make_request(QUESTIONS[3], latent=policy).num_prompt_tokens
    forks = []
    counter = PlanCounter(llama)
    execute = counter.runner.execute

    def spying(plan):
        forks.extend(plan.forks)
        return execute(plan)

    counter.runner.execute = spying
    try:
        [group] = llama.generate([QUESTIONS[3]], sampling, policy)
    finally:
        counter.close()
    assert counter.prefill_tokens + counter.reused_tokens == prompt   # the prompt is prefilled once
    assert counter.prefill_tokens >= 1                                # (its start may be cached)
    assert [f.length for f in forks] == [prompt - 1, prompt - 1]      # the forks take it but <bot>
    assert counter.latent_rows == 3 * 3                               # each answer thinks its own thoughts
    firsts = [tuple(_fed(a)[0]) for a in group.samples]
    assert len(set(firsts)) == 3                                      # they differ from the first thought
    for i, answer in enumerate(group.samples):
        [single] = llama.generate(QUESTIONS[3], SamplingParams(max_tokens=4, temperature=1.0, seed=500 + i,
                                                               ignore_eos=True), policy)
        assert answer.token_ids == single.token_ids
        assert answer.num_thoughts == single.num_thoughts == 3
        for a, b in zip(_fed(answer), _fed(single)):
            assert a == pytest.approx(b, abs=1e-5)
    assert len(llama.core.scheduler._free_slots) == llama.config.max_batch_size


class Exploding(NoiseDraws):
    def gumbel(self, *a):
        raise AssertionError("noise drawn for a request without noise")

    log_gamma = gumbel


def test_without_noise_no_noise_is_drawn_and_weights_stay_bit_for_bit(llama):
    policy = LatentPolicy(mode="fixed", thoughts=2, trace_top_k=1, feedback={"type": "soft_embedding"})
    runner = llama.runner
    runner.noise = Exploding(runner.generator)
    try:
        results = llama.generate(QUESTIONS[:2], SamplingParams(max_tokens=2, n=2), [
            policy, LatentPolicy(mode="fixed", thoughts=2, trace_top_k=1,
                                 feedback={"type": "soft_embedding", "noise": {"type": "none"}})])
    finally:
        runner.noise = NoiseDraws(runner.generator)
    for result in results:                              # noiseless answers still fork after the thoughts
        assert _fed(result.samples[0]) == _fed(result.samples[1])
    torch.manual_seed(7)
    base = soft_mixture(torch.randn(3, 60), [1.0, 0.5, 2.0], [10, 4, 0], [1.0, 1.0, 0.9])
    assert add_noise(base, [None, FeedbackNoise("none"), None], [], Exploding(torch.Generator())) is base
    mixed = add_noise(base, [None, FeedbackNoise("dirichlet", alpha=2.0), None],
                      [NoiseRow("b", None, 4)], NoiseDraws(torch.Generator().manual_seed(1)))
    assert torch.equal(mixed.weights[0], base.weights[0]) and torch.equal(mixed.weights[2], base.weights[2])
    assert not torch.equal(mixed.weights[1], base.weights[1])


# ---------------------------------------------------------------- parameters


def test_noise_and_mixture_parameters_are_validated():
    from engine.params import LatentFeedback

    assert FeedbackNoise("gumbel").tau == 1.0 and FeedbackNoise("dirichlet").alpha == 1.0
    assert InputMixture() == InputMixture("moi", 1.0, 20)
    cases = [(lambda: FeedbackNoise("gauss"), "latent.feedback.noise.type='gauss' is invalid"),
             (lambda: FeedbackNoise("gumbel", tau=0), r"latent.feedback.noise.tau=0 is invalid: expected null or a "
                                                      r"number in \(0, 100\]"),
             (lambda: FeedbackNoise("gumbel", alpha=1.0), "alpha is only meaningful with type 'dirichlet'"),
             (lambda: FeedbackNoise("dirichlet", alpha=-1.0), "latent.feedback.noise.alpha=-1.0 is invalid"),
             (lambda: LatentFeedback("hidden", noise={"type": "gumbel"}),
              "latent.feedback.noise is only meaningful with type 'soft_embedding'"),
             (lambda: InputMixture(top_k=1), r"mixture.top_k=1 is invalid: expected null or an integer in \[2, 256\]"),
             (lambda: InputMixture(beta=-0.5), "mixture.beta=-0.5 is invalid"),
             (lambda: InputMixture("none", beta=1.0), "only meaningful with type 'moi'"),
             (lambda: SamplingParams(mixture="moi"), "mixture='moi' is invalid")]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()


def test_engine_defaults_apply_to_soft_thoughts_and_a_request_turns_them_off(llama):
    from engine.config import EngineConfig

    noise, mixture = FeedbackNoise("dirichlet", alpha=3.0), InputMixture(top_k=4)
    saved = llama.config
    llama.config = EngineConfig(max_batch_size=saved.max_batch_size, feedback_noise={"type": "dirichlet", "alpha": 3.0},
                                mixture={"type": "moi", "top_k": 4})
    try:
        soft = llama.make_request(QUESTIONS[0], latent=LatentPolicy(mode="fixed", thoughts=2,
                                                                     feedback={"type": "soft_embedding"}))
        assert soft.latent.feedback.noise == noise and soft.sampling.mixture == mixture
        assert soft.thinks_randomly
        hidden = llama.make_request(QUESTIONS[0], latent=LatentPolicy(mode="fixed", thoughts=2))
        assert hidden.latent.feedback.noise is None and not hidden.thinks_randomly
        off = llama.make_request(QUESTIONS[0], SamplingParams(mixture={"type": "none"}), LatentPolicy(
            mode="fixed", thoughts=2, feedback={"type": "soft_embedding", "noise": {"type": "none"}}))
        assert off.latent.feedback.noise is None and off.sampling.mixture is None
        own = llama.make_request(QUESTIONS[0], latent=LatentPolicy(
            mode="entropy", feedback={"type": "soft_embedding", "top_k": 3, "noise": {"type": "gumbel", "tau": 2.0}}))
        assert own.latent.feedback.noise == FeedbackNoise("gumbel", tau=2.0) and own.latent.feedback.top_k == 3
    finally:
        llama.config = saved
