"""The latent-reasoning family in one continuous batch, token-exact against the oracle.

Three feedback operators (the hidden state, a CODI projection, a Soft Thinking embedding
mixture with several parameter sets) and four ways to end latent mode (fixed, auto,
entropy, token), on every architecture the engine supports, with requests joining at
every step and leaving at different ones; each request's greedy output must equal the
naive full-recompute reference (``engine.reference``) with the same operator, written
independently of ``engine.feedback``. The stop rules' logic is also checked on the core
alone, with scripted entropies and argmaxes.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from engine import Engine, LatentPolicy, SamplingParams
from engine.checkpoint import StopClassifierSpec
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.params import LatentFeedback, ResolvedLatent
from engine.request import Request
from engine.runner.plan import RowOutput
from engine.stop_classifier import StopClassifier
from tests.engine_helpers import QUESTIONS, reference, run_staggered

ARCHS = ["gpt2", "llama", "qwen2", "bloom", "gpt_neox", "gemma2"]

FEEDBACKS = [None,                                      # the checkpoint's: projection
             {"type": "hidden"},
             {"type": "soft_embedding"},                # T 1, top-k 10, top-p 1
             {"type": "soft_embedding", "temperature": 0.5, "top_k": 3},
             {"type": "soft_embedding", "top_k": 0, "top_p": 0.8}]


@pytest.fixture(scope="module", params=ARCHS)
def engine(request, tiny_checkpoint):
    torch.manual_seed(1)
    head = StopClassifier(64, 0)
    spec = StopClassifierSpec(path="stop_classifier.safetensors", threshold=0.5, max_thoughts=6)
    path = tiny_checkpoint(request.param, projection_size=48, stop_classifier=head, stop_spec=spec, seed=3)
    return Engine.from_pretrained(path, max_batch_size=32)


def _median_entropy(engine) -> float:
    """A threshold inside the thoughts' entropy range, read off the oracle, so that the
    entropy rule ends some requests early and lets others run to the cap."""
    values = []
    for question in QUESTIONS[:3]:
        values += reference(engine, question, 5, 1, record_hiddens=True).thought_entropies
    return statistics.median(values)


def _policies(threshold: float) -> list[tuple[dict, dict]]:
    """(LatentPolicy fields, reference keyword arguments) per stop mode."""
    return [({"mode": "fixed", "thoughts": 3}, {"thoughts": 3}),
            ({"mode": "fixed", "thoughts": 0}, {"thoughts": 0}),
            ({"mode": "auto", "max_thoughts": 5}, {"thoughts": 5, "mode": "auto", "threshold": 0.5}),
            ({"mode": "entropy", "entropy_threshold": threshold, "max_thoughts": 6},
             {"thoughts": 6, "mode": "entropy", "entropy_threshold": threshold}),
            ({"mode": "entropy", "entropy_threshold": threshold, "patience": 2, "max_thoughts": 6},
             {"thoughts": 6, "mode": "entropy", "entropy_threshold": threshold, "patience": 2}),
            ({"mode": "token", "max_thoughts": 4}, {"thoughts": 4, "mode": "token"})]


def test_operators_and_stop_modes_in_one_batch_match_reference(engine):
    threshold = _median_entropy(engine)
    plan = []
    for i, feedback in enumerate(FEEDBACKS):
        for j, (policy, ref) in enumerate(_policies(threshold)):
            n = len(plan)
            plan.append((QUESTIONS[n % len(QUESTIONS)], feedback, policy, ref, 3 + (i + 2 * j) % 6))
    def add(k):
        question, feedback, policy, _, max_tokens = plan[k]
        return engine.add_request(question, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                  LatentPolicy(feedback=feedback, **policy))

    done = run_staggered(engine, len(plan), add)
    stops = {"entropy": set(), "token": set()}
    for k, (question, feedback, policy, ref, max_tokens) in enumerate(plan):
        expected = reference(engine, question, max_tokens=max_tokens, feedback=feedback,
                             stop_classifier=engine.checkpoint.stop_classifier, ignore_eos=True, **ref)
        assert done[k].token_ids == expected.token_ids, (k, feedback, policy)
        assert done[k].num_thoughts == expected.num_thoughts, (k, feedback, policy)
        if policy["mode"] in stops:
            stops[policy["mode"]].add(done[k].num_thoughts)
    assert len(stops["entropy"]) > 1, "the entropy threshold never (or always) ended latent mode early"


def test_operators_change_the_thoughts(engine):
    """The operators are not the identity in disguise: each gives other thoughts than the
    hidden state (seen in the reference's states after 3 thoughts)."""
    after = {}
    for name, feedback in (("hidden", {"type": "hidden"}), ("projection", None),
                           ("soft", {"type": "soft_embedding"})):
        after[name] = reference(engine, QUESTIONS[0], 3, 1, feedback=feedback,
                                record_hiddens=True).thought_hiddens[-1]
    assert not torch.allclose(after["hidden"], after["projection"], atol=1e-3)
    assert not torch.allclose(after["hidden"], after["soft"], atol=1e-3)


def test_token_mode_ends_at_the_end_token(tiny_checkpoint):
    """A checkpoint whose <eot> is the token thoughts most often point at: the token rule
    must end latent mode there, as the reference does."""
    probe = Engine.from_pretrained(tiny_checkpoint("gpt2", seed=11))
    argmaxes = []
    for question in QUESTIONS:
        argmaxes += reference(probe, question, 6, 1, record_hiddens=True).thought_argmaxes
    common = max(set(argmaxes), key=argmaxes.count)
    eot = probe.tokenizer.convert_ids_to_tokens(common)
    marked = Engine.from_pretrained(tiny_checkpoint("gpt2", seed=11, coconut_fields={"eot_token": eot}))
    results = marked.generate(QUESTIONS, SamplingParams(max_tokens=6), LatentPolicy(mode="token", max_thoughts=6))
    thoughts = []
    for question, result in zip(QUESTIONS, results):
        expected = reference(marked, question, 6, 6, mode="token")
        assert result.token_ids == expected.token_ids and result.num_thoughts == expected.num_thoughts
        thoughts.append(result.num_thoughts)
    assert min(thoughts) < 6, f"token {eot!r} never ended latent mode ({argmaxes})"


def test_soft_embedding_trace_reports_the_mixture(engine):
    feedback = {"type": "soft_embedding", "top_k": 3, "temperature": 0.5}
    [out] = engine.generate([QUESTIONS[2]], SamplingParams(max_tokens=2),
                            LatentPolicy(mode="fixed", thoughts=3, trace_top_k=4, feedback=feedback))
    assert len(out.latent_trace) == 3
    # trace_probs: softmax(W h) of each state fed back
    expected = reference(engine, QUESTIONS[2], 3, 1, trace_top_k=4, feedback=feedback)
    for entry, probs in zip(out.latent_trace, expected.trace_probs):
        assert entry["feed"]["type"] == "soft_embedding"
        tokens, weights = entry["feed"]["token_ids"], entry["feed"]["weights"]
        assert len(tokens) == 3 and abs(sum(weights) - 1) < 1e-5
        # the mixture's tokens are the top 3 of softmax(W h), weights from softmax(W h / 0.5)
        assert tokens == probs.topk(3).indices.tolist()
        # the states match the reference's up to float rounding, which each soft thought at
        # temperature 0.5 amplifies (a prompt prefix from the cache, computed apart, rounds
        # differently: up to ~1e-4 by the third thought): the reported probabilities to 1e-3,
        # and the weights exactly as the rule makes them from the probabilities reported
        assert entry["probs"] == pytest.approx(probs.topk(4).values.tolist(), abs=1e-3)
        reported = torch.tensor(entry["probs"][:3], dtype=torch.float64) ** (1 / 0.5)
        assert weights == pytest.approx((reported / reported.sum()).tolist(), abs=1e-5)
        sharpened = (probs.log() / 0.5).softmax(-1)[tokens]
        assert weights == pytest.approx((sharpened / sharpened.sum()).tolist(), abs=1e-3)
        assert entry["entropy"] == pytest.approx(float(-(probs * probs.log()).sum()), abs=1e-3)


# ---------------------------------------------------------------- the core's stop rules


class ScriptedRunner:
    """Answers every latent row with a scripted entropy and argmax (per thoughts fed)."""

    def __init__(self, entropies: list[float], argmaxes: list[int]):
        self.entropies, self.argmaxes = entropies, argmaxes
        self.thoughts: dict[str, int] = {}

    def reset(self):
        pass

    def execute(self, plan):
        out = {}
        for row in plan.decode:
            fed = self.thoughts.setdefault(row.request_id, 0)
            if row.feed_token is None:
                self.thoughts[row.request_id] = fed = fed + 1
            out[row.request_id] = RowOutput(
                token_id=100 if row.sampling is not None else None,
                entropy=self.entropies[fed] if row.ask_entropy else None,
                argmax=self.argmaxes[fed] if row.ask_entropy else None)
        for chunk in plan.prefill:
            if chunk.last:
                out[chunk.request_id] = RowOutput()
        return out


def _thoughts_until_done(latent: ResolvedLatent, runner: ScriptedRunner) -> int:
    core = EngineCore(runner, EngineConfig(), max_seq_len=64, eos_token_ids=(999,))
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=1), latent, 900, starts_in_language=False)
    core.add_request(request)
    for _ in range(50):
        core.step()
        if request.is_finished:
            return request.thoughts_done
    raise AssertionError("never finished")


@pytest.mark.parametrize("patience,expected", [(1, 2), (2, 5), (3, 9)])
def test_entropy_rule_counts_thoughts_in_a_row(patience, expected):
    # the entropy after thought k (index k) is below 1.0 at thoughts 2, 4, 5, 7, 8, 9, 10
    entropies = [9, 3, 0.5, 3, 0.2, 0.1, 2.0, 0.3, 0.3, 0.3, 0.3]
    latent = ResolvedLatent(mode="entropy", thoughts=10, entropy_threshold=1.0, patience=patience)
    assert _thoughts_until_done(latent, ScriptedRunner(entropies, [0] * 11)) == expected


def test_entropy_rule_caps_at_max_thoughts():
    latent = ResolvedLatent(mode="entropy", thoughts=4, entropy_threshold=0.0, patience=1)
    assert _thoughts_until_done(latent, ScriptedRunner([5.0] * 10, [0] * 10)) == 4


def test_token_rule_and_at_least_one_thought():
    # the state at <bot> (index 0) already points at <eot>: not read, one thought is fed
    argmaxes = [900, 7, 7, 900, 7, 7]
    latent = ResolvedLatent(mode="token", thoughts=5)
    assert _thoughts_until_done(latent, ScriptedRunner([1.0] * 6, argmaxes)) == 3
    assert _thoughts_until_done(latent, ScriptedRunner([1.0] * 6, [900] * 6)) == 1


def test_feedback_parameters_are_validated():
    with pytest.raises(ValueError, match="temperature"):
        LatentFeedback("soft_embedding", temperature=0)
    with pytest.raises(ValueError, match="only meaningful with type 'soft_embedding'"):
        LatentFeedback("hidden", top_k=3)
    with pytest.raises(ValueError, match="top_k"):
        LatentFeedback("soft_embedding", top_k=True)
    with pytest.raises(ValueError, match="patience"):
        LatentPolicy(mode="entropy", patience=0)
    with pytest.raises(ValueError, match="only meaningful with mode 'entropy'"):
        LatentPolicy(mode="token", entropy_threshold=0.5)


def test_max_thoughts_alone_caps_the_checkpoints_adaptive_mode():
    from engine.checkpoint import CoconutConfig

    policy = LatentPolicy(mode=None, max_thoughts=5)
    assert policy.mode == "auto"                     # the HTTP contract: max_thoughts implies auto ...
    resolved = CoconutConfig(latent_mode="entropy").resolve(policy)
    assert (resolved.mode, resolved.thoughts) == ("entropy", 5)   # ... unless the checkpoint's mode is adaptive
    with pytest.raises(ValueError, match="needs a stop classifier"):
        CoconutConfig().resolve(policy)
    with pytest.raises(ValueError, match="needs a stop classifier"):
        CoconutConfig(latent_mode="entropy").resolve(LatentPolicy(mode="auto", max_thoughts=5))


def test_a_mixture_over_the_whole_vocabulary_is_one_dense_product():
    from engine.feedback import mix_embeddings, soft_mixture

    torch.manual_seed(0)
    E, logits = torch.randn(1000, 8), torch.randn(3, 1000)
    for k in (10, 0):
        mixture = soft_mixture(logits, [1.0, 0.5, 2.0], [k] * 3, [1.0, 0.9, 0.5])
        expected = torch.stack([sum(w * E[t] for t, w in zip(ids.tolist(), ws.tolist()) if t >= 0)
                                for ids, ws in zip(mixture.token_ids, mixture.weights)])
        assert torch.allclose(mix_embeddings(E, mixture), expected, atol=1e-5)
