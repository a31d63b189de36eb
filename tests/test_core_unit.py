"""EngineCore and Scheduler with a scripted runner: no model, hand-written outputs."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.core import EngineCore, RequestTooLongError
from engine.params import ResolvedLatent, SamplingParams
from engine.request import Request, RequestStatus
from engine.runner.model_runner import RowOutput, StepPlan

EOT, EOS = 900, 999


class ScriptedRunner:
    """Stands in for ModelRunner. Records what every row fed; samples token 100 + step;
    gives auto requests the stop probabilities scripted per request."""

    def __init__(self, stop_probs: dict[str, list[float]] | None = None, eos_at: dict[str, int] | None = None):
        self.rows: list[Request] = []
        self.fed: dict[str, list] = {}
        self.stop_probs = stop_probs or {}
        self.eos_at = eos_at or {}
        self.plans: list[StepPlan] = []
        self.fail_next = False

    def new_generator(self, seed):
        return None

    def reset(self):
        self.rows = []

    def execute(self, plan: StepPlan) -> dict[str, RowOutput]:
        self.plans.append(plan)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected failure")
        self.rows = [r for r in self.rows if r.request_id not in plan.removed_ids]
        out = {}
        for r in self.rows:  # decode step: one position each
            fed = self.fed[r.request_id]
            if r.status == RequestStatus.LATENT:
                fed.append("thought")
                probs = self.stop_probs.get(r.request_id)
                out[r.request_id] = RowOutput(stop_prob=probs[r.thoughts_done + 1] if probs else None)
            else:
                fed.append(r.pending_token)
                out[r.request_id] = RowOutput(token_id=self._token(r))
        for r in plan.new_requests:  # prefill
            self.fed[r.request_id] = ["prompt"]
            out[r.request_id] = RowOutput(token_id=self._token(r) if r.status == RequestStatus.DECODING else None)
        self.rows += plan.new_requests
        self.max_rows = max(getattr(self, "max_rows", 0), len(self.rows))
        return out

    def _token(self, r: Request) -> int:
        n = len(r.output_token_ids)
        return EOS if self.eos_at.get(r.request_id) == n else 100 + n


def make(request_id, thoughts=2, mode="fixed", max_tokens=3, prompt_len=5, threshold=0.5, **sampling):
    latent = ResolvedLatent(mode=mode, thoughts=thoughts, threshold=threshold)
    starts_in_language = mode == "none" or (mode == "fixed" and thoughts == 0)
    return Request(request_id, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens, **sampling),
                   latent, EOT, starts_in_language=starts_in_language)


def core_with(runner, **config):
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
    assert runner.fed["a"] == ["prompt", "thought", "thought", EOT, 100, 101]
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


def test_fifo_admission_respects_batch_size_and_prefill_budget():
    runner = ScriptedRunner()
    core = core_with(runner, max_batch_size=2, max_prefill_tokens=12)
    for name in "abcd":
        core.add_request(make(name, prompt_len=5, max_tokens=2))
    core.step()
    assert [r.request_id for r in runner.plans[0].new_requests] == ["a", "b"]
    run_to_end(core)
    admitted = [r.request_id for p in runner.plans for r in p.new_requests]
    assert admitted == ["a", "b", "c", "d"]
    assert runner.max_rows == 2


def test_prefill_budget_splits_a_burst():
    runner = ScriptedRunner()
    core = core_with(runner, max_batch_size=8, max_prefill_tokens=10)
    for name in "abc":
        core.add_request(make(name, prompt_len=5, max_tokens=1))
    core.step()
    assert len(runner.plans[0].new_requests) == 2   # 2 x 5 padded tokens fit, 3 x 5 do not


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
    assert runner.plans[-1].removed_ids == {"run"} and runner.rows == []   # freed in that same step
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
