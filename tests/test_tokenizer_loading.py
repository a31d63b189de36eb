"""A checkpoint's tokenizer loads as it was saved (``engine.checkpoint.load_tokenizer``).

The oracle is the ``tokenizers`` library reading ``tokenizer.json`` directly
(``Tokenizer.from_file``), independent of transformers. Before the fix, a Qwen2-type
checkpoint with a word-level tokenizer of its own went through ``AutoTokenizer``, which
in transformers 5 builds a ``Qwen2Tokenizer`` by model type and rebuilds the tokenizer
with Qwen's pre-tokenizer: "Tom is a wumpus ?" became 2 ids instead of 5. Tokenizers of
a specific class saved by ``save_pretrained`` (GPT-2, Qwen2, Llama, GPT-NeoX, Gemma)
must load exactly as ``AutoTokenizer`` loads them (same ids, same special tokens).
"""

from __future__ import annotations

import json
import warnings

import pytest

from engine.tiny import SPECIAL_TOKENS, sample_corpus

TEXTS = ["Tom is a wumpus ?", "Every wumpus is a yumpus . Tom is a wumpus . Is Tom a yumpus or zumpus ?",
         "Sally is a kirpus", "<|start-latent|> <|latent|> <|end-latent|> ### Tom is a yumpus"]
MARKERS = {"bot": "<|start-latent|>", "eot": "<|end-latent|>", "latent": "<|latent|>"}


def _words() -> list[str]:
    words = {"?", ".", "###"}
    for line in sample_corpus():
        words.update(line.replace(".", " .").replace("?", " ?").split())
    return sorted(words)


def word_level_tokenizer():
    """A whitespace-split word-level tokenizer (like a compact vocabulary of one's own)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + ["<unk>"] + _words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   unk_token="<unk>", additional_special_tokens=SPECIAL_TOKENS[2:5])


def whitespace_bpe_tokenizer():
    """A BPE over whitespace-split words (no byte-level pre-tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS + ["<unk>"], min_frequency=1,
                                  show_progress=False)
    tok.train_from_iterator(sample_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   unk_token="<unk>", additional_special_tokens=SPECIAL_TOKENS[2:5])


def raw_ids(directory, text: str) -> list[int]:
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(directory / "tokenizer.json")).encode(text).ids


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
@pytest.mark.parametrize("make_tokenizer", [word_level_tokenizer, whitespace_bpe_tokenizer],
                         ids=["word_level", "whitespace_bpe"])
def test_own_tokenizer_loads_as_saved(tmp_path, arch, make_tokenizer):
    from tokenizers import Tokenizer

    from engine.checkpoint import load_checkpoint
    from engine.tiny import make_checkpoint

    directory = make_checkpoint(tmp_path / arch, arch, hidden=32, layers=1, heads=2,
                                tokenizer=make_tokenizer())
    ckpt = load_checkpoint(directory)
    raw = Tokenizer.from_file(str(directory / "tokenizer.json"))
    for text in TEXTS:
        assert ckpt.tokenizer(text)["input_ids"] == raw.encode(text).ids, (arch, text)
    if make_tokenizer is word_level_tokenizer:
        assert len(ckpt.tokenizer("Tom is a wumpus ?")["input_ids"]) == 5
    for name, token in MARKERS.items():
        assert getattr(ckpt.markers, name) == raw.token_to_id(token), name
    assert ckpt.markers.eos == (raw.token_to_id("<|endoftext|>"),)
    assert ckpt.markers.pad == raw.token_to_id("<|pad|>")
    assert ckpt.tokenizer.eos_token == "<|endoftext|>" and ckpt.tokenizer.pad_token == "<|pad|>"
    assert set(MARKERS.values()) <= set(ckpt.tokenizer.all_special_tokens)


def test_the_engine_prompt_uses_the_saved_tokenizer(tmp_path):
    """The prompt the engine feeds: the question's ids as the file encodes them, then <bot>."""
    from tokenizers import Tokenizer

    from engine.sync_engine import Engine
    from engine.tiny import make_checkpoint

    directory = make_checkpoint(tmp_path / "q", "qwen2", hidden=32, layers=1, heads=2,
                                tokenizer=word_level_tokenizer())
    engine = Engine.from_pretrained(directory)
    question = "Tom is a wumpus . Is Tom a wumpus or yumpus ?"
    raw = Tokenizer.from_file(str(directory / "tokenizer.json"))
    want = raw.encode(question + "\n").ids + [raw.token_to_id("<|start-latent|>")]
    assert engine.make_request(question).prompt_token_ids == want
    [result] = engine.generate([question])
    assert result.prompt_token_ids == want


def _class_tokenizers():
    import transformers

    from engine.tiny import train_tokenizer

    base = json.loads(train_tokenizer(sample_corpus(), vocab_size=400).backend_tokenizer.to_str())
    vocab = dict(base["model"]["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in base["model"]["merges"]]
    for arch, name in [("gpt2", "GPT2Tokenizer"), ("qwen2", "Qwen2Tokenizer"), ("llama", "LlamaTokenizer"),
                       ("gpt_neox", "GPTNeoXTokenizer"), ("gemma2", "GemmaTokenizer")]:
        cls = getattr(transformers, name)
        tok = cls(vocab=dict(vocab), merges=list(merges), unk_token="<|endoftext|>", eos_token="<|endoftext|>",
                  pad_token="<|pad|>", bos_token="<s>")
        tok.add_special_tokens({"additional_special_tokens": list(MARKERS.values())})
        yield arch, name, tok


@pytest.mark.parametrize("arch, name, tokenizer", list(_class_tokenizers()), ids=lambda v: v if isinstance(v, str) else "")
def test_class_tokenizers_load_as_autotokenizer_loads_them(tmp_path, arch, name, tokenizer):
    from transformers import AutoTokenizer

    from engine.checkpoint import load_tokenizer
    from engine.tiny import model_config

    tokenizer.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_config(arch, len(tokenizer)).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == name
    ours, auto = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    texts = TEXTS + ["  two leading spaces, ünïcödé and 日本", "Every wumpus is a yumpus.\nTom is a wumpus."]
    for text in texts:
        for special in (True, False):
            got = ours(text, add_special_tokens=special)["input_ids"]
            assert got == auto(text, add_special_tokens=special)["input_ids"], (name, text, special)
        assert ours.decode(got, skip_special_tokens=True) == auto.decode(got, skip_special_tokens=True)
        assert ours(text)["input_ids"] == raw_ids(tmp_path, text)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, attr) == getattr(auto, attr), attr
    assert sorted(ours.all_special_tokens) == sorted(auto.all_special_tokens)
    assert ours.convert_tokens_to_ids(list(MARKERS.values())) == auto.convert_tokens_to_ids(list(MARKERS.values()))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tiny_checkpoints_load_as_before(tiny_checkpoint, arch):
    """The engine's own byte-level BPE checkpoints (GPT-2 without BOS, Llama with <s>)."""
    from transformers import AutoTokenizer

    from engine.checkpoint import load_tokenizer

    directory = tiny_checkpoint(arch)
    ours, auto = load_tokenizer(directory), AutoTokenizer.from_pretrained(directory)
    for text in TEXTS:
        assert ours(text)["input_ids"] == auto(text)["input_ids"] == raw_ids(directory, text)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (auto.bos_token, auto.eos_token, auto.pad_token)
