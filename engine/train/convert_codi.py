"""Converting a CODI checkpoint (Shen et al. 2025, zhenyi4/codi) into our format.

CODI trains LoRA adapters on a base causal LM and a projection ``prj`` of the last hidden
state; its trainer saves the whole ``CODI`` module's state dict (``model.safetensors``, or
``pytorch_model.bin``):

- ``codi.`` + the peft model: ``base_model.model.<name>.weight`` for untouched parameters,
  ``<name>.base_layer.weight`` / ``.bias`` for adapted layers, beside
  ``<name>.lora_A.default.weight`` [r, in] and ``<name>.lora_B.default.weight`` [out, r];
  the embedding already holds three tokens after the base vocabulary V: pad (V), bot
  (V + 1) and eot (V + 2). A tied LM head is usually left out (tied again on load).
- ``prj.``: ``nn.Sequential(Dropout, Linear(d, p), GELU, Linear(p, d)[, ln=LayerNorm(d)])``.

``convert_codi`` merges each adapter into its base weight, ``W += (alpha / r) B A`` (r read
off the shapes; GPT-2's ``Conv1D`` stores ``W`` as [in, out], so the delta is transposed),
names the three added tokens in the tokenizer at their ids, and writes a checkpoint this
engine serves as CODI's ``test.py`` decodes: ``question EOS <bot>`` (no EOS with
``eos=False``, CODI's ``--remove_eos``), ``num_latent`` thoughts fed as ``prj(h)``, then
``<eot> EOS``, and an answer that never picks the last vocabulary entry (``<eot>``). No
``peft`` is needed, here or at serving time. Weights are read from safetensors, or with
``torch.load(weights_only=True)`` (tensors only); nothing else is unpickled.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from engine.checkpoint import CoconutConfig, load_tokenizer, save_checkpoint
from engine.feedback import PROJECTION_FILE

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
PAD, BOT, EOT = "<|codi-pad|>", "<|codi-bot|>", "<|codi-eot|>"


def read_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """A CODI checkpoint file, or a directory holding ``model.safetensors`` or ``pytorch_model.bin``."""
    path = Path(checkpoint)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{checkpoint}: no model.safetensors or pytorch_model.bin in this directory")
    if not path.is_file():
        raise FileNotFoundError(f"CODI checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # anything but tensors and plain containers
        raise ValueError(f"{path}: not a plain state dict of tensors; refusing to unpickle it "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return state


def split_codi_state(state: dict[str, torch.Tensor], where: str = ""):
    """-> (base weights by our parameter name, LoRA pairs {module: (A, B)}, projection state)."""
    base: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    projection: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith("prj."):
            projection[key[len("prj."):]] = value
            continue
        if not key.startswith("codi."):
            unknown.append(key)
            continue
        name = key[len("codi."):]
        if name.startswith(PEFT_PREFIX):
            name = name[len(PEFT_PREFIX):]
        for side in ("lora_A", "lora_B"):
            for tail in (f".{side}.default.weight", f".{side}.weight"):
                if name.endswith(tail):
                    lora.setdefault(name[:-len(tail)], {})[side] = value
                    break
            else:
                continue
            break
        else:
            base[name.replace(".base_layer.", ".")] = value
    if unknown:
        raise ValueError(f"{where}: keys {sorted(unknown)[:5]} are neither the model's (codi.*) nor the "
                         f"projection's (prj.*): not a CODI checkpoint?")
    incomplete = [m for m, pair in lora.items() if set(pair) != {"lora_A", "lora_B"}]
    if incomplete:
        raise ValueError(f"{where}: LoRA adapters without both A and B: {incomplete[:5]}")
    return base, {m: (p["lora_A"], p["lora_B"]) for m, p in lora.items()}, projection


def convert_codi(checkpoint: str | Path, base: str | Path, out: str | Path, *, num_latent: int,
                 lora_alpha: float, eos: bool = True) -> Path:
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from engine.feedback import LatentProjection

    base = Path(base)
    if not base.is_dir():
        raise FileNotFoundError(f"base model directory not found: {base} (nothing is downloaded)")
    state = read_state_dict(checkpoint)
    weights, adapters, prj = split_codi_state(state, str(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True, dtype=torch.float32)
    tokenizer = load_tokenizer(base)
    vocab = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab + 3, mean_resizing=False)
    own = model.state_dict()
    for name, value in weights.items():
        if name not in own:
            raise ValueError(f"{checkpoint}: 'codi.{name}' matches no parameter of the base model from {base} "
                             f"(expected names like {next(iter(own))})")
        if own[name].shape != value.shape:
            raise ValueError(f"{checkpoint}: 'codi.{name}' has shape {tuple(value.shape)}, the base model's (with "
                             f"CODI's 3 tokens added: {vocab + 3}) has {tuple(own[name].shape)}")
    merged = {name: value.to(torch.float32).clone() for name, value in weights.items()}
    modules = dict(model.named_modules())
    ranks = set()
    for module_name, (a, b) in adapters.items():
        key = f"{module_name}.weight"
        if module_name not in modules or key not in own:
            raise ValueError(f"{checkpoint}: a LoRA adapter on '{module_name}', which the base model does not have")
        r = a.shape[0]
        ranks.add(r)
        delta = (lora_alpha / r) * (b.to(torch.float32) @ a.to(torch.float32))            # [out, in]
        if isinstance(modules[module_name], Conv1D):                                        # W is [in, out]
            delta = delta.t()
        target = merged.get(key, own[key].to(torch.float32).clone())
        if target.shape != delta.shape:
            raise ValueError(f"{checkpoint}: the adapter of '{module_name}' ({tuple(a.shape)}, {tuple(b.shape)}) "
                             f"does not fit its weight {tuple(target.shape)}")
        merged[key] = target + delta
    missing = model.load_state_dict(merged, strict=False).missing_keys
    if missing:
        log.info("kept the base model's %d parameters the CODI checkpoint does not hold (%s ...)", len(missing),
                 missing[0])
    model.tie_weights()
    pad, bot, eot = _name_added_tokens(tokenizer, vocab)
    eos_token = tokenizer.eos_token
    if eos and eos_token is None:
        raise ValueError(f"{base}: its tokenizer has no eos_token, which CODI's layout puts around the "
                         f"thoughts; pass --no-eos if the checkpoint was trained with --remove_eos")
    feedback = {"type": "hidden"}
    if prj:
        feedback = {"type": "projection", "file": PROJECTION_FILE}
    coconut = CoconutConfig(
        bot_token=bot, eot_token=eot, latent_token=pad, question_suffix="", step_suffix="", answer_prefix="",
        num_thoughts=num_latent, max_latent_stage=num_latent, latent_feedback=feedback,
        latent_prefix_tokens=[eos_token] if eos else [], latent_suffix_tokens=[eos_token] if eos else [],
        suppress_token_ids=[vocab + 2],
        training={"converted_from": str(checkpoint), "base": str(base), "method": "codi",
                  "lora_alpha": lora_alpha, "lora_r": sorted(ranks), "adapters": len(adapters), "eos": eos})
    path = save_checkpoint(out, model, tokenizer, coconut)
    if prj:
        LatentProjection.from_state_dict({k: v.to(torch.float32) for k, v in prj.items()},
                                         model.config.get_text_config().hidden_size,
                                         where=f"{checkpoint} (prj.*)").save(path / PROJECTION_FILE)
    return path


def _name_added_tokens(tokenizer, vocab: int) -> tuple[str, str, str]:
    """Give CODI's pad, bot and eot (ids vocab, vocab + 1, vocab + 2) names in the tokenizer;
    a tokenizer shorter than the model's vocabulary is filled up to it first."""
    if len(tokenizer) > vocab:
        raise ValueError(f"the base tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary "
                         f"({vocab}): CODI's tokens would not sit at {vocab}..{vocab + 2}")
    fillers = [f"<|codi-unused-{i}|>" for i in range(vocab - len(tokenizer))]
    tokenizer.add_special_tokens({"additional_special_tokens": fillers + [PAD, BOT, EOT]},
                                 replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids([PAD, BOT, EOT])
    if ids != [vocab, vocab + 1, vocab + 2]:
        raise ValueError(f"CODI's tokens landed at ids {ids}, expected {vocab}..{vocab + 2}")
    return PAD, BOT, EOT
