"""Marker embeddings when a run starts: kept as they are, or copied from a chosen token."""

from __future__ import annotations

import torch

from engine.checkpoint import CoconutConfig
from engine.train.modeling import add_markers, load_pretrained


def test_reinit_copies_the_init_token_into_all_markers_and_only_then(tiny_checkpoint):
    model, tokenizer = load_pretrained(tiny_checkpoint("gpt2"))
    coconut = CoconutConfig.read(tiny_checkpoint("gpt2"))
    weight = model.get_input_embeddings().weight
    before = weight.detach().clone()
    markers = add_markers(model, tokenizer, coconut, "\n")            # markers exist: untouched
    assert torch.equal(weight, before)
    [source] = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert not torch.equal(before[markers.bot], before[source])
    add_markers(model, tokenizer, coconut, "\n", reinit=True)
    for marker in (markers.bot, markers.eot, markers.latent):
        assert torch.equal(weight[marker], before[source])
    others = [i for i in range(weight.shape[0]) if i not in (markers.bot, markers.eot, markers.latent)]
    assert torch.equal(weight[others], before[others])
