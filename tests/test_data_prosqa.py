"""The ProsQA-style generator, its data sources and CLI, checked by an oracle written here.

``oracle`` re-derives everything from the question text alone (a BFS over the stated
facts), then checks the graph fields against it; it never calls the generator's verifier.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from collections import Counter, deque

import pytest

from engine.cli import main
from engine.data.prosqa import PRESETS, ProsQASettings, generate
from engine.data.records import load_records
from engine.data.source import epoch_seed, parse_spec, resolve_source
from engine.data.verify import SampleError, verify_sample
from engine.data.vocab import PERSON_NAMES, concept_words

QUESTION = re.compile(r"^((?:(?:Every [a-z]+|[A-Z][a-z]+) is a [a-z]+\. )+)Is ([A-Z][a-z]+) a ([a-z]+) or ([a-z]+)\?$")
FACT = re.compile(r"^(Every )?(\w+) is a (\w+)$")


def oracle(s: dict) -> int:
    """Assert everything about one sample; return its number of steps."""
    m = QUESTION.match(s["question"])
    assert m, s["question"]
    facts_text, x, opt1, opt2 = m.groups()
    facts = facts_text.strip().removesuffix(".").split(". ")
    graph: dict[str, list[str]] = {}
    people, concepts = set(), set()
    for f in facts:
        every, a, b = FACT.match(f).groups()
        (concepts if every else people).add(a)
        concepts.add(b)
        graph.setdefault(a, []).append(b)
    assert not people & concepts, "a name is used both as a person and as a concept"
    assert len(set(facts)) == len(facts), "repeated fact"
    dist = {x: 0}
    queue = deque([x])
    while queue:
        u = queue.popleft()
        for v in graph.get(u, []):
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    answer = s["answer"].removesuffix(".").split(" is a ")[1]
    other = opt2 if answer == opt1 else opt1
    assert s["answer"] == f"{x} is a {answer}." and answer in (opt1, opt2) and opt1 != opt2
    assert answer in dist and other not in dist, "target must be reachable, distractor not"
    assert len(s["steps"]) == dist[answer], "steps must be a shortest path"
    cur = x
    for k, step in enumerate(s["steps"]):
        assert step.endswith(".") and step[:-1] in facts, f"step {step!r} is not a stated fact"
        every, a, b = FACT.match(step[:-1]).groups()
        assert a == cur and bool(every) == (k > 0)
        cur = b
    assert cur == answer
    # The graph fields say the same thing as the text.
    sym = s["idx_to_symbol"]
    assert len(set(sym)) == len(sym) and set(sym) == people | concepts
    assert sorted(f"{sym[a]} {sym[b]}" for a, b in s["edges"]) == sorted(
        " ".join(FACT.match(f).groups()[1:]) for f in facts)
    assert (sym[s["root"]], sym[s["target"]], sym[s["neg_target"]]) == (x, answer, other)
    return len(s["steps"])


@pytest.fixture(scope="module")
def samples() -> dict[str, list[dict]]:
    return {"full": generate(400, 11, "full"), "mini": generate(400, 11, "mini"),
            "linear": generate(400, 11, "linear")}


@pytest.mark.parametrize("size", ["full", "mini", "linear"])
def test_every_sample_passes_the_oracle(samples, size):
    hops = [oracle(s) for s in samples[size]]
    s = PRESETS[size]
    assert min(hops) >= s.min_hops and max(hops) <= s.max_hops
    assert len(set(hops)) > 1, "the hop count should vary"


def test_oracle_and_verifier_reject_broken_samples(samples):
    good = samples["full"][0]
    target, neg = good["target"], good["neg_target"]
    broken = [
        dict(good, steps=good["steps"][:-1]),                                   # path too short
        dict(good, steps=good["steps"][:1] + good["steps"][2:]),                # a hop skipped
        dict(good, target=neg, neg_target=target, answer=good["answer"].replace(
            good["idx_to_symbol"][target], good["idx_to_symbol"][neg])),      # answer unreachable
        dict(good, question=good["question"].replace(good["steps"][1] + " ", "", 1)),  # fact not stated
        dict(good, edges=good["edges"][1:]),                                    # graph disagrees with text
    ]
    for bad in broken:
        with pytest.raises(AssertionError):
            oracle(bad)
        with pytest.raises(SampleError):
            verify_sample(bad)


def test_deterministic_by_seed_and_prefix_stable():
    a = generate(30, 5, "mini")
    assert a == generate(30, 5, "mini")
    assert a[:10] == generate(10, 5, "mini")
    assert a != generate(30, 6, "mini")
    assert len({s["question"] for s in a}) == 30


def test_names_and_step_format(samples):
    words = set(concept_words())
    first_step = re.compile(r"^[A-Z][a-z]+ is a [a-z]+pus\.$")
    later_step = re.compile(r"^Every [a-z]+pus is a [a-z]+pus\.$")
    for s in samples["full"] + samples["mini"] + samples["linear"]:
        has_parent = {b for _, b in s["edges"]}
        for i, name in enumerate(s["idx_to_symbol"]):
            assert (name in PERSON_NAMES) if i not in has_parent else (name in words and name.endswith("pus"))
        assert first_step.match(s["steps"][0]) and all(later_step.match(t) for t in s["steps"][1:])
    firsts = Counter(QUESTION.match(s["question"]).group(3) == s["idx_to_symbol"][s["target"]]
                     for s in samples["full"])
    assert 0.35 < firsts[True] / len(samples["full"]) < 0.65, "the target should come first about half the time"


def test_concept_words_are_made_up_pus_words():
    words = concept_words()
    assert len(words) == len(set(words)) > 300
    assert all(re.fullmatch(r"[a-z]+pus", w) for w in words)


def test_matches_the_real_split_format_vocabulary_and_statistics(prosqa_valid_path, samples):
    real = json.loads(prosqa_valid_path.read_text())
    for s in real:  # the oracle (and so our template) accepts the real format exactly
        oracle(s)
        assert list(s) == list(samples["full"][0])
    has_parent = [{b for _, b in s["edges"]} for s in real]
    real_people = {n for s, hp in zip(real, has_parent) for i, n in enumerate(s["idx_to_symbol"]) if i not in hp}
    real_concepts = {n for s, hp in zip(real, has_parent) for i, n in enumerate(s["idx_to_symbol"]) if i in hp}
    assert real_people <= set(PERSON_NAMES) and real_concepts <= set(concept_words())

    def summary(data):
        steps = [len(s["steps"]) for s in data]
        return {"nodes": statistics.mean(len(s["idx_to_symbol"]) for s in data),
                "edges": statistics.mean(len(s["edges"]) for s in data),
                "steps": statistics.mean(steps),
                "words": statistics.mean(len(s["question"].split()) for s in data),
                "people": statistics.mean(len(s["idx_to_symbol"]) - len({b for _, b in s["edges"]}) for s in data),
                "hist": {k: steps.count(k) / len(steps) for k in range(3, 7)},
                "range": (min(steps), max(steps))}

    ours, theirs = summary(samples["full"]), summary(real)
    assert abs(ours["nodes"] - theirs["nodes"]) < 1.0, (ours, theirs)
    assert abs(ours["edges"] - theirs["edges"]) < 2.5, (ours, theirs)
    assert abs(ours["steps"] - theirs["steps"]) < 0.15, (ours, theirs)
    assert abs(ours["words"] - theirs["words"]) < 12, (ours, theirs)
    assert abs(ours["people"] - theirs["people"]) < 0.3, (ours, theirs)
    assert ours["range"] == theirs["range"] == (3, 6)
    for k in range(3, 7):  # 0.08: two standard errors of 400 + 300 samples, plus a margin
        assert abs(ours["hist"][k] - theirs["hist"][k]) < 0.08, (k, ours["hist"], theirs["hist"])


def test_mini_is_smaller(samples):
    nodes = [len(s["idx_to_symbol"]) for s in samples["mini"]]
    assert max(nodes) <= 12 and 8 <= statistics.mean(nodes) <= 11


def test_linear_has_no_branching(samples):
    for s in samples["linear"]:
        parents, children = Counter(b for _, b in s["edges"]), Counter(a for a, _ in s["edges"])
        assert max(parents.values()) == 1 and max(children.values()) == 1
        assert len(s["idx_to_symbol"]) <= 12 and s["root"] in (0, 1)
        people = len(s["idx_to_symbol"]) - len(parents)
        assert people >= 3, "two question chains plus at least one distractor chain"
    # The entity is not simply the longer chain (that would give the answer away).
    def chain_length(s, node):
        parent = {b: a for a, b in s["edges"]}
        hops = 0
        while node in parent:
            node, hops = parent[node], hops + 1
        return hops

    longer = Counter(len(s["steps"]) > chain_length(s, s["neg_target"]) for s in samples["linear"])
    shorter = Counter(len(s["steps"]) < chain_length(s, s["neg_target"]) for s in samples["linear"])
    assert longer[True] > 50 and shorter[True] > 50, (longer, shorter)


def test_custom_settings_and_bad_settings():
    fixed = ProsQASettings(n_nodes=16, min_hops=3, max_hops=3)
    assert {oracle(s) for s in generate(40, 2, fixed)} == {3}
    tight = generate(40, 2, ProsQASettings(n_nodes=8, min_hops=2, max_hops=4, linear=True))
    assert max(len(s["idx_to_symbol"]) for s in tight) <= 8 and {oracle(s) for s in tight} <= {2, 3, 4}
    with pytest.raises(ValueError, match="min_hops <= max_hops"):
        ProsQASettings(min_hops=4, max_hops=3)
    with pytest.raises(ValueError, match="unknown ProsQA size 'huge'"):
        generate(1, 0, "huge")
    with pytest.raises(ValueError, match="no graph with a target 3..3 hops away in 5 tries"):
        generate(1, 0, ProsQASettings(n_nodes=8, min_hops=3, max_hops=3, mean_parents=0.001, max_tries=5))


# --- data sources ---------------------------------------------------------------------

def test_resolve_source_fresh_per_epoch_reproducible_per_seed():
    spec = "prosqa:mini?n=25"
    e0, e1 = resolve_source(spec, epoch=0, seed=1), resolve_source(spec, epoch=1, seed=1)
    assert len(e0) == len(e1) == 25
    assert [r.question for r in e0] != [r.question for r in e1]
    assert e0 == resolve_source(spec, epoch=0, seed=1)
    assert e0 != resolve_source(spec, epoch=0, seed=2)
    assert [r.to_dict() for r in e1] == generate(25, epoch_seed(1, 1), "mini")
    for r in e0:
        oracle(r.to_dict())


def test_resolve_source_spec_options():
    fixed = "prosqa:linear?n=10&fresh=0&seed=99"
    assert resolve_source(fixed, epoch=0, seed=1) == resolve_source(fixed, epoch=7, seed=2)
    deep = resolve_source("prosqa:mini?n=30&n_nodes=16&min_hops=4&max_hops=5", epoch=0, seed=0)
    assert {len(r.steps) for r in deep} <= {4, 5}
    assert parse_spec("prosqa?n=3").settings == PRESETS["full"]


@pytest.mark.parametrize("spec, message", [
    ("prosqa:mini", "missing n=<samples per epoch>"),
    ("prosqa:mini?n=ten", "n='ten': expected an integer"),
    ("prosqa:mini?n=0", "n must be >= 1"),
    ("prosqa:tiny?n=5", "unknown ProsQA size 'tiny'"),
    ("prosqa:mini?n=5&colour=red", "unknown ProsQA setting 'colour'"),
    ("prosqa:mini?n=5&fresh=maybe", "fresh='maybe': expected 1/0"),
    ("prosqa:mini?n=5&min_hops=5", "ProsQASettings: need 1 <= min_hops <= max_hops"),
    ("prosqa:mini?n=5&n", "'n': expected key=value"),
    ("prosq:mini?n=5", "unknown generator 'prosq'"),
])
def test_bad_specs_name_the_part_at_fault(spec, message):
    with pytest.raises(ValueError) as err:
        resolve_source(spec, epoch=0, seed=0)
    assert message in str(err.value)


def test_resolve_source_loads_files_unchanged(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(generate(5, 0, "mini")))
    assert resolve_source(path, 0, 0) == resolve_source(str(path), 3, 9) == load_records(path)


# --- CLI --------------------------------------------------------------------------------

def test_cli_prosqa_writes_verified_samples(tmp_path, capsys):
    out = tmp_path / "mini.jsonl"
    assert main(["data", "prosqa", "--n", "30", "--seed", "3", "--size", "mini", "--out", str(out)]) == 0
    assert "wrote 30 mini samples" in capsys.readouterr().out
    records = load_records(out)
    assert [r.to_dict() for r in records] == generate(30, 3, "mini")
    assert main(["data", "stats", str(out), "prosqa:linear?n=20"]) == 0
    table = capsys.readouterr().out
    assert "nodes (min / mean / max)" in table and "steps (min / mean / max)" in table
    assert re.search(r"records\s+30\s+20", table)


def test_cli_set_overrides_and_errors(tmp_path, capsys):
    out = tmp_path / "d.json"
    assert main(["data", "prosqa", "--n", "12", "--size", "mini", "--set", "min_hops=3",
                 "--set", "max_hops=3", "--out", str(out)]) == 0
    assert {len(r.steps) for r in load_records(out)} == {3}
    assert main(["data", "prosqa", "--n", "3", "--set", "colour=red", "--out", str(out)]) == 2
    assert "unknown ProsQA setting 'colour'" in capsys.readouterr().err
    assert main(["data", "stats", str(tmp_path / "missing.json")]) == 2


def test_cli_entry_point_end_to_end(tmp_path):
    out = tmp_path / "full.json"
    run = subprocess.run([sys.executable, "-m", "engine.cli", "data", "prosqa", "--n", "20", "--seed", "4",
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert data == generate(20, 4, "full")
    stats = subprocess.run([sys.executable, "-m", "engine.cli", "data", "stats", "--json", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert json.loads(stats.stdout)[str(out)]["steps"]["min"] >= 3


def test_a_mixture_concatenates_its_parts_each_from_its_own_stream():
    from engine.data.source import is_generator_spec

    spec = "prosqa:mini?n=6+prosqa:full?n=4&n_nodes=10&min_hops=1&max_hops=3+prosqa:mini?n=3&seed=77"
    assert is_generator_spec(spec) and not is_generator_spec("prosqa:mini?n=6+data/x.json")
    mixed = resolve_source(spec, epoch=2, seed=5)
    assert len(mixed) == 13
    assert mixed[:6] == resolve_source("prosqa:mini?n=6", epoch=2, seed=5)      # the first part: the run's seed
    small = mixed[6:10]
    assert all(1 <= len(r.steps) <= 3 for r in small)
    assert small != resolve_source("prosqa:full?n=4&n_nodes=10&min_hops=1&max_hops=3", epoch=2, seed=5)
    assert mixed[10:] == resolve_source("prosqa:mini?n=3&seed=77", epoch=2, seed=123)   # its own seed
    assert mixed == resolve_source(spec, epoch=2, seed=5)
    assert mixed != resolve_source(spec, epoch=3, seed=5)
