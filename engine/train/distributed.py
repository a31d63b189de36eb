"""Data parallelism for the trainer: one process, DDP or FSDP under ``torchrun``.

``setup(config)`` reads torchrun's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``); with more than one process it starts a process group (NCCL on GPUs,
gloo on CPUs). ``Objective`` is the module that gets wrapped: its forward is the whole
COCONUT loss, so DDP's and FSDP's hooks see every pass. Under FSDP every rank must run
the same number of forwards, so the objective first agrees on the batch's largest
number of thoughts (an all-reduce) and pads the passes to it. Only rank 0 evaluates,
saves and logs; the others wait at barriers. This module knows nothing of data or
checkpoint formats.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.train.loss import (coconut_hidden_states, frontier_loss_from_hidden, lm_loss_from_hidden,
                               teacher_thought_hidden_states)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def setup(device_name: str = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, device)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(info: DistInfo, value):
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across(info: DistInfo, value: float, count: int = 1) -> float:
    """The count-weighted mean of ``value`` over ranks."""
    if not info.enabled:
        return value
    t = torch.tensor([value * count, float(count)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / t[1].clamp_min(1))


class Objective(torch.nn.Module):
    """``forward(batch)`` = ``coconut_loss(model, batch, latent_token_id)`` (or the plain LM
    loss when ``latent_token_id`` is None), with passes agreed across ranks when ``sync``."""

    def __init__(self, model: torch.nn.Module, latent_token_id: int | None, sync_passes: bool = False,
                 frontier_loss_weight: float = 0.0, projection: torch.nn.Module | None = None):
        super().__init__()
        self.model = model
        self.projection = projection     # CODI's prj (latent_projection), trained beside the model
        self.latent_token_id = latent_token_id
        self.sync_passes = sync_passes
        # weight of the auxiliary frontier loss (needs batch["frontier_ids"]); 0 = off
        self.frontier_loss_weight = frontier_loss_weight
        self.last_frontier_loss: float | None = None
        self.teacher_probability = 0.0   # chance a batch gets teacher-forced thoughts (the trainer sets it)
        # drawn from a generator every rank seeds alike (the trainer reseeds it per epoch), so all
        # ranks take the same forward for a batch (sharded training needs the same passes) and a
        # resumed run draws as the original did
        self.teacher_rng = random.Random(0)

    def forward(self, batch: dict) -> torch.Tensor:
        min_passes = 0
        if self.sync_passes and self.latent_token_id is not None:
            ids, mask = batch["input_ids"], batch["attention_mask"].bool()
            n = ((ids == self.latent_token_id) & mask).sum(dim=1).max().reshape(1).to(torch.long)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            min_passes = int(n) + 1
        if (self.teacher_probability > 0 and self.latent_token_id is not None
                and batch.get("frontier_ids") is not None and self.teacher_rng.random() < self.teacher_probability):
            out = teacher_thought_hidden_states(self.model, batch, self.latent_token_id, batch["frontier_ids"])
        else:
            out = coconut_hidden_states(self.model, batch, self.latent_token_id, min_passes=min_passes,
                                        projection=self.projection)
        loss = lm_loss_from_hidden(self.model, out.hidden, out.labels)
        if (self.frontier_loss_weight > 0 and self.latent_token_id is not None
                and batch.get("frontier_ids") is not None):
            aux = frontier_loss_from_hidden(self.model, out, batch["frontier_ids"], self.latent_token_id)
            self.last_frontier_loss = None if aux is None else float(aux.detach())
            if aux is not None:
                loss = loss + self.frontier_loss_weight * aux
        return loss


def _decoder_layer_classes(model: torch.nn.Module) -> tuple[type, ...]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    return tuple(classes)


def wrap(objective: Objective, info: DistInfo, parallel: str) -> torch.nn.Module:
    """DDP or FSDP (per decoder layer, then the whole) around the objective; as-is alone."""
    objective.to(info.device)
    if not info.enabled:
        return objective
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        objective.sync_passes = True
        layers = _decoder_layer_classes(objective.model)
        for module in objective.model.modules():
            if layers and isinstance(module, layers):
                fully_shard(module)
        fully_shard(objective)
        return objective
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(objective, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def unwrap(module: torch.nn.Module) -> Objective:
    return module.module if hasattr(module, "module") and isinstance(module.module, Objective) else module


def full_state_dict(module: torch.nn.Module, info: DistInfo, parallel: str) -> dict[str, torch.Tensor] | None:
    """The language model's full state dict on CPU (rank 0; None elsewhere under FSDP)."""
    model = unwrap(module).model
    if info.enabled and parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if info.main else None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
