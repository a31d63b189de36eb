"""Serving a model trained with per-question symbols (``coconut.json`` ``symbols: K``): the
engine renames the question's names to symbols before tokenizing and writes its output in
the question's names again. A tiny random model with a tokenizer that knows only the
symbols: the prompt it is fed is the question's graph under a one-to-one renaming (checked
against the original graph), its text is its tokens with each of the question's symbol
tokens written as the question's word (the runs between decoded as the tokenizer does),
and the trace's frontier view names the question's own words with their BFS distances."""

from __future__ import annotations

import json

import pytest

from engine.data.question import hop_distances, parse_question
from engine.data.symbols import symbol_words

QUESTION = ("Every wumpus is a yumpus. Every yumpus is a zumpus. Tom is a wumpus. Alex is a rempus. "
            "Every rempus is a gorpus. Is Tom a zumpus or gorpus?")
K = 16


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from engine.sync_engine import Engine
    from engine.tiny import make_checkpoint, train_tokenizer

    words = " ".join(symbol_words(K))
    texts = [f" {words} | ? ###"] * 50 + [f"{a} {b} | ? {a} {b} {a}\n ### {a} {b}"
                                          for a, b in zip(symbol_words(K), symbol_words(K)[1:])]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    directory = make_checkpoint(tmp_path_factory.mktemp("symbols") / "ckpt", "llama", tokenizer=tokenizer,
                                num_thoughts=3, init_std=0.02)   # near-uniform logits: sampling visits symbols
    config = json.loads((directory / "coconut.json").read_text())
    config.update(text_format="compact", symbols=K)
    (directory / "coconut.json").write_text(json.dumps(config))
    return Engine.from_pretrained(directory, max_batch_size=4)


def test_the_model_reads_the_question_in_symbols(engine):
    request = engine.make_request(QUESTION)
    fed = engine.tokenizer.decode(request.prompt_token_ids, skip_special_tokens=True)
    assert not {"Tom", "wumpus", "zumpus"} & set(fed.replace("|", " ").split())
    original, renamed = parse_question(QUESTION), parse_question(fed.strip())
    forward = dict(zip(original.nodes, renamed.nodes))
    assert len(set(forward.values())) == len(forward) and set(forward.values()) <= set(symbol_words(K))
    assert sorted((forward[a], forward[b]) for a, b in original.edges) == sorted(renamed.edges)
    assert (forward[original.name], tuple(forward[o] for o in original.options)) == (renamed.name, renamed.options)
    assert engine.make_request(QUESTION).prompt_token_ids == request.prompt_token_ids   # one fixed assignment


def test_the_output_is_written_in_the_questions_names(engine):
    from engine.params import LatentPolicy, SamplingParams

    out = engine.generate([QUESTION], SamplingParams(max_tokens=120, temperature=1.0, seed=0, ignore_eos=True),
                          LatentPolicy(mode="fixed", thoughts=3, trace_top_k=3))[0]
    fed = engine.tokenizer.decode(engine.make_request(QUESTION).prompt_token_ids, skip_special_tokens=True)
    original, renamed = parse_question(QUESTION), parse_question(fed.strip())
    back = {s: n for n, s in zip(original.nodes, renamed.nodes)}
    symbol_ids = {engine.tokenizer(" " + s, add_special_tokens=False)["input_ids"][0]: n for s, n in back.items()}
    expected, run = "", []
    for t in out.token_ids + [None]:       # each symbol token becomes its word; the runs between decode as usual
        if t is None or t in symbol_ids:
            expected += engine.tokenizer.decode(run, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            expected += "" if t is None else " " + symbol_ids[t]
            run = []
        else:
            run.append(t)
    assert set(out.token_ids) & set(symbol_ids), "the random model wrote none of the question's symbols"
    assert out.text == expected
    assert not set(out.text.split()) & set(back)          # no symbol of the question is left
    distances = hop_distances(original)
    assert len(out.latent_trace) == 3
    for entry in out.latent_trace:
        nodes = entry["frontier"]["nodes"]
        assert [n["concept"] for n in nodes] == list(original.nodes)
        assert all(n["hops"] == distances.get(n["concept"]) for n in nodes)
