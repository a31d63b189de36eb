"""ModelRunner: the forward passes of one engine step over a continuous batch.

``execute(plan)`` does, in order:

1. drop the rows of requests that left (finished or aborted) from the KV cache;
2. one mixed forward over every running row, one new position each: a row in latent
   mode feeds its last hidden state (a continuous thought), a row in language mode the
   embedding of its pending token (``<eot>`` or the last sampled token);
3. one prefill forward over the newly admitted prompts (left-padded), whose rows then
   join the batch for the next step.

For each request it returns one ``RowOutput``: a sampled token for rows in language
mode; for rows in latent mode the stop classifier's probability (``auto`` policy, after
a thought) and the thought's trace when asked. The runner reads request state but never
changes it: the core decides what each request does next.

Tensor shapes: B running rows, d hidden size, V vocabulary, P padded prompt width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.request import Request, RequestStatus, TraceEntry
from engine.runner.adapter import DecoderAdapter
from engine.runner.kv_cache import PaddedBatchCache
from engine.runner.sampler import sample


@dataclass
class StepPlan:
    """What the scheduler decided for one step (plain data)."""

    new_requests: list[Request] = field(default_factory=list)
    removed_ids: set[str] = field(default_factory=set)


@dataclass
class RowOutput:
    token_id: int | None = None
    logprob: float | None = None
    stop_prob: float | None = None
    trace: TraceEntry | None = None


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pad_token_id: int, stop_classifier: torch.nn.Module | None = None,
                 seed: int | None = None):
        self.adapter = DecoderAdapter(model)
        self.pad_token_id = pad_token_id
        self.stop_classifier = stop_classifier
        self.device = self.adapter.device
        self.rows: list[Request] = []
        self.batch: PaddedBatchCache | None = None
        self.hidden: torch.Tensor | None = None   # [B, d] last hidden state of every row
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    # ---------------------------------------------------------------- public

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def new_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> dict[str, RowOutput]:
        if plan.removed_ids:
            self._drop(plan.removed_ids)
        outputs: dict[str, RowOutput] = {}
        if self.rows:
            outputs.update(self._decode_step())
        if plan.new_requests:
            outputs.update(self._prefill(plan.new_requests))
        return outputs

    def reset(self) -> None:
        """Forget the whole batch (after an error left the cache in an unknown state)."""
        self.rows, self.batch, self.hidden = [], None, None

    # ---------------------------------------------------------------- steps

    def _drop(self, removed: set[str]) -> None:
        keep = [i for i, r in enumerate(self.rows) if r.request_id not in removed]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.reset()
            return
        self.rows = [self.rows[i] for i in keep]
        self.batch.filter(keep)
        self.hidden = self.hidden.index_select(0, torch.tensor(keep, device=self.device))

    def _decode_step(self) -> dict[str, RowOutput]:
        rows = self.rows
        in_latent = [r.status == RequestStatus.LATENT for r in rows]
        token_ids = torch.tensor([self.pad_token_id if latent else r.pending_token
                                  for r, latent in zip(rows, in_latent)], device=self.device)
        embeds = self.adapter.embed(token_ids)                                  # [B, d]
        if any(in_latent):
            latent_mask = torch.tensor(in_latent, device=self.device)[:, None]
            embeds = torch.where(latent_mask, self.hidden.to(embeds.dtype), embeds)
        attention_mask, position_ids = self.batch.mask_for_step()              # [B, L+1], [B, 1]
        hidden = self.adapter.forward(embeds[:, None], attention_mask, position_ids,
                                      self.batch.cache)[:, -1]                 # [B, d]
        self.hidden = hidden
        return self._row_outputs(rows, hidden, after_thought=in_latent)

    def _prefill(self, requests: list[Request]) -> dict[str, RowOutput]:
        lengths = [r.num_prompt_tokens for r in requests]
        width = max(lengths)
        ids = torch.full((len(requests), width), self.pad_token_id, dtype=torch.long, device=self.device)
        for i, r in enumerate(requests):
            ids[i, width - lengths[i]:] = torch.tensor(r.prompt_token_ids, device=self.device)
        cache = self.adapter.new_cache()
        batch, position_ids = PaddedBatchCache.for_prefill(cache, lengths, self.device)
        hidden = self.adapter.forward(self.adapter.embed(ids), batch.attention_mask, position_ids,
                                      cache)[:, -1]                            # [b, d]
        outputs = self._row_outputs(requests, hidden, after_thought=[False] * len(requests))
        if self.rows:
            self.batch.concat(batch)
            self.hidden = torch.cat([self.hidden, hidden])
            self.rows = self.rows + list(requests)
        else:
            self.batch, self.hidden, self.rows = batch, hidden, list(requests)
        return outputs

    # ---------------------------------------------------------------- outputs

    def _row_outputs(self, rows: list[Request], hidden: torch.Tensor,
                     after_thought: list[bool]) -> dict[str, RowOutput]:
        """hidden [R, d]: the output state of each row's newest position."""
        out = {r.request_id: RowOutput() for r in rows}
        language = [i for i, r in enumerate(rows) if r.status == RequestStatus.DECODING]
        if language:
            logits = self.adapter.logits(hidden[language])                     # [n, V]
            picked = sample(logits, [rows[i].sampling for i in language],
                            [rows[i].generator for i in language], self.generator)
            for j, i in enumerate(language):
                out[rows[i].request_id].token_id = picked.token_ids[j]
                out[rows[i].request_id].logprob = picked.logprobs[j]
        traced = [i for i, r in enumerate(rows) if r.status == RequestStatus.LATENT and r.latent.trace_top_k > 0]
        if traced:
            probs = self.adapter.logits(hidden[traced]).softmax(dim=-1)         # [n, V]
            k = max(rows[i].latent.trace_top_k for i in traced)
            top = probs.topk(min(k, probs.shape[-1]), dim=-1)
            values, indices = top.values.tolist(), top.indices.tolist()
            for j, i in enumerate(traced):
                kk = rows[i].latent.trace_top_k
                watch = rows[i].watch_token_ids
                watched = probs[j, watch].tolist() if watch else None
                out[rows[i].request_id].trace = TraceEntry(token_ids=indices[j][:kk], probs=values[j][:kk],
                                                           watch_probs=watched)
        asking = [i for i, r in enumerate(rows) if after_thought[i] and r.latent.mode == "auto"]
        if asking:
            if self.stop_classifier is None:
                raise RuntimeError("a request uses the auto latent policy but no stop classifier is loaded")
            probs = self.stop_classifier(hidden[asking]).tolist()
            for j, i in enumerate(asking):
                out[rows[i].request_id].stop_prob = probs[j]
        return out
