"""The superposition view: each thought's mass on the frontier (the nodes within k hops of
the asked name), measured by the engine in a batch, equals what an independent computation
gives: the naive full-recompute decoder's softmax of the LM head on each thought, summed over
nodes found by a reachability fixpoint over the question's facts (read here with a plain
split of the compact text, not with engine.data.question). ``engine eval`` reports the means
of the same masses, accuracy per hop count (against the generator's own step counts) and the
share of answers naming neither option. Runs on the bundled default model (compact facts)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from engine.data.records import parse_records
from engine.sync_engine import Engine
from engine.models import default_model_dir
from engine.params import LatentPolicy, SamplingParams
from engine.train.evaluate import evaluate
from tests.engine_helpers import reference


@pytest.fixture(scope="module")
def engine():
    engine = Engine.from_pretrained()
    if engine.coconut.text_format != "compact":
        pytest.skip("the bundled model does not read compact graph questions")
    return engine


@pytest.fixture(scope="module")
def records():
    return json.loads((default_model_dir() / "test.json").read_text())[:8]


def facts_of(compact: str) -> tuple[str, list[tuple[str, str]]]:
    *facts, ask = [p.split() for p in compact.split("|")]
    return ask[1], [(a, b) for a, b in facts]


def reached(edges, root: str, k: int) -> set[str]:
    out = {root}
    for _ in range(k):
        out |= {b for a, b in edges if a in out}
    return out


def oracle_masses(engine, question: str, thoughts: int) -> list[tuple[float, float]]:
    compact = engine.prompt_format.read_graph(question).compact()
    if engine.coconut.symbols:   # the model reads the question renamed, one fixed assignment per question
        from engine.data.symbols import SymbolMap

        compact = SymbolMap.for_text(compact, engine.coconut.symbols, seed=compact).rename(compact)
    root, edges = facts_of(compact)
    ref = reference(engine, compact, thoughts, 4, trace_top_k=1)
    token = {w: engine.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for e in edges for w in e}
    masses = []
    for k, probs in enumerate(ref.trace_probs, 1):
        within, beyond = reached(edges, root, k), reached(edges, root, k + 1) - reached(edges, root, k)
        masses.append((sum(float(probs[token[w]]) for w in within),
                       sum(float(probs[token[w]]) for w in beyond)))
    return masses


def test_engine_frontier_mass_equals_the_naive_reference_over_an_independent_bfs(engine, records):
    thoughts = engine.coconut.num_thoughts
    outs = engine.generate([r["question"] for r in records], SamplingParams(max_tokens=8),
                           LatentPolicy(thoughts=thoughts, trace_top_k=3))
    for record, out in zip(records, outs):
        expected = oracle_masses(engine, record["question"], thoughts)
        got = [m for e in out.latent_trace for m in (e["frontier"]["frontier_mass"], e["frontier"]["next_mass"])]
        assert got == pytest.approx([m for pair in expected for m in pair], abs=1e-4)
        for e in out.latent_trace:
            f = e["frontier"]
            assert f["frontier_mass"] + f["next_mass"] + f["rest_mass"] == pytest.approx(1.0, abs=1e-5)


def test_eval_reports_mean_frontier_masses_per_hop_accuracy_and_neither(engine, records):
    thoughts = engine.coconut.num_thoughts
    report = evaluate(engine, parse_records(records, "test.json"), max_tokens=16)
    oracle = [oracle_masses(engine, r["question"], thoughts) for r in records]
    assert [f["thought"] for f in report.frontier] == list(range(1, thoughts + 1))
    for k, f in enumerate(report.frontier):
        assert f["frontier_mass"] == pytest.approx(sum(o[k][0] for o in oracle) / len(oracle), abs=1e-4)
        assert f["next_mass"] == pytest.approx(sum(o[k][1] for o in oracle) / len(oracle), abs=1e-4)
    hops = Counter(str(len(r["steps"])) for r in records)
    assert {h: v["n"] for h, v in report.per_hops.items()} == dict(hops)
    assert sum(v["correct"] for v in report.per_hops.values()) == report.correct
    assert 0.0 <= report.neither_option <= 1 - report.accuracy + 1e-9


def test_eval_plot_draws_reports_side_by_side(engine, records, tmp_path):
    from engine.train.eval_plot import main

    report = evaluate(engine, parse_records(records, "test.json"), max_tokens=16).to_dict()
    no_trace = {**report, "frontier": None}
    (tmp_path / "a.json").write_text(json.dumps(report))
    (tmp_path / "b.json").write_text(json.dumps(no_trace))
    assert main([str(tmp_path / "plot.png"), f"COCONUT={tmp_path / 'a.json'}", f"CoT={tmp_path / 'b.json'}"]) == 0
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
