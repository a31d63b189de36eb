"""The training loop behind ``engine train``: curriculum epochs, evaluation, checkpoints.

``Trainer(config).run()`` does, per epoch: resolve the epoch's records (a file once, or
fresh samples from a generator spec), lay them out at the epoch's stage, shard them with
a ``DistributedSampler`` (seeded by the run's seed and the epoch, so the data order is
reproducible and a resumed run continues it), run ``coconut_loss`` (or the plain LM loss
for methods without feedback) with gradient accumulation, bf16 autocast when asked, a
warmup/cosine learning rate and an AdamW that is recreated when the stage changes
(``reset_optimizer``); then, on rank 0, the validation loss, the engine's exact-match
accuracy on ``val_path``, a servable checkpoint (``checkpoint_<epoch>``, and ``best/``),
the metrics log and plot. After the last epoch it can fit the stop classifier.

Resuming: a run directory holding ``checkpoint_<E>`` with a trainer state restarts at
epoch E with that model, optimizer state (unless the stage changes there) and metrics;
``resume: N`` without such a directory starts at epoch N from ``load_model_path`` (the
reference's use). The RNG state of dropout is restored too. This module owns the loop;
data, layout, loss, parallelism and files live in their own modules.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import torch

from engine.checkpoint import CoconutConfig
from engine.feedback import PROJECTION_FILE
from engine.train import distributed as D
from engine.train import state as S
from engine.train.config import TrainConfig
from engine.train.layout import Curriculum, collate, frontier_token_ids, tokenize_records
from engine.train.metrics import MetricsLog, truncate_after
from engine.train.session import EvalSession

log = logging.getLogger(__name__)


def teacher_probability(config: TrainConfig, epoch: int) -> float:
    """The chance that a batch of ``epoch`` gets teacher-forced thoughts: 1 for the first
    ``teacher_thoughts_epochs`` epochs of the run (counted from ``resume``), then falling
    linearly to 0 over ``teacher_anneal_epochs``, 0 after."""
    done = epoch - config.resume - config.teacher_thoughts_epochs
    if done < 0:
        return 1.0 if config.teacher_thoughts_epochs else 0.0
    return max(0.0, 1.0 - (done + 1) / max(1, config.teacher_anneal_epochs))


class Trainer:
    def __init__(self, config: TrainConfig):
        config.require("train_path", "val_path")
        self.config = config
        self.dist = D.setup(config.device)
        self.curriculum = Curriculum.from_config(config)
        self.run_dir = config.run_dir
        self.saving = not config.debug
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.dist.main)
        self._file_cache: tuple[str, list] | None = None
        self._frontier_words: dict[str, int] = {}   # node word -> token id, for the frontier targets

    # ------------------------------------------------------------------ data

    def records(self, epoch: int) -> list:
        from engine.data.source import is_generator_spec, resolve_source

        path = self.config.train_path
        if not is_generator_spec(path):
            if self._file_cache is None:
                self._file_cache = (path, resolve_source(path, 0, self.config.seed))
            records = self._file_cache[1]
        else:
            records = resolve_source(path, epoch, self.config.seed)
        return self._render(records[:5000] if self.config.debug else records)

    def val_records(self) -> list:
        from engine.data.source import resolve_source

        records = resolve_source(self.config.val_path, 0, self.config.seed + 1)
        limit = 32 if self.config.debug else self.config.max_val_samples
        return self._render(records[:limit] if limit else records)

    def _render(self, records: list) -> list:
        if self.config.text_format == "compact":
            from engine.data.compact import compact_record

            out = [compact_record(r, i, steps=self.config.compact_steps) for i, r in enumerate(records)]
            if self.config.symbols:
                from engine.data.symbols import rename_record

                out = [rename_record(r, i, self.config.symbols) for i, r in enumerate(out)]
            return out
        return records

    # ------------------------------------------------------------------ setup

    def _resume_point(self) -> tuple[int, Path | None, dict | None]:
        latest = S.latest_checkpoint(self.run_dir) if self.dist.main else None
        latest = D.broadcast_object(self.dist, str(latest) if latest else None)
        if latest:
            state = S.load_training_state(Path(latest))
            log.warning("found %s: resuming at epoch %d", latest, state["epoch"])
            return state["epoch"], Path(latest), state
        return self.config.resume, None, None

    def _build(self, start: int, resume_dir: Path | None, first_records: list) -> None:
        from engine.train.modeling import build_model

        cfg = self.config
        load = str(resume_dir) if resume_dir else cfg.load_model_path
        scratch_tokenizer = None
        if cfg.init == "scratch" and not load and self.dist.enabled:
            scratch_tokenizer = self._shared_scratch_tokenizer(first_records)
        # reinit_markers applies to the starting weights, never to this run's own checkpoint
        built_cfg = cfg.model_copy(update={"load_model_path": load,
                                           "reinit_markers": cfg.reinit_markers and resume_dir is None})
        self.coconut = CoconutConfig(question_suffix=cfg.question_suffix, step_suffix=cfg.step_suffix,
                                     answer_prefix=cfg.answer_prefix, c_thought=max(1, cfg.c_thought),
                                     max_latent_stage=cfg.max_latent_stage, method=cfg.method,
                                     text_format=cfg.text_format, symbols=cfg.symbols,
                                     latent_feedback=({"type": "projection", "file": PROJECTION_FILE}
                                                      if cfg.latent_projection else {"type": "hidden"}))
        model, self.tokenizer, self.markers = build_model(built_cfg, first_records, self.coconut,
                                                          tokenizer=scratch_tokenizer)
        self.model = model.to(self.dist.device)
        latent = self.markers.latent if self.curriculum.feeds_thoughts else None
        weight = cfg.frontier_loss_weight if self.curriculum.feeds_thoughts else 0.0
        self.projection = self._projection(load) if cfg.latent_projection else None
        self.objective = D.wrap(D.Objective(self.model, latent, frontier_loss_weight=weight,
                                            projection=self.projection), self.dist, cfg.parallel)
        self.session = EvalSession(self)

    def _projection(self, load: str | None):
        """CODI's prj for ``latent_projection``: the starting checkpoint's when it has one, else
        new (PyTorch's default initialisation, seeded by the run's seed)."""
        from engine.feedback import LatentProjection

        d = self.model.get_input_embeddings().weight.shape[1]
        if load and (Path(load) / PROJECTION_FILE).is_file():
            log.warning("latent projection from %s", Path(load) / PROJECTION_FILE)
            module = LatentProjection.load(Path(load) / PROJECTION_FILE, d)
        else:
            torch.manual_seed(self.config.seed)
            module = LatentProjection(d, self.config.latent_projection_size or d,
                                      layer_norm=self.config.latent_projection_layer_norm)
        return module.to(self.dist.device)

    def _shared_scratch_tokenizer(self, records: list):
        """Under torchrun, rank 0 trains the tokenizer and every rank loads that one."""
        from engine.checkpoint import load_tokenizer
        from engine.tiny import train_tokenizer
        from engine.train.modeling import record_texts

        path = self.run_dir / "tokenizer_init"
        if self.dist.main:
            train_tokenizer(record_texts(records, self.config), vocab_size=self.config.tokenizer_vocab_size,
                            bos=self.config.tokenizer_bos).save_pretrained(path)
        D.barrier(self.dist)
        return load_tokenizer(path)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        self.steps_since_reset = 0
        return torch.optim.AdamW(self.objective.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 betas=tuple(cfg.adam_betas))

    def _lr(self, step: int, total: int) -> float:
        cfg = self.config
        lr = cfg.lr
        if cfg.lr_schedule == "cosine" and total > 0:
            progress = min(1.0, step / total)
            lr *= cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.warmup_steps:
            lr *= min(1.0, (self.steps_since_reset + 1) / cfg.warmup_steps)
        return lr

    def optimizer_state(self) -> dict:
        if self.dist.enabled and self.config.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.objective, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        if self.dist.enabled and self.config.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.objective, self.optimizer, state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state)

    # ------------------------------------------------------------------ loop

    def run(self) -> dict:
        cfg = self.config
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        start, resume_dir, resumed = self._resume_point()
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(_dump_yaml(cfg.model_dump()))
        val = self.val_records()
        self._build(start, resume_dir, self.records(start))
        self.optimizer = self._new_optimizer()
        self.global_step = 0
        self.best = (-1.0, 0)
        self.best_stage = 0         # best/ is the best of the latest stage reached
        if resumed:
            self.global_step, self.best = resumed["global_step"], (resumed["best_accuracy"], resumed["best_epoch"])
            self.best_stage = resumed.get("best_stage", 0)
            self.steps_since_reset = resumed.get("steps_since_reset", 0)
            if self.dist.main:
                truncate_after(self.log.path, start)
            payload = S.load_optimizer(resume_dir, 0, sharded=False)
            if payload is not None and not self._resets(start):
                self.load_optimizer_state(payload["optimizer"])
                torch.set_rng_state(payload["rng"])
        self.thought_scale = (resumed or {}).get("thought_scale", self._loaded_thought_scale())
        for epoch in range(start, cfg.num_epochs):
            if epoch > start and self._resets(epoch):
                self.optimizer = self._new_optimizer()
            if (cfg.rescale_thoughts and self.curriculum.feeds_thoughts and self.thought_scale is None
                    and self.curriculum.stage(epoch) >= 1):
                self._rescale_thoughts(epoch)
            self._train_epoch(epoch)
        summary = {"epochs": cfg.num_epochs, "best_accuracy": self.best[0], "best_epoch": self.best[1],
                   "method": cfg.method, "run_dir": str(self.run_dir)}
        if cfg.stop_classifier and self.dist.main and self.curriculum.feeds_thoughts:
            summary["stop_classifier"] = self.session.fit_stop_classifier(cfg.num_epochs, val)
        if self.dist.enabled and self.config.parallel == "ddp":
            summary["rank_checksums"] = self._rank_checksums()
        self.log.write("summary", **summary)
        D.barrier(self.dist)
        D.cleanup(self.dist)
        return summary if self.dist.main else None

    def _loaded_thought_scale(self) -> float | None:
        """The scale already applied to a checkpoint we start from (its coconut.json)."""
        load = self.config.load_model_path
        if not load or not Path(load).is_dir() or not (Path(load) / "coconut.json").is_file():
            return None
        return (CoconutConfig.read(load).training or {}).get("thought_scale")

    def _rescale_thoughts(self, epoch: int) -> None:
        from engine.train.modeling import rescale_thoughts

        if self.dist.enabled and self.config.parallel == "fsdp":
            raise ValueError("rescale_thoughts is not supported with parallel: fsdp (use ddp)")
        sample = tokenize_records(self.tokenizer, self.records(epoch)[:64], self.markers.eos,
                                  self.config.question_suffix, self.config.step_suffix, self.config.answer_prefix)
        batch = collate([self.curriculum.build(t, 0, self.markers) for t in sample], self.markers.pad)
        model = D.unwrap(self.objective).model
        self.thought_scale = rescale_thoughts(model, batch["input_ids"].to(self.dist.device),
                                              batch["attention_mask"].to(self.dist.device))
        self.optimizer = self._new_optimizer()
        self.log.write("rescale_thoughts", epoch=epoch + 1, thought_scale=self.thought_scale)
        log.info("epoch %d: continuous thoughts rescaled by %.4f (final norm x alpha, LM head / alpha)",
                 epoch + 1, self.thought_scale)

    def _rank_checksums(self) -> list[float]:
        """Every rank's sum of its parameters: DDP replicas must agree exactly."""
        import torch.distributed as dist

        mine = float(sum(p.detach().double().sum() for p in self.model.parameters()))
        gathered: list = [None] * self.dist.world
        dist.all_gather_object(gathered, mine)
        return gathered

    def _resets(self, epoch: int) -> bool:
        policy = self.config.reset_policy
        if policy == "epoch":
            return True
        if policy == "stage":   # past max_latent_stage + 1 the layout no longer changes: no reset
            last = self.curriculum.max_latent_stage + 1
            return epoch > 0 and min(self.curriculum.stage(epoch), last) != min(self.curriculum.stage(epoch - 1), last)
        return False

    def _steps_per_epoch(self, n: int) -> int:
        per_rank = math.ceil(n / self.dist.world)
        return math.ceil(math.ceil(per_rank / self.config.batch_size_training) / self.config.gradient_accumulation_steps)

    def _train_epoch(self, epoch: int) -> None:
        if self.config.teacher_thoughts_epochs or self.config.teacher_anneal_epochs:
            p = teacher_probability(self.config, epoch)
            D.unwrap(self.objective).teacher_probability = p
            D.unwrap(self.objective).teacher_rng = random.Random(f"{self.config.seed}/teacher/{epoch}")
            log.info("epoch %d: a batch's chance of teacher-forced thoughts: %.2f", epoch + 1, p)
        from torch.utils.data.distributed import DistributedSampler
        from tqdm import tqdm

        cfg, dev = self.config, self.dist.device
        stage = self.curriculum.stage(epoch)
        records = self.records(epoch)
        tokenized = tokenize_records(self.tokenizer, records, self.markers.eos, cfg.question_suffix,
                                     cfg.step_suffix, cfg.answer_prefix)
        if cfg.frontier_loss_weight > 0 and self.curriculum.feeds_thoughts:   # frontier targets per thought
            from dataclasses import replace

            depth = cfg.max_latent_stage * max(1, cfg.c_thought)
            tokenized = [replace(t, frontier=frontier_token_ids(self.tokenizer, r.question, depth, self._frontier_words,
                                                                  within=cfg.frontier_within))
                         for t, r in zip(tokenized, records)]
        sampler = DistributedSampler(range(len(tokenized)), num_replicas=self.dist.world, rank=self.dist.rank,
                                     shuffle=True, seed=cfg.seed)
        sampler.set_epoch(epoch)
        order = list(sampler)
        rng = random.Random(f"{cfg.seed}/{epoch}/{self.dist.rank}")
        bs, accum = cfg.batch_size_training, cfg.gradient_accumulation_steps
        if cfg.group_by_length:
            order = _group_by_length(order, [len(t.question) for t in tokenized], bs, rng)
        batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        total_steps = self._steps_per_epoch(len(tokenized)) * cfg.num_epochs
        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.num_epochs} stage {stage}",
                   disable=not self.dist.main, dynamic_ncols=True, leave=False)
        self.objective.train()
        losses, seen, started, ema = [], 0, time.perf_counter(), None
        for i, idx in enumerate(batches):
            samples = [self.curriculum.build(tokenized[j], stage, self.markers, rng) for j in idx]
            batch = {k: v.to(dev) for k, v in collate(samples, self.markers.pad).items()}
            last_micro = (i + 1) % accum == 0 or i == len(batches) - 1
            sync = self.objective.no_sync() if (self.dist.enabled and not last_micro
                                                 and hasattr(self.objective, "no_sync")) else _null()
            with sync:
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss = self.objective(batch)
                (loss / accum).backward()
            losses.append(float(loss.detach()))
            seen += len(idx)
            if last_micro:
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.objective.parameters(), cfg.max_grad_norm)
                lr = self._lr(self.global_step, total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                self.steps_since_reset += 1
                if self.global_step % 25 == 0:
                    extra = {}
                    aux = getattr(D.unwrap(self.objective), "last_frontier_loss", None)
                    if aux is not None:
                        extra["frontier_loss"] = aux
                    self.log.write("step", epoch=epoch + 1, step=self.global_step, loss=losses[-1], lr=lr, **extra)
            ema = losses[-1] if ema is None else 0.95 * ema + 0.05 * losses[-1]
            rate = seen * self.dist.world / max(1e-9, time.perf_counter() - started)
            bar.set_postfix(loss=f"{ema:.4f}", samples_s=f"{rate:.0f}")
            bar.update(1)
        bar.close()
        seconds = time.perf_counter() - started
        train_loss = D.mean_across(self.dist, sum(losses) / max(1, len(losses)), len(losses))
        D.barrier(self.dist)
        self.session.end_of_epoch(epoch, stage, train_loss, seconds, seen * self.dist.world)


def _group_by_length(order: list[int], lengths: list[int], batch_size: int, rng: random.Random,
                     group_batches: int = 50) -> list[int]:
    """``order`` regrouped so that each batch holds samples of similar length: chunks of
    ``group_batches`` batches are sorted by length, cut into batches, and the batches are
    shuffled (deterministic for a given ``rng``, so a resumed run sees the same order)."""
    chunk = batch_size * group_batches
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return [i for b in batches for i in b]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _dump_yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
