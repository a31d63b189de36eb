"""The naive reference decoder: batch size 1, the whole sequence recomputed every step.

This is how the COCONUT reference implementation decodes, written as plainly as
possible to serve as the oracle for the engine's tests and the baseline of
``engine bench latency``. It deliberately shares no code with the engine's runner: it
calls the full ``model(inputs_embeds=...)`` with ``output_hidden_states=True``, feeds
``hidden_states[-1][:, -1]`` back as the next input embedding (or ``feedback`` of it:
``projection_feedback``, ``soft_embedding_feedback`` with its Gumbel and Dirichlet noise
from injected draws, written here on their own), and reads the model's own logits; a
generated token may be fed as its Mixture of Inputs (``moi_input``). Stop modes: fixed, auto (a stop classifier), entropy and
token, each read after every thought. Greedy only (sampling is checked by the engine's
own tests).
"""

from __future__ import annotations

import math
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
    thought_entropies: list[float] = field(default_factory=list)       # after each thought (adaptive/record)
    thought_argmaxes: list[int] = field(default_factory=list)          # argmax of W h after each thought
    token_logprobs: list[float] = field(default_factory=list)          # logprobs_top_k: each token's
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # and the top (id, logprob)


def projection_feedback(prj):
    """CODI: a thought is prj(h)."""
    return lambda model, h, logits: prj(h)


def soft_embedding_feedback(temperature: float = 1.0, top_k: int = 10, top_p: float = 1.0,
                            noise: tuple[str, float] | None = None, draws=None, record: list | None = None):
    """Soft Thinking: a thought is sum_i p_i E[i], p = softmax(W h / T) kept to its top-k
    tokens (0: all), then to the smallest set whose mass reaches top_p, renormalised.

    ``noise``: ``("gumbel", tau)``, the weights become exp((log p_i + g_i) / tau), normalised,
    with ``g = draws("gumbel", ids, None)``, one number per kept token (``ids``, in order of p);
    ``("dirichlet", alpha)``, the weights become G_i / sum G with
    ``log G = draws("dirichlet", ids, c)``, ``c`` the concentrations alpha p_i of the kept
    tokens. ``record`` (a list) receives each thought's (tokens, weights)."""
    def feed(model, h, logits):
        probs = torch.softmax(logits.float() / temperature, dim=-1)              # [V]
        # ranked by the logits: near-equal logits may round to one probability, and the
        # noise's i-th draw goes to the i-th token
        order = torch.argsort(logits.float(), descending=True, stable=True)
        keep = order if top_k <= 0 else order[:top_k]
        p = probs[keep] / probs[keep].sum()
        kept, mass = [], 0.0
        for token, weight in zip(keep.tolist(), p.tolist()):
            if kept and mass >= top_p:
                break
            kept.append((token, weight))
            mass += weight
        total = sum(w for _, w in kept)
        kept = [(t, w / total) for t, w in kept]
        if noise is not None:
            kept = _noisy(kept, noise, draws)
        if record is not None:
            record.append(([t for t, _ in kept], [w for _, w in kept]))
        E = model.get_input_embeddings().weight
        thought = sum(w * E[t].float() for t, w in kept)
        return thought.to(h.dtype).view(1, 1, -1)
    return feed


def _noisy(kept: list[tuple[int, float]], noise: tuple[str, float], draws) -> list[tuple[int, float]]:
    kind, value = noise
    ids = [t for t, _ in kept]
    if kind == "gumbel":
        g = [float(x) for x in draws("gumbel", ids, None)]
        scores = [(math.log(w) + g[i]) / value for i, (_, w) in enumerate(kept)]
    else:
        concentration = torch.tensor([value * w for _, w in kept], dtype=torch.float64)
        scores = [float(x) for x in draws("dirichlet", ids, concentration)]
    top = max(scores)
    unnormalised = [math.exp(s - top) for s in scores]
    total = sum(unnormalised)
    return [(t, u / total) for (t, _), u in zip(kept, unnormalised)]


def moi_input(model, logits: torch.Tensor, token: int, beta: float, top_k: int) -> torch.Tensor:
    """Mixture of Inputs after sampling ``token`` from ``logits`` [V]: Hn * sum_i w_i E[i] +
    (1 - Hn) * E[token] over the top_k tokens, p their softmax, w = (p + beta [i = token]) /
    (1 + beta), Hn = H(p) / log top_k (mixinputs). [1, 1, d]"""
    embed = model.get_input_embeddings()
    values, ids = torch.sort(logits.float(), descending=True)
    values, ids = values[:top_k].tolist(), ids[:top_k].tolist()
    top = max(values)
    exps = [math.exp(v - top) if v != float("-inf") else 0.0 for v in values]
    p = [e / sum(exps) for e in exps]
    entropy = -sum(q * math.log(max(q, 1e-12)) for q in p)
    hn = entropy / math.log(len(ids))
    mixed = sum(((q + (beta if i == token else 0.0)) / (1 + beta)) * embed(torch.tensor(i, device=logits.device)).float()
                for q, i in zip(p, ids))
    out = hn * mixed + (1 - hn) * embed(torch.tensor(token, device=logits.device)).float()
    return out.to(embed.weight.dtype).view(1, 1, -1)


def _entropy(logits: torch.Tensor) -> float:
    p = torch.softmax(logits.float(), dim=-1)
    return float(-(p * torch.log(p.clamp_min(1e-45))).sum())


@torch.inference_mode()
def reference_generate(model, tokenizer, question: str, *, question_suffix: str, bot_id: int, eot_id: int,
                       eos_ids: set[int], thoughts: int, max_tokens: int, mode: str = "fixed",
                       stop_classifier=None, threshold: float = 0.5, latent_token_id: int | None = None,
                       pause: bool = False, ignore_eos: bool = False, trace_top_k: int = 0,
                       record_hiddens: bool = False, feedback=None, entropy_threshold: float = 0.0,
                       patience: int = 1, prefix_ids: tuple[int, ...] = (), suffix_ids: tuple[int, ...] = (),
                       suppress_ids: tuple[int, ...] = (), logprobs_top_k: int = 0,
                       mixture: tuple[float, int] | None = None) -> ReferenceResult:
    """Decode one question. ``mode``: fixed (``thoughts`` thoughts), auto (stop classifier),
    entropy (below ``entropy_threshold`` nats ``patience`` times in a row), token (argmax is
    ``eot_id``), each with ``thoughts`` as the cap, or none. ``pause`` feeds the latent
    token's embedding instead of hidden states (the pause_as_thought ablation);
    ``feedback(model, h [1, 1, d], logits [V])`` makes a thought from the state (default:
    the state itself). ``prefix_ids`` go before ``<bot>``, ``suffix_ids`` after ``<eot>``;
    ``suppress_ids`` are never chosen. ``logprobs_top_k`` > 0 records each generated token's
    ``log_softmax`` and the ``logprobs_top_k`` best (id, logprob) of the same distribution
    (the logits with ``suppress_ids`` at -inf; those never among them). ``mixture``
    ``(beta, top_k)``: each generated token is fed as its Mixture of Inputs (``moi_input``,
    from those logits)."""
    embed = model.get_input_embeddings()
    ids = tokenizer(question + question_suffix)["input_ids"]
    device = embed.weight.device
    seq = embed(torch.tensor([ids + list(prefix_ids)], device=device))      # [1, T, d]
    fed = 0
    result = ReferenceResult(token_ids=[], num_thoughts=0, positions_fed=0)

    def run(seq):
        nonlocal fed
        fed += seq.shape[1]
        return model(inputs_embeds=seq, output_hidden_states=True)

    if mode != "none":
        seq = torch.cat([seq, embed(torch.tensor([[bot_id]], device=device))], dim=1)
        low_run = 0
        for _ in range(thoughts):                                         # N, or the cap
            if pause:
                thought = embed(torch.tensor([[latent_token_id]], device=device))
            else:
                out = run(seq)
                thought = out.hidden_states[-1][:, -1:, :]               # [1, 1, d]
                if feedback is not None:
                    thought = feedback(model, thought, out.logits[0, -1])
                if trace_top_k:
                    probs = out.logits[0, -1].float().softmax(-1)
                    result.trace.append(probs.topk(trace_top_k).indices.tolist())
                    result.trace_probs.append(probs)
            seq = torch.cat([seq, thought], dim=1)
            result.num_thoughts += 1
            if mode in ("auto", "entropy", "token") or record_hiddens:
                out = run(seq)                                            # the state after this thought
                after = out.hidden_states[-1][0, -1]
                result.thought_hiddens.append(after)
                result.thought_entropies.append(_entropy(out.logits[0, -1]))
                result.thought_argmaxes.append(int(out.logits[0, -1].argmax()))
                if mode == "auto" and float(stop_classifier(after)) >= threshold:
                    break
                if mode == "entropy":
                    low_run = low_run + 1 if result.thought_entropies[-1] < entropy_threshold else 0
                    if low_run >= patience:
                        break
                if mode == "token" and result.thought_argmaxes[-1] == eot_id:
                    break
        seq = torch.cat([seq, embed(torch.tensor([[eot_id, *suffix_ids]], device=device))], dim=1)
    for _ in range(max_tokens):
        logits = run(seq).logits[0, -1].clone()
        if suppress_ids:
            logits[list(suppress_ids)] = float("-inf")
        token = int(logits.argmax())
        if token in eos_ids and not ignore_eos:
            break
        result.token_ids.append(token)
        if logprobs_top_k:
            lp = torch.log_softmax(logits.float(), dim=-1)
            result.token_logprobs.append(float(lp[token]))
            order = torch.argsort(lp, descending=True, stable=True)[:logprobs_top_k].tolist()
            result.top_logprobs.append([(i, float(lp[i])) for i in order if float(lp[i]) != float("-inf")])
        if mixture is not None:
            seq = torch.cat([seq, moi_input(model, logits, token, *mixture)], dim=1)
        else:
            seq = torch.cat([seq, embed(torch.tensor([[token]], device=device))], dim=1)
    result.positions_fed = fed
    return result
