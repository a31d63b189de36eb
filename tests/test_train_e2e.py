"""End to end: ``engine train`` on a trivial task learns, writes servable checkpoints, metrics
and a plot, resumes exactly, and trains every method into a checkpoint the engine serves."""

from __future__ import annotations

import json
import random

import pytest
import torch

from engine.data.records import save_records

@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread avoids OpenMP waits on a busy 2-core machine (and the
    trainer's num_threads setting does not leak into other tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


NAMES = ["Tom", "Sam", "Max", "Rex", "Fae", "Wren", "Alex", "Sally"]
WORDS = ["wumpus", "yumpus", "zumpus", "dumpus", "rompus", "numpus", "tumpus", "impus"]


def toy_records(n: int, seed: int, max_steps: int = 2) -> list[dict]:
    """X is a (fixed) concept; 1..max_steps steps restate it; the answer names it."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(len(NAMES))
        steps = [f"{NAMES[i]} is a {WORDS[i]}."] * rng.randint(1, max_steps)
        out.append({"question": f"What is {NAMES[i]}?", "steps": steps, "answer": f"{NAMES[i]} is a {WORDS[i]}."})
    return out


def write_config(tmp_path, name="run", **overrides) -> tuple:
    train = save_records(toy_records(256, 0), tmp_path / "train.json")
    val = save_records(toy_records(8, 1), tmp_path / "val.json")
    config = {
        "save_path": str(tmp_path / name), "init": "scratch", "seed": 0, "num_threads": 1,
        "model": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128},
        "tokenizer_vocab_size": 300, "train_path": str(train), "val_path": str(val),
        "c_thought": 1, "epochs_per_stage": 1, "max_latent_stage": 1, "num_epochs": 3,
        "batch_size_training": 16, "lr": 1e-2, "val_max_tokens": 16, "plot": True,
    }
    config.update(overrides)
    return config


def run_train(config: dict, tmp_path, name="config.yaml") -> int:
    import yaml

    from engine.cli import main

    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return main(["train", str(path)])


def epochs(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "epoch"]


def test_tiny_run_learns_and_the_checkpoint_serves(tmp_path):
    from engine import Engine, SamplingParams

    config = write_config(tmp_path, num_epochs=4, epochs_per_stage=2, reset_optimizer=True,
                          warmup_steps=2, lr_schedule="cosine")
    assert run_train(config, tmp_path) == 0
    run_dir = tmp_path / "run"
    rows = epochs(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and [r["stage"] for r in rows] == [0, 0, 1, 1]
    assert rows[-1]["train_loss"] < 0.5 * rows[0]["train_loss"], [r["train_loss"] for r in rows]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and r["samples_per_s"] > 0 for r in rows)
    assert (run_dir / "metrics.png").stat().st_size > 1000
    assert (run_dir / "best" / "coconut.json").is_file()
    # best/ is the best epoch of the last stage reached, however well stage 0 scored
    best = json.loads((run_dir / "best" / "coconut.json").read_text())["training"]
    last_stage = [r for r in rows if r["stage"] == 1]
    assert best["stage"] == 1 and best["val_accuracy"] == max(r["val_accuracy"] for r in last_stage)
    coconut = json.loads((run_dir / "checkpoint_4" / "coconut.json").read_text())
    assert coconut["method"] == "coconut" and coconut["num_thoughts"] == 1
    assert coconut["training"]["epoch"] == 4 and coconut["training"]["stage"] == 1
    engine = Engine.from_pretrained(run_dir / "checkpoint_4")
    out = engine.generate(["What is Tom?"], SamplingParams(max_tokens=16))[0]
    assert out.num_thoughts == 1 and out.finish_reason in ("stop", "length")


def test_resume_continues_exactly(tmp_path):
    """Two epochs, stop, resume to three == three epochs straight (model, optimizer, data order).
    (A constant schedule: a cosine one depends on num_epochs, which the two runs change.)"""
    common = dict(num_epochs=3, epochs_per_stage=1, max_latent_stage=1, reset_optimizer=False,
                  uniform_prob=0.5, warmup_steps=20, plot=False)
    straight = write_config(tmp_path, name="straight", **common)
    assert run_train(straight, tmp_path, "straight.yaml") == 0
    resumed = write_config(tmp_path, name="resumed", **{**common, "num_epochs": 2})
    assert run_train(resumed, tmp_path, "resumed.yaml") == 0
    assert not (tmp_path / "resumed" / "checkpoint_3").exists()
    resumed["num_epochs"] = 3
    assert run_train(resumed, tmp_path, "resumed.yaml") == 0

    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight" / "checkpoint_3" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint_3" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert [r["epoch"] for r in epochs(tmp_path / "resumed")] == [1, 2, 3]
    first = json.loads((tmp_path / "straight" / "checkpoint_3" / "trainer_state.json").read_text())
    second = json.loads((tmp_path / "resumed" / "checkpoint_3" / "trainer_state.json").read_text())
    assert first["global_step"] == second["global_step"] == 48


@pytest.mark.parametrize("method,flags,thoughts", [
    ("cot", {"coconut": False, "cot": True}, 0),
    ("no_cot", {"coconut": False, "no_cot": True}, 0),
    ("no_thoughts", {"coconut": False, "no_thoughts": True}, 0),
    ("pause_as_thought", {"coconut": False, "pause_as_thought": True}, 1),
    ("no_curriculum", {"no_curriculum": True}, 1),
])
def test_every_method_trains_and_serves(tmp_path, method, flags, thoughts):
    from engine import Engine, SamplingParams

    # resume: 1 (the reference's "skip the first epochs") -> one epoch, at stage 1
    config = write_config(tmp_path, num_epochs=2, resume=1, plot=False, **flags)
    assert run_train(config, tmp_path) == 0
    assert not (tmp_path / "run" / "checkpoint_1").exists()
    directory = tmp_path / "run" / "checkpoint_2"
    coconut = json.loads((directory / "coconut.json").read_text())
    assert coconut["method"] == method and coconut["num_thoughts"] == thoughts
    engine = Engine.from_pretrained(directory)
    out = engine.generate(["What is Sam?"], SamplingParams(max_tokens=8))[0]
    if method == "pause_as_thought":    # pause tokens are part of the prompt, not fed-back thoughts
        assert out.prompt_token_ids.count(engine.checkpoint.markers.latent) == thoughts
    else:
        assert out.num_thoughts == thoughts


def test_stop_classifier_is_trained_saved_and_used(tmp_path):
    from engine import Engine, LatentPolicy, SamplingParams

    config = write_config(tmp_path, num_epochs=2, max_latent_stage=3, epochs_per_stage=1, plot=False,
                          stop_classifier=True, stop_classifier_samples=64, stop_classifier_epochs=100)
    config["train_path"] = str(save_records(toy_records(64, 5, max_steps=3), tmp_path / "train3.json"))
    assert run_train(config, tmp_path) == 0
    directory = tmp_path / "run" / "checkpoint_2"
    coconut = json.loads((directory / "coconut.json").read_text())
    spec = coconut["stop_classifier"]
    assert spec["max_thoughts"] == 3 and 0.0 <= spec["accuracy"] <= 1.0
    report = coconut["training"]["stop_classifier"]
    assert report["positives"] == 64 and report["negatives"] > 0
    assert set(report["auto"]) == {"accuracy", "mean_thoughts"} and report["fixed"]["mean_thoughts"] == 1.0
    engine = Engine.from_pretrained(directory)
    from tests.engine_helpers import reference

    for question in ("What is Tom?", "What is Sam?", "What is Wren?"):
        out = engine.generate([question], SamplingParams(max_tokens=8), LatentPolicy(mode="auto"))[0]
        # oracle: the naive decoder stops at the first thought whose state the saved head scores >= threshold
        ref = reference(engine, question, 3, 8, mode="auto", stop_classifier=engine.checkpoint.stop_classifier,
                        threshold=spec["threshold"])
        assert (out.num_thoughts, out.token_ids) == (ref.num_thoughts, ref.token_ids)


def test_prune_keeps_the_newest_and_every_nth(tmp_path):
    from engine.train.state import TRAINER_STATE, list_checkpoints, prune

    for epoch in range(1, 8):
        (tmp_path / f"checkpoint_{epoch}").mkdir()
        (tmp_path / f"checkpoint_{epoch}" / TRAINER_STATE).write_text("{}")
    prune(tmp_path, keep=2, keep_every=3)
    assert [e for e, _ in list_checkpoints(tmp_path)] == [3, 6, 7]
    prune(tmp_path, keep=0)
    assert len(list_checkpoints(tmp_path)) == 3


def test_best_is_the_best_of_the_latest_stage():
    from engine.train.state import is_new_best

    assert is_new_best(0.2, 0, -1.0, 0)                 # the first evaluation
    assert is_new_best(0.5, 1, 0.9, 0)                  # a later stage wins, even when worse
    assert not is_new_best(0.8, 1, 0.9, 1)              # within a stage, the higher accuracy
    assert is_new_best(0.95, 1, 0.9, 1)
    assert not is_new_best(0.9, 1, 0.9, 1)              # a tie keeps the earlier epoch
    assert not is_new_best(None, 2, 0.9, 1)             # an epoch without validation


def test_compact_run_declares_its_text_format_and_serves_natural_questions(tmp_path):
    """A model trained on the compact rendering must say so in coconut.json, or the engine
    would feed it natural-language questions it never saw."""
    from engine import Engine, SamplingParams
    from engine.data.source import resolve_source

    config = write_config(tmp_path, train_path="prosqa:linear?n=64", val_path="prosqa:linear?n=4&fresh=0",
                          text_format="compact", compact_steps="path", step_suffix="", answer_prefix=" ### ",
                          num_epochs=1, tokenizer_vocab_size=2048)   # room for every ProsQA word
    config["model"]["n_positions"] = 256
    assert run_train(config, tmp_path) == 0
    coconut = json.loads((tmp_path / "run" / "checkpoint_1" / "coconut.json").read_text())
    assert coconut["text_format"] == "compact" and coconut["step_suffix"] == ""
    engine = Engine.from_pretrained(tmp_path / "run" / "checkpoint_1")
    natural = resolve_source("prosqa:linear?n=1&seed=9&fresh=0", 0, 0)[0].question
    assert natural.startswith(("Every", *NAMES)) or " is a" in natural
    out = engine.generate([natural], SamplingParams(max_tokens=4))[0]
    assert out.finish_reason in ("stop", "length")


def test_latent_projection_trains_saves_serves_and_resumes(tmp_path):
    """``latent_projection: true``: CODI's prj learned with the curriculum, saved beside the
    model, served with projection feedback exactly as the reference decodes it, and a resumed
    run ends where a straight one does, projection included."""
    from safetensors.torch import load_file

    from engine import Engine, LatentPolicy, SamplingParams
    from tests.engine_helpers import reference

    common = dict(num_epochs=3, epochs_per_stage=1, max_latent_stage=1, reset_optimizer=False,
                  warmup_steps=20, plot=False, latent_projection=True, latent_projection_size=24)
    straight = write_config(tmp_path, name="straight", **common)
    assert run_train(straight, tmp_path, "straight.yaml") == 0
    resumed = write_config(tmp_path, name="resumed", **{**common, "num_epochs": 2})
    assert run_train(resumed, tmp_path, "resumed.yaml") == 0
    resumed["num_epochs"] = 3
    assert run_train(resumed, tmp_path, "resumed.yaml") == 0
    done = tmp_path / "straight" / "checkpoint_3"
    a = load_file(done / "latent_projection.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint_3" / "latent_projection.safetensors")
    from engine.feedback import LatentProjection

    torch.manual_seed(0)                           # the run's seed: how the trainer initialised it
    initial = LatentProjection(32, 24).state_dict()
    assert a["1.weight"].shape == (24, 32)
    assert not torch.allclose(initial["1.weight"], a["1.weight"]), "the projection was not trained"
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    coconut = json.loads((done / "coconut.json").read_text())
    assert coconut["latent_feedback"] == {"type": "projection", "file": "latent_projection.safetensors",
                                          "temperature": None, "top_k": None, "top_p": None}
    engine = Engine.from_pretrained(done)
    assert engine.checkpoint.projection is not None
    questions = ["What is Tom?", "What is Max?"]
    for question, out in zip(questions, engine.generate(questions, SamplingParams(max_tokens=8),
                                                        LatentPolicy(mode="fixed", thoughts=2))):
        assert out.token_ids == reference(engine, question, 2, 8).token_ids
