"""From core token ids to what users see: text deltas, stop strings, answers, traces.

``OutputProcessor`` keeps one ``_TextState`` per request. Each core output's new tokens
are detokenized incrementally (the prefix/read-offset scheme of TGI and vLLM, which holds
back incomplete UTF-8); stop strings are searched in the new text and, when one
matches, the text is cut before it and the caller is told to end the request. While a
request runs, the last ``max(len(stop)) - 1`` characters are held back, so streamed
deltas never contain the beginning of a stop string and always concatenate exactly to
the final ``text``. Used by the synchronous ``Engine`` and by ``AsyncEngine`` alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.core import CoreOutput
from engine.prompt import PromptFormat
from engine.request import Request, TraceEntry


@dataclass
class RequestOutput:
    """A snapshot of one request after a step (``delta`` holds only the new text)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    delta: str
    answer: str
    num_thoughts: int
    finished: bool
    finish_reason: str | None
    logprobs: list[float] | None = None
    #: ``sampling.top_logprobs`` > 0: per generated token, its position's most likely tokens as
    #: (id, logprob), best first, from the distribution ``logprobs`` are of
    top_logprobs: list[list[tuple[int, float]]] | None = None
    #: with ``sampling.logprobs``, for a symbols model: token id -> the question's own word
    #: (what a token of the question's names is called in the text)
    renamed_tokens: dict[int, str] | None = None
    latent_trace: list[dict] | None = None
    stop_probs: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    #: which answer of the prompt's ``n`` this is (``SamplingParams.n``), 0..n-1
    index: int = 0
    #: ``Engine.generate`` with n > 1: every answer of the prompt, in index order (else None)
    samples: list["RequestOutput"] | None = None
    #: prompt tokens taken from the prefix cache rather than computed (``engine.prefix_cache``)
    cached_prompt_tokens: int = 0


def text_decoder(tokenizer):
    """ids -> text without special tokens and without clean-up: the tokenizer's own
    ``decode``, or, for a ``tokenizers``-backed one, its backend's (the same call without
    the Python wrapper, several times faster per streamed token)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode"):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class _TextState:
    def __init__(self, decode, stop: tuple[str, ...], renamed_tokens: dict[int, str] | None = None):
        self.decode = decode
        self.renamed = renamed_tokens or {}   # symbol token -> the question's word (symbols models)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._before: str | None = ""            # the text of ids[prefix_offset:read_offset]
        self.answer_of: tuple[str, str] | None = None    # (text, its answer), recomputed when text changes
        self.traces: list[dict] = []             # the trace entries made so far, as dicts

    def _decode(self, ids: list[int]) -> str:
        if not self.renamed or not any(i in self.renamed for i in ids):
            return self.decode(ids)
        parts, run = [], []
        for i in ids:
            if i in self.renamed:
                if run:
                    parts.append(self.decode(run))
                    run = []
                parts.append(self.renamed[i])
            else:
                run.append(i)
        if run:
            parts.append(self.decode(run))
        return "".join(parts)

    def add(self, new_ids: list[int], final: bool) -> None:
        if self.stopped:
            return
        self.ids.extend(new_ids)
        if self._before is None:     # the window's text is the same until the offsets move
            self._before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        before = self._before
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            start = len(self.text)
            self.text += after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._before = None
            self._find_stop(max(0, start - self.hold))

    def _find_stop(self, search_from: int) -> None:
        hits = [at for at in (self.text.find(s, search_from) for s in self.stop) if at >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def take_delta(self, final: bool) -> str:
        limit = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent:limit]
        self.sent = limit
        return delta


class OutputProcessor:
    def __init__(self, tokenizer, prompt_format: PromptFormat):
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self._decode = text_decoder(tokenizer)
        self._states: dict[str, tuple[Request, _TextState]] = {}

    def add(self, request: Request) -> None:
        self._states[request.request_id] = (request, _TextState(self._decode, request.sampling.stop,
                                                                         request.renamed_tokens))

    def process(self, outputs: list[CoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the user-facing outputs and the ids of requests a stop string ended
        (the caller must end them in the core with FINISHED_STOP)."""
        results, stopped = [], []
        for out in outputs:
            entry = self._states.get(out.request_id)
            if entry is None:
                continue
            request, state = entry
            state.add(out.new_token_ids, final=out.finished)
            finish_reason = out.finish_reason
            if state.stopped:
                finish_reason = "stop"
                if not out.finished:
                    stopped.append(out.request_id)
            finished = finish_reason is not None
            results.append(self._snapshot(request, state, out, finish_reason, finished))
            if finished:
                del self._states[out.request_id]
        return results, stopped

    def _snapshot(self, request: Request, state: _TextState, out: CoreOutput,
                  finish_reason: str | None, finished: bool) -> RequestOutput:
        trace = None
        if request.latent.trace_top_k > 0:
            for k in range(len(state.traces), len(request.trace)):   # entries never change once made
                state.traces.append(self.trace_entry(request.trace[k], request, k + 1))
            trace = list(state.traces)
        if state.answer_of is None or state.answer_of[0] != state.text:
            state.answer_of = (state.text, self.prompt_format.answer(state.text, request.graph))
        return RequestOutput(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            token_ids=list(request.output_token_ids), text=state.text,
            delta=state.take_delta(final=finished),
            answer=state.answer_of[1], num_thoughts=request.thoughts_done,
            finished=finished, finish_reason=finish_reason,
            logprobs=list(request.output_logprobs) if request.sampling.logprobs else None,
            top_logprobs=list(request.output_top_logprobs) if request.sampling.top_logprobs else None,
            renamed_tokens=request.renamed_tokens if request.sampling.logprobs else None,
            latent_trace=trace, stop_probs=list(request.stop_probs),
            timings=request.times.phases(), error=out.error, index=request.index,
            cached_prompt_tokens=request.cached_prompt_tokens)

    def trace_entry(self, entry: TraceEntry, request: Request | None = None, thought: int = 1) -> dict:
        """One thought's top tokens and entropy (nats), what was fed (``feed``: the operator,
        and for a soft embedding the tokens mixed and their weights); for a graph question
        also its frontier view
        (``engine.frontier.thought_frontier``: the mass on the nodes within ``thought`` hops)."""
        tokens = self.tokenizer.convert_ids_to_tokens(entry.token_ids)
        renamed = (request.renamed_tokens if request is not None else None) or {}
        texts = [renamed.get(i) or self.tokenizer.decode([i], clean_up_tokenization_spaces=False)
                 for i in entry.token_ids]
        out = {"token_ids": entry.token_ids, "tokens": tokens, "texts": texts, "probs": entry.probs,
               "entropy": entry.entropy}
        feed = {"type": entry.feed_type}
        if entry.feed_token_ids is not None:
            feed.update(token_ids=entry.feed_token_ids, weights=entry.feed_weights,
                        tokens=self.tokenizer.convert_ids_to_tokens(entry.feed_token_ids),
                        texts=[renamed.get(i) or self.tokenizer.decode([i], clean_up_tokenization_spaces=False)
                               for i in entry.feed_token_ids])
        out["feed"] = feed
        if request is not None and request.graph is not None and entry.watch_probs is not None:
            from engine.frontier import thought_frontier

            nodes = dict(zip(request.graph.nodes, entry.watch_probs))
            out["frontier"] = thought_frontier(thought, request.graph_hops, nodes)
        return out
