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
wall time. For ProsQA questions (``engine.data.question`` parses them) it also reports
accuracy per hop count (the asked name's breadth-first distance to the right option),
the share of answers naming neither option, and, for a model that thinks in a graph
question's tokens (compact), per thought the mean mass on the frontier (the nodes within
k hops), on the nodes one hop past it and on the rest (``engine.frontier``). It knows
nothing of training.
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
    unreadable: int = 0                                         # questions the model cannot read (wrong)
    per_hops: dict[str, dict] = field(default_factory=dict)    # hops -> n, correct, accuracy
    neither_option: float | None = None                         # share naming neither option
    frontier: list[dict] | None = None                          # per thought: mean masses

    def to_dict(self) -> dict:
        return asdict(self)


def _graph(question: str):
    from engine.data.question import parse_question

    try:
        return parse_question(question)
    except ValueError:
        return None


def named_concept(answer: str) -> str:
    """The concept an answer names: its last word ('Tom is a yumpus.' / 'Tom yumpus' -> yumpus)."""
    words = answer.replace(".", " ").split()
    return words[-1] if words else ""


def _traced(engine, latent, frontier: bool):
    """``latent`` with a minimal trace switched on when the frontier view is wanted."""
    from dataclasses import replace

    from engine.params import LatentPolicy

    resolved = engine.coconut.resolve(latent)
    if not frontier or resolved.mode == "none" or resolved.feed != "hidden":
        return latent
    base = latent if latent is not None else LatentPolicy(mode=resolved.mode)
    return replace(base, trace_top_k=max(1, base.trace_top_k))


class _Unanswered:
    """Stands for the output of a question the model cannot read: nothing generated."""

    text = ""
    token_ids: list = []
    num_thoughts = 0
    latent_trace = None


_UNANSWERED = _Unanswered()


def _readable(engine, question: str) -> bool:
    try:
        engine.prompt_format.question_ids(question)
        return True
    except ValueError:
        return False


def evaluate(engine, records, latent=None, max_tokens: int = 128, progress: bool = False,
             examples: int = 3, frontier: bool = True) -> EvalReport:
    """Answer every record's question greedily and compare with its answer."""
    from engine.frontier import mean_masses
    from engine.params import SamplingParams

    if not records:
        raise ValueError("no records to evaluate")
    suffix = engine.coconut.question_suffix
    text_format = engine.coconut.text_format
    start = time.perf_counter()
    readable = [i for i, r in enumerate(records) if _readable(engine, r.question)]
    answered = engine.generate([records[i].question for i in readable],
                               SamplingParams(max_tokens=max_tokens, temperature=0.0),
                               _traced(engine, latent, frontier), progress=progress)
    outputs: list = [None] * len(records)
    for i, out in zip(readable, answered):
        outputs[i] = out
    outputs = [out if out is not None else _UNANSWERED for out in outputs]
    seconds = time.perf_counter() - start
    correct = 0
    shown = []
    per_hops: dict[int, list[int]] = {}
    neither = asked = 0
    traces = []
    for record, out in zip(records, outputs):
        gold = gold_answer(record.answer, text_format)
        ok = is_correct(record.question, out.text, gold, suffix)
        graph = _graph(record.question)
        if graph is not None:
            from engine.data.question import hop_distances

            hops = hop_distances(graph).get(named_concept(record.answer))
            if hops is not None:
                tally = per_hops.setdefault(hops, [0, 0])
                tally[0] += 1
                tally[1] += ok
            asked += 1
            neither += named_concept(extract_answer(record.question, out.text, suffix)) not in graph.options
        if out.latent_trace and all("frontier" in e for e in out.latent_trace):
            traces.append([e["frontier"] for e in out.latent_trace])
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
        seconds=seconds, latent=f"{resolved.mode}:{resolved.thoughts}", examples=shown,
        unreadable=len(records) - len(readable),
        per_hops={str(h): {"n": n, "correct": c, "accuracy": c / n} for h, (n, c) in sorted(per_hops.items())},
        neither_option=neither / asked if asked else None,
        frontier=mean_masses(traces) if traces else None)
