"""Exact-match evaluation of a checkpoint through the engine (batched, KV cache).

The comparison is the reference's (``run.py``): it decodes the question and the output
together (special tokens skipped), takes the text after the last ``#``, removes commas
and strips; the gold answer gets the same comma removal and strip. Here the engine
returns the generated text alone, so the question text (``question + question_suffix``)
is put back in front before splitting, which keeps the reference's behaviour when the
model writes no ``#`` at all (the whole text then never equals the answer).

A checkpoint whose ``coconut.json`` says ``text_format: compact`` answers in the compact
rendering (``Tom yumpus``); a reference-style gold answer (``Tom is a yumpus.``) is
rewritten the same way before the comparison, so ``engine eval`` takes the natural
data file for either kind of model.

``evaluate`` reports accuracy, mean generated tokens (EOS excluded), mean thoughts and
wall time. It knows nothing of training.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


def extract_answer(question: str, generated: str, question_suffix: str = "\n") -> str:
    text = question + question_suffix + generated
    return text.split("#")[-1].replace(",", "").strip()


def is_correct(question: str, generated: str, gold: str, question_suffix: str = "\n") -> bool:
    return extract_answer(question, generated, question_suffix) == gold.replace(",", "").strip()


def gold_answer(answer: str, text_format: str) -> str:
    """The answer as a model of ``text_format`` writes it (compact answers pass unchanged)."""
    if text_format != "compact":
        return answer
    from engine.data.compact import compact_answer

    try:
        return compact_answer(answer)
    except ValueError:   # already compact ("Tom yumpus")
        return answer


@dataclass
class EvalReport:
    n: int
    correct: int
    accuracy: float
    mean_generated_tokens: float
    thoughts: int                  # the policy's thoughts: the fixed count, or auto's cap
    mean_thoughts: float
    seconds: float
    latent: str
    examples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(engine, records, latent=None, max_tokens: int = 128, progress: bool = False,
             examples: int = 3) -> EvalReport:
    """Answer every record's question greedily and compare with its answer."""
    from engine.params import SamplingParams

    if not records:
        raise ValueError("no records to evaluate")
    suffix = engine.coconut.question_suffix
    text_format = engine.coconut.text_format
    start = time.perf_counter()
    outputs = engine.generate([r.question for r in records], SamplingParams(max_tokens=max_tokens, temperature=0.0),
                              latent, progress=progress)
    seconds = time.perf_counter() - start
    correct = 0
    shown = []
    for record, out in zip(records, outputs):
        gold = gold_answer(record.answer, text_format)
        ok = is_correct(record.question, out.text, gold, suffix)
        correct += ok
        if len(shown) < examples:
            shown.append({"question": record.question[-120:], "answer": gold, "output": out.text,
                          "correct": ok, "thoughts": out.num_thoughts})
    n = len(records)
    resolved = engine.coconut.resolve(latent)
    # pause_as_thought models get their N pause tokens in the prompt: count those as thoughts
    thoughts = (resolved.thoughts * n if resolved.feed == "pause" and resolved.mode != "none"
                else sum(o.num_thoughts for o in outputs))
    return EvalReport(
        n=n, correct=correct, accuracy=correct / n,
        mean_generated_tokens=sum(len(o.token_ids) for o in outputs) / n,
        thoughts=resolved.thoughts, mean_thoughts=thoughts / n,
        seconds=seconds, latent=f"{resolved.mode}:{resolved.thoughts}", examples=shown)
