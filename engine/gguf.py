"""GGUF files (the llama.cpp / Ollama format) turned into ordinary checkpoint directories.

``convert_gguf(file, out, dtype)`` dequantizes the file's weights to ``dtype`` through
transformers' GGUF reader and writes what ``save_pretrained`` writes for any model:
``config.json``, ``model.safetensors``, the tokenizer with its chat template, and
``generation_config.json`` (the end tokens the file names). A model loaded from GGUF
refuses ``save_pretrained`` ("quantized with gguf"), so the weights are moved into a
model built from the same config without its ``quantization_config``, then saved.

``materialize(source, dtype)`` does the same into a temporary directory, removed at
process exit: a ``.gguf`` served directly is dequantized at every start (convert it once
with ``engine convert gguf`` to skip that). The ``gguf`` package is an optional extra
(``pip install 'coconut-serve[gguf]'``); without it every function here raises
``ValueError`` naming the extra. This module knows files; it knows nothing of serving.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import time
from pathlib import Path

from engine.errors import CheckpointError

log = logging.getLogger(__name__)

EXTRA = "pip install 'coconut-serve[gguf]' (the gguf and accelerate packages)"


def require_gguf() -> None:
    missing = []
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ValueError(f"reading a .gguf file needs the optional extra 'gguf' ({', '.join(missing)} not "
                         f"installed): {EXTRA}")


def convert_gguf(file: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Dequantize ``file`` to ``dtype`` and write a checkpoint directory at ``out`` (created;
    files already there are overwritten). Returns ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from engine.checkpoint import resolve_dtype

    require_gguf()
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: no such GGUF file")
    torch_dtype = resolve_dtype(dtype)
    started = time.perf_counter()
    folder, name = str(file.parent), file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{file}: the GGUF file does not load ({e})") from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False, assign=True)
    missing = [k for k in missing if not _tied(model, k)]
    if missing or unexpected:
        raise CheckpointError(f"{file}: the dequantized weights do not match the model built from its "
                              f"config (missing {missing[:4]}, unexpected {unexpected[:4]})")
    model.tie_weights()
    model.generation_config = GenerationConfig.from_model_config(quantized.config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(quantized.generation_config, key, None)
        if value is not None:
            setattr(model.generation_config, key, value)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("converted %s to %s (%s) in %.1f s", file, out, dtype, time.perf_counter() - started)
    return out


def _tied(model, key: str) -> bool:
    """A missing key that tying fills (``lm_head.weight`` of a model with tied embeddings)."""
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key.endswith("lm_head.weight")


def local_directory(source, dtype: str = "float32") -> Path:
    """The checkpoint directory of an ``engine.sources.ModelSource``: its own, or for a GGUF
    file a temporary one it is dequantized into (``materialize``)."""
    if not source.is_gguf:
        return source.directory
    log.info("dequantizing %s to %s ...", source.gguf_file, dtype)
    return materialize(source.directory / source.gguf_file, dtype)


def materialize(file: str | Path, dtype: str = "float32") -> Path:
    """``convert_gguf`` into a fresh temporary directory that is removed when this process
    exits (normally). Returns the directory."""
    directory = Path(tempfile.mkdtemp(prefix="coconut-gguf-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    try:
        return convert_gguf(file, directory, dtype)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
