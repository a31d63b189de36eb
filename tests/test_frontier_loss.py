"""``frontier_loss_weight``: the auxiliary frontier loss (``frontier_loss_from_hidden``
on ``coconut_hidden_states``, batched, rows shifted to align thoughts) against a naive per-sample
computation (one sample at a time: a plain loop of full model calls feeding each thought back,
then the model's own logits at <bot> and at every placeholder), loss and gradients; plus the
layout/collate plumbing (frontier targets from a compact ProsQA question, -1 padding) and that
weight 0 leaves the objective unchanged. Teacher-forced thoughts (``teacher_thought_hidden_states``)
against a naive per-sample forward with the frontier embeddings written in by hand, the
objective's switch between the two forwards, and the teacher schedule."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.train.distributed import Objective
from engine.train.layout import Curriculum, Markers, TokenizedRecord, collate, frontier_token_ids
from engine.train.loss import coconut_hidden_states, frontier_loss_from_hidden
from tests.test_loss import LATENT, grads, make_batch, one_thread, tiny_model  # noqa: F401

# (real length, first placeholder column, placeholders): right-padded, offsets differ, one row
# without thoughts (skipped), one row whose <bot> is its second real position
ROWS = [(16, 4, 3), (12, 7, 2), (10, 0, 0), (14, 1, 5), (9, 3, 1)]


def make_frontier(rows, seed: int = 3) -> torch.Tensor:
    """[B, 1 + max placeholders, 4] random node ids, -1 padded; some positions empty."""
    g = torch.Generator().manual_seed(seed)
    P = 1 + max(c for _, _, c in rows) + 1            # one spare position past every row's thoughts
    out = torch.full((len(rows), P, 4), -1, dtype=torch.long)
    for b in range(len(rows)):
        for d in range(P):
            n = int(torch.randint(0, 5, (1,), generator=g))    # 0 = empty frontier
            out[b, d, :n] = torch.randperm(90, generator=g)[:n] + 3
    return out


def naive_frontier_loss(model, batch, frontier, latent=LATENT):
    embed = model.get_input_embeddings()
    terms = []
    for b in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][b].bool().nonzero().flatten()
        ids = batch["input_ids"][b, real]
        embeds = embed(ids)
        spots = [j for j in range(len(ids)) if int(ids[j]) == latent]
        for j in spots:
            out = model(inputs_embeds=embeds[None, :j], position_ids=torch.arange(j)[None],
                        output_hidden_states=True)
            embeds = torch.cat([embeds[:j], out.hidden_states[-1][0, -1][None], embeds[j + 1:]])
        if not spots:
            continue
        logits = model(inputs_embeds=embeds[None], position_ids=torch.arange(len(ids))[None]).logits[0].float()
        bot = spots[0] - 1
        for d in range(len(spots) + 1):                   # <bot>, then placeholder d
            targets = [int(t) for t in frontier[b, d] if int(t) >= 0]
            if targets:
                logp = F.log_softmax(logits[bot + d], dim=-1)
                terms.append(-logp[targets].mean())
    return torch.stack(terms).mean()


def test_matches_naive_per_sample():
    for arch in ("gpt2", "llama"):
        model = tiny_model(arch)
        batch = make_batch(ROWS, width=16)
        frontier = make_frontier(ROWS)
        out = coconut_hidden_states(model, batch, LATENT)
        fast = frontier_loss_from_hidden(model, out, frontier, LATENT)
        slow = naive_frontier_loss(model, batch, frontier)
        assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-6), (arch, fast.item(), slow.item())
        names = [n for n, _ in model.named_parameters()]
        for name, a, b in zip(names, grads(fast, model), grads(slow, model)):
            assert (a is None) == (b is None), name
            if a is not None:
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (arch, name, (a - b).abs().max().item())


def test_objective_adds_weighted_aux_and_weight_zero_is_unchanged():
    model = tiny_model("gpt2")
    batch = make_batch(ROWS, width=16)
    plain = Objective(model, LATENT)(batch)
    batch["frontier_ids"] = make_frontier(ROWS)
    assert torch.equal(Objective(model, LATENT)(batch), plain)            # default weight 0: off
    out = coconut_hidden_states(model, batch, LATENT)
    aux = frontier_loss_from_hidden(model, out, batch["frontier_ids"], LATENT)
    total = Objective(model, LATENT, frontier_loss_weight=0.5)(batch)
    assert torch.allclose(total, plain + 0.5 * aux, rtol=1e-6)
    empty = torch.full_like(batch["frontier_ids"], -1)
    assert frontier_loss_from_hidden(model, out, empty, LATENT) is None


class WordTokenizer:
    """One id per space-prefixed word (what the ProsQA tokenizer gives a node)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]}


def test_layout_carries_frontier_per_thought():
    tok = WordTokenizer()
    q = "Tom wumpus | wumpus yumpus | Tom rempus | rempus zumpus | yumpus gorpus | ? Tom gorpus zumpus"
    fr = frontier_token_ids(tok, q, 6)
    v = tok.vocab
    assert fr[0] == (v["Tom"],)
    assert set(fr[1]) == {v["wumpus"], v["rempus"]}
    assert set(fr[2]) == {v["yumpus"], v["zumpus"]}
    assert fr[3] == (v["gorpus"],) and fr[4:] == ((), (), ())
    markers = Markers(bot=1, eot=2, latent=3, eos=4, pad=0)
    record = TokenizedRecord((5, 6), ((7,), (8,), (9,)), (4,), frontier=fr)
    cur = Curriculum(epochs_per_stage=1, max_latent_stage=6)
    s2 = cur.build(record, 2, markers)
    assert s2.num_thoughts == 2 and s2.frontier == fr[:3]
    s0 = cur.build(record, 0, markers)
    batch = collate([s2, s0, cur.build(TokenizedRecord((5, 6), ((7,),), (4,)), 1, markers)], 0)
    f = batch["frontier_ids"]
    assert f.shape == (3, 3, 2)
    assert f[0, 1].tolist() == sorted([v["wumpus"], v["rempus"]])
    assert f[1, 0].tolist() == [v["Tom"], -1] and (f[1, 1:] == -1).all() and (f[2] == -1).all()
    assert "frontier_ids" not in collate([cur.build(TokenizedRecord((5, 6), ((7,),), (4,)), 1, markers)], 0)


def naive_teacher_hidden(model, batch, frontier, latent=LATENT):
    """Per row: placeholder d's input = the mean embedding of frontier d - 1, rescaled to the
    batch's mean token-embedding norm (zero for an empty frontier); one plain forward."""
    embed = model.get_input_embeddings()
    mask = batch["attention_mask"].bool()
    scale = embed(batch["input_ids"])[mask].norm(dim=-1).mean()
    out = []
    for b in range(batch["input_ids"].shape[0]):
        real = mask[b].nonzero().flatten()
        ids = batch["input_ids"][b, real]
        embeds = embed(ids).clone()
        spots = [j for j in range(len(ids)) if int(ids[j]) == latent]
        for d, j in enumerate(spots, start=1):
            nodes = [int(t) for t in frontier[b, d - 1] if int(t) >= 0]
            if nodes:
                mean = embed(torch.tensor(nodes)).mean(dim=0)
                embeds[j] = mean / mean.norm() * scale
            else:
                embeds[j] = 0.0
        hidden = model(inputs_embeds=embeds[None], position_ids=torch.arange(len(ids))[None],
                       output_hidden_states=True).hidden_states[-1][0]
        out.append((real, hidden))
    return out


def test_teacher_forced_thoughts_match_a_naive_per_sample_forward():
    from engine.train.loss import teacher_thought_hidden_states

    for arch in ("gpt2", "llama"):
        model = tiny_model(arch)
        batch = make_batch(ROWS, width=16)
        frontier = make_frontier(ROWS)
        fast = teacher_thought_hidden_states(model, batch, LATENT, frontier)
        for b, (real, hidden) in enumerate(naive_teacher_hidden(model, batch, frontier)):
            got = fast.hidden[b, real]
            assert torch.allclose(got, hidden, rtol=1e-4, atol=1e-5), (arch, b, (got - hidden).abs().max().item())
        # the teacher really is used: a different frontier changes the hidden states after a thought
        other = teacher_thought_hidden_states(model, batch, LATENT, make_frontier(ROWS, seed=9))
        assert not torch.allclose(other.hidden[0, 4:16], fast.hidden[0, 4:16])


def test_objective_with_teacher_probability_one_uses_the_teacher_forward():
    from engine.train.loss import lm_loss_from_hidden, teacher_thought_hidden_states

    model = tiny_model("llama")
    batch = make_batch(ROWS, width=16)
    batch["frontier_ids"] = make_frontier(ROWS)
    objective = Objective(model, LATENT, frontier_loss_weight=0.5)
    objective.teacher_probability = 1.0
    out = teacher_thought_hidden_states(model, batch, LATENT, batch["frontier_ids"])
    expected = (lm_loss_from_hidden(model, out.hidden, out.labels)
                + 0.5 * frontier_loss_from_hidden(model, out, batch["frontier_ids"], LATENT))
    assert torch.allclose(objective(batch), expected, rtol=1e-6)
    objective.teacher_probability = 0.0
    assert torch.allclose(objective(batch), Objective(model, LATENT, frontier_loss_weight=0.5)(batch))


def test_teacher_schedule_holds_then_anneals_to_zero():
    from engine.train.config import TrainConfig
    from engine.train.trainer import teacher_probability

    cfg = TrainConfig(resume=7, teacher_thoughts_epochs=3, teacher_anneal_epochs=4)
    assert [teacher_probability(cfg, e) for e in range(7, 16)] == [1, 1, 1, 0.75, 0.5, 0.25, 0, 0, 0]
    assert teacher_probability(TrainConfig(), 5) == 0.0
