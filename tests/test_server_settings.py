"""``engine serve`` settings: every flag is also an environment variable (``COCONUT_*``),
flags win over the environment, bad values are refused with the field named, and the
model defaults to the bundled one. No server is started here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import build_parser
from server.cli import settings_from_args
from server.settings import ServerSettings


def parse(*argv: str) -> ServerSettings:
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_every_field_is_a_flag_and_an_env_var(monkeypatch):
    monkeypatch.setenv("COCONUT_PORT", "9123")
    monkeypatch.setenv("COCONUT_API_KEY", "from-env")
    monkeypatch.setenv("COCONUT_MAX_QUEUE", "7")
    monkeypatch.setenv("COCONUT_MODEL", "/models/a")
    s = parse()
    assert (s.port, s.api_key.get_secret_value(), s.max_queue, s.model) == (9123, "from-env", 7, "/models/a")
    s = parse("--port", "9200", "--max-queue", "9", "--api-key", "from-flag", "--max-batch-size", "4",
              "--log-level", "debug")
    assert (s.port, s.max_queue, s.api_key.get_secret_value(), s.max_batch_size, s.log_level) == \
        (9200, 9, "from-flag", 4, "debug")
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for name in ServerSettings.model_fields:
        assert "--" + name.replace("_", "-") in help_text and f"COCONUT_{name.upper()}" in help_text


def test_the_serve_log_level_does_not_clobber_the_global_one():
    args = build_parser().parse_args(["--log-level", "ERROR", "serve", "--log-level", "debug"])
    assert args.log_level == "ERROR" and settings_from_args(args).log_level == "debug"


@pytest.mark.parametrize("argv, field", [
    (["--port", "70000"], "port"),
    (["--max-batch-size", "0"], "max_batch_size"),
    (["--max-body-bytes", "10"], "max_body_bytes"),
    (["--log-level", "loud"], None),  # argparse choices: exits with usage
])
def test_bad_settings_name_the_field(argv, field):
    if field is None:
        with pytest.raises(SystemExit):
            parse(*argv)
        return
    with pytest.raises(ValueError, match=field):
        parse(*argv)


def test_an_empty_api_key_means_no_key(monkeypatch):
    monkeypatch.setenv("COCONUT_API_KEY", "")
    assert parse().api_key is None


def test_model_defaults_to_the_bundled_one(monkeypatch):
    monkeypatch.delenv("COCONUT_MODEL", raising=False)
    from engine.models import REPO_MODELS_DIR, DEFAULT_MODEL_NAME
    s = parse()
    assert s.model is None
    if (REPO_MODELS_DIR / DEFAULT_MODEL_NAME).is_dir():
        assert s.model_spec() == str(REPO_MODELS_DIR / DEFAULT_MODEL_NAME)
    else:
        with pytest.raises(FileNotFoundError, match="--model"):
            s.model_spec()


def test_serve_refuses_a_missing_model_dir_with_a_clear_error(tmp_path, capsys):
    from engine.cli import main
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no such directory or .gguf file, and not a Hugging Face Hub id" in err and str(tmp_path / "nope") in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_auto_device_and_dtype(monkeypatch):
    """--dtype auto on CPU: bfloat16 where the CPU multiplies it natively (AVX-512 BF16 or
    AMX), else float32; this machine's answer follows its own /proc/cpuinfo flags."""
    from engine import cpu_features

    s = ServerSettings(device="cpu")
    try:
        flags = cpu_features.cpu_flags(open("/proc/cpuinfo").read())
    except OSError:
        flags = set()
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert (s.resolved_device(), s.resolved_dtype()) == ("cpu", "bfloat16" if native else "float32")
    for has, dtype in ((False, "float32"), (True, "bfloat16")):
        monkeypatch.setattr(cpu_features, "native_bfloat16", lambda has=has: has)
        assert ServerSettings(device="cpu").resolved_dtype() == dtype
    assert ServerSettings(device="cpu", dtype="bfloat16").resolved_dtype() == "bfloat16"
    assert ServerSettings(device="cpu", dtype="float32").resolved_dtype() == "float32"


def test_the_engine_process_threads_follow_the_weights_with_passive_openmp(monkeypatch, tmp_path):
    """Without --torch-threads the engine process takes every usable CPU for large weights
    and leaves one to the API process for small ones; --torch-threads wins. Its OpenMP threads are made to sleep when idle (OMP_WAIT_POLICY=PASSIVE, set in
    the environment its fork server or spawned child inherits) unless the user set it."""
    import os

    from engine import process_engine
    from server.app import engine_process_threads

    from server.app import PARALLEL_WEIGHTS_BYTES

    big = tmp_path / "big"
    big.mkdir()
    with open(big / "model.safetensors", "wb") as f:      # sparse: its size is what counts
        f.truncate(PARALLEL_WEIGHTS_BYTES)
    for cpus, small in ((1, 1), (2, 1), (16, 15)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert engine_process_threads(ServerSettings()) == small            # the bundled 11 MB model
        assert engine_process_threads(ServerSettings(model=str(big))) == cpus
        assert engine_process_threads(ServerSettings(torch_threads=3)) == 3
    # prefill pacing follows the same bound: on for large weights, off for small ones
    assert ServerSettings(model=str(big)).resolved_prefill_delay_factor() == 2.0
    assert ServerSettings().resolved_prefill_delay_factor() == 0.0
    assert ServerSettings(prefill_delay_factor=1.5).resolved_prefill_delay_factor() == 1.5
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    process_engine._context()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    process_engine._context()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_bench_serve_matches_the_servers_prefill_budget_by_default():
    """`engine bench serve` drives its offline engine with the server's default
    --max-prefill-tokens, so the two sides plan their steps alike unless told otherwise."""
    from engine.bench.serve import SERVER_PREFILL_TOKENS
    from server.settings import ServerSettings
    assert SERVER_PREFILL_TOKENS == ServerSettings.model_fields["max_prefill_tokens"].default


def test_compile_is_where_it_pays_unless_told(monkeypatch):
    """Unset, --compile is None (the engine compiles where it pays); the flags and the
    environment force it either way."""
    monkeypatch.delenv("COCONUT_COMPILE", raising=False)
    assert parse().compile is None
    assert parse("--compile").compile is True and parse("--no-compile").compile is False
    monkeypatch.setenv("COCONUT_COMPILE", "false")
    assert parse().compile is False
