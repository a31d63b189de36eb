"""Stop-classifier features and labels against the naive reference decoder, and the head's fit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.reference import reference_generate
from engine.train.layout import Curriculum, Markers, tokenize_records
from engine.train.stop_head import stop_features, train_stop_head

@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread avoids OpenMP waits on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


RECORDS = [
    SimpleNamespace(question="Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus or zumpus?",
                    steps=["Tom is a wumpus.", "Every wumpus is a yumpus."], answer="Tom is a yumpus."),
    SimpleNamespace(question="Sam is a rompus. Is Sam a rompus or impus?", steps=["Sam is a rompus."],
                    answer="Sam is a rompus."),
    SimpleNamespace(question="Max is a a. Every a is a b. Every b is a c. Every c is a d. Is Max a d or e?",
                    steps=["Max is a a.", "Every a is a b.", "Every b is a c.", "Every c is a d."],
                    answer="Max is a d."),
]


def test_features_are_the_states_after_each_thought_and_labels_mark_the_needed_one(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint("gpt2"))
    m = ckpt.markers
    markers = Markers(bot=m.bot, eot=m.eot, latent=m.latent, eos=m.eos[0], pad=m.pad)
    curriculum = Curriculum(max_latent_stage=3, c_thought=1, pad_latent_to_max=True)
    tokenized = tokenize_records(ckpt.tokenizer, RECORDS, markers.eos)
    feats, labels, owners = stop_features(ckpt.model, tokenized, curriculum, markers, batch_size=2)
    needed = [2, 1, 3]                         # min(steps, max_latent_stage=3)
    assert owners.tolist() == [0, 0, 1, 2, 2, 2]
    assert labels.tolist() == [0, 1, 1, 0, 0, 1]
    for i, record in enumerate(RECORDS):
        ref = reference_generate(ckpt.model, ckpt.tokenizer, record.question, question_suffix="\n",
                                 bot_id=m.bot, eot_id=m.eot, eos_ids=set(m.eos), thoughts=needed[i],
                                 max_tokens=1, record_hiddens=True)
        expected = torch.stack(ref.thought_hiddens)
        assert torch.allclose(feats[owners == i], expected, atol=1e-4), i


def test_head_learns_a_separable_stop_signal():
    g = torch.Generator().manual_seed(0)
    def data(n):
        y = (torch.rand(n, generator=g) < 0.3).float()
        x = torch.randn(n, 16, generator=g) + 5
        x[:, 3] += 4 * y                         # the stop signal lives in one (offset) direction
        owners = torch.arange(n)
        return x, y, owners
    head, report = train_stop_head(data(400), data(200), hidden_size=0, steps=300, lr=0.05)
    assert report.accuracy > 0.9 and report.train_accuracy > 0.9
    assert report.positives + report.negatives == 400
    head2, report2 = train_stop_head(data(400), data(200), hidden_size=8, steps=300, lr=0.05)
    assert report2.accuracy > 0.9
