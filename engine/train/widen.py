"""Widening a trained Llama-shaped checkpoint without changing what it computes.

Contract of ``widen_model(model, hidden_size, num_heads, intermediate_size, noise)``:

- The input is a ``LlamaForCausalLM`` (any model with Llama's parameter names, biases
  allowed). The output is a new model of the same class with ``hidden_size`` residual
  dimensions, ``num_heads`` attention heads of the **same head_dim** (so RoPE and the
  attention scale are unchanged; key/value heads grow by the same factor, keeping the
  query-group size) and an MLP of ``intermediate_size``. Nothing may shrink.
- Every old weight is copied into the leading block of its new matrix (old heads are the
  first heads, old MLP units the first units, old residual dimensions the first ones).
- Entries that **write into the residual stream** from anything new (o_proj and
  down_proj: new rows, and new columns; the embedding's new columns, which, tied, are
  also the LM head's reads of the new dimensions) are ``noise`` x N(0, 1) (0: exactly
  zero; with zero writers the new heads' and units' readers get no gradient on the first
  step, so the default is 1e-5, which moves the bundled ProsQA model's logits by about
  3e-3 at d=256; 1e-3 would move them by 0.3). Entries that only **read** (q/k/v/gate/up
  rows of new heads and units, columns reading new residual dimensions) are N(0, std of that old matrix), so new heads and
  units compute something from the start and their writers receive gradients.
- RMSNorm weights of the old dimensions are multiplied by sqrt(d_old / d_new) and
  ``rms_norm_eps`` by d_old / d_new: with the new dimensions at zero, the RMS over d_new
  dimensions is rms_old x sqrt(d_old / d_new), so every norm's output on the old
  dimensions is exactly the old one. New dimensions' norm weights are the mean of the
  rescaled old ones.
- Hence with ``noise=0`` the residual stream is [old, 0] at every layer, the last hidden
  state after the final norm is [old, 0] (so a continuous thought fed back as an input
  embedding is the old thought, padded with zeros) and the logits are the old logits up to
  float rounding; with small noise they move by O(noise) (tests/test_widen.py measures
  both, token forwards and forwards with fed-back hidden states).

``widen_checkpoint(src, out, ...)`` does this to one of our checkpoint directories
(config.json, model.safetensors, tokenizer files, coconut.json): it loads the weights with
safetensors only and writes a servable checkpoint whose coconut.json records the source
under ``training.widened_from``. Optimizer state is not carried over (its shapes change):
training the widened model starts a fresh AdamW.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import torch

_LAYER = re.compile(r"^model\.layers\.\d+\.(.+)$")
_COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def widened_config(config, hidden_size: int, num_heads: int, intermediate_size: int):
    """The config of the widened model (a copy; ``config`` is left as it is)."""
    d_old = config.hidden_size
    h_old = config.num_attention_heads
    kv_old = getattr(config, "num_key_value_heads", None) or h_old
    head_dim = getattr(config, "head_dim", None) or d_old // h_old
    if hidden_size < d_old or num_heads < h_old or intermediate_size < config.intermediate_size:
        raise ValueError(f"widen: nothing may shrink (hidden {d_old} -> {hidden_size}, heads {h_old} -> "
                         f"{num_heads}, intermediate {config.intermediate_size} -> {intermediate_size})")
    if (num_heads * kv_old) % h_old:
        raise ValueError(f"widen: {num_heads} heads cannot keep the query-group size {h_old // kv_old} "
                         f"of {h_old} heads over {kv_old} key/value heads")
    new = config.__class__.from_dict(config.to_dict())
    new.hidden_size = hidden_size
    new.num_attention_heads = num_heads
    new.num_key_value_heads = num_heads * kv_old // h_old
    new.head_dim = head_dim
    new.intermediate_size = intermediate_size
    new.rms_norm_eps = config.rms_norm_eps * d_old / hidden_size
    return new


@torch.no_grad()
def widen_model(model, hidden_size: int, num_heads: int, intermediate_size: int, noise: float = 1e-5,
                seed: int = 0):
    """A wider copy of ``model`` computing the same function (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    old_cfg = model.config
    if getattr(old_cfg, "model_type", None) not in ("llama", "mistral", "qwen2", "qwen3"):
        raise ValueError(f"widen supports Llama-shaped models, not model_type={old_cfg.model_type!r}")
    cfg = widened_config(old_cfg, hidden_size, num_heads, intermediate_size)
    d_old, d_new = old_cfg.hidden_size, hidden_size
    norm_scale = math.sqrt(d_old / d_new)
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    wide = AutoModelForCausalLM.from_config(cfg, dtype=dtype,
                                            attn_implementation=getattr(old_cfg, "_attn_implementation", None))
    wide.generation_config = model.generation_config
    old_state = model.state_dict()
    tied = bool(getattr(old_cfg, "tie_word_embeddings", False))

    def randn(shape, std):
        return (torch.randn(shape, generator=gen) * std).to(dtype)

    for name, param in wide.named_parameters():
        if tied and name == "lm_head.weight":
            continue
        old = old_state[name].to(dtype)
        layer = _LAYER.match(name)
        part = layer.group(1) if layer else name
        target = torch.zeros(param.shape, dtype=dtype)
        if part.endswith("norm.weight"):                            # RMSNorm over the residual stream
            scaled = old * norm_scale
            target.fill_(float(scaled.mean()))
            target[:old.shape[0]] = scaled
        elif part.endswith(("o_proj.weight", "down_proj.weight")):   # writers into the residual stream
            target = randn(param.shape, noise)
            target[:old.shape[0], :old.shape[1]] = old
        elif part.endswith("o_proj.bias") or part.endswith("down_proj.bias"):
            target[:old.shape[0]] = old
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            # rows: tokens (same vocabulary); new columns write (embedding) / read (untied head)
            target = randn(param.shape, noise)
            target[:, :old.shape[1]] = old
        elif part.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                            "up_proj.weight")):                      # readers: new rows and columns random
            target = randn(param.shape, float(old.float().std()) if old.numel() > 1 else 0.02)
            target[:old.shape[0], :old.shape[1]] = old
        elif part.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            target[:old.shape[0]] = old
        elif part.endswith(("q_norm.weight", "k_norm.weight")):     # per-head norms (Qwen3): head_dim kept
            target = old.clone()
        else:
            raise ValueError(f"widen: no rule for parameter {name!r} of shape {tuple(old.shape)}")
        param.copy_(target.to(param.dtype))
    if tied:
        wide.tie_weights()
    return wide


def widen_checkpoint(src: str | Path, out: str | Path, hidden_size: int, num_heads: int, intermediate_size: int,
                     noise: float = 1e-5, seed: int = 0) -> Path:
    """Widen the checkpoint directory ``src`` into ``out`` (servable, no optimizer state)."""
    from transformers import AutoModelForCausalLM

    from engine.checkpoint import CoconutConfig

    src, out = Path(src), Path(out)
    if not (src / "model.safetensors").is_file():
        raise FileNotFoundError(f"{src}: no model.safetensors (widen reads safetensors weights only)")
    model = AutoModelForCausalLM.from_pretrained(src, use_safetensors=True, dtype=torch.float32)
    wide = widen_model(model, hidden_size, num_heads, intermediate_size, noise=noise, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    wide.save_pretrained(out)
    for name in _COPY_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    if (src / "coconut.json").is_file():
        coconut = CoconutConfig.read(src)
        training = dict(coconut.training or {})
        training.pop("config", None)
        training["widened_from"] = {"path": str(src), "hidden_size": model.config.hidden_size,
                                    "num_attention_heads": model.config.num_attention_heads,
                                    "intermediate_size": model.config.intermediate_size, "noise": noise,
                                    "seed": seed}
        coconut.model_copy(update={"training": training}).write(out)
    return out
