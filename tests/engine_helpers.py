"""Helpers for engine tests: the naive reference decoder bound to a checkpoint."""

from __future__ import annotations

from engine.reference import (ReferenceResult, projection_feedback, reference_generate,
                              soft_embedding_feedback)

QUESTIONS = [
    "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or zumpus?",
    "Is Sally a rompus?",
    "Max is a tumpus. Every tumpus is a numpus. Every numpus is a gorpus. Is Max a gorpus or lempus?",
    "Every impus is a jompus. Every jompus is a lorpus. Every lorpus is a brimpus. Wren is an impus. "
    "Every brimpus is a sterpus. Is Wren a sterpus or a scrompus?",
    "Alex is a dumpus.",
    "Every vumpus is a numpus. Polly is a vumpus. Every numpus is a tumpus. Is Polly a tumpus?",
    "Jack?",
    "Stella is a gorpus. Every gorpus is a wumpus. Every wumpus is a rompus. Every rompus is an impus. "
    "Every impus is a yumpus. Every yumpus is a zumpus. Is Stella a zumpus or a dumpus?",
    "Is Rex a lempus or a vumpus?",
    "Davis is a brimpus. Every brimpus is a jompus. Is Davis a jompus or a lorpus?",
]


def reference_feedback(engine, feedback: dict | None):
    """The oracle's operator for a request's ``latent.feedback`` object (None: the
    checkpoint's own), written independently of ``engine.feedback``."""
    ck = engine.checkpoint
    spec = feedback if feedback is not None else ck.config.latent_feedback.model_dump(exclude_none=True)
    kind = spec.get("type", "hidden")
    if kind == "hidden":
        return None
    if kind == "projection":
        return projection_feedback(ck.projection)
    own = ck.config.latent_feedback
    inherit = own.type == "soft_embedding"
    def pick(name, default):
        if spec.get(name) is not None:
            return spec[name]
        return getattr(own, name) if inherit and getattr(own, name) is not None else default
    return soft_embedding_feedback(pick("temperature", 1.0), pick("top_k", 10), pick("top_p", 1.0))


def reference(engine, question: str, thoughts: int, max_tokens: int, feedback: dict | None = None,
              **kw) -> ReferenceResult:
    """The oracle's answer for a question, with the engine's checkpoint (its prompt layout,
    suppressed tokens and, unless ``feedback`` names another, its feedback operator)."""
    ck = engine.checkpoint
    return reference_generate(ck.model, ck.tokenizer, question, question_suffix=ck.config.question_suffix,
                              bot_id=ck.markers.bot, eot_id=ck.markers.eot, eos_ids=set(ck.markers.eos),
                              thoughts=thoughts, max_tokens=max_tokens,
                              latent_token_id=ck.markers.latent, feedback=reference_feedback(engine, feedback),
                              prefix_ids=ck.markers.prefix, suffix_ids=ck.markers.suffix,
                              suppress_ids=tuple(ck.config.suppress_token_ids), **kw)


def run_staggered(engine, count: int, add) -> list:
    """Requests 0..count-1 join a running engine one or two per step (``add(k)`` submits
    request k and returns its id); returns each request's final output, in order."""
    ids, done, step, next_up = {}, {}, 0, 0
    while len(done) < count:
        for _ in range(1 + step % 2):           # one or two join at every step
            if next_up < count:
                ids[add(next_up)] = next_up
                next_up += 1
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out
        step += 1
        assert step < 1000
    return [done[k] for k in range(count)]


def assert_same_slot_state(runner, oracle, slots, tolerance: float = 1e-5) -> None:
    """Two model runners agree on the slots' newest output states (``thoughts``), lengths and
    every layer's cached keys and values, up to float rounding."""
    import torch

    close = dict(rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(runner.thoughts[slots], oracle.thoughts[slots], **close)
    for a, b in zip(runner.cache.layers, oracle.cache.layers):
        for s in slots:
            n = runner.lengths[s]
            assert n == oracle.lengths[s]
            torch.testing.assert_close(a.keys[s, :, :n], b.keys[s, :, :n], **close)
            torch.testing.assert_close(a.values[s, :, :n], b.values[s, :, :n], **close)
