"""``Engine``: the synchronous Python API over one checkpoint.

    eng = Engine.from_pretrained(path, device="cpu", dtype="float32")
    results = eng.generate(questions, sampling=SamplingParams(max_tokens=32, temperature=0.0),
                           latent=LatentPolicy(mode="fixed", thoughts=6))

``generate`` batches all questions continuously (``max_batch_size`` at a time) and
returns one ``RequestOutput`` per question, in order. The step-level interface
(``add_request``, ``step``, ``abort``, ``has_unfinished``) is what ``AsyncEngine`` and
the HTTP server drive. Text (tokenizing, detokenizing, stop strings) is handled here and
in ``engine.output``; the core below sees token ids only. Not thread-safe except
``abort``: one thread drives ``step``.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from dataclasses import replace
from pathlib import Path

from engine.checkpoint import Checkpoint, load_checkpoint
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.kv_cache_sizing import DEFAULT_MAX_SEQ_LEN, check_allocation, plan_for_model
from engine.output import OutputProcessor, RequestOutput
from engine.params import LatentPolicy, SamplingParams, broadcast, with_default_mixture, with_noise
from engine.prompt import PromptFormat
from engine.request import Request, RequestStatus
from engine.runner.model_runner import ModelRunner

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None):
        self._init_text(checkpoint, config)
        kv_plan = plan_for_model(checkpoint.model, checkpoint.max_seq_len, self.config)  # ValueError: no fit
        max_seq_len = kv_plan.max_seq_len
        self.runner = ModelRunner(checkpoint.model, checkpoint.markers.pad, checkpoint.stop_classifier,
                                  seed=self.config.seed, num_slots=self.config.max_batch_size,
                                  max_seq_len=max_seq_len, compile=self.config.compile,
                                  projection=checkpoint.projection,
                                  suppress_token_ids=checkpoint.config.suppress_token_ids,
                                  pack_weights=self.config.pack_weights, lean_decode=self.config.lean_decode)
        if self.runner.adapter.packed_linears:
            log.info("weights packed by oneDNN: %d linear layers and the LM head", self.runner.adapter.packed_linears)
        cache_bytes = self.runner.allocate()
        log.info("KV cache: %d slots x %d positions, %.1f MiB (%s)", self.config.max_batch_size, max_seq_len,
                 cache_bytes / 2**20, kv_plan.source)
        check_allocation(kv_plan, self.config.max_batch_size, cache_bytes)
        if self.runner.compile_reason is not None:
            log.info("decode step not compiled (--compile to force it): %s", self.runner.compile_reason)
        if self.runner.compiled_decode is not None or self.runner.compile_modules:
            if self.runner.compiled_decode is not None:
                log.info("compiling the lean decode step (graphs for 1 row and for 2 or more) ...")
            else:
                log.info("compiling the decode step for batch sizes %s ...", self.runner.decode_buckets)
            log.info("decode step compiled in %.1f s", self.runner.warm_up())
        self.core = EngineCore(self.runner, self.config, max_seq_len, checkpoint.markers.eos)

    def _init_text(self, checkpoint: Checkpoint, config: EngineConfig | None) -> int:
        """Everything but the model runner: tokenizer, prompt format, output processing.
        Returns the sequence limit without a memory budget (the frontend's, until the engine
        process reports its own)."""
        self.checkpoint = checkpoint
        self.config = config or EngineConfig()
        self.tokenizer = checkpoint.tokenizer
        self.coconut = checkpoint.config
        self.prompt_format = PromptFormat(checkpoint.tokenizer, checkpoint.config, checkpoint.markers)
        self.outputs = OutputProcessor(checkpoint.tokenizer, self.prompt_format)
        self._ids = itertools.count()
        return min(checkpoint.max_seq_len, self.config.max_seq_len or DEFAULT_MAX_SEQ_LEN)

    @classmethod
    def frontend(cls, path: str | Path, max_seq_len: int | None = None,
                 coconut: dict | None = None, max_batch_size: int = 1, feedback_noise=None,
                 mixture=None) -> "Engine":
        """The text side of an engine without its weights or KV cache (the model stays on
        the meta device): ``make_request``, the limits and ``outputs`` work, ``step`` does
        not. For a process that tokenizes while the model runs in another
        (``engine.process_engine``); ``max_batch_size`` is the other's, which ``check_fits``
        holds ``SamplingParams.n`` to; ``feedback_noise`` and ``mixture`` are its request
        defaults (``EngineConfig``)."""
        engine = cls.__new__(cls)
        limit = engine._init_text(load_checkpoint(path, weights=False, coconut=coconut),
                                  EngineConfig(max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                                               feedback_noise=feedback_noise, mixture=mixture))
        engine.runner = None
        engine.core = EngineCore(None, engine.config, limit, engine.checkpoint.markers.eos)
        return engine

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "cpu", dtype: str = "float32",
                        coconut: dict | None = None, revision: str | None = None, **config) -> "Engine":
        """Load a model (default: the bundled one) and build an engine. ``path``: a checkpoint
        directory, a ``.gguf`` file or a Hugging Face Hub id (``revision``: its branch, tag
        or commit); ``engine.sources``. ``coconut``: ``coconut.json`` fields over the file's
        (or, for a plain Hugging Face model, over the plain defaults: ``load_checkpoint``).
        Extra keyword arguments are ``EngineConfig`` fields (``max_batch_size``, ...)."""
        if path is None:
            from engine.models import default_model_dir
            path = default_model_dir()
        checkpoint = load_checkpoint(path, device=device, dtype=dtype, coconut=coconut, revision=revision)
        return cls(checkpoint, EngineConfig(device=device, dtype=dtype, **config))

    @property
    def model_name(self) -> str:
        return self.checkpoint.name

    @property
    def max_seq_len(self) -> int:
        return self.core.max_seq_len

    # ------------------------------------------------------------ step level

    def make_request(self, question: str | list[dict[str, str]], sampling: SamplingParams | None = None,
                     latent: LatentPolicy | None = None, request_id: str | None = None) -> Request:
        """Validate and tokenize; raises ``ValueError`` with the reason for bad input.
        ``question`` may be chat messages (``[{"role", "content"}]``) when the tokenizer has
        a chat template (``prompt_format.has_chat_template``). The engine's request defaults
        (``EngineConfig.feedback_noise``, ``mixture``) fill in what the request leaves unset."""
        sampling = with_default_mixture(sampling or SamplingParams(), self.config.mixture)
        noise = latent.feedback.noise if latent is not None and latent.feedback is not None else None
        if noise is not None:   # the checkpoint's resolution rebuilds the operator: the noise goes back after
            latent = replace(latent, feedback=replace(latent.feedback, noise=None))
        resolved = with_noise(self.coconut.resolve(latent), noise, self.config.feedback_noise)
        if resolved.mode != "none" and self.checkpoint.markers.bot is None:
            raise ValueError("this model is served as a plain language model (no coconut.json and no latent "
                             "flags at start-up), so it has no latent mode: ask without latent, or serve it "
                             "with --latent-feedback soft_embedding (Soft Thinking)")
        if isinstance(question, str) and self.coconut.use_chat_template and self.prompt_format.has_chat_template:
            question = [{"role": "user", "content": question}]
        if isinstance(question, list):   # chat messages, for a tokenizer with a chat template
            prompt = self.prompt_format.build_chat(question, resolved)
        else:
            prompt = self.prompt_format.build(question, resolved)
        request_id = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        watch = prompt.node_ids if prompt.graph and resolved.trace_top_k else None
        request = Request(request_id, prompt.ids, sampling.for_sample(0) if sampling.n > 1 else sampling, resolved,
                          self.checkpoint.markers.eot, starts_in_language=prompt.in_language,
                          watch_token_ids=watch, graph=prompt.graph, renamed_tokens=prompt.renamed_tokens,
                          latent_suffix_ids=self.checkpoint.markers.suffix)
        if sampling.n > 1:   # the other answers fork from this request's prompt and thoughts
            request.add_forks([sampling.for_sample(i) for i in range(1, sampling.n)])
        return request

    def add_request(self, question: str | Request, sampling: SamplingParams | None = None,
                    latent: LatentPolicy | None = None, request_id: str | None = None) -> str:
        request = question if isinstance(question, Request) else self.make_request(
            question, sampling, latent, request_id)
        self.core.add_request(request)
        for member in request.members:
            self.outputs.add(member)
        return request.request_id

    def abort(self, request_id: str) -> None:
        """Thread-safe: the request ends with finish_reason 'abort' at the next step."""
        self.core.abort_request(request_id)

    def step(self) -> list[RequestOutput]:
        results, stopped = self.outputs.process(self.core.step())
        for request_id in stopped:
            self.core.abort_request(request_id, RequestStatus.FINISHED_STOP)
        return results

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    # ------------------------------------------------------------ offline

    def generate(self, questions: str | list[str], sampling: SamplingParams | list[SamplingParams] | None = None,
                 latent: LatentPolicy | list[LatentPolicy] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Answer every question; one result per question, in order. With
        ``sampling.n`` > 1 a question's result is its first answer, and its ``samples`` hold
        all ``n`` (index order)."""
        single = isinstance(questions, str)
        questions = [questions] if single else list(questions)
        samplings = broadcast(sampling, len(questions), "sampling")
        latents = broadcast(latent, len(questions), "latent")
        requests = [self.make_request(q, s, l) for q, s, l in zip(questions, samplings, latents)]
        for request in requests:
            self.add_request(request)
        done: dict[str, RequestOutput] = {}
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(requests), desc="generate", unit="q")
        wanted = sum(len(r.members) for r in requests)
        while len(done) < wanted:
            if not self.has_unfinished():
                raise RuntimeError("the engine went idle with requests unanswered (a bug)")
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
                    if bar is not None and out.index == 0:
                        bar.update(1)
        if bar is not None:
            bar.close()
        results = []
        for r in requests:
            first = done[r.request_id]
            if r.forks:
                first.samples = [done[m.request_id] for m in r.members]
            results.append(first)
        return results
