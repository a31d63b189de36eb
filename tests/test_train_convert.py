"""``engine convert-reference``: a state dict saved the reference's way becomes a servable
checkpoint whose weights, marker ids and greedy answers match the original model."""

from __future__ import annotations

import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.reference import reference_generate

MARKERS = ["<|start-latent|>", "<|end-latent|>", "<|latent|>"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def base_model_dir(tmp_path):
    """A GPT-2-like base (tied embeddings) whose tokenizer has no COCONUT markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from engine.tiny import model_config, sample_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample_corpus(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    config = model_config("gpt2", len(tokenizer), hidden=32, layers=2, heads=2, init_std=0.2,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config.tie_word_embeddings = True                # as GPT-2's own
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base, model, tokenizer


def reference_state_dict(base, tmp_path):
    """What the reference's run.py saves: markers added with add_tokens, embeddings resized,
    then the Coconut wrapper's state dict (keys base_causallm.*) after training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    for token in MARKERS:
        tokenizer.add_tokens(token)
    model.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():                          # "training" moved every weight
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    state = {f"base_causallm.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "checkpoint_7"
    torch.save(state, path)
    return path, model, len(tokenizer) - 3


def test_convert_reference_roundtrip(tmp_path):
    from engine.cli import main

    base, _, _ = base_model_dir(tmp_path)
    ckpt, trained, first_marker = reference_state_dict(base, tmp_path)
    out = tmp_path / "converted"
    assert main(["convert-reference", str(ckpt), "--base", str(base), "--out", str(out)]) == 0
    loaded = load_checkpoint(out)
    assert (loaded.markers.bot, loaded.markers.eot, loaded.markers.latent) == (
        first_marker, first_marker + 1, first_marker + 2)
    assert loaded.config.num_thoughts == 6 and loaded.config.method == "coconut"
    ours = loaded.model.state_dict()
    for key, value in trained.state_dict().items():
        assert torch.equal(ours[key], value), key
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))

    from engine import Engine, LatentPolicy, SamplingParams

    question = "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or zumpus?"
    got = Engine.from_pretrained(out).generate([question], SamplingParams(max_tokens=8),
                                               LatentPolicy(mode="fixed", thoughts=3))[0]
    ref = reference_generate(trained.eval(), loaded.tokenizer, question, question_suffix="\n",
                             bot_id=first_marker, eot_id=first_marker + 1, eos_ids=set(loaded.markers.eos),
                             thoughts=3, max_tokens=8)
    assert got.token_ids == ref.token_ids


def test_convert_reference_rejects_bad_files(tmp_path):
    from engine.train.convert import convert_reference

    base, _, _ = base_model_dir(tmp_path)
    ckpt, trained, _ = reference_state_dict(base, tmp_path)
    state = torch.load(ckpt, weights_only=True)
    state["base_causallm.transformer.wte.weight"] = state["base_causallm.transformer.wte.weight"][:10]
    torch.save(state, tmp_path / "wrong_shape")
    with pytest.raises(ValueError, match="transformer.wte.weight' has shape"):
        convert_reference(tmp_path / "wrong_shape", base, tmp_path / "out1")
    torch.save({"base_causallm.not_a_weight": torch.zeros(1)}, tmp_path / "extra_key")
    with pytest.raises(ValueError, match="not_a_weight"):
        convert_reference(tmp_path / "extra_key", base, tmp_path / "out2")

    import argparse

    torch.save({"x": argparse.Namespace(payload="arbitrary object")}, tmp_path / "pickled")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        convert_reference(tmp_path / "pickled", base, tmp_path / "out3")
