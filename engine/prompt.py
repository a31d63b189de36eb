"""Turning a question into prompt token ids, as the checkpoint's format says.

For ``N`` thoughts fed as hidden states the prompt is
``tokenizer(question + question_suffix)`` (with the tokenizer's default special tokens,
e.g. BOS for Llama) followed by ``<bot>``; the engine then feeds the N thoughts and
``<eot>``. Policy ``none`` adds no markers. Two cases end the prompt in language mode
already, so the prefill's logits give the first answer token:

- zero thoughts: ``... <bot> <eot>``;
- ``pause_as_thought`` models: ``... <bot> <latent>*N <eot>`` (their thoughts are the
  latent token's embedding, fixed inputs that need no feedback).
"""

from __future__ import annotations

from engine.checkpoint import CoconutConfig, MarkerIds
from engine.params import ResolvedLatent


class PromptFormat:
    def __init__(self, tokenizer, config: CoconutConfig, markers: MarkerIds):
        self.tokenizer = tokenizer
        self.config = config
        self.markers = markers

    def question_ids(self, question: str) -> list[int]:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        return list(self.tokenizer(question + self.config.question_suffix)["input_ids"])

    def build(self, question: str, latent: ResolvedLatent) -> tuple[list[int], bool]:
        """Returns (prompt ids, whether the prompt already ends in language mode)."""
        ids = self.question_ids(question)
        m = self.markers
        if latent.mode == "none":
            return ids, True
        if latent.feed == "pause":
            return ids + [m.bot] + [m.latent] * latent.thoughts + [m.eot], True
        if latent.mode == "fixed" and latent.thoughts == 0:
            return ids + [m.bot, m.eot], True
        return ids + [m.bot], False

    def answer(self, text: str) -> str:
        """The answer inside generated text: what follows the last answer prefix, stripped."""
        marker = self.config.answer_prefix.strip()
        if marker:
            at = text.rfind(marker)
            if at >= 0:
                return text[at + len(marker):].strip()
        return text.strip()
