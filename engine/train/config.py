"""The trainer's configuration: one typed object, built once from YAML and ``--set`` overrides.

The reference implementation's options keep their reference names and meanings
(``c_thought``, ``epochs_per_stage``, ``max_latent_stage``, ``pad_latent_to_max``,
``uniform_prob``, ``reset_optimizer``, ``lr``, ``weight_decay``, ``batch_size_training``,
``gradient_accumulation_steps``, ``num_epochs``, ``seed``, ``bf16``, ``resume``,
``train_path``, ``val_path``, ``save_path``, ``name``, ``model_id``, ``load_model_path``,
``only_eval``, ``debug``, ``save_only_improve``, ``project`` and the method flags
``coconut``, ``cot``, ``no_cot``, ``no_thoughts``), so the reference's own YAML files load
unchanged. Keys that only steer the reference's infrastructure (``local``, ``local_path``,
``special_token``, ``grpo``) are accepted and ignored; any other unknown key is an error
naming it. The method is resolved once (``TrainConfig.method``): exactly one of ``cot``,
``no_cot``, ``no_thoughts``, ``pause_as_thought``, ``no_curriculum`` may be set (the last
also with ``coconut``); with none of them set, ``coconut: true`` is COCONUT and
``coconut: false`` trains the placeholders as plain tokens, which is what the reference
code does then, i.e. ``pause_as_thought``.

Our additions (no reference name) are documented field by field below. This module
knows nothing of models or data beyond names and numbers.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: Reference keys that steer only its infrastructure (wandb, cluster paths, forks' extras).
IGNORED_REFERENCE_KEYS = frozenset({"local", "local_path", "special_token", "grpo"})
METHOD_FLAGS = ("cot", "no_cot", "no_thoughts", "pause_as_thought", "no_curriculum")


class ConfigError(ValueError):
    """A training configuration is invalid; the message names the key and what was expected."""


def _none_string(value):
    """The reference writes ``load_model_path: None`` (a string) for "no checkpoint"."""
    return None if isinstance(value, str) and value.strip() in ("None", "none", "null", "") else value


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # ---------------------------------------------------------------- reference: run
    project: str = "coconut"
    name: str | None = Field(None, description="run name; the run directory is save_path/name (as the reference)")
    save_path: str = "runs/train"
    only_eval: bool = Field(False, description="evaluate load_model_path on val_path, no training")
    debug: bool = Field(False, description="small subsets (5000 train, 32 val), no checkpoints")
    save_only_improve: bool = Field(False, description="keep an epoch's checkpoint only when validation improves")
    seed: int = 0
    resume: int = Field(0, ge=0, description="first epoch to run (skip earlier stages; load_model_path gives the weights)")
    # ---------------------------------------------------------------- reference: method
    coconut: bool = True
    cot: bool = False
    no_cot: bool = False
    no_thoughts: bool = False
    pause_as_thought: bool = False
    no_curriculum: bool = False
    # ---------------------------------------------------------------- reference: curriculum
    c_thought: int = Field(1, ge=0)
    epochs_per_stage: int = Field(5, ge=1)
    max_latent_stage: int = Field(6, ge=0)
    pad_latent_to_max: bool = True
    uniform_prob: float = Field(0.0, ge=0.0, le=1.0)
    # ---------------------------------------------------------------- reference: data and model
    train_path: str | None = Field(None, description="data file, or a generator spec such as prosqa:mini?n=6000")
    val_path: str | None = None
    model_id: str | None = Field(None, description="a local model directory (init: pretrained)")
    load_model_path: str | None = Field(None, description="our checkpoint directory, or a reference state dict file")
    # ---------------------------------------------------------------- reference: optimisation
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    batch_size_training: int = Field(32, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_epochs: int = Field(50, ge=1)
    reset_optimizer: bool | Literal["stage", "epoch"] = Field(
        True, description="true/'stage': a new AdamW when the stage changes; 'epoch': every epoch "
                          "(what the reference code does); false: never")
    bf16: bool = Field(False, description="bf16 autocast for forward/backward (weights stay float32)")
    group_by_length: bool = Field(
        False, description="batch samples of similar question length together (shuffled groups of 50 "
                           "batches, sorted within; the batch order is shuffled): less padding, and for "
                           "COCONUT less shifting to align thoughts")
    attn_implementation: Literal["eager", "sdpa"] | None = Field(
        None, description="attention kernel for training (None: transformers' default); eager with bf16 "
                          "autocast is 1.3x sdpa for small models on CPU")

    # ================================================================ our additions
    init: Literal["pretrained", "scratch"] = Field(
        "pretrained", description="pretrained: model_id (or load_model_path) directory; scratch: "
                                  "a model built from `model` and a tokenizer trained on the training data")
    model: dict[str, Any] | None = Field(
        None, description="init scratch: transformers config fields, with model_type (e.g. gpt2)")
    tokenizer_vocab_size: int = Field(512, ge=64, description="init scratch: BPE vocabulary size")
    init_embedding_std: float | None = Field(
        None, gt=0, description="init scratch: std of the input embeddings (null: the model's initializer_range)")
    init_final_norm: float | None = Field(
        None, gt=0, description="init scratch: initial weight of the final norm; with init_embedding_std it sets "
                                "how large a continuous thought is relative to a token embedding")
    tokenizer_bos: bool = Field(False, description="init scratch: prepend <s> to every text (like Llama)")
    marker_init_token: str = Field("<<", description="new marker embeddings copy this token's (falls back to EOS)")
    reinit_markers: bool = Field(
        False, description="copy marker_init_token's embedding into all three markers when the model is built, "
                           "even if they exist (a curriculum starting from a CoT checkpoint of a scratch "
                           "tokenizer, whose markers were never trained)")
    rescale_thoughts: bool = Field(
        False, description="entering the first latent stage, scale the final norm so thoughts are as large as "
                           "token embeddings, and the untied LM head inversely (logits unchanged)")
    text_format: Literal["reference", "compact"] = Field(
        "reference", description="compact: ProsQA facts as 's t |', one word per node (engine.data.compact); "
                                 "the model must then be asked compact questions")
    symbols: int = Field(0, ge=0, description="text_format compact: rename each question's names to K symbols "
                                             "(naa, nab, ...), a random assignment per sample (engine.data.symbols); 0: off")
    compact_steps: Literal["facts", "path"] = Field(
        "facts", description="text_format compact: a reasoning step as its fact ('s t |') or as the one node "
                             "it reaches (' t': the steps spell the path, one node per step)")
    question_suffix: str = "\n"
    step_suffix: str = "\n"
    answer_prefix: str = "### "
    warmup_steps: int = Field(0, ge=0, description="linear warmup (optimizer steps) after every optimizer (re)start")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="cosine: decays over the whole run")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine floor as a fraction of lr")
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(None, gt=0, description="clip the gradient norm (null: no clipping)")
    val_every: int = Field(1, ge=1, description="evaluate every N epochs (and always after the last)")
    val_max_tokens: int = Field(128, ge=1, description="answer tokens generated at evaluation (reference: 128)")
    val_batch_size: int = Field(64, ge=1, description="engine batch size at evaluation")
    max_val_samples: int | None = Field(None, ge=1, description="evaluate on the first N validation records")
    keep_last_checkpoints: int = Field(0, ge=0, description="keep only the newest N epoch checkpoints (0: all)")
    keep_every: int = Field(0, ge=0, description="with keep_last_checkpoints: also keep every N-th epoch's")
    plot: bool = Field(True, description="write metrics.png after every epoch")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (null: torch's default)")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="under torchrun: DDP, or FSDP (sharded)")
    frontier_loss_weight: float = Field(
        0.0, ge=0.0, description="coconut: add weight x the cross-entropy of the LM head's output at <bot> / "
                                 "placeholder j against the uniform distribution over the ProsQA graph nodes at "
                                 "BFS distance j from the asked name (within j with frontier_within; Zhu et al. "
                                 "2025's frontier target); needs ProsQA questions; 0: off")
    teacher_thoughts_epochs: int = Field(0, ge=0, description="coconut with frontier targets: the first epochs of this "
                                         "run in which every batch gets teacher-forced thoughts (thought j + 1 = the "
                                         "mean embedding of frontier j) instead of its own (engine.train.loss)")
    teacher_anneal_epochs: int = Field(0, ge=0, description="then the chance that a batch is teacher-forced falls "
                                       "linearly to 0 over this many epochs")
    latent_projection: bool = Field(False, description="coconut: learn CODI's projection prj(h) = Dropout, Linear(d, p), "
                                    "GELU, Linear(p, d), LayerNorm(d) as the thought fed back instead of h itself, "
                                    "with the curriculum's loss (saved as latent_projection.safetensors; served with "
                                    "latent_feedback type projection)")
    latent_projection_size: int | None = Field(None, ge=1, description="its p (null: the model's hidden size)")
    latent_projection_layer_norm: bool = Field(True, description="its final LayerNorm (CODI's default; prj_no_ln: false)")
    frontier_within: bool = Field(False, description="frontier j = the nodes within j hops (cumulative, the breadth-first set) "
                                  "instead of exactly j")
    # ---------------------------------------------------------------- stop classifier (after the last stage)
    stop_classifier: bool = Field(False, description="train a stop head with the LM frozen after training")
    stop_classifier_hidden: int = Field(0, ge=0, description="MLP width (0: a linear head)")
    stop_classifier_epochs: int = Field(200, ge=1, description="full-batch optimisation steps")
    stop_classifier_lr: float = Field(1e-2, gt=0)
    stop_classifier_samples: int = Field(2000, ge=1, description="training records used for its features")
    stop_classifier_threshold: float = Field(0.5, ge=0.0, le=1.0)

    _source: str = "defaults"

    @field_validator("load_model_path", "model_id", "train_path", "val_path", "name", mode="before")
    @classmethod
    def _none(cls, value):
        return _none_string(value)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        set_flags = [f for f in METHOD_FLAGS if getattr(self, f)]
        if len(set_flags) > 1:
            raise ValueError(f"method flags {set_flags} are all true: set at most one of {list(METHOD_FLAGS)}")
        if self.coconut and set_flags and set_flags[0] != "no_curriculum":
            raise ValueError(f"coconut: true conflicts with {set_flags[0]}: true (set coconut: false)")
        if self.method in ("coconut", "no_curriculum", "pause_as_thought") and self.c_thought < 1:
            raise ValueError(f"c_thought={self.c_thought} is invalid for method {self.method}: expected >= 1")
        if self.init == "scratch" and not self.model:
            raise ValueError("init: scratch needs `model`, a dict of transformers config fields with "
                             "model_type (e.g. {model_type: gpt2, n_embd: 128, n_layer: 2, n_head: 4})")
        if self.latent_projection and self.method not in ("coconut", "no_curriculum"):
            raise ValueError(f"latent_projection: true needs thoughts fed back (coconut), not method {self.method}")
        if self.latent_projection and self.parallel == "fsdp":
            raise ValueError("latent_projection: true is not supported with parallel: fsdp (use ddp)")
        if self.model is not None and "model_type" not in self.model:
            raise ValueError(f"model: {self.model} has no model_type (e.g. gpt2, llama)")
        return self

    @property
    def method(self) -> str:
        for flag in METHOD_FLAGS:
            if getattr(self, flag):
                return flag
        return "coconut" if self.coconut else "pause_as_thought"

    @property
    def run_dir(self) -> Path:
        return Path(self.save_path) / self.name if self.name else Path(self.save_path)

    @property
    def reset_policy(self) -> str:
        """'stage', 'epoch' or 'never'."""
        if self.reset_optimizer is True:
            return "stage"
        return "never" if self.reset_optimizer is False else self.reset_optimizer

    def require(self, *keys: str) -> None:
        """Raise a ConfigError naming the first of ``keys`` that is not set."""
        for key in keys:
            if getattr(self, key) in (None, ""):
                raise ConfigError(f"config key '{key}' is required here ({self._source})")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["lr=3e-4", "model.n_layer=4"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected key=value (e.g. --set lr=3e-4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        target = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {pair!r}: {part!r} is not a mapping")
        target[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate a mapping; errors name the key and what was expected."""
    known = set(TrainConfig.model_fields)
    data = {k: v for k, v in raw.items() if k not in IGNORED_REFERENCE_KEYS}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown config key '{key}'{hint} (see engine/train/config.py "
                              f"for the accepted keys)")
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"key '{'.'.join(map(str, err['loc'])) or '(config)'}': {err['msg']}"
                             + (f" (got {err['input']!r})" if err["loc"] and not isinstance(err["input"], dict) else "")
                             for err in e.errors())
        raise ConfigError(f"{source}: {problems}") from None
    config._source = source
    return config


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML file (or start from defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(loaded).__name__}")
        raw, source = loaded, str(path)
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
        source += " + --set"
    return build_config(raw, source)
