"""The GPU recipes run: each committed ``configs/*_gpu.yaml`` trains end to end on the CPU
with its own method, curriculum, data format and optimizer settings, shrunk to a tiny model
and a few steps (the shape overrides are the only changes), and writes a checkpoint the
engine serves with the recipe's number of thoughts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.train.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*_gpu.yaml"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_gpu_recipe_smoke_runs_on_cpu(path, tmp_path, tiny_checkpoint):
    from engine.sync_engine import Engine
    from engine.train.trainer import Trainer

    recipe = load_config(path)
    shrink = [f"save_path={tmp_path}", "device=cpu", "num_threads=1", "bf16=false",
              "train_path=prosqa:mini?n=48", "val_path=prosqa:mini?n=4&seed=9&fresh=0",
              "epochs_per_stage=1", f"num_epochs={recipe.max_latent_stage + 2}", "batch_size_training=16",
              "gradient_accumulation_steps=1", "val_batch_size=4", "val_every=1", "stop_classifier_samples=32"]
    if recipe.init == "scratch":
        shrink += ["model.n_layer=1", "model.n_embd=32", "model.n_head=2"]
    else:
        shrink += [f"model_id={tiny_checkpoint('gpt2', max_positions=512)}"]
    config = load_config(path, shrink)
    summary = Trainer(config).run()
    assert summary["method"] == recipe.method and summary["epochs"] == recipe.max_latent_stage + 2
    last = config.run_dir / f"checkpoint_{config.num_epochs}"
    coconut = json.loads((last / "coconut.json").read_text())
    assert coconut["num_thoughts"] == recipe.max_latent_stage * recipe.c_thought
    engine = Engine.from_pretrained(last)
    out = engine.generate("Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or zumpus?")[0] \
        if coconut.get("text_format") != "compact" else None
    assert out is None or out.num_thoughts == coconut["num_thoughts"]
