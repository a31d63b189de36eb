"""Code that was written and never read is gone (issue 13): ``RunnerStats`` (the model
runner counted forwards and positions nobody read; the core's ``StepStats`` is what the
server's metrics and the benchmarks use) and ``OutputProcessor.discard`` (never called).
``ReasonStreamEvent`` is used: it is the declared schema of /v1/reason's stream events
(tests/test_openapi_contract.py checks real events against it)."""

from __future__ import annotations

import inspect


def test_the_model_runner_keeps_no_unread_counters():
    import engine.runner.model_runner as model_runner

    assert not hasattr(model_runner, "RunnerStats")
    source = inspect.getsource(model_runner.ModelRunner)
    assert "self.stats" not in source and "_count(" not in source


def test_the_output_processor_has_no_discard():
    from engine.output import OutputProcessor

    assert not hasattr(OutputProcessor, "discard")


def test_reason_stream_event_is_a_stream_event_model_of_the_app():
    from server.app import STREAM_EVENT_MODELS
    from server.schemas import ReasonStreamEvent

    assert ReasonStreamEvent in STREAM_EVENT_MODELS
