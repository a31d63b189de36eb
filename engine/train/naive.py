"""The naive COCONUT objective: per sample, full recompute. The oracle for ``coconut_loss``.

For each row, its real positions (``attention_mask == 1``) are taken in order; for each
latent placeholder, the full model runs on the whole prefix before it (thoughts already
filled in) and the last hidden state of the last position becomes the placeholder's input
embedding. A final full pass gives the logits; the cross-entropy is summed over the
labelled positions of all rows and divided by their count. It calls the model's own
``forward`` (``output_hidden_states=True``) and its own logits, sharing no code with
``engine.train.loss``; it is slow on purpose (one forward per thought per sample) and is
the baseline of ``engine bench train``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_coconut_loss(model: torch.nn.Module, batch: dict, latent_token_id: int | None,
                       projection: torch.nn.Module | None = None) -> torch.Tensor:
    """``projection``: each thought is ``projection(h)`` instead of ``h``."""
    embed = model.get_input_embeddings()
    ids_all, mask_all, labels_all = batch["input_ids"], batch["attention_mask"], batch["labels"]
    positions_all = batch.get("position_ids")
    total = None
    count = 0
    for b in range(ids_all.shape[0]):
        real = mask_all[b].bool().nonzero().flatten()
        ids = ids_all[b, real]
        labels = labels_all[b, real]
        positions = (positions_all[b, real] if positions_all is not None
                     else torch.arange(len(real), device=ids.device))[None]
        embeds = embed(ids)                                                    # [L, d]
        for j in range(len(ids)):
            if latent_token_id is None or int(ids[j]) != latent_token_id:
                continue
            out = model(inputs_embeds=embeds[None, :j], position_ids=positions[:, :j],
                        output_hidden_states=True)
            thought = out.hidden_states[-1][0, -1]
            if projection is not None:
                thought = projection(thought[None])[0]
            embeds = torch.cat([embeds[:j], thought[None].to(embeds.dtype), embeds[j + 1:]])
        logits = model(inputs_embeds=embeds[None], position_ids=positions).logits[0].float()
        targets = labels[1:]
        keep = targets != -100
        if keep.any():
            part = F.cross_entropy(logits[:-1][keep], targets[keep], reduction="sum")
            total = part if total is None else total + part
            count += int(keep.sum())
    if count == 0:
        raise ValueError("the batch has no labelled positions (every label is -100): nothing to learn")
    return total / count
