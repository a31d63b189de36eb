"""``engine eval``: the reference's answer comparison and the CLI on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from engine.data.records import save_records
from engine.train.evaluate import extract_answer, gold_answer, is_correct


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_reference_comparison():
    q = "Is Tom a wumpus or yumpus?"
    assert extract_answer(q, "Tom is a rompus.\n### Tom is a wumpus. ") == "Tom is a wumpus."
    assert is_correct(q, "steps\n### Tom is a wumpus.", " Tom is a wumpus. ")
    assert is_correct("What is 2 x 500?", "### 1,000", "1000")          # commas removed on both sides
    assert is_correct(q, "#### 5 # Tom is a wumpus.", "Tom is a wumpus.")  # text after the last '#'
    # no '#' in the output: the reference's text still holds the question, so it never matches
    assert not is_correct(q, "Tom is a wumpus.", "Tom is a wumpus.")
    assert not is_correct(q, "### Tom is a yumpus.", "Tom is a wumpus.")


def test_compact_models_are_scored_against_the_compact_gold():
    assert gold_answer("Tom is a wumpus.", "compact") == "Tom wumpus"
    assert gold_answer("Tom wumpus", "compact") == "Tom wumpus"          # already compact
    assert gold_answer("Tom is a wumpus.", "reference") == "Tom is a wumpus."
    q = "Every rompus is a wumpus. Tom is a rompus. Is Tom a wumpus or yumpus?"
    assert is_correct(q, "rompus wumpus | ### Tom wumpus", gold_answer("Tom is a wumpus.", "compact"))
    assert not is_correct(q, "### Tom yumpus", gold_answer("Tom is a wumpus.", "compact"))


def test_eval_cli_json_counts_correct_answers(tmp_path, tiny_checkpoint, capsys):
    from engine import Engine, LatentPolicy, SamplingParams
    from engine.cli import main

    directory = tiny_checkpoint("gpt2")
    questions = ["Is Tom a wumpus or yumpus?", "Is Sally a rompus or impus?", "Is Max a zumpus or dumpus?"]
    outputs = Engine.from_pretrained(directory).generate(questions, SamplingParams(max_tokens=12),
                                                         LatentPolicy(mode="fixed", thoughts=2))
    # make the first record's answer the model's own (as the reference would extract it) and
    # the others wrong, so the expected accuracy is exactly 1/3
    first = extract_answer(questions[0], outputs[0].text)
    records = [{"question": questions[0], "steps": [], "answer": first or "x"},
               {"question": questions[1], "steps": [], "answer": "never this"},
               {"question": questions[2], "steps": ["a step"], "answer": "nor this"}]
    data = save_records(records, tmp_path / "eval.json")
    code = main(["eval", "--model", str(directory), "--data", str(data), "--thoughts", "2",
                 "--max-tokens", "12", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["n"] == 3 and report["correct"] == (1 if first else 0)
    assert report["mean_thoughts"] == 2.0
    assert report["thoughts"] == 2
    assert report["mean_generated_tokens"] == pytest.approx(sum(len(o.token_ids) for o in outputs) / 3)
    assert report["latent"] == "fixed:2" and report["seconds"] > 0 and report["max_tokens"] == 12


def test_eval_cli_text_output_and_errors(tmp_path, tiny_checkpoint, capsys):
    from engine.cli import main

    directory = tiny_checkpoint("gpt2")
    data = save_records([{"question": "Is Tom a wumpus?", "steps": [], "answer": "yes"}], tmp_path / "d.jsonl")
    assert main(["eval", "--model", str(directory), "--data", str(data), "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "mean thoughts" in out
    assert main(["eval", "--model", str(directory), "--data", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "--model", str(directory), "--data", str(data), "--latent", "auto"]) == 2
    assert "stop classifier" in capsys.readouterr().err


def test_only_eval_config_runs_the_evaluation(tmp_path, tiny_checkpoint, capsys):
    """The reference's *_eval.yaml use: only_eval with load_model_path (here our checkpoint)."""
    from engine.cli import main

    data = save_records([{"question": "Is Tom a wumpus?", "steps": [], "answer": "yes"}], tmp_path / "v.json")
    config = tmp_path / "eval.yaml"
    config.write_text(f"only_eval: true\nload_model_path: {tiny_checkpoint('gpt2')}\nval_path: {data}\n"
                      f"val_max_tokens: 4\n")
    assert main(["train", str(config)]) == 0
    assert "accuracy" in capsys.readouterr().out
    config.write_text(f"only_eval: true\nload_model_path: {tmp_path / 'checkpoint_40'}\nval_path: {data}\n")
    (tmp_path / "checkpoint_40").write_bytes(b"")
    assert main(["train", str(config)]) == 2
    assert "convert-reference" in capsys.readouterr().err
