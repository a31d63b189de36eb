"""Engine behaviour on a tiny GPT-2: KV reuse, aborts, sampling, stop conditions, traces,
the auto policy and the pause ablation, each checked against an independent oracle."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, LatentPolicy, SamplingParams
from engine.stop_classifier import StopClassifier
from tests.engine_helpers import QUESTIONS, reference


@pytest.fixture(scope="module")
def engine(gpt2_checkpoint):
    # positions are counted per request here: no prompt may come from an earlier one's slot
    return Engine.from_pretrained(gpt2_checkpoint, max_batch_size=8, prefix_caching=False)


class PositionCounter:
    """Counts the positions fed to the decoder, from outside the engine (a forward hook)."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.get_decoder().register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        self.shapes.append((embeds.shape[0], embeds.shape[1]))

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("thoughts", [0, 3])
def test_kv_cache_reuse_one_position_per_step(engine, thoughts):
    question, max_tokens = QUESTIONS[2], 7
    counter = PositionCounter(engine.checkpoint.model)
    try:
        [result] = engine.generate([question], SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                   LatentPolicy(mode="fixed", thoughts=thoughts))
    finally:
        counter.close()
    prompt = len(engine.prompt_format.question_ids(question)) + 1          # + <bot>
    assert counter.shapes[0] == (1, prompt + (1 if thoughts == 0 else 0))  # prefill once (<eot> folded when N=0)
    assert all(shape == (1, 1) for shape in counter.shapes[1:])              # then one position per step
    # every position fed exactly once: prompt, thoughts, <eot>, answer tokens but the last
    assert sum(b * t for b, t in counter.shapes) == prompt + thoughts + 1 + max_tokens - 1
    reference_cost = reference(engine, question, thoughts, max_tokens, ignore_eos=True).positions_fed
    assert reference_cost > 3 * sum(b * t for b, t in counter.shapes)
    assert len(result.token_ids) == max_tokens


def test_batched_steps_feed_one_position_per_request(engine):
    counter = PositionCounter(engine.checkpoint.model)
    try:
        engine.generate(QUESTIONS[:6], SamplingParams(max_tokens=5, ignore_eos=True),
                        LatentPolicy(mode="fixed", thoughts=2))
    finally:
        counter.close()
    prefill, *steps = counter.shapes
    assert prefill[0] == 6
    assert steps and all(shape == (6, 1) for shape in steps)
    assert len(steps) == 2 + 1 + 5 - 1


def test_abort_frees_slot_at_next_step(gpt2_checkpoint):
    engine = Engine.from_pretrained(gpt2_checkpoint, max_batch_size=2)
    long = SamplingParams(max_tokens=200, ignore_eos=True)
    a, b, c = (engine.add_request(q, long, LatentPolicy(mode="fixed", thoughts=1)) for q in QUESTIONS[:3])
    for _ in range(3):
        engine.step()
    running = engine.core.scheduler.running
    assert {i: r.slot for i, r in running.items()} == {a: 0, b: 1}
    assert engine.core.scheduler.num_waiting == 1
    engine.abort(a)
    outputs = {o.request_id: o for o in engine.step()}
    assert outputs[a].finished and outputs[a].finish_reason == "abort"
    assert {i: r.slot for i, r in running.items()} == {b: 1, c: 0}   # a's slot went to c, b kept its own
    engine.abort(b)
    engine.abort(c)
    engine.step()
    engine.step()
    assert engine.runner.num_active_slots == 0 and not engine.has_unfinished()


def test_seeded_sampling_is_batch_invariant(engine):
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    [alone] = engine.generate([QUESTIONS[0]], seeded)
    noisy = [SamplingParams(max_tokens=12 + i, temperature=0.8, ignore_eos=True) for i in range(5)]
    crowd = engine.generate(QUESTIONS[1:6] + [QUESTIONS[0]], noisy + [seeded])
    assert crowd[-1].token_ids == alone.token_ids
    [again] = engine.generate([QUESTIONS[0]], seeded)
    assert again.token_ids == alone.token_ids
    other = engine.generate([QUESTIONS[0]] * 3, [SamplingParams(max_tokens=12, temperature=1.0, seed=s,
                                                                ignore_eos=True) for s in (1, 2, 3)])
    assert len({tuple(r.token_ids) for r in other + [alone]}) > 1


def test_logprobs_match_teacher_forced_model(engine):
    [result] = engine.generate([QUESTIONS[3]], SamplingParams(max_tokens=6, logprobs=True, ignore_eos=True),
                               LatentPolicy(mode="none"))
    model = engine.checkpoint.model
    prompt = engine.prompt_format.question_ids(QUESTIONS[3])
    ids = torch.tensor([prompt + result.token_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    expected = [float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(result.token_ids)]
    assert result.logprobs == pytest.approx(expected, abs=1e-4)


def test_stop_string_cuts_text_and_token_ids_and_eos(engine):
    [full] = engine.generate([QUESTIONS[5]], SamplingParams(max_tokens=16, ignore_eos=True))
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), "pick a visible stop string"
    [cut] = engine.generate([QUESTIONS[5]], SamplingParams(max_tokens=16, ignore_eos=True, stop=stop))
    assert cut.text == text[:text.index(stop)]
    assert cut.finish_reason == "stop"
    # a stop token id ends the answer without appearing in it
    token = full.token_ids[3]
    [by_id] = engine.generate([QUESTIONS[5]], SamplingParams(max_tokens=16, stop_token_ids=(token,), ignore_eos=True))
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(token)]
    assert by_id.finish_reason == "stop"


def test_eos_stops_unless_ignored(gpt2_checkpoint):
    engine = Engine.from_pretrained(gpt2_checkpoint)
    [full] = engine.generate([QUESTIONS[1]], SamplingParams(max_tokens=10, ignore_eos=True))
    engine.core.eos_token_ids = frozenset({full.token_ids[4]})   # pretend this token is EOS
    first = full.token_ids.index(full.token_ids[4])
    [stopped] = engine.generate([QUESTIONS[1]], SamplingParams(max_tokens=10))
    assert stopped.token_ids == full.token_ids[:first] and stopped.finish_reason == "stop"
    [ignored] = engine.generate([QUESTIONS[1]], SamplingParams(max_tokens=10, ignore_eos=True))
    assert ignored.token_ids == full.token_ids and ignored.finish_reason == "length"


def test_streamed_deltas_concatenate_to_text(engine):
    request_id = engine.add_request(QUESTIONS[7], SamplingParams(max_tokens=20, ignore_eos=True, stop="zz"),
                                    LatentPolicy(mode="fixed", thoughts=2))
    deltas, final = [], None
    while final is None:
        for out in engine.step():
            assert out.request_id == request_id
            deltas.append(out.delta)
            final = out if out.finished else None
    assert "".join(deltas) == final.text
    assert final.text == engine.tokenizer.decode(final.token_ids, skip_special_tokens=True)


def test_latent_trace_matches_reference_projection(engine):
    [result] = engine.generate([QUESTIONS[2]], SamplingParams(max_tokens=3),
                               LatentPolicy(mode="fixed", thoughts=4, trace_top_k=5))
    expected = reference(engine, QUESTIONS[2], 4, 3, trace_top_k=5).trace
    assert [entry["token_ids"] for entry in result.latent_trace] == expected
    for entry in result.latent_trace:
        assert entry["probs"] == sorted(entry["probs"], reverse=True) and 0 < sum(entry["probs"]) <= 1.0001
        assert len(entry["tokens"]) == len(entry["texts"]) == 5


def test_pause_as_thought_feeds_latent_token_embeddings(tiny_checkpoint):
    engine = Engine.from_pretrained(tiny_checkpoint("gpt2", method="pause_as_thought"))
    results = engine.generate(QUESTIONS[:3], SamplingParams(max_tokens=6), LatentPolicy(mode="fixed", thoughts=3))
    for question, result in zip(QUESTIONS[:3], results):
        assert result.token_ids == reference(engine, question, 3, 6, pause=True).token_ids
        assert result.num_thoughts == 0  # pause tokens are part of the prompt, no hidden feedback


def test_auto_policy_stops_where_hand_set_head_says(tiny_checkpoint):
    from engine.checkpoint import StopClassifierSpec

    cap, target = 7, 3
    base = Engine.from_pretrained(tiny_checkpoint("gpt2"))
    question = QUESTIONS[3]
    hiddens = reference(base, question, cap, 4, record_hiddens=True).thought_hiddens  # state after thought i
    hidden_size = hiddens[0].shape[-1]
    head = StopClassifier(hidden_size)
    # score_i = <h_i, h_target>/|h_target|^2 peaks at i = target (post-norm states have similar norms)
    direction = hiddens[target - 1] / hiddens[target - 1].norm() ** 2
    scores = [float(h @ direction) for h in hiddens]
    assert max(scores[:target - 1]) < scores[target - 1] - 1e-3
    cut = (max(scores[:target - 1]) + scores[target - 1]) / 2
    with torch.no_grad():
        head.net[0].weight.copy_(direction[None, :] * 50)
        head.net[0].bias.fill_(-cut * 50)
    path = tiny_checkpoint("gpt2", stop_classifier=head,
                           stop_spec=StopClassifierSpec(path="stop_classifier.safetensors", threshold=0.5,
                                                        max_thoughts=cap))
    engine = Engine.from_pretrained(path)
    [result] = engine.generate([question], SamplingParams(max_tokens=4), LatentPolicy(mode="auto"))
    expected = reference(engine, question, cap, 4, mode="auto", stop_classifier=engine.checkpoint.stop_classifier,
                         threshold=0.5)
    assert expected.num_thoughts == target
    assert result.num_thoughts == target
    assert result.token_ids == expected.token_ids
    assert result.stop_probs[-1] >= 0.5 and all(p < 0.5 for p in result.stop_probs[:-1])
    # a threshold above every probability runs to the cap; max_thoughts lowers the cap
    [capped] = engine.generate([question], SamplingParams(max_tokens=4), LatentPolicy(mode="auto", threshold=1.0))
    assert capped.num_thoughts == cap
    [short] = engine.generate([question], SamplingParams(max_tokens=4), LatentPolicy(mode="auto", max_thoughts=2))
    assert short.num_thoughts == 2


def test_bfloat16_runs_and_tracks_the_bf16_reference(gpt2_checkpoint):
    """bf16 sums in a different order when batched, so exact equality is not expected;
    the answers must still start like the batch-1 bf16 reference's."""
    engine = Engine.from_pretrained(gpt2_checkpoint, dtype="bfloat16")
    assert engine.checkpoint.model.dtype == torch.bfloat16
    results = engine.generate(QUESTIONS[:8], SamplingParams(max_tokens=6), LatentPolicy(mode="fixed", thoughts=3))
    agree = sum(r.token_ids[:3] == reference(engine, q, 3, 6).token_ids[:3] for q, r in zip(QUESTIONS, results))
    assert agree >= 6


def test_compact_text_format_rewrites_reference_questions(tiny_checkpoint, tmp_path):
    import json
    import shutil

    from engine.data.compact import compact_question

    directory = tmp_path / "compact"
    shutil.copytree(tiny_checkpoint("gpt2"), directory)
    config = json.loads((directory / "coconut.json").read_text())
    (directory / "coconut.json").write_text(json.dumps({**config, "text_format": "compact"}))
    engine = Engine.from_pretrained(directory)
    question = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or zumpus?"
    compact = "wumpus yumpus | Tom wumpus | ? Tom yumpus zumpus"
    assert compact_question(question) == compact
    expected = engine.tokenizer(compact + "\n")["input_ids"]
    assert engine.prompt_format.question_ids(question) == expected
    assert engine.prompt_format.question_ids(compact) == expected
    [a, b] = engine.generate([question, compact], SamplingParams(max_tokens=5), LatentPolicy(thoughts=2))
    assert a.token_ids == b.token_ids == reference(engine, compact, 2, 5).token_ids
    with pytest.raises(ValueError, match="reads ProsQA questions"):
        engine.make_request("What is the capital of France?")
