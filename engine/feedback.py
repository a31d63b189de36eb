"""Latent feedback operators: what a continuous thought feeds back, batched over rows.

A thought is made from the state ``h`` [d] the previous position produced (after the
final norm), by the request's operator (``engine.params.LatentFeedback``):

- ``hidden``: ``h`` (COCONUT);
- ``projection``: ``prj(h)`` with CODI's module, ``LatentProjection``: Dropout,
  Linear(d, p), GELU, Linear(p, d), and optionally LayerNorm(d) (eps 1e-5), stored as that
  ``nn.Sequential``'s state dict (``1.weight`` [p, d], ``1.bias``, ``3.weight`` [d, p],
  ``3.bias``, ``ln.weight``, ``ln.bias``) in a safetensors file;
- ``soft_embedding``: ``sum_i p_i E[i]`` with ``p = softmax(W h / T)`` kept to its top-k
  tokens, then to the smallest set whose mass reaches top-p (as sampling filters them),
  renormalised (Soft Thinking). ``soft_mixture`` takes the logits ``W h`` the runner has
  already computed for the step (shared with the trace and the stop rules), so the
  operator costs one gather of k embedding rows per thought, not a second LM head product.

This module knows tensors and the operators' definitions; it knows nothing of requests,
slots or checkpoints' directories beyond the projection's file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.errors import CheckpointError

LAYER_NORM_EPS = 1e-5
#: The projection's file in a checkpoint (``coconut.json: latent_feedback.file``) as the
#: trainer, the converter and the tiny checkpoints write it.
PROJECTION_FILE = "latent_projection.safetensors"


class LatentProjection(nn.Sequential):
    """CODI's ``prj``: Dropout, Linear(d, p), GELU, Linear(p, d) [, LayerNorm(d)]."""

    def __init__(self, hidden_size: int, projection_size: int, layer_norm: bool = True, dropout: float = 0.0):
        super().__init__(nn.Dropout(dropout), nn.Linear(hidden_size, projection_size), nn.GELU(),
                         nn.Linear(projection_size, hidden_size))
        if layer_norm:
            self.add_module("ln", nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS))

    @property
    def has_layer_norm(self) -> bool:
        return hasattr(self, "ln")

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], hidden_size: int, where: str = "") -> "LatentProjection":
        """Build from CODI's state dict; names the key or shape that is wrong."""
        required = ("1.weight", "1.bias", "3.weight", "3.bias")
        missing = [k for k in required if k not in state]
        if missing:
            raise CheckpointError(f"{where}: the latent projection lacks {missing} (expected the state dict of "
                                  f"nn.Sequential(Dropout, Linear(d, p), GELU, Linear(p, d)[, ln=LayerNorm(d)]))")
        layer_norm = "ln.weight" in state
        extra = sorted(set(state) - set(required) - ({"ln.weight", "ln.bias"} if layer_norm else set()))
        if extra:
            raise CheckpointError(f"{where}: unexpected keys in the latent projection: {extra}")
        p, d = state["1.weight"].shape
        if d != hidden_size:
            raise CheckpointError(f"{where}: the latent projection reads width {d} (1.weight is {list(state['1.weight'].shape)}) "
                                  f"but the model's hidden size is {hidden_size}")
        module = cls(hidden_size, p, layer_norm=layer_norm)
        try:
            module.load_state_dict(state)
        except RuntimeError as e:   # shape mismatches
            raise CheckpointError(f"{where}: the latent projection does not fit [d={d}, p={p}]: {e}") from None
        return module

    @classmethod
    def load(cls, path: str | Path, hidden_size: int) -> "LatentProjection":
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: the latent projection file named by coconut.json "
                                  f"(latent_feedback.file) does not exist")
        return cls.from_state_dict(load_file(str(path)), hidden_size, where=str(path)).eval()


@dataclass
class SoftMixture:
    """Per row: the tokens mixed (``token_ids`` [R, K], -1 where a row keeps fewer) and
    their renormalised weights [R, K] (0 there)."""

    token_ids: torch.Tensor
    weights: torch.Tensor


def soft_mixture(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float]) -> SoftMixture:
    """logits [R, V] float32 (the model's ``W h``), per-row temperature, top-k (0: all)
    and top-p -> the weights of each row's mixture. The top-ranked token always stays."""
    rows, vocab = logits.shape
    dev = logits.device
    k = [vocab if kk <= 0 else min(kk, vocab) for kk in top_k]
    width = max(k)
    temps = torch.tensor(temperature, device=dev, dtype=logits.dtype)[:, None]
    scaled = logits / temps
    values, ids = scaled.topk(width, dim=-1) if width < vocab else scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(width, device=dev)[None, :]
    remove = ranks >= torch.tensor(k, device=dev)[:, None]
    probs = values.masked_fill(remove, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= torch.tensor(top_p, device=dev, dtype=probs.dtype)[:, None]
    remove[:, 0] = False
    weights = probs.masked_fill(remove, 0.0)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return SoftMixture(token_ids=ids.masked_fill(remove, -1), weights=weights)


#: Above this many tokens per row a mixture is one dense [R, V] x [V, d] product instead of a
#: gather of R x K embedding rows (which for K = V would copy the whole table R times).
DENSE_MIXTURE_TOKENS = 256


def mix_embeddings(embedding: torch.Tensor, mixture: SoftMixture) -> torch.Tensor:
    """embedding [V, d], mixture of R rows -> [R, d]: sum_i p_i E[i]."""
    ids = mixture.token_ids.clamp(min=0)                                # dropped slots carry weight 0
    weights = mixture.weights.to(embedding.dtype)
    if ids.shape[1] > DENSE_MIXTURE_TOKENS:
        dense = torch.zeros((ids.shape[0], embedding.shape[0]), dtype=embedding.dtype, device=embedding.device)
        return dense.scatter_add_(1, ids, weights) @ embedding
    return torch.einsum("rk,rkd->rd", weights, embedding[ids])


def entropy_and_argmax(logits: torch.Tensor) -> tuple[list[float], list[int]]:
    """logits [R, V] -> the entropy in nats of softmax(logits) per row, and its argmax."""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)         # H = log Z - E_p[logit]: one exp pass, no log
    p = (logits - lse).exp_()
    entropy = lse.squeeze(-1) - torch.where(p > 0, p * logits, 0.0).sum(dim=-1)   # a -inf logit adds 0
    return entropy.tolist(), logits.argmax(dim=-1).tolist()
