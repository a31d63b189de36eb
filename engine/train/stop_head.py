"""Training the stop classifier (the paper's option a) on a frozen COCONUT model.

Features follow ``engine.stop_classifier``'s contract: samples are laid out at the last
stage with ``pad_latent_to_max: false``, so a sample with s steps gets
``min(s, max_latent_stage) * c_thought`` thoughts (what it needs); one batched forward
with thoughts fed back gives the hidden state at each placeholder, i.e. the state after
thought i has been fed (i >= 1), labelled 1 iff i equals the number the sample needs.
A linear head (or a one-hidden-layer MLP) is fitted full-batch with a class-balanced
binary cross-entropy and measured on held-out records: per-thought accuracy, and the
share of records where the first thought over the threshold is exactly the needed one.
This module knows nothing of the training loop or checkpoint files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.stop_classifier import StopClassifier
from engine.train.layout import Curriculum, Markers, collate
from engine.train.loss import coconut_hidden_states


@torch.no_grad()
def stop_features(model, tokenized, curriculum: Curriculum, markers: Markers, batch_size: int = 32,
                  bf16: bool = False, projection=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [N, d] float32, label [N] float, sample index [N]) over all thoughts of all
    records (thoughts fed through ``projection`` when the model learned one)."""
    unpadded = Curriculum(method=curriculum.method, c_thought=curriculum.c_thought,
                          epochs_per_stage=curriculum.epochs_per_stage,
                          max_latent_stage=curriculum.max_latent_stage, pad_latent_to_max=False)
    last_stage = curriculum.max_latent_stage + 1
    device = next(model.parameters()).device
    feats, labels, owners = [], [], []
    for start in range(0, len(tokenized), batch_size):
        samples = [unpadded.build(t, last_stage, markers) for t in tokenized[start:start + batch_size]]
        batch = {k: v.to(device) for k, v in collate(samples, markers.pad).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = coconut_hidden_states(model, batch, markers.latent, projection=projection)
        is_latent = (out.input_ids == markers.latent) & out.attention_mask
        index = is_latent.long().cumsum(dim=1)                         # i for the i-th thought
        needed = torch.tensor([s.num_thoughts for s in samples], device=device)[:, None].expand_as(index)
        rows = torch.arange(len(samples), device=device)[:, None].expand_as(index) + start
        feats.append(out.hidden[is_latent].float().cpu())
        labels.append((index == needed)[is_latent].float().cpu())
        owners.append(rows[is_latent].cpu())
    if not feats or sum(len(f) for f in feats) == 0:
        raise ValueError("no thoughts to learn from: the records need at least one step each")
    return torch.cat(feats), torch.cat(labels), torch.cat(owners)


@dataclass
class StopHeadReport:
    accuracy: float            # per thought, held out, at the threshold
    exact_stop: float          # records whose first thought over the threshold is the needed one
    train_accuracy: float
    positives: int
    negatives: int


def _exact_stop(probs: torch.Tensor, labels: torch.Tensor, owners: torch.Tensor, threshold: float) -> float:
    hits, total = 0, 0
    for owner in owners.unique():
        sel = owners == owner
        fired = (probs[sel] >= threshold).nonzero()
        first = int(fired[0]) if len(fired) else int(sel.sum()) - 1
        hits += bool(labels[sel][first] == 1) and bool(len(fired))
        total += 1
    return hits / max(1, total)


def train_stop_head(train: tuple, held_out: tuple, hidden_size: int = 0, steps: int = 200, lr: float = 1e-2,
                    threshold: float = 0.5, seed: int = 0) -> tuple[StopClassifier, StopHeadReport]:
    x, y, _ = train
    torch.manual_seed(seed)
    head = StopClassifier(x.shape[1], hidden_size)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    positives = int(y.sum())
    negatives = len(y) - positives
    pos_weight = torch.tensor(negatives / max(1, positives))
    # Standardising the inputs speeds up the fit; folded into the first layer afterwards.
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    xs = (x - mean) / std
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head.logits(xs), y, pos_weight=pos_weight)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        first = head.net[0]
        first.bias -= (first.weight / std) @ mean
        first.weight /= std
    with torch.no_grad():
        train_acc = float(((head(x) >= threshold).float() == y).float().mean())
        hx, hy, howner = held_out
        probs = head(hx)
        acc = float(((probs >= threshold).float() == hy).float().mean())
        exact = _exact_stop(probs, hy, howner, threshold)
    return head, StopHeadReport(accuracy=acc, exact_stop=exact, train_accuracy=train_acc,
                                positives=positives, negatives=negatives)
