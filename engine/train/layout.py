"""Records to token sequences: the reference layout and the COCONUT curriculum.

A record tokenizes as the reference does: ``question + question_suffix`` (with the
tokenizer's own special tokens, e.g. BOS), each ``step + step_suffix``, then
``answer_prefix + answer`` and EOS (the suffixes and prefix live in ``coconut.json``).

At stage k (``Curriculum.stage(epoch)`` = epoch // epochs_per_stage) a training
sequence is::

    question <bot> <latent> * (k * c_thought) <eot> steps[k:] answer EOS

with labels -100 on the question, the markers and the placeholders. Past
``max_latent_stage`` every step goes and the thoughts stay at max_latent_stage * c.
With ``pad_latent_to_max: false`` a sample never gets more thoughts than it has steps
(times c); the reference applies that cap at evaluation but not in training below
``max_latent_stage``; we apply it in both, so that training, evaluation and the stop
classifier's labels agree. With probability ``uniform_prob`` a sample is drawn at a
random stage in [0, len(steps)] (the reference's mixing; curriculum methods only).

Methods: ``coconut`` and ``pause_as_thought`` share this layout (they differ only in
how the model consumes placeholders); ``no_curriculum`` starts at the last stage;
``no_thoughts`` removes steps on the same schedule but keeps no placeholders
(``<bot><eot>``; the reference drops the markers too, but the engine serves this model
with zero thoughts, i.e. ``<bot><eot>``, so we train what is served); ``cot`` is stage 0
forever without markers (full chain of thought); ``no_cot`` is the answer alone without
markers. This module knows token ids, not models or files.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

CURRICULUM_METHODS = ("coconut", "pause_as_thought", "no_thoughts", "no_curriculum")


@dataclass(frozen=True)
class Markers:
    bot: int
    eot: int
    latent: int
    eos: int
    pad: int


@dataclass(frozen=True)
class TokenizedRecord:
    question: tuple[int, ...]
    steps: tuple[tuple[int, ...], ...]
    answer: tuple[int, ...]          # answer_prefix + answer, then EOS
    # with frontier_loss_weight > 0: per BFS distance d = 0, 1, ... from the asked name,
    # the token ids of the graph nodes at exactly that distance; None when not computed.
    frontier: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True)
class Sample:
    input_ids: list[int]
    labels: list[int]
    num_thoughts: int                # placeholders in input_ids
    needed_thoughts: int             # min(steps, max_latent_stage) * c_thought: the stop label
    # with the frontier loss: num_thoughts + 1 entries, the frontier token ids that the LM
    # head's output at <bot> (distance 0) and at placeholder j (distance j) is pushed toward.
    frontier: tuple[tuple[int, ...], ...] | None = None


def frontier_token_ids(tokenizer, question: str, max_distance: int,
                       cache: dict[str, int] | None = None, within: bool = False) -> tuple[tuple[int, ...], ...]:
    """The frontier targets: the token ids of the nodes at BFS distance 0..max_distance
    from the asked name of a ProsQA question (either wording; ``engine.data.question``).
    Each node is read as ``" " + word`` and its first token taken (one token per ProsQA word);
    ``cache`` (word -> id) saves the tokenizer calls across questions."""
    from engine.data.question import hop_distances, parse_question

    distances = hop_distances(parse_question(question))
    cache = {} if cache is None else cache
    out: list[list[int]] = [[] for _ in range(max_distance + 1)]
    for word, d in distances.items():
        if d <= max_distance:
            if word not in cache:
                cache[word] = tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]
            # within-k target: a node at distance d belongs to every frontier j >= d
            for j in range(d, (max_distance + 1) if within else d + 1):
                out[j].append(cache[word])
    return tuple(tuple(sorted(set(ids))) for ids in out)


def tokenize_record(tokenizer, record, eos_id: int, question_suffix: str = "\n", step_suffix: str = "\n",
                    answer_prefix: str = "### ") -> TokenizedRecord:
    question = tokenizer(record.question + question_suffix)["input_ids"]
    steps = tuple(tuple(tokenizer(s + step_suffix, add_special_tokens=False)["input_ids"]) for s in record.steps)
    answer = tuple(tokenizer(answer_prefix + record.answer, add_special_tokens=False)["input_ids"]) + (eos_id,)
    return TokenizedRecord(tuple(question), steps, answer)


def tokenize_records(tokenizer, records, eos_id: int, question_suffix: str = "\n", step_suffix: str = "\n",
                     answer_prefix: str = "### ") -> list[TokenizedRecord]:
    """``tokenize_record`` for many records, with one batched tokenizer call per field."""
    if not records:
        return []
    questions = tokenizer([r.question + question_suffix for r in records])["input_ids"]
    flat = [s + step_suffix for r in records for s in r.steps]
    steps = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    answers = tokenizer([answer_prefix + r.answer for r in records], add_special_tokens=False)["input_ids"]
    out, at = [], 0
    for r, q, a in zip(records, questions, answers):
        own = steps[at:at + len(r.steps)]
        at += len(r.steps)
        out.append(TokenizedRecord(tuple(q), tuple(tuple(s) for s in own), tuple(a) + (eos_id,)))
    return out


@dataclass(frozen=True)
class Curriculum:
    method: str = "coconut"
    c_thought: int = 1
    epochs_per_stage: int = 5
    max_latent_stage: int = 6
    pad_latent_to_max: bool = True
    uniform_prob: float = 0.0

    @classmethod
    def from_config(cls, config) -> "Curriculum":
        return cls(method=config.method, c_thought=config.c_thought, epochs_per_stage=config.epochs_per_stage,
                   max_latent_stage=config.max_latent_stage, pad_latent_to_max=config.pad_latent_to_max,
                   uniform_prob=config.uniform_prob)

    @property
    def uses_markers(self) -> bool:
        return self.method not in ("cot", "no_cot")

    @property
    def feeds_thoughts(self) -> bool:
        """Whether placeholders are continuous thoughts (hidden-state feedback)."""
        return self.method in ("coconut", "no_curriculum")

    def stage(self, epoch: int) -> int:
        if self.method in ("cot", "no_cot"):
            return 0
        if self.method == "no_curriculum":
            return self.max_latent_stage + 1
        return epoch // self.epochs_per_stage

    def layout(self, stage: int, n_steps: int) -> tuple[int, int]:
        """(steps removed, placeholders) for a sample with ``n_steps`` steps at ``stage``."""
        if self.method == "no_cot":
            return n_steps, 0
        if stage > self.max_latent_stage:
            skip, thoughts = n_steps, self.max_latent_stage
        else:
            skip, thoughts = min(stage, n_steps), stage
        if not self.pad_latent_to_max:
            thoughts = min(thoughts, n_steps)
        if self.method == "no_thoughts":
            thoughts = 0
        return skip, thoughts * self.c_thought

    def eval_thoughts(self, stage: int) -> int:
        """The fixed number of thoughts a model of this stage answers with (coconut.json)."""
        if not self.uses_markers or self.method == "no_thoughts":
            return 0
        return min(stage, self.max_latent_stage) * self.c_thought

    def needed_thoughts(self, n_steps: int) -> int:
        return min(n_steps, self.max_latent_stage) * self.c_thought

    def build(self, record: TokenizedRecord, stage: int, markers: Markers,
              rng: random.Random | None = None) -> Sample:
        if (self.uniform_prob > 0 and self.method in CURRICULUM_METHODS and rng is not None
                and rng.random() < self.uniform_prob):
            stage = rng.choice(range(len(record.steps) + 1))
        skip, thoughts = self.layout(stage, len(record.steps))
        question = list(record.question)
        middle = ([markers.bot] + [markers.latent] * thoughts + [markers.eot]) if self.uses_markers else []
        rest = [t for step in record.steps[skip:] for t in step] + list(record.answer)
        ids = question + middle + rest
        labels = [-100] * (len(question) + len(middle)) + rest
        frontier = None
        if record.frontier is not None and self.uses_markers:
            frontier = tuple(record.frontier[d] if d < len(record.frontier) else ()
                             for d in range(thoughts + 1))
        return Sample(ids, labels, thoughts, self.needed_thoughts(len(record.steps)), frontier)


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: input_ids, attention_mask, labels [B, T]. When any
    sample carries a frontier (the frontier loss), also ``frontier_ids`` [B, P, M]:
    P = 1 + the most placeholders of a row, M = the largest frontier, -1 as padding
    (entry [b, d] belongs to <bot> for d = 0 and to placeholder d otherwise)."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(s.labels)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(s.frontier is not None for s in samples):
        positions = max(len(s.frontier or ()) for s in samples)
        size = max([len(f) for s in samples for f in (s.frontier or ())] + [1])
        frontier = torch.full((len(samples), max(1, positions), size), -1, dtype=torch.long)
        for i, s in enumerate(samples):
            for d, f in enumerate(s.frontier or ()):
                if f:
                    frontier[i, d, :len(f)] = torch.tensor(f)
        out["frontier_ids"] = frontier
    return out
