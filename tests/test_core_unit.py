"""EngineCore and Scheduler with a scripted runner: no model, hand-written outputs."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.core import EngineCore, RequestTooLongError
from engine.params import ResolvedLatent, SamplingParams
from engine.request import Request, RequestStatus
from engine.runner.plan import RowOutput, StepPlan

EOT, EOS = 900, 999


class ScriptedRunner:
    """Stands in for ModelRunner, reading only the plan (plain data). Records what every
    request fed; samples token 100 + tokens sampled so far; gives auto rows the stop
    probabilities scripted per request (indexed by thoughts fed)."""

    def __init__(self, stop_probs: dict[str, list[float]] | None = None, eos_at: dict[str, int] | None = None):
        self.fed: dict[str, list] = {}
        self.sampled: dict[str, int] = {}
        self.slots: dict[int, str] = {}          # slot -> request id, as the plans assign them
        self.stop_probs = stop_probs or {}
        self.eos_at = eos_at or {}
        self.plans: list[StepPlan] = []
        self.fail_next = False
        self.max_rows = 0

    def reset(self):
        self.slots = {}

    def execute(self, plan: StepPlan) -> dict[str, RowOutput]:
        self.plans.append(plan)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected failure")
        for released in plan.released:
            assert self.slots.pop(released.slot, None) in (None, released.request_id)   # None after reset
        out = {}
        for row in plan.decode:  # one position each
            assert self.slots[row.slot] == row.request_id
            fed = self.fed[row.request_id]
            fed.append("thought" if row.feed_token is None else row.feed_token)
            probs = self.stop_probs.get(row.request_id)
            out[row.request_id] = RowOutput(
                stop_prob=probs[fed.count("thought")] if probs and row.ask_stop else None,
                token_id=self._token(row.request_id) if row.sampling is not None else None)
        for chunk in plan.prefill:
            if chunk.start == 0:
                assert chunk.slot not in self.slots, "a slot given twice"
                self.slots[chunk.slot] = chunk.request_id
                self.fed[chunk.request_id] = []
            self.fed[chunk.request_id].append(("prompt", len(chunk.token_ids)))
            if chunk.last:
                out[chunk.request_id] = RowOutput(
                    token_id=self._token(chunk.request_id) if chunk.sampling is not None else None)
        self.max_rows = max(self.max_rows, len(self.slots))
        return out

    def _token(self, request_id: str) -> int:
        n = self.sampled.get(request_id, 0)
        self.sampled[request_id] = n + 1
        return EOS if self.eos_at.get(request_id) == n else 100 + n


def make(request_id, thoughts=2, mode="fixed", max_tokens=3, prompt_len=5, threshold=0.5, **sampling):
    latent = ResolvedLatent(mode=mode, thoughts=thoughts, threshold=threshold)
    starts_in_language = mode == "none" or (mode == "fixed" and thoughts == 0)
    return Request(request_id, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens, **sampling),
                   latent, EOT, starts_in_language=starts_in_language)


def core_with(runner, **config):
    config.setdefault("prefix_caching", False)     # every prompt here is range(prompt_len): test_prefix_cache covers it
    return EngineCore(runner, EngineConfig(**config), max_seq_len=64, eos_token_ids=(EOS,))


def run_to_end(core, limit=100):
    outputs = []
    for _ in range(limit):
        if not core.has_unfinished():
            return outputs
        outputs += core.step()
    raise AssertionError("did not finish")


def test_fixed_thoughts_then_eot_then_tokens():
    runner = ScriptedRunner()
    core = core_with(runner)
    core.add_request(make("a", thoughts=2, max_tokens=3))
    outs = run_to_end(core)
    assert runner.fed["a"] == [("prompt", 5), "thought", "thought", EOT, 100, 101]
    final = [o for o in outs if o.finished]
    assert len(final) == 1 and final[0].finish_reason == "length" and final[0].num_thoughts == 2
    assert [t for o in outs for t in o.new_token_ids] == [100, 101, 102]


def test_eos_finishes_with_stop_and_is_not_emitted():
    runner = ScriptedRunner(eos_at={"a": 1})
    core = core_with(runner)
    core.add_request(make("a", thoughts=0, mode="none", max_tokens=5))
    outs = run_to_end(core)
    assert [t for o in outs for t in o.new_token_ids] == [100]
    assert outs[-1].finish_reason == "stop"


def test_auto_stops_at_threshold_or_cap():
    runner = ScriptedRunner(stop_probs={"a": [None, 0.1, 0.2, 0.9, 0.1], "b": [None, 0.1, 0.1, 0.1, 0.1, 0.1]})
    core = core_with(runner)
    core.add_request(make("a", mode="auto", thoughts=5, max_tokens=1))
    core.add_request(make("b", mode="auto", thoughts=3, max_tokens=1))
    run_to_end(core)
    assert runner.fed["a"].count("thought") == 3     # the third thought's state said stop
    assert runner.fed["b"].count("thought") == 3     # ran to its cap
    assert runner.fed["a"][4] == EOT


def admitted(plan: StepPlan) -> list[str]:
    return [chunk.request_id for chunk in plan.prefill if chunk.start == 0]


def test_fifo_admission_respects_batch_size_and_prefill_budget():
    runner = ScriptedRunner()
    core = core_with(runner, max_batch_size=2, max_prefill_tokens=12)
    for name in "abcd":
        core.add_request(make(name, prompt_len=5, max_tokens=2))
    core.step()
    assert admitted(runner.plans[0]) == ["a", "b"]
    run_to_end(core)
    assert [i for p in runner.plans for i in admitted(p)] == ["a", "b", "c", "d"]
    assert runner.max_rows == 2


def test_prefill_budget_chunks_a_burst():
    runner = ScriptedRunner()
    core = core_with(runner, max_batch_size=8, max_prefill_tokens=12)
    for name in "abc":
        core.add_request(make(name, prompt_len=5, max_tokens=1))
    core.step()
    first = runner.plans[0].prefill
    assert [(c.request_id, c.start, len(c.token_ids), c.last) for c in first] == \
        [("a", 0, 5, True), ("b", 0, 5, True), ("c", 0, 2, False)]     # 12 tokens: c's first 2
    core.step()
    second = runner.plans[1]
    assert [(c.request_id, c.start, len(c.token_ids), c.last) for c in second.prefill] == [("c", 2, 3, True)]
    assert {row.request_id for row in second.decode} == {"a", "b"}       # decoding went on meanwhile
    run_to_end(core)
    assert runner.fed["c"][:2] == [("prompt", 2), ("prompt", 3)]


def test_a_long_prompt_is_prefilled_in_budget_sized_chunks_while_others_decode():
    runner = ScriptedRunner()
    core = core_with(runner, max_batch_size=4, max_prefill_tokens=4)
    core.add_request(make("short", prompt_len=3, thoughts=0, mode="none", max_tokens=8))
    core.step()
    core.add_request(make("long", prompt_len=10, thoughts=1, max_tokens=2))
    for _ in range(3):
        core.step()
    chunks = [(c.start, len(c.token_ids)) for p in runner.plans[1:4] for c in p.prefill]
    assert chunks == [(0, 4), (4, 4), (8, 2)]
    assert all(len(p.decode) == 1 and p.decode[0].request_id == "short" for p in runner.plans[1:4])
    assert sum(len(c.token_ids) for p in runner.plans for c in p.prefill) <= 4 * len(runner.plans)
    outs = run_to_end(core)
    assert {o.request_id for o in outs if o.finished} == {"short", "long"}
    assert runner.fed["long"] == [("prompt", 4), ("prompt", 4), ("prompt", 2), "thought", EOT, 100]


def test_rows_keep_their_slot_and_freed_slots_are_reused_lowest_first():
    runner = ScriptedRunner()
    core = core_with(runner, max_batch_size=3)
    for name, tokens in (("a", 1), ("b", 6), ("c", 3)):
        core.add_request(make(name, thoughts=0, mode="none", max_tokens=tokens))
    core.step()
    slots = {c.request_id: c.slot for c in runner.plans[0].prefill}
    assert slots == {"a": 0, "b": 1, "c": 2}
    core.add_request(make("d", thoughts=0, mode="none", max_tokens=2))
    for _ in range(3):
        core.step()
    rows = {row.request_id: row.slot for p in runner.plans for row in p.decode}
    assert rows["b"] == 1 and rows["c"] == 2
    assert {c.request_id: c.slot for p in runner.plans for c in p.prefill}["d"] == 0   # a's slot


def test_abort_waiting_and_running_requests():
    runner = ScriptedRunner()
    core = core_with(runner, max_batch_size=1)
    core.add_request(make("run", max_tokens=50))
    core.add_request(make("wait", max_tokens=50))
    core.step()
    core.abort_request("wait")
    core.abort_request("run")
    core.abort_request("unknown")  # ignored
    outs = core.step()
    assert {o.request_id: o.finish_reason for o in outs} == {"wait": "abort", "run": "abort"}
    assert [r.request_id for r in runner.plans[-1].released] == ["run"] and runner.slots == {}   # freed that step
    assert not core.has_unfinished()


def test_runner_failure_fails_only_that_step_and_engine_continues():
    runner = ScriptedRunner()
    core = core_with(runner)
    core.add_request(make("a", max_tokens=5))
    core.step()
    runner.fail_next = True
    outs = core.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "error")]
    assert "injected failure" in outs[0].error
    core.add_request(make("b", max_tokens=2))
    outs = run_to_end(core)
    assert outs[-1].request_id == "b" and outs[-1].finish_reason == "length"


def test_too_long_request_is_rejected_with_the_numbers():
    core = core_with(ScriptedRunner())
    with pytest.raises(RequestTooLongError, match="needs up to 70 positions.*limit is 64"):
        core.add_request(make("a", thoughts=4, prompt_len=20, max_tokens=46))
    core.add_request(make("b", thoughts=4, prompt_len=20, max_tokens=40))  # exactly 64 fits


def test_status_order_makes_finished_one_comparison():
    assert all(s.finished == (s >= RequestStatus.FINISHED_STOP) for s in RequestStatus)
    assert RequestStatus.WAITING < RequestStatus.LATENT < RequestStatus.DECODING < RequestStatus.FINISHED_STOP
