"""What happens on rank 0 between epochs: validation, checkpoints, metrics, stop classifier.

``EvalSession(trainer)`` is called by every rank at the end of each epoch
(``end_of_epoch``): under FSDP the full weights and optimizer state are gathered
collectively first; then rank 0 computes the validation loss at the epoch's stage,
runs the engine on the validation questions (greedy, the checkpoint's default latent
policy, i.e. the thoughts of the epoch's stage), writes ``checkpoint_<epoch>`` (and
``best/``), the metrics line and the plot. The engine runs on the in-memory model,
wrapped as a ``Checkpoint``, so evaluation needs no disk round trip. This module knows
the order of those chores, not how any of them works inside.
"""

from __future__ import annotations

import logging

import torch

from engine.checkpoint import Checkpoint, MarkerIds, StopClassifierSpec, model_max_len, save_checkpoint
from engine.train import distributed as D
from engine.train import state as S
from engine.train.evaluate import evaluate
from engine.train.layout import collate, tokenize_records

log = logging.getLogger(__name__)


class EvalSession:
    def __init__(self, trainer):
        self.t = trainer
        self.config = trainer.config

    # ------------------------------------------------------------------ helpers

    def servable_model(self, full_state: dict | None):
        """The language model as one module: the live one, or (FSDP) a full CPU copy."""
        if full_state is None:
            return D.unwrap(self.t.objective).model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(self.t.model.config)
        model.load_state_dict(full_state)
        model.generation_config = self.t.model.generation_config
        return model

    def engine(self, model, coconut, stop_classifier=None):
        from engine.config import EngineConfig
        from engine.sync_engine import Engine

        m = self.t.markers
        projection = self.t.projection.eval() if self.t.projection is not None else None
        checkpoint = Checkpoint(path=self.t.run_dir, model=model.eval(), tokenizer=self.t.tokenizer, config=coconut,
                                markers=MarkerIds(bot=m.bot, eot=m.eot, latent=m.latent, eos=(m.eos,), pad=m.pad),
                                stop_classifier=stop_classifier, max_seq_len=model_max_len(model.config),
                                name=self.t.run_dir.name, projection=projection)
        device = next(model.parameters()).device
        return Engine(checkpoint, EngineConfig(device=str(device), max_batch_size=self.config.val_batch_size))

    @torch.no_grad()
    def val_loss(self, model, tokenized, stage: int) -> float:
        latent = self.t.markers.latent if self.t.curriculum.feeds_thoughts else None
        objective = D.Objective(model, latent, projection=self.t.projection).eval()
        device = next(model.parameters()).device
        total, count = 0.0, 0
        bs = self.config.batch_size_training
        for start in range(0, len(tokenized), bs):
            samples = [self.t.curriculum.build(r, stage, self.t.markers) for r in tokenized[start:start + bs]]
            batch = {k: v.to(device) for k, v in collate(samples, self.t.markers.pad).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
                total += float(objective(batch)) * len(samples)
            count += len(samples)
        return total / max(1, count)

    # ------------------------------------------------------------------ per epoch

    def end_of_epoch(self, epoch: int, stage: int, train_loss: float, seconds: float, samples: int) -> None:
        t, cfg = self.t, self.config
        sharded = t.dist.enabled and cfg.parallel == "fsdp"
        full = D.full_state_dict(t.objective, t.dist, cfg.parallel) if sharded else None
        optimizer_state = t.optimizer_state() if self.t.saving else None
        if t.dist.main:
            self._main_end_of_epoch(epoch, stage, train_loss, seconds, samples, full, optimizer_state)
        D.barrier(t.dist)

    def _main_end_of_epoch(self, epoch, stage, train_loss, seconds, samples, full, optimizer_state) -> None:
        t, cfg = self.t, self.config
        model = self.servable_model(full)
        was_training = model.training
        done = epoch + 1
        row = {"epoch": done, "stage": stage, "train_loss": train_loss, "train_seconds": round(seconds, 2),
               "samples": samples, "samples_per_s": round(samples / max(seconds, 1e-9), 1),
               "lr": t.optimizer.param_groups[0]["lr"], "global_step": t.global_step}
        val = t.val_records_cache if hasattr(t, "val_records_cache") else None
        if val is None:
            val = t.val_records_cache = t.val_records()
            t.val_tokenized = tokenize_records(t.tokenizer, val, t.markers.eos, cfg.question_suffix,
                                               cfg.step_suffix, cfg.answer_prefix)
        model.eval()
        row["val_loss"] = self.val_loss(model, t.val_tokenized, stage)
        coconut = t.coconut.model_copy(update={
            "num_thoughts": t.curriculum.eval_thoughts(stage),
            "training": {"epoch": done, "stage": stage, "num_epochs": cfg.num_epochs, "method": cfg.method,
                         "train_loss": train_loss, "thought_scale": t.thought_scale,
                         "config": cfg.model_dump(mode="json")}})
        if done % cfg.val_every == 0 or done == cfg.num_epochs:
            report = evaluate(self.engine(model, coconut), val, max_tokens=cfg.val_max_tokens)
            row.update(val_accuracy=report.accuracy, val_mean_tokens=report.mean_generated_tokens,
                       val_mean_thoughts=report.mean_thoughts, val_seconds=round(report.seconds, 2),
                       val_examples=report.examples[:2])
            coconut.training["val_accuracy"] = report.accuracy
        stage_reached = min(stage, cfg.max_latent_stage)
        improved = S.is_new_best(row.get("val_accuracy"), stage_reached, t.best[0], t.best_stage)
        if improved:
            t.best, t.best_stage = (row["val_accuracy"], done), stage_reached
        if t.saving and (improved or not cfg.save_only_improve):
            directory = save_checkpoint(S.checkpoint_dir(t.run_dir, done), model, t.tokenizer, coconut)
            if t.projection is not None:
                from engine.feedback import PROJECTION_FILE

                t.projection.save(directory / PROJECTION_FILE)
            S.save_training_state(directory, {
                "epoch": done, "stage": stage, "global_step": t.global_step,
                "steps_since_reset": t.steps_since_reset, "best_accuracy": t.best[0], "best_epoch": t.best[1],
                "best_stage": t.best_stage, "thought_scale": t.thought_scale,
                "method": cfg.method, "world": t.dist.world})
            if optimizer_state is not None:
                S.save_optimizer(directory, optimizer_state)
            if improved:
                S.copy_as_best(directory, t.run_dir)
            S.prune(t.run_dir, cfg.keep_last_checkpoints, cfg.keep_every)
        t.log.write("epoch", **row)
        if cfg.plot:
            from engine.train.metrics import plot_run
            plot_run(t.run_dir, f"{cfg.name or t.run_dir.name} ({cfg.method})")
        acc = row.get("val_accuracy")
        log.info("epoch %d stage %d: train loss %.4f, val loss %.4f, val accuracy %s", done, stage, train_loss,
                 row["val_loss"], "-" if acc is None else f"{acc:.3f}")
        model.train(was_training)

    # ------------------------------------------------------------------ after training

    def fit_stop_classifier(self, epoch: int, val: list) -> dict:
        from engine.params import LatentPolicy
        from engine.train.stop_head import stop_features, train_stop_head

        t, cfg = self.t, self.config
        model = D.unwrap(t.objective).model.eval()
        records = t.records(epoch)[:cfg.stop_classifier_samples]   # a fresh epoch for generator specs
        tok = lambda rs: tokenize_records(t.tokenizer, rs, t.markers.eos, cfg.question_suffix,  # noqa: E731
                                          cfg.step_suffix, cfg.answer_prefix)
        train = stop_features(model, tok(records), t.curriculum, t.markers, cfg.batch_size_training, cfg.bf16,
                              projection=t.projection)
        held = stop_features(model, tok(val), t.curriculum, t.markers, cfg.batch_size_training, cfg.bf16,
                             projection=t.projection)
        head, report = train_stop_head(train, held, cfg.stop_classifier_hidden, cfg.stop_classifier_epochs,
                                       cfg.stop_classifier_lr, cfg.stop_classifier_threshold, cfg.seed)
        max_thoughts = max(1, cfg.max_latent_stage * max(1, cfg.c_thought))
        spec = StopClassifierSpec(path="stop_classifier.safetensors", threshold=cfg.stop_classifier_threshold,
                                  max_thoughts=max_thoughts, hidden_size=cfg.stop_classifier_hidden,
                                  accuracy=report.accuracy)
        stage = t.curriculum.stage(cfg.num_epochs - 1)
        coconut = t.coconut.model_copy(update={"num_thoughts": t.curriculum.eval_thoughts(stage),
                                               "stop_classifier": spec})
        engine = self.engine(model, coconut, head.to(next(model.parameters()).device).eval())
        fixed = evaluate(engine, val, max_tokens=cfg.val_max_tokens)
        auto = evaluate(engine, val, LatentPolicy(mode="auto"), max_tokens=cfg.val_max_tokens)
        result = {"accuracy": report.accuracy, "exact_stop": report.exact_stop,
                  "train_accuracy": report.train_accuracy, "positives": report.positives,
                  "negatives": report.negatives,
                  "fixed": {"accuracy": fixed.accuracy, "mean_thoughts": fixed.mean_thoughts},
                  "auto": {"accuracy": auto.accuracy, "mean_thoughts": auto.mean_thoughts}}
        if t.saving:
            targets = [S.checkpoint_dir(t.run_dir, cfg.num_epochs)]
            if t.best[1] == cfg.num_epochs:
                targets.append(t.run_dir / "best")
            for directory in targets:
                if directory.is_dir():
                    self._attach_head(directory, head, spec, result)
        t.log.write("stop_classifier", epoch=cfg.num_epochs, **result)
        return result

    @staticmethod
    def _attach_head(directory, head, spec: StopClassifierSpec, result: dict) -> None:
        from engine.checkpoint import CoconutConfig

        coconut = CoconutConfig.read(directory)
        training = dict(coconut.training or {})
        training["stop_classifier"] = result
        coconut = coconut.model_copy(update={"stop_classifier": spec, "training": training})
        head.save(directory / spec.path)
        coconut.write(directory)
