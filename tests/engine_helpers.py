"""Helpers for engine tests: the naive reference decoder bound to a checkpoint."""

from __future__ import annotations

from engine.reference import ReferenceResult, reference_generate

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


def reference(engine, question: str, thoughts: int, max_tokens: int, **kw) -> ReferenceResult:
    """The oracle's answer for a question, with the engine's checkpoint."""
    ck = engine.checkpoint
    return reference_generate(ck.model, ck.tokenizer, question, question_suffix=ck.config.question_suffix,
                              bot_id=ck.markers.bot, eot_id=ck.markers.eot, eos_ids=set(ck.markers.eos),
                              thoughts=thoughts, max_tokens=max_tokens,
                              latent_token_id=ck.markers.latent, **kw)
