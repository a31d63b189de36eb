"""``kv_cache_memory``: the KV cache sized by a memory budget (``engine.kv_cache_sizing``).

The bytes-per-position formula is checked against what the runner really allocates (the
sum of the cache tensors' ``nbytes``) on tiny models of several architectures: grouped and
multi-query attention, explicit head dims, sliding-window layers, layers sharing another's
keys. A budget gives the expected ``max_seq_len`` (the model's context when it fits, no
4096 cap), an impossible one is refused with the figures, and the flag's syntax is parsed
or refused saying what is expected. Through the server (its engine in its own process),
the limit the child derived is the one requests are held to: a longer one is a 400.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from engine.config import EngineConfig
from engine.kv_cache_sizing import (DEFAULT_MAX_SEQ_LEN, MIN_POSITIONS, kv_bytes_per_position,
                                    parse_kv_cache_memory, plan_kv_cache)

GiB, MiB = 2**30, 2**20

ARCHITECTURES = {   # tiny configs: AutoConfig.for_model(type, vocab_size=128, **fields)
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4),
    "llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128),
    "gemma2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=128, sliding_window=4),
    "gemma3_text": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                        head_dim=32, intermediate_size=128, sliding_window=4),
    "qwen3": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                  intermediate_size=128),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                   new_decoder_architecture=False),
    "gemma3n_text": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=16, intermediate_size=128, num_kv_shared_layers=2, vocab_size_per_layer_input=128,
                         hidden_size_per_layer_input=8, laurel_rank=4, altup_num_inputs=2,
                         layer_types=["sliding_attention", "full_attention"] * 2,
                         activation_sparsity_pattern=[0.0] * 4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_bytes_per_position_is_what_the_runner_allocates(arch, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.runner.model_runner import ModelRunner

    config = AutoConfig.for_model(arch, vocab_size=128, **ARCHITECTURES[arch])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    runner = ModelRunner(model, 0, num_slots=3, max_seq_len=16)
    reported = runner.allocate()
    allocated = sum(layer.keys.nbytes + layer.values.nbytes for layer in runner.cache.layers if layer.is_initialized)
    assert kv_bytes_per_position(config, dtype) * 3 * 16 == allocated == reported


def test_gemma_3_270m_at_its_own_context_needs_38_gb():
    from transformers import AutoConfig

    config = AutoConfig.for_model("gemma3_text", num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                                  head_dim=256, hidden_size=640, max_position_embeddings=32768)
    per_position = kv_bytes_per_position(config, torch.float32)
    assert per_position == 18 * 1 * 256 * 2 * 4
    assert per_position * 32 * 32768 == 38_654_705_664
    plan = plan_kv_cache(32768, 32, None, parse_kv_cache_memory("4GiB"), per_position, free_memory=None)
    assert plan.max_seq_len == 4 * GiB // (32 * per_position) == 3640


# ------------------------------------------------------------------ the plan


def plan(max_seq_len=None, memory=None, context=8192, slots=4, per_position=1024, free=None):
    return plan_kv_cache(context, slots, max_seq_len, None if memory is None else parse_kv_cache_memory(memory),
                         per_position, free_memory=lambda: free)


def test_without_a_budget_the_limit_is_as_before():
    assert plan().max_seq_len == DEFAULT_MAX_SEQ_LEN
    assert plan(context=1024).max_seq_len == 1024
    assert plan(max_seq_len=6000).max_seq_len == 6000
    assert plan(max_seq_len=6000, context=2048).max_seq_len == 2048
    assert plan().budget_bytes is None


def test_a_budget_gives_the_models_context_when_it_fits_else_what_fits():
    assert plan(memory="1GiB").max_seq_len == 8192                 # no 4096 cap
    fitted = plan(memory="16MiB")                                   # 16 MiB / (4 slots x 1 KiB)
    assert fitted.max_seq_len == 4096 and fitted.budget_bytes == 16 * MiB
    assert "16MiB" in fitted.source and "8192" in fitted.source
    assert plan(memory="0.01").max_seq_len == int(0.01 * GiB) // 4096
    assert plan(memory="50%", free=8 * MiB).max_seq_len == 1024    # half of 8 MiB free
    assert plan(max_seq_len=2048, memory="16MiB").max_seq_len == 2048
    assert plan(max_seq_len=100000, memory="1GiB", context=4096).max_seq_len == 4096


def test_a_budget_that_cannot_hold_the_asked_positions_is_refused_with_the_figures():
    with pytest.raises(ValueError) as refused:
        plan(max_seq_len=8192, memory="16MiB")
    message = str(refused.value)
    for figure in ("4 slots x 8192 positions", str(4 * 8192 * 1024), str(16 * MiB), "at most 4096 positions",
                   "1024 bytes per position"):
        assert figure in message, message


def test_a_budget_below_the_minimum_is_refused_with_the_figures():
    with pytest.raises(ValueError, match=f"63 positions per slot for 4 slots.*{MIN_POSITIONS * 4096} bytes needed"):
        plan(memory=f"{63 * 4096 / MiB}MiB")
    assert plan(memory=f"{64 * 4096 / MiB}MiB").max_seq_len == 64
    assert plan(memory="1MiB", context=32).max_seq_len == 32      # a short model fits whole


# ------------------------------------------------------------------ syntax


@pytest.mark.parametrize("text, size, fraction", [
    ("4GiB", 4 * GiB, None), ("4 gib", 4 * GiB, None), ("512MiB", 512 * MiB, None), ("4", 4 * GiB, None),
    ("0.5", GiB // 2, None), (2, 2 * GiB, None), ("90%", None, 0.9), ("100%", None, 1.0)])
def test_the_syntax(text, size, fraction):
    parsed = parse_kv_cache_memory(text)
    assert (parsed.size_bytes, parsed.fraction) == (size, fraction)


@pytest.mark.parametrize("text", ["4GB", "lots", "", "0", "-1GiB", "150%", "0%", "nan", "inf", True])
def test_a_bad_value_says_what_is_expected(text):
    with pytest.raises(ValueError, match=r"kv_cache_memory=.* is invalid: expected a size in GiB or MiB"):
        parse_kv_cache_memory(text)
    with pytest.raises(ValueError, match="expected a size in GiB or MiB"):
        EngineConfig(kv_cache_memory=text)


def serve_settings(*argv):
    from engine.cli import build_parser
    from server.cli import settings_from_args

    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_the_flag_and_the_env_var_reach_the_engine_options(monkeypatch):
    from server.app import engine_options

    assert serve_settings().kv_cache_memory is None
    assert engine_options(serve_settings())["kv_cache_memory"] is None
    monkeypatch.setenv("COCONUT_KV_CACHE_MEMORY", "90%")
    assert serve_settings().kv_cache_memory == "90%"
    settings = serve_settings("--kv-cache-memory", "512MiB", "--device", "cpu")
    assert engine_options(settings)["kv_cache_memory"] == "512MiB"
    with pytest.raises(ValueError, match="kv_cache_memory.*expected a size in GiB or MiB"):
        serve_settings("--kv-cache-memory", "4GB")


# ------------------------------------------------------------------ the engine


def cache_bytes(engine) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in engine.runner.cache.layers)


def test_the_engine_sizes_its_cache_by_the_budget(tiny_checkpoint, caplog):
    from engine.sync_engine import Engine

    path = tiny_checkpoint("gpt2", max_positions=6000)     # 2 layers x 2 x 64 x 4 bytes = 1 KiB a position
    assert Engine.from_pretrained(path, max_batch_size=2).max_seq_len == DEFAULT_MAX_SEQ_LEN
    assert Engine.from_pretrained(path, max_batch_size=2, kv_cache_memory="1GiB").max_seq_len == 6000
    with caplog.at_level("INFO", logger="engine.sync_engine"):
        engine = Engine.from_pretrained(path, max_batch_size=2, kv_cache_memory="0.5MiB")
    assert engine.max_seq_len == 256 and cache_bytes(engine) == 2 * 256 * 1024 == MiB // 2
    assert "KV cache: 2 slots x 256 positions, 0.5 MiB (what kv_cache_memory 0.5MiB (0.5 MiB) holds" in caplog.text
    with pytest.raises(ValueError, match=r"2 slots x 512 positions needs 1048576 bytes .* holds 524288 bytes"):
        Engine.from_pretrained(path, max_batch_size=2, max_seq_len=512, kv_cache_memory="0.5MiB")


def test_a_share_of_free_memory_sizes_the_cache(tiny_checkpoint, monkeypatch):
    import engine.kv_cache_sizing as sizing
    from engine.sync_engine import Engine

    monkeypatch.setattr(sizing, "free_memory_bytes", lambda device: 4 * MiB)
    engine = Engine.from_pretrained(tiny_checkpoint("gpt2", max_positions=6000), max_batch_size=4,
                                    kv_cache_memory="25%")
    assert engine.max_seq_len == MiB // (4 * 1024)


def test_free_memory_is_known_on_cpu():
    from engine.kv_cache_sizing import free_memory_bytes

    assert free_memory_bytes("cpu") > 0


# ------------------------------------------------------------------ the server


def test_the_server_holds_requests_to_the_limit_its_engine_process_derived(tiny_checkpoint):
    from tests.test_server_harness import InProcessServer

    path = tiny_checkpoint("gpt2")                           # 512 positions; 2 slots x 1 KiB a position
    with InProcessServer(path, max_batch_size=2, kv_cache_memory="0.5MiB", torch_threads=1) as server:
        assert server.settings.engine_process
        with httpx.Client(base_url=server.url, timeout=60) as http:
            card = http.get("/v1/models").json()["data"][0]
            assert card["max_model_len"] == 256
            r = http.post("/v1/reason", json={"question": "Is Tom a wumpus?", "max_tokens": 300})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["type"] == "context_length_exceeded" and "limit is 256" in error["message"]
            assert "needs up to" in error["message"]
            r = http.post("/v1/reason", json={"question": "Is Tom a wumpus?", "max_tokens": 8})
            assert r.status_code == 200, r.text


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs Linux's /proc to read RSS")
def test_the_cpu_cache_holds_memory_only_where_it_was_written():
    """The slot cache's CPU tensors (``slot_cache.zeroed``) read as zeros and take resident
    memory only for the pages written: 64 slots x 4096 positions of 3 heads x 64 (192 MiB),
    of which the first 16 positions of every slot and head are written (16 x 256 bytes: one
    4 KiB page each, 768 KiB), grow the process's RSS by far less than the whole."""
    from engine.runner.slot_cache import zeroed

    before = _resident_bytes()
    cache = zeroed((64, 3, 4096, 64), torch.float32, torch.device("cpu"))
    assert cache.shape == (64, 3, 4096, 64) and cache.dtype == torch.float32
    cache[:, :, :16] = 1.0
    grown = _resident_bytes() - before
    assert grown < 32 * MiB, f"writing 768 KiB of a 192 MiB cache made {grown / MiB:.1f} MiB resident"
    assert int(cache[:, :, :16].sum()) == 64 * 3 * 16 * 64
    assert int(cache[:, :, 16:].count_nonzero()) == 0        # the rest reads as zeros
    view = cache[:2]
    del cache                                                  # a view keeps the map alive
    assert int(view.sum()) == 2 * 3 * 16 * 64
