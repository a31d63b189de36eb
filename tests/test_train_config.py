"""Training configuration: the reference's YAML files load unchanged, overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.train.config import ConfigError, load_config

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "reference"
RECIPES = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(REFERENCE.glob("*.yaml")), ids=lambda p: p.name)
def test_reference_yaml_loads_unchanged(path):
    config = load_config(path)
    assert config.lr == 1e-4 and config.weight_decay == 0.01 and config.batch_size_training == 32
    assert config.model_id == "openai-community/gpt2"
    if config.load_model_path is None:
        assert "load_model_path: None" in path.read_text()


def test_reference_values_and_methods():
    coconut = load_config(REFERENCE / "prosqa_coconut.yaml")
    assert coconut.method == "coconut"
    assert (coconut.c_thought, coconut.epochs_per_stage, coconut.max_latent_stage) == (1, 5, 6)
    assert coconut.pad_latent_to_max and coconut.reset_policy == "stage" and coconut.num_epochs == 50
    assert coconut.run_dir == Path("prosqa_experiments/prosqa-coconut")
    assert coconut.train_path == "data/prosqa_train.json" and coconut.load_model_path is None
    cot = load_config(REFERENCE / "gsm_cot.yaml")
    assert cot.method == "cot" and cot.c_thought == 0 and cot.save_only_improve and cot.reset_policy == "never"
    gsm = load_config(REFERENCE / "gsm_coconut.yaml")
    assert (gsm.c_thought, gsm.max_latent_stage, gsm.resume) == (2, 3, 3)
    assert gsm.load_model_path == "YOUR_PATH_TO_SAVE_THE_MODEL/gsm-cot/checkpoint_22"
    assert load_config(REFERENCE / "prosqa_coconut_eval.yaml").only_eval
    # coconut: false with no other method flag: placeholders trained as plain tokens
    assert load_config(REFERENCE / "prosqa_special_token.yaml").method == "pause_as_thought"


def test_overrides(tmp_path):
    config = load_config(REFERENCE / "prosqa_coconut.yaml",
                         ["lr=3e-4", "bf16=true", "coconut=false", "cot=true", "c_thought=0",
                          "init=scratch", "model.model_type=gpt2", "model.n_layer=2", "load_model_path=None",
                          "reset_optimizer=epoch", "train_path=prosqa:mini?n=100"])
    assert config.lr == 3e-4 and config.bf16 and config.method == "cot"
    assert config.model == {"model_type": "gpt2", "n_layer": 2}
    assert config.reset_policy == "epoch" and config.train_path == "prosqa:mini?n=100"
    assert load_config(None, ["no_curriculum=true"]).method == "no_curriculum"


@pytest.mark.parametrize("overrides,message", [
    (["learning_rate=1"], "unknown config key 'learning_rate'"),
    (["c_thougth=2"], "did you mean 'c_thought'"),
    (["lr=-1"], "key 'lr'"),
    (["cot=true"], "coconut: true conflicts with cot"),
    (["coconut=false", "cot=true", "no_cot=true"], "set at most one"),
    (["c_thought=0"], "c_thought=0 is invalid for method coconut"),
    (["init=scratch"], "init: scratch needs `model`"),
    (["reset_optimizer=sometimes"], "key 'reset_optimizer"),
    (["oops"], "expected key=value"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((REFERENCE / "prosqa_coconut.yaml").read_text() + "\nwarmup: 10\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown config key 'warmup'"):
        load_config(path)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_committed_recipes_load(path):
    load_config(path)
