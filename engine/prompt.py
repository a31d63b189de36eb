"""Turning a question into prompt token ids, as the checkpoint's format says.

For ``N`` thoughts fed as hidden states the prompt is
``tokenizer(question + question_suffix)`` (with the tokenizer's default special tokens,
e.g. BOS for Llama) followed by ``<bot>``; the engine then feeds the N thoughts and
``<eot>``. Policy ``none`` adds no markers. Two cases end the prompt in language mode
already, so the prefill's logits give the first answer token:

- zero thoughts: ``... <bot> <eot>``;
- ``pause_as_thought`` models: ``... <bot> <latent>*N <eot>`` (their thoughts are the
  latent token's embedding, fixed inputs that need no feedback).

A checkpoint with ``text_format: compact`` was trained on ProsQA facts written as
``s t |``; a question in the reference sentences ("Every A is a B. ... Is X a A or B?")
is rewritten to that form first, and one already compact is used as it is.
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
        if self.config.text_format == "compact":
            question = self.compact(question)
        return list(self.tokenizer(question + self.config.question_suffix)["input_ids"])

    @staticmethod
    def compact(question: str) -> str:
        from engine.data.compact import compact_question

        text = question.strip()
        if " | " in text and "? " in text:   # already in the compact rendering
            return text
        try:
            return compact_question(text)
        except ValueError as e:
            raise ValueError(f"this model reads ProsQA-style questions (facts such as 'Every wumpus is "
                             f"a yumpus.' or 'Tom is a wumpus.', then 'Is Tom a yumpus or zumpus?'): {e}") from None

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
