"""Loading validates the checkpoint directory and names what is wrong; bad requests get
clear errors naming the field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine import CheckpointError, Engine, LatentPolicy, RequestTooLongError, SamplingParams
from engine.checkpoint import CoconutConfig, load_checkpoint


@pytest.fixture
def checkpoint_copy(gpt2_checkpoint, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(gpt2_checkpoint, target)
    return target


def edit_coconut_json(directory, **changes):
    path = directory / "coconut.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None and key.startswith("drop_"):
            data.pop(key[5:])
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_round_trip_config(checkpoint_copy):
    config = CoconutConfig.read(checkpoint_copy)
    assert config.bot_token == "<|start-latent|>" and config.method == "coconut"
    assert load_checkpoint(checkpoint_copy).markers.bot != load_checkpoint(checkpoint_copy).markers.eot


@pytest.mark.parametrize("changes, message", [
    ({"num_thoughts": -1}, "field 'num_thoughts'"),
    ({"method": "magic"}, "field 'method'"),
    ({"c_thought": "two"}, "field 'c_thought'"),
    ({"eot_token": "<|start-latent|>"}, "three distinct"),
    ({"bot_token": "<|not-a-token|>"}, "field 'bot_token'"),
    ({"format_version": 7}, "format_version 7"),
    ({"stop_classifier": {"path": "missing.safetensors"}}, "stop_classifier.path"),
    ({"stop_classifier": {"path": "x", "threshold": 3}}, "field 'stop_classifier.threshold'"),
])
def test_bad_coconut_json_names_the_field(checkpoint_copy, changes, message):
    edit_coconut_json(checkpoint_copy, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(checkpoint_copy)


def test_missing_pieces_are_named(checkpoint_copy, tmp_path):
    with pytest.raises(CheckpointError, match="no such directory or .gguf file"):
        load_checkpoint(tmp_path / "nope")
    (checkpoint_copy / "coconut.json").rename(tmp_path / "c.json")
    # without coconut.json: a plain language model (tests/test_plain_model.py)
    assert load_checkpoint(checkpoint_copy).config.method == "no_cot"
    (tmp_path / "c.json").rename(checkpoint_copy / "coconut.json")
    (checkpoint_copy / "coconut.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(checkpoint_copy)


def test_pickled_weights_are_refused(checkpoint_copy):
    from safetensors.torch import load_file

    state = load_file(str(checkpoint_copy / "model.safetensors"))
    (checkpoint_copy / "model.safetensors").unlink()
    torch.save(state, checkpoint_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        load_checkpoint(checkpoint_copy)


def test_wrong_stop_classifier_shape_is_named(checkpoint_copy):
    from engine.stop_classifier import StopClassifier

    StopClassifier(13).save(checkpoint_copy / "head.safetensors")
    edit_coconut_json(checkpoint_copy, stop_classifier={"path": "head.safetensors"})
    with pytest.raises(CheckpointError, match="does not match a head for model hidden size 64"):
        load_checkpoint(checkpoint_copy)


def test_impossible_and_invalid_requests(gpt2_checkpoint):
    engine = Engine.from_pretrained(gpt2_checkpoint, max_seq_len=64)
    with pytest.raises(RequestTooLongError, match="limit is 64"):
        engine.add_request("Is Tom a wumpus? " * 20, SamplingParams(max_tokens=4))
    with pytest.raises(RequestTooLongError):
        engine.add_request("Is Tom a wumpus?", SamplingParams(max_tokens=60), LatentPolicy(thoughts=10))
    with pytest.raises(ValueError, match="needs a stop classifier"):
        engine.add_request("Is Tom a wumpus?", latent=LatentPolicy(mode="auto"))
    with pytest.raises(ValueError, match="non-empty"):
        engine.add_request("   ")
    assert not engine.has_unfinished()


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"seed": -1}, "seed"), ({"stop": [""]}, "stop"),
])
def test_sampling_params_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}="):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"mode": "sometimes"}, "latent.mode"), ({"thoughts": -1}, "latent.thoughts"),
    ({"mode": "auto", "threshold": 2.0}, "latent.threshold"), ({"mode": "auto", "max_thoughts": 0}, "latent.max_thoughts"),
    ({"mode": "none", "thoughts": 3}, "latent.thoughts"),
])
def test_latent_policy_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LatentPolicy(**kwargs)


def test_list_arguments_must_match_question_count(gpt2_checkpoint):
    engine = Engine.from_pretrained(gpt2_checkpoint)
    with pytest.raises(ValueError, match="2 entries for 3 questions"):
        engine.generate(["a?", "b?", "c?"], sampling=[SamplingParams(), SamplingParams()])
