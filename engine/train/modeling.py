"""Building the model and tokenizer a run starts from, and giving them the COCONUT markers.

- ``init: pretrained``: ``model_id`` is a local Hugging Face model directory (no hub
  downloads); ``load_model_path`` may then replace its weights with our checkpoint
  directory (model and tokenizer) or a reference state dict file (``torch.load`` with
  ``weights_only=True``; keys may carry the reference's ``base_causallm.`` prefix).
- ``init: scratch``: a byte-level BPE tokenizer is trained on the training texts
  (``engine.tiny.train_tokenizer``, markers included as special tokens) and a model is
  built with ``AutoConfig.for_model(model_type, **fields)``.

Markers missing from the vocabulary are added as tokens, the embedding table resized,
and each new row (input embeddings and an untied LM head) copied from
``marker_init_token``'s row, as the reference does with ``<<`` (EOS when that string is
not a single token). This module knows nothing of curricula or training loops.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from engine.checkpoint import CoconutConfig
from engine.train.layout import Markers

log = logging.getLogger(__name__)

REFERENCE_PREFIX = "base_causallm."


def record_texts(records, config) -> list[str]:
    """The texts a scratch tokenizer is trained on: the records, and for compact models every
    ProsQA name and concept word too, so that each is one token even if no record used it."""
    texts = [r.question + config.question_suffix + "".join(s + config.step_suffix for s in r.steps)
             + config.answer_prefix + r.answer for r in records]
    if config.text_format == "compact":
        from engine.data.vocab import PERSON_NAMES, concept_words

        texts += [" " + " ".join(PERSON_NAMES + concept_words())] * 4
        if getattr(config, "symbols", 0):
            from engine.data.symbols import symbol_words

            texts += [" " + " ".join(symbol_words(config.symbols))] * 8
    return texts


def build_scratch(config, records, tokenizer=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.tiny import train_tokenizer

    if tokenizer is None:
        tokenizer = train_tokenizer(record_texts(records, config), vocab_size=config.tokenizer_vocab_size,
                                    bos=config.tokenizer_bos)
    fields = dict(config.model)
    model_type = fields.pop("model_type")
    fields.setdefault("tie_word_embeddings", False)
    model_cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                     **fields)
    torch.manual_seed(config.seed)
    extra = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    model = AutoModelForCausalLM.from_config(model_cfg, **extra)
    with torch.no_grad():
        if config.init_embedding_std is not None:
            model.get_input_embeddings().weight.normal_(0.0, config.init_embedding_std)
        if config.init_final_norm is not None:
            final_norm(model).weight.fill_(config.init_final_norm)
    return model, tokenizer


def load_pretrained(directory: str | Path, attn_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    from engine.checkpoint import load_tokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory} (model_id/load_model_path must be a "
                                f"local directory; nothing is downloaded)")
    tokenizer = load_tokenizer(directory)     # as saved (AutoTokenizer can rebuild it by model type)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token       # as the reference
    return model, tokenizer


def load_reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A reference checkpoint (torch.save of a state dict), prefix removed. Never unpickles
    anything but tensors (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything but tensors and plain containers
        raise ValueError(f"{path}: not a plain state dict of tensors; refusing to unpickle it "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (torch.save(model.state_dict()))")
    return {(k[len(REFERENCE_PREFIX):] if k.startswith(REFERENCE_PREFIX) else k): v for k, v in state.items()}


def add_markers(model, tokenizer, coconut: CoconutConfig, init_token: str = "<<", reinit: bool = False) -> Markers:
    """Make sure the three markers are single tokens of the vocabulary (adding them in the
    reference's order: start, end, latent) and return all special ids. New markers (or all
    three with ``reinit``) get ``init_token``'s embedding (EOS's when it is not one token)."""
    names = [coconut.bot_token, coconut.eot_token, coconut.latent_token]
    vocab = tokenizer.get_vocab()
    missing = [t for t in names if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(names)
    embeddings = model.get_input_embeddings()
    if max(ids) >= embeddings.weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if reinit:
        missing = names
    if missing:
        init_ids = tokenizer(init_token, add_special_tokens=False)["input_ids"] if init_token else []
        source = init_ids[0] if len(init_ids) == 1 else tokenizer.eos_token_id
        with torch.no_grad():
            head = model.get_output_embeddings()
            for token in missing:
                new = tokenizer.convert_tokens_to_ids(token)
                model.get_input_embeddings().weight[new] = model.get_input_embeddings().weight[source]
                if head is not None and head.weight is not model.get_input_embeddings().weight:
                    head.weight[new] = head.weight[source]
        log.info("added markers %s, embeddings initialised from token %d", missing, source)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: the answer must end with one")
    for attr in ("eos_token_id", "pad_token_id"):
        if getattr(model.generation_config, attr, None) is None:
            setattr(model.generation_config, attr, getattr(tokenizer, attr))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Markers(bot=ids[0], eot=ids[1], latent=ids[2], eos=tokenizer.eos_token_id, pad=pad)


def build_model(config, train_records, coconut: CoconutConfig, tokenizer=None):
    """(model, tokenizer, markers) for a run, as the config says (``tokenizer``: a
    ready scratch tokenizer, e.g. the one rank 0 trained)."""
    load = config.load_model_path
    if load and Path(load).is_dir():
        model, tokenizer = load_pretrained(load, config.attn_implementation)   # our checkpoint: model + tokenizer
    elif config.init == "scratch":
        model, tokenizer = build_scratch(config, train_records, tokenizer)
    else:
        if not config.model_id:
            raise ValueError("config key 'model_id' must name a local model directory (or use init: scratch)")
        model, tokenizer = load_pretrained(config.model_id, config.attn_implementation)
    markers = add_markers(model, tokenizer, coconut, config.marker_init_token, reinit=config.reinit_markers)
    if load and not Path(load).is_dir():
        state = load_reference_state_dict(load)
        result = model.load_state_dict(state, strict=False)
        log.warning("loaded %s: missing keys %s, unexpected keys %s", load, result.missing_keys,
                    result.unexpected_keys)
    return model, tokenizer, markers


_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


def final_norm(model) -> torch.nn.Module:
    decoder = model.get_decoder()
    for name in _FINAL_NORMS:
        module = getattr(decoder, name, None)
        if isinstance(module, torch.nn.Module) and getattr(module, "weight", None) is not None:
            return module
    raise ValueError(f"{type(model).__name__}: no final norm with a weight found (looked for {_FINAL_NORMS})")


@torch.no_grad()
def rescale_thoughts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Make continuous thoughts as large as token embeddings, without changing the logits.

    A thought is the last hidden state after the final norm, whose norm is about
    sqrt(d) * |norm weight| (20x a token embedding in a small model trained from scratch):
    fed back as an input it swamps the residual stream and the next pass cannot change it.
    The final norm's weight (and bias) is multiplied by alpha = mean |embedding| / mean
    |last hidden state| over the real positions of ``input_ids`` and the (untied) LM head
    divided by alpha, so every logit is unchanged. Returns alpha."""
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    if head is None or head.weight is embedding.weight or getattr(model.config, "tie_word_embeddings", False):
        raise ValueError("rescale_thoughts needs an untied LM head (tie_word_embeddings: false): with tied "
                         "weights, scaling the head would scale the input embeddings too")
    norm = final_norm(model)
    if "gemma" in type(norm).__name__.lower():
        raise ValueError(f"rescale_thoughts does not support {type(norm).__name__} (weight stored as 1 + w)")
    was_training = model.training
    model.eval()
    mask = attention_mask.bool()
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
    model.train(was_training)
    alpha = float(embedding(input_ids)[mask].norm(dim=-1).mean() / hidden[mask].norm(dim=-1).mean())
    norm.weight.mul_(alpha)
    if getattr(norm, "bias", None) is not None:
        norm.bias.mul_(alpha)
    head.weight.div_(alpha)
    return alpha
