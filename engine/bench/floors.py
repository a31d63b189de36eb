"""The machine's floor for one decode step of a model, and the engine's step beside it.

A decode step cannot be faster than the larger of two bounds:

- the **memory floor**: every weight is read once per step, so ``weight bytes / read
  bandwidth``. The bandwidth is measured here, on this process's threads, as the fastest of
  reading a buffer larger than any cache (``sum``) and two matrix-vector products over it
  (torch's and the engine's own: what batch 1 does), or the model's own products at 1 row
  where they read faster still (they read every weight once);
- the **matrix floor**: the model's own matrix products, in the order a step runs them
  (every ``nn.Linear`` of the decoder, then the LM head), at batch B, with nothing else:
  no attention, norms, activations, masks or Python; the fastest of three kernels: MKL's
  (``F.linear``), oneDNN's on weights it packed ahead, and the engine's own
  (``engine.runner.cpu_kernel``, where it builds; what the engine uses on CPU in float32,
  with the weights in blocks of 16 outputs, the head's too, as the engine has them).
  Its FLOPs over its time is the rate this CPU
  multiplies the model's shapes at (``2 x B x weights`` FLOPs per step).

``measure(model, batches)`` returns both floors per batch and the rates; ``side_by_side``
times the engine's own decode step at the same batches (every row decoding, prompts of
``prompt_tokens``) in turns with the floors, so that each ``step / floor`` pairs figures
measured within the same half minute. Nothing here knows
about servers; ``engine bench peers`` calls it after the servers have stopped, and the
thread count it runs with is the caller's (``torch.set_num_threads``).
"""

from __future__ import annotations

import statistics
import time

import torch


def _best_of(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> dict:
    """Bytes per second this process reads from memory (float32 buffer of ``megabytes``):
    the fastest of torch's ``sum``, torch's ``mv`` and the engine's own matrix-vector
    product (``engine.runner.cpu_kernel``, where it builds; it streams faster than ``sum``
    here, so leaving it out would flatter every step)."""
    from engine.runner import cpu_kernel

    n = megabytes * (1 << 20) // 4
    rows = 4096
    buffer = torch.rand(rows, n // rows)
    vector = torch.rand(n // rows)
    nbytes = buffer.numel() * 4
    out = {}
    with torch.inference_mode():
        out["sum_bytes_per_s"] = nbytes / _best_of(lambda: buffer.sum(), repeats)
        out["mv_bytes_per_s"] = nbytes / _best_of(lambda: torch.mv(buffer, vector), repeats)
        if cpu_kernel.unavailable_reason() is None:
            product, row = cpu_kernel.RowsProduct(buffer), vector[None]
            out["engine_mv_bytes_per_s"] = nbytes / _best_of(lambda: product(row), repeats)
    out["bytes_per_s"] = max(out.values())
    return out


def _step_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weights a decode step multiplies by, in order: the decoder's linears (a packed
    model's merged q/k/v and gate/up products once each, as the engine runs them), the head."""
    from engine.runner.packed_linear import PackedLinear

    decoder = model.get_decoder()
    weights = [m.dense_weight() if isinstance(m, PackedLinear) else m.weight for m in decoder.modules()
               if isinstance(m, (torch.nn.Linear, PackedLinear))]
    # fused or non-Linear projections (GPT-2's Conv1D) hold [in, out] weights
    weights += [m.weight.t() for m in decoder.modules() if type(m).__name__ == "Conv1D"]
    head = model.get_output_embeddings()
    return weights + [head.weight]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters one step reads (tied tensors once; the embedding table, which
    a step only indexes, is counted when it is the tied head)."""
    seen, total = set(), 0
    for w in _step_matrices(model):
        key = w.data_ptr()
        if key not in seen:
            seen.add(key)
            total += w.numel() * w.element_size()
    # norms and biases: small, read too
    for name, p in model.named_parameters():
        if p.ndim == 1 and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def matrix_floor(model: torch.nn.Module, batch: int, repeats: int = 5) -> dict:
    """Seconds of the model's matrix products alone at ``batch`` rows (the faster kernel),
    their FLOP rate, and each kernel's seconds (``kernels``)."""
    from engine.runner import cpu_kernel
    from engine.runner.packed_linear import onednn_can_pack, pack_weight, packed_product

    weights = _step_matrices(model)
    dtype = weights[0].dtype
    inputs = {w.shape[1]: torch.rand(batch, w.shape[1], dtype=dtype) for w in weights}
    flops = sum(2 * batch * w.shape[0] * w.shape[1] for w in weights)

    def products():
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    kernels = {}
    with torch.inference_mode():
        kernels["mkl"] = _best_of(products, repeats)
        if onednn_can_pack(dtype, weights[0].device):
            packed = [(inputs[w.shape[1]], pack_weight(w)) for w in weights]
            kernels["onednn_packed"] = _best_of(lambda: [packed_product(x, p) for x, p in packed], repeats)
            del packed
        if dtype == torch.float32 and weights[0].device.type == "cpu" and cpu_kernel.unavailable_reason() is None:
            # as the engine lays them out: in blocks of 16 outputs (the head too) where the
            # output count allows
            layouts = ["blocks" if w.shape[0] % cpu_kernel.BLOCK == 0 else "rows" for w in weights]
            bound = [(inputs[w.shape[1]], cpu_kernel.RowsProduct(w, layout=layout)) for w, layout in zip(weights, layouts)]
            kernels["engine"] = _best_of(lambda: [product(x) for x, product in bound], repeats)
    seconds = min(kernels.values())
    return {"seconds": seconds, "flops": flops, "flops_per_s": flops / seconds, "kernels": kernels}


def measure(model: torch.nn.Module, batches: list[int]) -> dict:
    """Both floors at each batch, for ``model`` as loaded (its dtype, this process's threads)."""
    bandwidth = read_bandwidth()
    nbytes = weight_bytes(model)
    memory_floor = nbytes / bandwidth["bytes_per_s"]
    out = {"threads": torch.get_num_threads(), "weight_bytes": nbytes, "read_bandwidth": bandwidth,
           "memory_floor_ms": 1000 * memory_floor, "batches": {}}
    for batch in batches:
        m = matrix_floor(model, batch)
        out["batches"][str(batch)] = {"matrix_floor_ms": 1000 * m["seconds"], "flops": m["flops"],
                                      "matrix_flops_per_s": m["flops_per_s"],
                                      "matrix_kernel_ms": {k: 1000 * v for k, v in m["kernels"].items()}}
        if batch == 1:
            # the products at 1 row read every weight once too: where they ran faster than
            # the buffer was read, the machine read at least that fast
            bandwidth["model_products_bytes_per_s"] = nbytes / m["seconds"]
            bandwidth["bytes_per_s"] = max(bandwidth["bytes_per_s"], bandwidth["model_products_bytes_per_s"])
            out["memory_floor_ms"] = 1000 * nbytes / bandwidth["bytes_per_s"]
    for row in out["batches"].values():
        row["floor_ms"] = max(out["memory_floor_ms"], row["matrix_floor_ms"])
    return out


def side_by_side(directory, batches: list[int], *, dtype: str, prompt_tokens: int, new_tokens: int,
                 turns: int = 5, **engine_options) -> tuple[dict, object]:
    """The engine's decode step and both floors, measured in turns: each turn times one
    round of steps at every batch (the median step where every row decodes), then measures
    the floors (``measure``) and pairs them (``with_ratios``). A shared machine's read rate
    drifts by tens of percent over minutes, so a ratio compares figures taken within the
    same half minute. Returns the turns combined (``combine``: every figure and every ratio
    the median over the turns, each turn's own under ``"turns"``) and the engine's runner
    (which says how its steps ran: lean, compiled)."""
    from engine import Engine, LatentPolicy, SamplingParams
    from engine.bench.models import engine_round, make_prompts

    sampling = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    latent = LatentPolicy(mode="none")
    engine = Engine.from_pretrained(directory, dtype=dtype, max_batch_size=max(batches), **engine_options)
    questions = {batch: make_prompts(engine, batch, prompt_tokens, 0, sampling, latent) for batch in batches}
    for batch in batches:        # warm: every batch's shapes once
        engine_round(engine, questions[batch], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), latent)
    reports = []
    for _ in range(turns):
        steps = {str(batch): {"step_ms": 1000 * statistics.median(
            engine_round(engine, questions[batch], sampling, latent)["steps_s"])} for batch in batches}
        reports.append(with_ratios(measure(engine.runner.adapter.model, batches), steps))
    return combine(reports), engine.runner


def combine(turns: list[dict]) -> dict:
    """Turns of ``with_ratios(measure(...), steps)`` as one report: each number the median
    over the turns (a ratio is the median of the turns' own ratios, not a ratio of
    medians), the rest as the first turn has it, and the turns themselves (``"turns"``)."""

    def median_of(values: list):
        first = values[0]
        if isinstance(first, dict):
            return {k: median_of([v[k] for v in values if k in v]) for k in first}
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            return statistics.median(values)
        return first

    out = median_of(turns)
    out["turns"] = turns
    return out


def with_ratios(floors: dict, steps: dict) -> dict:
    """``floors`` with each batch's engine step and its ratio to the floor of its kind:
    batch 1 against the memory floor, larger batches against the matrix floor (and both)."""
    for batch, row in floors["batches"].items():
        step = steps.get(batch, {}).get("step_ms")
        if step is None:
            continue
        row["engine_step_ms"] = step
        row["step_over_memory_floor"] = step / floors["memory_floor_ms"]
        row["step_over_matrix_floor"] = step / row["matrix_floor_ms"]
        row["step_over_floor"] = step / row["floor_ms"]
    return floors
