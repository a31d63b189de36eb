"""The self-describing checkpoint: a Hugging Face model + tokenizer + ``coconut.json``.

Layout of a checkpoint directory::

    config.json, model.safetensors (or sharded *.safetensors + index)   save_pretrained
    tokenizer.json, tokenizer_config.json, ...                          save_pretrained
    coconut.json                                                        CoconutConfig
    stop_classifier.safetensors                                         optional

``load_checkpoint`` validates the directory and names the file or field that is wrong.
Weights load from safetensors only: nothing is ever unpickled. This module knows the
format; it knows nothing of decoding, scheduling or training loops.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.errors import CheckpointError
from engine.params import (DEFAULT_ENTROPY_THRESHOLD, DEFAULT_PATIENCE, MAX_ENTROPY_THRESHOLD,
                           MAX_THOUGHTS_CEILING, LatentFeedback, LatentPolicy, ResolvedLatent)

log = logging.getLogger(__name__)

COCONUT_JSON = "coconut.json"
FORMAT_VERSION = 1
METHODS = ("coconut", "cot", "no_cot", "no_thoughts", "pause_as_thought", "no_curriculum")


class StopClassifierSpec(BaseModel):
    """Where the stop classifier's weights are and how to use it by default."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="safetensors file, relative to the checkpoint directory")
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    max_thoughts: int = Field(16, ge=1, le=1024)
    hidden_size: int = Field(0, ge=0, description="width of the MLP's hidden layer; 0 = linear head")
    accuracy: float | None = Field(None, description="held-out accuracy measured by the trainer")


class FeedbackSpec(BaseModel):
    """``coconut.json: latent_feedback``: what a continuous thought feeds back
    (``engine.params.LatentFeedback``; ``engine.feedback`` computes it)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["hidden", "projection", "soft_embedding"] = "hidden"
    file: str | None = Field(None, description="projection: the safetensors file of prj's state dict, "
                                              "relative to the checkpoint directory")
    temperature: float | None = Field(None, gt=0, le=100)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _fields_of_type(self) -> "FeedbackSpec":
        if self.type == "projection" and not self.file:
            raise ValueError("type 'projection' needs 'file' (e.g. latent_projection.safetensors)")
        self.feedback()       # the same checks as a request's
        return self

    def feedback(self) -> LatentFeedback:
        return LatentFeedback(self.type, self.temperature, self.top_k, self.top_p, self.file)


class CoconutConfig(BaseModel):
    """Contents of ``coconut.json``: the markers, the prompt format and latent defaults."""

    model_config = ConfigDict(extra="allow")

    format_version: int = FORMAT_VERSION
    bot_token: str = "<|start-latent|>"
    eot_token: str = "<|end-latent|>"
    latent_token: str = "<|latent|>"
    question_suffix: str = "\n"
    step_suffix: str = "\n"
    answer_prefix: str = "### "
    num_thoughts: int = Field(6, ge=0, le=1024)
    c_thought: int = Field(1, ge=1)
    max_latent_stage: int = Field(6, ge=0)
    method: Literal[METHODS] = "coconut"  # type: ignore[valid-type]
    text_format: Literal["reference", "compact"] = Field(
        "reference", description="compact: the model reads ProsQA facts as 's t |' (engine.data.compact); "
                                 "questions in the reference sentences are rewritten before tokenizing")
    symbols: int = Field(0, ge=0, description="compact models trained with per-question symbols "
                                             "(engine.data.symbols): each question's names are renamed to these "
                                             "many symbols before tokenizing, and the output is renamed back")
    use_chat_template: bool = Field(False, description="render a /v1/reason question as one user message "
                                    "through the tokenizer's chat template (a plain model with a template: true)")
    stop_classifier: StopClassifierSpec | None = None
    latent_feedback: FeedbackSpec = Field(default_factory=FeedbackSpec,
                                          description="what a thought feeds back (default: the hidden state)")
    latent_mode: Literal["fixed", "auto", "entropy", "token", "none"] | None = Field(
        None, description="the latent mode of a request that names none (None: fixed; CoT and no-CoT "
                          "models answer without markers; none: no thoughts unless a request asks)")
    max_thoughts: int = Field(16, ge=1, le=MAX_THOUGHTS_CEILING,
                              description="the cap of the entropy and token modes")
    entropy_threshold: float = Field(DEFAULT_ENTROPY_THRESHOLD, ge=0, le=MAX_ENTROPY_THRESHOLD,
                                     description="the entropy mode's threshold, nats")
    patience: int = Field(DEFAULT_PATIENCE, ge=1, le=MAX_THOUGHTS_CEILING,
                          description="the entropy mode: thoughts in a row below the threshold")
    latent_prefix_tokens: list[str] = Field(default_factory=list,
                                            description="tokens between the question and <bot> (CODI: EOS)")
    latent_suffix_tokens: list[str] = Field(default_factory=list,
                                            description="tokens fed after <eot>, before the answer (CODI: EOS)")
    suppress_token_ids: list[int] = Field(default_factory=list,
                                          description="token ids the answer never picks (CODI: its last "
                                                      "vocabulary entry)")
    training: dict[str, Any] | None = Field(None, description="how the trainer produced it")

    @model_validator(mode="after")
    def _distinct_markers(self) -> "CoconutConfig":
        markers = [self.bot_token, self.eot_token, self.latent_token]
        if len(set(markers)) != 3 or not all(markers):
            raise ValueError(f"bot_token, eot_token and latent_token must be three distinct "
                             f"non-empty strings, got {markers}")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version} is not supported "
                             f"(this engine reads version {FORMAT_VERSION})")
        return self

    @property
    def default_mode(self) -> str:
        """``latent_mode`` when set; else CoT and no-CoT models answer without markers and
        every other method thinks a fixed number of thoughts."""
        if self.latent_mode is not None:
            return self.latent_mode
        return "none" if self.method in ("cot", "no_cot") else "fixed"

    def resolve(self, policy: LatentPolicy | None) -> ResolvedLatent:
        """Fill a request's latent policy with this checkpoint's defaults (the only place
        they are applied: an unset policy or mode takes ``default_mode``, unset counts,
        thresholds and feedback parameters the checkpoint's)."""
        if policy is None:
            policy = LatentPolicy(mode=None)
        mode = policy.mode
        if (mode == "auto" and policy.mode_inferred and policy.threshold is None
                and self.default_mode in ("entropy", "token")):
            mode = self.default_mode          # max_thoughts alone caps the checkpoint's own adaptive mode
        if mode is None:   # nothing that implies a mode was given (at most feedback, trace)
            mode = self.default_mode
            if mode == "none" and policy.feedback is not None:
                raise ValueError("latent.feedback needs a latent mode: this checkpoint answers without "
                                 "thoughts by default (set latent.mode)")
        if mode == "none":
            return ResolvedLatent(mode="none", thoughts=0, trace_top_k=0)
        pause = self.method == "pause_as_thought"
        feedback = self._feedback(policy.feedback, pause)
        common = dict(feed="pause" if pause else "hidden", trace_top_k=policy.trace_top_k, feedback=feedback)
        if mode == "fixed":
            n = self.num_thoughts if policy.thoughts is None else policy.thoughts
            return ResolvedLatent(mode="fixed", thoughts=n, **common)
        if pause:
            raise ValueError(f"latent mode {mode!r} is not available for pause_as_thought models "
                             f"(their thoughts are fixed inputs): use mode 'fixed'")
        if mode in ("entropy", "token"):
            return ResolvedLatent(
                mode=mode, thoughts=self.max_thoughts if policy.max_thoughts is None else policy.max_thoughts,
                entropy_threshold=(self.entropy_threshold if policy.entropy_threshold is None
                                   else float(policy.entropy_threshold)),
                patience=self.patience if policy.patience is None else policy.patience, **common)
        spec = self.stop_classifier
        if spec is None:
            raise ValueError("latent mode 'auto' needs a stop classifier, and this checkpoint "
                             "has none (coconut.json: stop_classifier is null); use mode "
                             "'fixed', 'entropy' or 'token', or train one with `engine train` "
                             "(stop classifier stage)")
        return ResolvedLatent(
            mode="auto", thoughts=spec.max_thoughts if policy.max_thoughts is None else policy.max_thoughts,
            threshold=spec.threshold if policy.threshold is None else policy.threshold, **common)

    def _feedback(self, asked: LatentFeedback | None, pause: bool) -> LatentFeedback:
        """The checkpoint's feedback operator, or the request's: ``hidden`` or
        ``soft_embedding`` on any checkpoint (soft parameters not given keep the
        checkpoint's when it is a soft one), ``projection`` only where the checkpoint has it."""
        own = self.latent_feedback.feedback()
        if asked is None:
            return own.resolved()
        if pause and asked.type != "hidden":
            raise ValueError("latent.feedback is not available for pause_as_thought models "
                             "(their thoughts are the latent token's embedding)")
        if asked.type == "projection":
            if own.type != "projection":
                raise ValueError("latent.feedback type 'projection' needs the checkpoint's learned "
                                 "projection, and this checkpoint has none (coconut.json: latent_feedback "
                                 f"is {own.type!r}); use 'hidden' or 'soft_embedding'")
            return own
        if asked.type == "soft_embedding" and own.type == "soft_embedding":
            asked = LatentFeedback("soft_embedding",
                                   *(own_value if value is None else value for value, own_value in
                                     ((asked.temperature, own.temperature), (asked.top_k, own.top_k),
                                      (asked.top_p, own.top_p))))
        return asked.resolved()

    @classmethod
    def read(cls, directory: str | Path, overrides: dict[str, Any] | None = None) -> "CoconutConfig":
        """``coconut.json`` of a checkpoint, with ``overrides`` on top; without the file,
        ``overrides`` alone (a plain Hugging Face model served as a latent reasoner)."""
        path = Path(directory) / COCONUT_JSON
        if not path.is_file() and overrides is None:
            raise CheckpointError(f"{directory}: missing {COCONUT_JSON} (not a COCONUT "
                                  f"checkpoint; see docs/checkpoints.md; a plain Hugging Face "
                                  f"model is served with --latent-feedback and the marker flags)")
        raw: Any = {}
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        raw = {**raw, **(overrides or {})}
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"field '{'.'.join(map(str, err['loc'])) or '(root)'}': {err['msg']}"
                                 for err in e.errors())
            raise CheckpointError(f"{path}: {problems}") from None

    def write(self, directory: str | Path) -> None:
        path = Path(directory) / COCONUT_JSON
        path.write_text(json.dumps(self.model_dump(exclude_none=False), indent=2) + "\n")


@dataclass
class MarkerIds:
    bot: int | None       # None: a plain language model without latent markers
    eot: int | None
    latent: int | None
    eos: tuple[int, ...]
    pad: int
    prefix: tuple[int, ...] = ()     # latent_prefix_tokens: between the question and <bot>
    suffix: tuple[int, ...] = ()     # latent_suffix_tokens: after <eot>, before the answer


@dataclass
class Checkpoint:
    """Everything the engine needs from a checkpoint directory, loaded and validated."""

    path: Path
    model: torch.nn.Module
    tokenizer: Any
    config: CoconutConfig
    markers: MarkerIds
    stop_classifier: torch.nn.Module | None
    max_seq_len: int
    name: str
    projection: torch.nn.Module | None = None    # latent_feedback type projection: prj


def _check_weights_are_safetensors(directory: Path) -> None:
    if any(directory.glob("*.safetensors")):
        return
    pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    hint = (f" (found {', '.join(pickled)}: pickled weights are never loaded; convert them "
            f"with `engine convert-reference` or save_pretrained(safe_serialization=True))"
            if pickled else "")
    raise CheckpointError(f"{directory}: no *.safetensors weights{hint}")


def token_id(tokenizer, token: str, field: str) -> int:
    """The id of a marker that must be exactly one token of the vocabulary."""
    ids = tokenizer.convert_tokens_to_ids([token])
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or ids[0] is None or (unk is not None and ids[0] == unk and token != tokenizer.unk_token):
        raise CheckpointError(f"coconut.json field '{field}': token {token!r} is not in the "
                              f"tokenizer's vocabulary (add it as a special token)")
    return int(ids[0])


def eos_ids(tokenizer, model) -> tuple[int, ...]:
    """End-of-sequence ids: the tokenizer's plus those of the model's generation config."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(int(i) for i in extra)
    return tuple(sorted(ids))


def model_max_len(config) -> int:
    for attr in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 20  # positions are not bounded by the architecture (e.g. ALiBi)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r} is invalid: expected one of float32, bfloat16, float16")
    return table[dtype]


TOKENIZER_JSON = "tokenizer.json"


def load_tokenizer(directory: str | Path):
    """The checkpoint's tokenizer, as it was saved.

    With a ``tokenizer.json``, that file is the tokenizer (its normalizer, pre-tokenizer,
    model, post-processor and decoder) and ``tokenizer_config.json`` gives the special
    tokens: both are loaded as they are (``PreTrainedTokenizerFast.from_pretrained``).
    ``AutoTokenizer`` is not used then, because transformers 5 picks the tokenizer class
    by the model type for some architectures (Qwen2, Phi-3, ...) and rebuilds the
    tokenizer from the vocabulary with that class's own pre-tokenizer: a word-level or
    whitespace-split tokenizer of the checkpoint's own (``engine train`` with
    ``init: scratch`` writes one for any model type) then loses words. Without a
    ``tokenizer.json`` (e.g. only a SentencePiece ``tokenizer.model``), ``AutoTokenizer``
    builds it.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = Path(directory)
    if (directory / TOKENIZER_JSON).is_file():
        return PreTrainedTokenizerFast.from_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def load_checkpoint(path: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32",
                    weights: bool = True, coconut: dict[str, Any] | None = None,
                    revision: str | None = None) -> Checkpoint:
    """Load and validate a model. Raises ``CheckpointError`` naming the problem.

    ``path``: a checkpoint directory, a ``.gguf`` file (dequantized to ``dtype`` through a
    temporary directory) or a Hugging Face Hub id (``revision``: its branch, tag or
    commit), as ``engine.sources.resolve_model`` reads them.
    ``weights=False``: the model is built on the meta device from its config (shapes, no
    memory) and no stop classifier is loaded; for a process that only tokenizes.

    A directory without ``coconut.json`` is a plain Hugging Face model: it is served as a
    language model (its chat template renders ``/v1/reason`` questions too) unless
    ``coconut`` asks for latent mode (``latent_feedback``, ``latent_mode``, the markers or
    ``method``): then its own ``<think>`` / ``</think>`` are the markers when its tokenizer
    has them, and markers it lacks are added as special tokens, with new embedding rows
    (the mean of the others). ``coconut``: ``coconut.json`` fields over the file's (or the
    plain defaults)."""
    from transformers import AutoModelForCausalLM

    from engine.sources import resolve_model
    from engine.stop_classifier import StopClassifier

    from engine.gguf import local_directory

    source = resolve_model(path, revision)
    directory = local_directory(source, _dtype_name(dtype))
    plain = not (directory / COCONUT_JSON).is_file()
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: missing config.json (the Hugging Face model config)")
    _check_weights_are_safetensors(directory)
    torch_dtype = resolve_dtype(dtype)
    try:
        tokenizer = load_tokenizer(directory)
    except Exception as e:  # transformers raises many kinds here
        raise CheckpointError(f"{directory}: the tokenizer does not load ({e})") from e
    config = CoconutConfig.read(directory, overrides=plain_fields(tokenizer, coconut) if plain else coconut)
    try:
        if weights:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, use_safetensors=True)
            model.to(device).eval()
        else:
            model = _model_without_weights(directory, torch_dtype)
    except Exception as e:
        raise CheckpointError(f"{directory}: the model does not load ({e})") from e
    latent = config.method not in ("cot", "no_cot") or config.latent_mode not in (None, "none")
    if plain and latent:
        _add_missing_markers(model, tokenizer, config, resize=weights)   # resize: real weights to fill
    pause = config.method == "pause_as_thought"
    markers = MarkerIds(
        bot=_marker(tokenizer, config.bot_token, "bot_token", required=latent or not plain),
        eot=_marker(tokenizer, config.eot_token, "eot_token", required=latent or not plain),
        latent=_marker(tokenizer, config.latent_token, "latent_token", required=pause or not plain),
        eos=eos_ids(tokenizer, model),
        pad=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)),
        prefix=tuple(token_id(tokenizer, t, "latent_prefix_tokens") for t in config.latent_prefix_tokens),
        suffix=tuple(token_id(tokenizer, t, "latent_suffix_tokens") for t in config.latent_suffix_tokens),
    )
    if not markers.eos:
        raise CheckpointError(f"{directory}: the tokenizer has no eos_token and the model's "
                              f"generation config no eos_token_id")
    vocab, hidden = model.get_input_embeddings().weight.shape
    for name in ("bot", "eot", "latent"):
        if getattr(markers, name) is not None and getattr(markers, name) >= vocab:
            raise CheckpointError(f"{directory}: {name}_token id {getattr(markers, name)} is outside "
                                  f"the model's embedding table ({vocab} rows)")
    bad = [i for i in config.suppress_token_ids if not 0 <= i < vocab]
    if bad:
        raise CheckpointError(f"{directory}: coconut.json field 'suppress_token_ids': {bad} outside the "
                              f"vocabulary (0..{vocab - 1})")
    classifier = projection = None
    if config.stop_classifier is not None and weights:
        classifier = StopClassifier.load(directory / config.stop_classifier.path, hidden,
                                         config.stop_classifier.hidden_size)
        classifier.to(device=device, dtype=torch_dtype).eval()
    if config.latent_feedback.type == "projection" and weights:
        from engine.feedback import LatentProjection

        projection = LatentProjection.load(directory / config.latent_feedback.file, hidden)
        projection.to(device=device, dtype=torch_dtype)
    return Checkpoint(path=directory, model=model, tokenizer=tokenizer, config=config,
                      markers=markers, stop_classifier=classifier,
                      max_seq_len=model_max_len(model.config), name=source.name, projection=projection)


#: What asks a plain model (no coconut.json) for latent mode.
LATENT_FIELDS = ("latent_feedback", "latent_mode", "bot_token", "eot_token", "method", "num_thoughts")
THINK_MARKERS = ("<think>", "</think>")


def plain_fields(tokenizer, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``coconut.json`` fields for a plain model: a language model (``no_cot``: no markers,
    no thoughts) whose questions go through its chat template when it has one and whose
    answer is all it says; with any of ``LATENT_FIELDS`` among the ``overrides``, a latent
    reasoner (``coconut``, fixed thoughts by default) whose markers are the tokenizer's own
    ``<think>`` / ``</think>`` when it has them. ``overrides`` are applied last."""
    overrides = dict(overrides or {})
    latent = any(key in overrides for key in LATENT_FIELDS
                 if not (key == "latent_mode" and overrides.get(key) == "none"))
    fields: dict[str, Any] = {"method": "coconut" if latent else "no_cot", "question_suffix": "",
                              "answer_prefix": "", "step_suffix": "",
                              "use_chat_template": bool(getattr(tokenizer, "chat_template", None))}
    vocab = tokenizer.get_vocab()
    if all(marker in vocab for marker in THINK_MARKERS):
        fields["bot_token"], fields["eot_token"] = THINK_MARKERS
    return {**fields, **overrides}


def _marker(tokenizer, token: str, field: str, required: bool) -> int | None:
    """A marker's id; a plain language model may lack its markers (None: never fed)."""
    if not required and token not in tokenizer.get_vocab():
        return None
    return token_id(tokenizer, token, field)


def _dtype_name(dtype: str | torch.dtype) -> str:
    return str(resolve_dtype(dtype)).removeprefix("torch.")


def _add_missing_markers(model, tokenizer, config: CoconutConfig, resize: bool) -> None:
    """A plain model served with markers its tokenizer lacks: add them as special tokens and
    grow the embedding (and untied LM head) with rows at the mean of the others."""
    vocab = set(tokenizer.get_vocab())
    wanted = [config.bot_token, config.eot_token, *config.latent_prefix_tokens, *config.latent_suffix_tokens]
    if config.method == "pause_as_thought":
        wanted.append(config.latent_token)
    missing = [t for t in dict.fromkeys(wanted)
               if t not in vocab]
    if not missing:
        return
    tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:   # on the meta device (a frontend): the shapes only
        # transformers' mean_resizing draws the new rows at random (a normal with the old rows'
        # mean and covariance); the exact mean keeps every start, and every process, identical
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        if resize:
            with torch.no_grad():
                for table in {id(t): t for t in (model.get_input_embeddings(), model.get_output_embeddings())
                              if t is not None}.values():
                    table.weight[rows:] = table.weight[:rows].mean(dim=0)
    log.info("added markers %s to the tokenizer (%d tokens)", missing, len(tokenizer))


def _model_without_weights(directory: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=dtype)
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


def save_checkpoint(directory: str | Path, model, tokenizer, config: CoconutConfig,
                    stop_classifier: torch.nn.Module | None = None) -> Path:
    """Write a servable checkpoint (safetensors weights) and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(directory)
    if stop_classifier is not None:
        if config.stop_classifier is None:
            raise ValueError("a stop classifier was given but config.stop_classifier is None")
        stop_classifier.save(directory / config.stop_classifier.path)
    config.write(directory)
    return directory
