"""ModelRunner: the forward passes of one engine step, on a slot KV cache.

``execute(plan)`` (a ``StepPlan`` of plain data, ``engine.runner.plan``) does, in order:

1. forget the slots of requests that ended (``released``): nothing is copied; copy the
   cached positions of slots that answers fork from into their own slots (``forks``),
   then the prompt prefixes that new requests reuse (``prefix_copies``);
2. one decode forward over the leading slots 0..n-1 (n = the highest slot with a decode
   row, + 1), one new position each: a row in latent mode feeds its slot's last hidden
   state (a continuous thought), a row in language mode the embedding of its token. Slots
   without a decode row (free, or between prefill chunks) ride along as padding rows that
   see one key and write into the cache's scratch column;
3. one prefill forward over this step's prompt chunks (right-padded), each written into
   its slot at its own positions; when every chunk starts a prompt, the attention reads
   the chunks' own new keys, nothing is gathered from the cache.

For models the lean forward supports (Llama, Qwen2: ``engine.runner.lean_decoder``; unless
``lean_decode=False``, or ``compile`` off the lean path), steps 2 and 3 are one forward over a flat batch of
the decode rows and the chunks' tokens (``engine.runner.flat_batch``): the same rows,
padding and positions, with the weights read once for both. Its seconds reach the prefill
pacer as the decode forward's when the step has no chunks, else as the chunks', marked as
holding the decode rows' time too (``ForwardTiming.with_decode``: the pacer takes off its
decode average).

``compile=None`` compiles where it pays (``reason_not_compiled_by_default``: a real Llama
or Qwen2 model with packed weights on CPU, and a C++ compiler). With ``compile=True`` on
CPU, a model the lean forward and ``CompiledDecode`` take runs
its decode-only steps through one compiled graph around the engine's own products
(``engine.runner.compiled_decode``: two graphs, 1 row and 2 or more, compiled by
``warm_up()``); steps with prompt chunks stay eager. Any other compiled model runs its
decode forward (the modules) through ``torch.compile``: its rows are padded to a batch
bucket (1, 2, 4, ... up to the slot count, the extra slots riding along as padding), and
``warm_up()`` compiles every bucket before the first request. Prefill stays eager (its
shapes vary too much to pay back a compile). On CUDA that compiled step replays CUDA
graphs (``mode="reduce-overhead"``): the key length is padded to ``key_buckets`` too (16,
32, ... up to ``max_seq_len``; the extra columns are masked), and ``warm_up()`` records
every batch x key bucket. That path has not run on a GPU yet; its key padding is tested on
CPU (set ``key_buckets`` on an eager runner).

It returns one ``RowOutput`` per decode row and per last prefill chunk (both kinds share
one LM head product and one sampling call): a sampled token,
the stop classifier's probability, the entropy and argmax of ``softmax(W h)``, the
thought's trace, as the plan asks. A row whose state becomes the next thought through a
feedback operator (``engine.feedback``: CODI's projection, Soft Thinking's embedding
mixture, which reuses the same ``W h``, with its noise when asked: ``engine.noise``) writes
that thought into its slot's buffer; a language row with a Mixture of Inputs
(``engine.moi``, from the logits it sampled from) writes there the input that its sampled
token's next position reads (``DecodeRow.feed_mixture``). The runner owns
the slot table (each slot's length and last hidden state) and the per-request random
generators of seeded requests (which draw a request's noise and its tokens, in that
order); it knows nothing of requests' states, text or latent
policies: the scheduler decides what each row feeds, the core what happens next.

Tensor shapes: n decode rows, b prefill rows of T tokens, d hidden size, V vocabulary.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from engine.feedback import entropy_and_argmax, mix_embeddings, soft_mixture
from engine.moi import moi_inputs
from engine.noise import NoiseDraws, NoiseRow, add_noise
from engine.runner.adapter import DecoderAdapter
from engine.runner.compiled_decode import CompiledDecode, reason_not_compiled_by_default
from engine.runner.flat_batch import flat_layout
from engine.runner.lean_decoder import LeanDecoder
from engine.runner.packed_linear import should_pack
from engine.runner.plan import DecodeRow, ForkCopy, PrefillChunk, RowOutput, RowWork, StepPlan, TraceEntry
from engine.runner.sampler import sample
from engine.runner.slot_cache import SlotCache, slot_attention_masks


class ForwardTiming(NamedTuple):
    """One step's forwards, in seconds (None: that forward did not run this step).
    ``with_decode``: the prompts ran in one forward with the decode rows (the lean path), so
    ``prefill_s`` holds the decode rows' time too."""

    decode_s: float | None = None
    prefill_s: float | None = None
    prefill_tokens: int = 0
    with_decode: bool = False


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pad_token_id: int, stop_classifier: torch.nn.Module | None = None,
                 seed: int | None = None, *, num_slots: int = 32, max_seq_len: int = 2048,
                 compile: bool | None = False, projection: torch.nn.Module | None = None,
                 suppress_token_ids: list[int] | tuple[int, ...] = (), pack_weights: str = "auto",
                 lean_decode: bool = True):
        # compile=None: where it pays (compiled_decode.reason_not_compiled_by_default)
        self.compile_reason = None
        if compile is None:
            self.compile_reason = reason_not_compiled_by_default(model, pack_weights, lean_decode)
            compile = self.compile_reason is None
        lean_supported = lean_decode and LeanDecoder.reason_unsupported(model) is None
        on_cpu = next(model.parameters()).device.type == "cpu"
        # compiled, a CPU step of a model the lean forward and CompiledDecode support compiles
        # the lean forward's decode steps around the engine's own products; any other compiles
        # the modules' decode forward (rows padded to batch buckets)
        self.compile_modules = compile and not (
            lean_supported and on_cpu and CompiledDecode.reason_unsupported(model) is None)
        if self.compile_modules and pack_weights == "on":
            raise ValueError("pack_weights='on' and compile do not go together for this model: torch.compile "
                             "packs the weights it freezes itself; use pack_weights='auto' or 'off' with compile")
        pack = not self.compile_modules and should_pack(model, pack_weights)
        self.adapter = DecoderAdapter(model, inference=True, pack=pack)
        self.pad_token_id = pad_token_id
        self.stop_classifier = stop_classifier
        self.projection = projection            # the checkpoint's latent projection (CODI's prj)
        self.suppress_token_ids = list(suppress_token_ids)   # never sampled
        self.device = self.adapter.device
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.cache = SlotCache(config.num_hidden_layers, num_slots, max_seq_len)
        self.lengths = [0] * num_slots            # positions written per slot
        # each slot's next continuous thought: its newest output state, passed through the
        # feedback operator of the row that produced it (the identity for COCONUT)
        self.thoughts = torch.zeros((num_slots, self.adapter.hidden_size), dtype=self.adapter.dtype,
                                    device=self.device)
        self.decode_buckets = batch_buckets(num_slots) if self.compile_modules else None   # None: not padded
        # CUDA graphs replay fixed shapes: on CUDA the compiled step also pads the key length
        # to buckets, so that a few graphs (batch buckets x key buckets) serve every step
        self.cuda_graphs = self.compile_modules and self.device.type == "cuda"
        self.key_buckets = length_buckets(max_seq_len) if self.cuda_graphs else None   # None: exact
        self._decode_forward = self.adapter.forward
        # the steps of Llama-family models skip the modules' dispatch and run their decode rows
        # and prompt chunks as one flat batch (engine.runner.lean_decoder, flat_batch)
        self.lean_decode = lean_supported and not self.compile_modules
        self.lean = LeanDecoder(model) if self.lean_decode else None
        self.compiled_decode = CompiledDecode(self.lean) if compile and self.lean_decode else None
        if self.compile_modules:
            # dynamic: one compiled graph serves every key length and bucket (sizes 1 get their
            # own); on CUDA, "reduce-overhead" records a CUDA graph per shape it meets
            mode = "reduce-overhead" if self.cuda_graphs else None
            self._decode_forward = torch.compile(self.adapter.forward, dynamic=True, mode=mode)
        self.generators: dict[str, torch.Generator] = {}
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self.noise = NoiseDraws(self.generator)   # the noise of soft thoughts (tests inject theirs)
        self.last_timing = ForwardTiming()        # the last step's forwards (the prefill pacer reads it)

    # ---------------------------------------------------------------- public

    @property
    def num_active_slots(self) -> int:
        return sum(1 for n in self.lengths if n > 0)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> dict[str, RowOutput]:
        for released in plan.released:
            self.lengths[released.slot] = 0
            self.generators.pop(released.request_id, None)
        self._fork(plan.forks)
        self._copy_prefixes(plan.prefix_copies)
        if self.lean is not None:
            return self._execute_lean(plan)
        rows: list[RowWork] = []
        states: list[torch.Tensor] = []
        seconds: list[float | None] = [None, None]
        for k, (forward, work) in enumerate(((self._decode, plan.decode), (self._prefill, plan.prefill))):
            if work:
                t0 = time.perf_counter()
                done, hidden = forward(work)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                seconds[k] = time.perf_counter() - t0
                rows += done
                states.append(hidden)
        self.last_timing = ForwardTiming(seconds[0], seconds[1], sum(len(c.token_ids) for c in plan.prefill))
        if not rows:
            return {}
        # one LM head product and one sampling call for the decode rows and the finished prompts
        return self._row_outputs(rows, states[0] if len(states) == 1 else torch.cat(states))

    def _execute_lean(self, plan: StepPlan) -> dict[str, RowOutput]:
        """The step's decode rows and prompt chunks in one lean forward. Its timing goes to
        the prefill pacer as the decode forward's when there are no chunks, else as a prefill
        forward that includes the decode rows' time (``with_decode``) when there are some."""
        if not plan.decode and not plan.prefill:
            self.last_timing = ForwardTiming()
            return {}
        t0 = time.perf_counter()
        rows, hidden = self._lean_forward(plan.decode, plan.prefill)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for c in plan.prefill)
        if not plan.prefill:
            self.last_timing = ForwardTiming(seconds, None, 0)
        else:
            self.last_timing = ForwardTiming(None, seconds, tokens, with_decode=bool(plan.decode))
        if not rows:
            return {}
        return self._row_outputs(rows, hidden)

    def _lean_forward(self, rows: list[DecodeRow], chunks: list[PrefillChunk]) -> tuple[list[RowWork], torch.Tensor]:
        """One lean forward over the decode rows (the leading slots 0..n-1, free ones as
        padding) and the chunks' tokens (``engine.runner.flat_batch``). Returns the rows with
        output, the decode rows then the chunks that end a prompt, and their states [R, d]."""
        lean, dev = self.lean, self.device
        layout = flat_layout(rows, chunks, self.lengths, self.max_seq_len, self.pad_token_id)
        embeds = self.adapter.embed(torch.tensor(layout.tokens, device=dev))            # [N, d]
        n = layout.decode_rows
        if any(layout.latent):
            embeds[:n] = torch.where(torch.tensor(layout.latent, device=dev)[:, None],
                                     self.thoughts[:n].to(embeds.dtype), embeds[:n])
        batch = layout.batch(lean.kv_heads, lean.groups, lean.scaling, self.adapter.dtype, dev)
        forward = lean.forward
        if self.compiled_decode is not None and CompiledDecode.takes(batch, self.cache):
            forward = self.compiled_decode                   # decode rows only: the compiled graph
        out = forward(embeds, batch, self.cache)                                        # [N, d]
        for c in chunks:
            self.lengths[c.slot] = c.start + len(c.token_ids)
        for r in rows:
            self.lengths[r.slot] += 1
        done = list(rows) + [c for c in chunks if c.last]
        if not done:
            return [], out.new_zeros((0, out.shape[-1]))
        hidden = out.index_select(0, torch.tensor(layout.outputs, device=dev))          # [R, d]
        self.thoughts[torch.tensor([r.slot for r in done], device=dev)] = hidden
        return done, hidden

    def allocate(self) -> int:
        """Allocate the slot cache now (one throwaway one-token prefill into slot 0) rather
        than at the first request, so that a cache too big for memory fails at start-up.
        Returns its size in bytes."""
        warm = PrefillChunk(request_id="", slot=0, token_ids=(self.pad_token_id,), start=0, last=False)
        self.execute(StepPlan(prefill=[warm]))
        self.lengths[0] = 0
        return self.cache.memory_bytes

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile the decode step now, not at the first requests: the compiled lean step's
        two graphs (1 row; 2 rows, every larger count and key length), or the modules' step
        for every batch bucket (key lengths 1, 2 and 3 each, so the dynamic graphs cover any
        length). Returns the seconds it took (0 for an eager runner)."""
        start = time.perf_counter()
        if self.compiled_decode is not None:
            for rows in (1, 2)[:len(self.lengths)]:     # one slot: the 2-row graph never runs
                decode = [DecodeRow(request_id="", slot=slot, feed_token=self.pad_token_id) for slot in range(rows)]
                for slot in range(rows):
                    self.lengths[slot] = 2            # 3 keys: a length that is not 0 or 1 stays dynamic
                self._lean_forward(decode, [])
                for slot in range(rows):
                    self.lengths[slot] = 0
        if self.decode_buckets:
            for bucket in self.decode_buckets:
                rows = [DecodeRow(request_id="", slot=slot, feed_token=self.pad_token_id) for slot in range(bucket)]
                for _ in range(3):   # key lengths 1, 2, 3: sizes 1 are compiled apart
                    self._decode(rows)
                for key_length in (self.key_buckets or [])[1:]:   # record each key bucket's graph
                    self.lengths[0] = key_length - 1
                    self._decode(rows)
                for slot in range(bucket):
                    self.lengths[slot] = 0
        return time.perf_counter() - start

    def reset(self) -> None:
        """Forget every slot (after an error left the cache in an unknown state)."""
        self.lengths = [0] * self.num_slots
        self.generators.clear()

    def _fork(self, forks: list[ForkCopy]) -> None:
        """Each fork's slot takes its source's first ``length`` positions. The source may
        have ended in the step that decided the fork (released just above): its columns stay
        intact until a forward writes into the slot again, which comes after this."""
        by_source: dict[tuple[int, int], list[int]] = {}
        for fork in forks:
            by_source.setdefault((fork.source_slot, fork.length), []).append(fork.slot)
            self.lengths[fork.slot] = fork.length
            self.thoughts[fork.slot] = self.thoughts[fork.source_slot]
        for (source, length), targets in by_source.items():
            self.cache.copy_positions(source, targets, length)

    def _copy_prefixes(self, copies: list[ForkCopy]) -> None:
        """Each new request's slot takes the prompt prefix another slot holds (one copy at a
        time, in plan order; a copy from the slot itself only sets its length)."""
        for copy in copies:
            if copy.source_slot != copy.slot:
                self.cache.copy_positions(copy.source_slot, [copy.slot], copy.length)
            self.lengths[copy.slot] = copy.length

    # ---------------------------------------------------------------- forwards

    def _decode(self, rows: list[DecodeRow]) -> tuple[list[DecodeRow], torch.Tensor]:
        n = max(r.slot for r in rows) + 1
        if self.decode_buckets:
            n = next(b for b in self.decode_buckets if b >= n)
        scratch = self.max_seq_len
        tokens = [self.pad_token_id] * n
        positions = [scratch] * n            # where each slot's new key goes
        query_positions = [0] * n
        valid = [False] * n
        latent = [False] * n                 # fed from the slot's buffer: a thought, or a mixture of inputs
        for r in rows:
            if self.lengths[r.slot] >= self.max_seq_len:
                raise RuntimeError(f"slot {r.slot} ({r.request_id}) is full ({self.max_seq_len} positions)")
            positions[r.slot] = query_positions[r.slot] = self.lengths[r.slot]
            valid[r.slot] = True
            if r.feed_token is None or r.feed_mixture:
                latent[r.slot] = True
            else:
                tokens[r.slot] = r.feed_token
        dev = self.device
        embeds = self.adapter.embed(torch.tensor(tokens, device=dev))                  # [n, d]
        if any(latent):
            embeds = torch.where(torch.tensor(latent, device=dev)[:, None], self.thoughts[:n].to(embeds.dtype), embeds)
        kv_len = max(query_positions) + 1
        if self.key_buckets:    # the extra columns are masked (stale keys of earlier requests)
            kv_len = next(b for b in self.key_buckets if b >= kv_len)
        query = torch.tensor(query_positions, device=dev)[:, None]                      # [n, 1]
        self.cache.plan_write(torch.arange(n, device=dev), torch.tensor(positions, device=dev)[:, None],
                              kv_len, rows_are_leading=True)
        full, sliding = slot_attention_masks(query, torch.tensor(valid, device=dev)[:, None], kv_len,
                                             self.adapter.dtype, self.adapter.sliding_window)
        out = self._decode_forward(embeds[:, None], self.adapter.mask_argument(full, sliding), query,
                                   self.cache)[:, -1]                                   # [n, d]
        slots = torch.tensor([r.slot for r in rows], device=dev)
        hidden = out.index_select(0, slots)                                             # [rows, d]
        self.thoughts[slots] = hidden
        for r in rows:
            self.lengths[r.slot] += 1
        return rows, hidden

    def _prefill(self, chunks: list[PrefillChunk]) -> tuple[list[PrefillChunk], torch.Tensor]:
        width = max(len(c.token_ids) for c in chunks)
        dev = self.device
        ids = torch.full((len(chunks), width), self.pad_token_id, dtype=torch.long, device=dev)
        for i, c in enumerate(chunks):
            if self.lengths[c.slot] != c.start:
                raise RuntimeError(f"chunk of {c.request_id} starts at {c.start} but slot {c.slot} "
                                   f"holds {self.lengths[c.slot]} positions")
            ids[i, :len(c.token_ids)] = torch.tensor(c.token_ids, device=dev)
        starts = torch.tensor([c.start for c in chunks], device=dev)
        sizes = torch.tensor([len(c.token_ids) for c in chunks], device=dev)
        offsets = torch.arange(width, device=dev)[None, :]
        valid = offsets < sizes[:, None]                                                # [b, T]
        positions = starts[:, None] + offsets
        kv_len = int((starts + sizes).max())
        self.cache.plan_write(torch.tensor([c.slot for c in chunks], device=dev),
                              torch.where(valid, positions, torch.full_like(positions, self.max_seq_len)),
                              kv_len, rows_are_leading=False, fresh=all(c.start == 0 for c in chunks))
        full, sliding = slot_attention_masks(positions, valid, kv_len, self.adapter.dtype,
                                             self.adapter.sliding_window)
        query = torch.where(valid, positions, starts[:, None].expand_as(positions))
        out = self.adapter.forward(self.adapter.embed(ids), self.adapter.mask_argument(full, sliding), query,
                                   self.cache)                                          # [b, T, d]
        for c in chunks:
            self.lengths[c.slot] = c.start + len(c.token_ids)
        done = [i for i, c in enumerate(chunks) if c.last]
        if not done:
            return [], out.new_zeros((0, out.shape[-1]))
        last = out[torch.tensor(done, device=dev), (sizes - 1)[done]]                   # [done, d]
        rows = [chunks[i] for i in done]
        self.thoughts[torch.tensor([r.slot for r in rows], device=dev)] = last
        return rows, last

    # ---------------------------------------------------------------- outputs

    def _generator_for(self, row: RowWork) -> torch.Generator | None:
        if row.seed is None:
            return None
        generator = self.generators.get(row.request_id)
        if generator is None:
            generator = self.generators[row.request_id] = torch.Generator(device=self.device).manual_seed(row.seed)
        return generator

    def _row_outputs(self, rows: list[RowWork], hidden: torch.Tensor) -> dict[str, RowOutput]:
        """hidden [R, d]: the output state of each row's newest position. One LM head product
        serves every row that needs ``W h``: sampling, the trace, the entropy and token stop
        rules and the soft-embedding feedback."""
        out = {r.request_id: RowOutput() for r in rows}
        language = [i for i, r in enumerate(rows) if r.sampling is not None]
        traced = [i for i, r in enumerate(rows) if r.trace_top_k > 0]
        entropic = [i for i, r in enumerate(rows) if r.ask_entropy]
        soft = [i for i, r in enumerate(rows) if r.feedback is not None and r.feedback.type == "soft_embedding"]
        need = sorted(set(language) | set(traced) | set(entropic) | set(soft))
        logits = None
        at: dict[int, int] = {}
        if need:
            logits = self.adapter.logits(hidden[need] if len(need) < len(rows) else hidden)   # [N, V]
            at = {i: j for j, i in enumerate(need)}

        def logits_of(indices: list[int]) -> torch.Tensor:
            if len(indices) == logits.shape[0]:
                return logits
            return logits.index_select(0, torch.tensor([at[i] for i in indices], device=logits.device))

        if language:
            chosen = logits_of(language)
            if self.suppress_token_ids:
                chosen = chosen.index_fill(-1, torch.tensor(self.suppress_token_ids, device=chosen.device),
                                           float("-inf"))
            picked = sample(chosen, [rows[i].sampling for i in language],
                            [self._generator_for(rows[i]) for i in language], self.generator)
            for j, i in enumerate(language):
                out[rows[i].request_id].token_id = picked.token_ids[j]
                out[rows[i].request_id].logprob = picked.logprobs[j]
                out[rows[i].request_id].top_logprobs = picked.top_logprobs[j]
            self._mix_inputs(rows, language, chosen, picked.token_ids)
        if entropic:
            entropies, argmaxes = entropy_and_argmax(logits_of(entropic))
            for j, i in enumerate(entropic):
                out[rows[i].request_id].entropy = entropies[j]
                out[rows[i].request_id].argmax = argmaxes[j]
        mixtures = self._feed_back(rows, hidden, soft, logits_of(soft) if soft else None)
        if traced:
            probs = logits_of(traced).softmax(dim=-1)                                     # [n, V]
            k = max(rows[i].trace_top_k for i in traced)
            top = probs.topk(min(k, probs.shape[-1]), dim=-1)
            values, indices = top.values.tolist(), top.indices.tolist()
            entropies = torch.special.entr(probs).sum(dim=-1).tolist()
            for j, i in enumerate(traced):
                row = rows[i]
                kk, watch = row.trace_top_k, list(row.watch_token_ids)
                watched = probs[j, watch].tolist() if watch else None
                entry = TraceEntry(token_ids=indices[j][:kk], probs=values[j][:kk], watch_probs=watched,
                                   entropy=entropies[j])
                if row.feedback is not None:
                    entry.feed_type = row.feedback.type
                    if i in mixtures:
                        entry.feed_token_ids, entry.feed_weights = mixtures[i]
                out[row.request_id].trace = entry
        asking = [i for i, r in enumerate(rows) if r.ask_stop]
        if asking:
            if self.stop_classifier is None:
                raise RuntimeError("a request uses the auto latent policy but no stop classifier is loaded")
            probs = self.stop_classifier(hidden[asking]).tolist()
            for j, i in enumerate(asking):
                out[rows[i].request_id].stop_prob = probs[j]
        return out

    def _feed_back(self, rows: list[RowWork], hidden: torch.Tensor, soft: list[int],
                   soft_logits: torch.Tensor | None) -> dict[int, tuple[list[int], list[float]]]:
        """Make the next thought of every row with a feedback operator, batched per operator,
        into its slot's thought buffer. Returns the soft rows' mixtures (tokens, weights) for
        the trace."""
        dev = self.device
        projected = [i for i, r in enumerate(rows) if r.feedback is not None and r.feedback.type == "projection"]
        if projected:
            if self.projection is None:
                raise RuntimeError("a request uses projection feedback but the checkpoint has no latent projection")
            slots = torch.tensor([rows[i].slot for i in projected], device=dev)
            self.thoughts[slots] = self.projection(hidden[projected]).to(self.thoughts.dtype)
        mixtures: dict[int, tuple[list[int], list[float]]] = {}
        if soft:
            feedbacks = [rows[i].feedback for i in soft]
            mixture = soft_mixture(soft_logits, [f.temperature for f in feedbacks], [f.top_k for f in feedbacks],
                                   [f.top_p for f in feedbacks])
            if any(f.random for f in feedbacks):
                vocab = soft_logits.shape[1]
                noisy = [NoiseRow(rows[i].request_id, self._generator_for(rows[i]),
                                  vocab if f.top_k <= 0 else min(f.top_k, vocab))
                         for i, f in zip(soft, feedbacks) if f.random]
                mixture = add_noise(mixture, [f.noise for f in feedbacks], noisy, self.noise)
            slots = torch.tensor([rows[i].slot for i in soft], device=dev)
            self.thoughts[slots] = mix_embeddings(self.adapter.embedding.weight, mixture).to(self.thoughts.dtype)
            if any(rows[i].trace_top_k for i in soft):
                ids, weights = mixture.token_ids.tolist(), mixture.weights.tolist()
                for j, i in enumerate(soft):
                    kept = [(t, w) for t, w in zip(ids[j], weights[j]) if t >= 0]
                    mixtures[i] = ([t for t, _ in kept], [w for _, w in kept])
        return mixtures


    def _mix_inputs(self, rows: list[RowWork], language: list[int], logits: torch.Tensor,
                    token_ids: list[int]) -> None:
        """Into the slot buffer of each language row with a Mixture of Inputs: the input that
        replaces its sampled token's embedding at its next position (``engine.moi``).
        ``logits``: the language rows', as sampled from (suppressed tokens at -inf)."""
        mixing = [j for j, i in enumerate(language)
                  if rows[language[j]].sampling.mixture is not None and rows[language[j]].sampling.mixture.active]
        if not mixing:
            return
        dev = self.device
        mixtures = [rows[language[j]].sampling.mixture for j in mixing]
        sub = logits if len(mixing) == len(language) else logits.index_select(0, torch.tensor(mixing, device=dev))
        sampled = torch.tensor([token_ids[j] for j in mixing], device=dev)
        inputs = moi_inputs(self.adapter.embed, sub, sampled, [m.top_k for m in mixtures], [m.beta for m in mixtures])
        slots = torch.tensor([rows[language[j]].slot for j in mixing], device=dev)
        self.thoughts[slots] = inputs.to(self.thoughts.dtype)


def length_buckets(max_seq_len: int, smallest: int = 16) -> list[int]:
    """The key lengths a step is padded to when its shapes must be few (CUDA graphs): powers
    of two from ``smallest`` below ``max_seq_len``, and ``max_seq_len`` itself."""
    buckets, n = [], smallest
    while n < max_seq_len:
        buckets.append(n)
        n *= 2
    return buckets + [max_seq_len]


def batch_buckets(num_slots: int) -> list[int]:
    """The decode batch sizes a compiled step is built for: powers of two below
    ``num_slots``, and ``num_slots`` itself."""
    buckets, b = [], 1
    while b < num_slots:
        buckets.append(b)
        b *= 2
    return buckets + [num_slots]
