"""The naive reference decoder: batch size 1, the whole sequence recomputed every step.

This is how the COCONUT reference implementation decodes, written as plainly as
possible to serve as the oracle for the engine's tests and the baseline of
``engine bench latency``. It deliberately shares no code with the engine's runner: it
calls the full ``model(inputs_embeds=...)`` with ``output_hidden_states=True``, feeds
``hidden_states[-1][:, -1]`` back as the next input embedding, and reads the model's own
logits. Greedy only (sampling is checked by the engine's own tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ReferenceResult:
    token_ids: list[int]
    num_thoughts: int
    positions_fed: int
    thought_hiddens: list[torch.Tensor] = field(default_factory=list)  # state after each thought (auto/record)
    trace: list[list[int]] = field(default_factory=list)               # argsorted top ids per thought
    trace_probs: list[torch.Tensor] = field(default_factory=list)      # softmax(W h) per thought [V]


@torch.inference_mode()
def reference_generate(model, tokenizer, question: str, *, question_suffix: str, bot_id: int, eot_id: int,
                       eos_ids: set[int], thoughts: int, max_tokens: int, mode: str = "fixed",
                       stop_classifier=None, threshold: float = 0.5, latent_token_id: int | None = None,
                       pause: bool = False, ignore_eos: bool = False, trace_top_k: int = 0,
                       record_hiddens: bool = False) -> ReferenceResult:
    """Decode one question. ``mode``: fixed (``thoughts`` thoughts), auto (stop classifier,
    ``thoughts`` is the cap) or none. ``pause`` feeds the latent token's embedding instead
    of hidden states (the pause_as_thought ablation)."""
    embed = model.get_input_embeddings()
    ids = tokenizer(question + question_suffix)["input_ids"]
    device = embed.weight.device
    seq = embed(torch.tensor([ids], device=device))                       # [1, T, d]
    fed = 0
    result = ReferenceResult(token_ids=[], num_thoughts=0, positions_fed=0)

    def run(seq):
        nonlocal fed
        fed += seq.shape[1]
        return model(inputs_embeds=seq, output_hidden_states=True)

    if mode != "none":
        seq = torch.cat([seq, embed(torch.tensor([[bot_id]], device=device))], dim=1)
        for _ in range(thoughts):                                         # N, or the cap for auto
            if pause:
                thought = embed(torch.tensor([[latent_token_id]], device=device))
            else:
                out = run(seq)
                thought = out.hidden_states[-1][:, -1:, :]               # [1, 1, d]
                if trace_top_k:
                    probs = out.logits[0, -1].float().softmax(-1)
                    result.trace.append(probs.topk(trace_top_k).indices.tolist())
                    result.trace_probs.append(probs)
            seq = torch.cat([seq, thought], dim=1)
            result.num_thoughts += 1
            if mode == "auto" or record_hiddens:
                after = run(seq).hidden_states[-1][0, -1]                 # state after this thought
                result.thought_hiddens.append(after)
                if mode == "auto" and float(stop_classifier(after)) >= threshold:
                    break
        seq = torch.cat([seq, embed(torch.tensor([[eot_id]], device=device))], dim=1)
    for _ in range(max_tokens):
        logits = run(seq).logits[0, -1]
        token = int(logits.argmax())
        if token in eos_ids and not ignore_eos:
            break
        result.token_ids.append(token)
        seq = torch.cat([seq, embed(torch.tensor([[token]], device=device))], dim=1)
    result.positions_fed = fed
    return result
