"""Small random checkpoints built from config, for tests, demos and benchmarks.

No download: the model comes from ``AutoModelForCausalLM.from_config`` with random
weights and the tokenizer is a byte-level BPE trained here with the ``tokenizers``
library on a small ProsQA-flavoured corpus. ``make_checkpoint`` writes a complete,
servable checkpoint directory (the same format the trainer writes).

Random models have nearly flat next-token distributions, where two tokens can tie to
the last bit and batched arithmetic may break the tie differently; ``init_std`` widens
the weights so that greedy choices are well separated.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from engine.checkpoint import CoconutConfig, StopClassifierSpec, save_checkpoint

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|start-latent|>", "<|end-latent|>", "<|latent|>", "<s>"]

_NAMES = ["Tom", "Alex", "Sally", "Jack", "Max", "Sam", "Fae", "Rex", "Polly", "Stella", "Wren", "Davis"]
_CONCEPTS = ["wumpus", "yumpus", "zumpus", "dumpus", "rompus", "numpus", "tumpus", "vumpus",
             "impus", "jompus", "gorpus", "lempus", "scrompus", "sterpus", "brimpus", "lorpus"]


def sample_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """ProsQA-flavoured sentences: enough to train a small BPE vocabulary."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        name, a, b, c = rng.choice(_NAMES), *rng.sample(_CONCEPTS, 3)
        lines.append(f"Every {a} is a {b}. {name} is a {a}. Is {name} a {b} or {c}?\n"
                     f"{name} is a {a}.\nEvery {a} is a {b}.\n### {name} is a {b}.")
    return lines


def train_tokenizer(texts: list[str], vocab_size: int = 512, bos: bool = False):
    """A byte-level BPE tokenizer (exact round trip) with the COCONUT markers as special
    tokens; with ``bos`` it prepends ``<s>`` to every encoded text, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
        bos_token="<s>" if bos else None, additional_special_tokens=SPECIAL_TOKENS[2:5])


def model_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                 max_positions: int = 512, init_std: float = 0.2, **overrides):
    """A small config of one architecture family, with the same shape knobs for all."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, initializer_range=init_std,
                  tie_word_embeddings=overrides.pop("tie_word_embeddings", False))
    shapes = {
        "gpt2": dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions),
        "llama": dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), intermediate_size=hidden * 2,
                      max_position_embeddings=max_positions),
        "qwen2": dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), intermediate_size=hidden * 2,
                      max_position_embeddings=max_positions, use_sliding_window=False),
        "gpt_neox": dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=hidden * 2, max_position_embeddings=max_positions,
                         rotary_pct=0.5),
        "bloom": dict(hidden_size=hidden, n_layer=layers, n_head=heads),
        "phi": dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=hidden * 2, max_position_embeddings=max_positions,
                    partial_rotary_factor=0.5),
        "gemma2": dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads,
                       intermediate_size=hidden * 2, max_position_embeddings=max_positions,
                       sliding_window=max_positions),
    }
    if arch not in shapes:
        raise ValueError(f"arch={arch!r} is not one of {sorted(shapes)}")
    return AutoConfig.for_model(arch, **common, **shapes[arch], **overrides)


def make_checkpoint(directory: str | Path, arch: str = "gpt2", *, hidden: int = 64, layers: int = 2,
                    heads: int = 4, max_positions: int = 512, init_std: float = 0.2, seed: int = 0,
                    bos: bool | None = None, vocab_size: int = 512, num_thoughts: int = 4,
                    method: str = "coconut", stop_classifier: torch.nn.Module | None = None,
                    stop_spec: StopClassifierSpec | None = None, tokenizer=None,
                    dtype: torch.dtype = torch.float32, model_vocab_size: int | None = None,
                    projection_size: int | None = None, projection_layer_norm: bool = True,
                    coconut_fields: dict | None = None) -> Path:
    """Write a random checkpoint of ``arch``; returns its directory. ``model_vocab_size``
    widens the embedding and LM head beyond the tokenizer (e.g. 50257 to cost like GPT-2).
    ``projection_size`` adds a random CODI projection (``latent_projection.safetensors``,
    feedback type ``projection``); ``coconut_fields`` are more ``coconut.json`` fields."""
    from transformers import AutoModelForCausalLM

    if tokenizer is None:
        tokenizer = train_tokenizer(sample_corpus(), vocab_size=vocab_size,
                                    bos=(arch == "llama") if bos is None else bos)
    config = model_config(arch, max(len(tokenizer), model_vocab_size or 0), hidden=hidden, layers=layers, heads=heads,
                          max_positions=max_positions, init_std=init_std,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    from engine.feedback import PROJECTION_FILE

    fields = dict(coconut_fields or {})
    if projection_size:
        fields["latent_feedback"] = {"type": "projection", "file": PROJECTION_FILE}
    coconut = CoconutConfig(num_thoughts=num_thoughts, method=method, stop_classifier=stop_spec, **fields)
    path = save_checkpoint(directory, model, tokenizer, coconut, stop_classifier=stop_classifier)
    if projection_size:
        from engine.feedback import LatentProjection

        projection = LatentProjection(config.get_text_config().hidden_size, projection_size,
                                      layer_norm=projection_layer_norm)
        with torch.no_grad():   # random, and wide enough that a projected thought differs from h
            for name, tensor in projection.named_parameters():
                tensor.normal_(1.0 if name == "ln.weight" else 0.0, 0.3)
        projection.save(path / PROJECTION_FILE)
    return path

