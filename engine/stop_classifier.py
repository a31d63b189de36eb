"""The stop classifier: a small head that reads a latent hidden state and says "stop".

Contract: after the i-th continuous thought has been fed (i >= 1), the model's last
hidden state at that position (after the final norm) is ``h``; ``StopClassifier(h)``
returns the probability that thought i was the last useful one. The engine's ``auto``
policy ends latent mode when it is >= the threshold; the trainer labels thought i as
"stop" when i equals the number of thoughts the sample needs.

Weights are a safetensors file; ``hidden_size == 0`` means a linear head, otherwise a
one-hidden-layer MLP. This module knows nothing of decoding or training loops.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.errors import CheckpointError


class StopClassifier(nn.Module):
    def __init__(self, model_hidden_size: int, hidden_size: int = 0):
        super().__init__()
        self.model_hidden_size = model_hidden_size
        self.hidden_size = hidden_size
        if hidden_size > 0:
            self.net = nn.Sequential(nn.Linear(model_hidden_size, hidden_size), nn.GELU(),
                                     nn.Linear(hidden_size, 1))
        else:
            self.net = nn.Sequential(nn.Linear(model_hidden_size, 1))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [...] stop logits (computed in float32 for a stable threshold)."""
        return self.net(hidden.to(self.net[0].weight.dtype)).squeeze(-1).float()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [...] probability of stopping after this thought."""
        return torch.sigmoid(self.logits(hidden))

    def save(self, path: str | Path) -> None:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"model_hidden_size": str(self.model_hidden_size),
                                                "hidden_size": str(self.hidden_size)})

    @classmethod
    def load(cls, path: str | Path, model_hidden_size: int, hidden_size: int) -> "StopClassifier":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"coconut.json field 'stop_classifier.path': {path} does not exist")
        head = cls(model_hidden_size, hidden_size)
        try:
            state = load_file(str(path))
            head.load_state_dict(state)
        except Exception as e:
            raise CheckpointError(
                f"coconut.json field 'stop_classifier': {path.name} does not match a head for "
                f"model hidden size {model_hidden_size} and hidden_size {hidden_size} ({e})") from None
        return head
