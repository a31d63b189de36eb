"""``--model`` as users write it (``engine.sources``): a directory, a Hub id from a cache in
the Hub's own layout (offline, as CI runs), a ``.gguf`` spec; the refusals name the model
and say what was expected. The Hub cache is filled by hand here, in the layout
``huggingface_hub`` reads (``models--org--name/refs/REV`` holding a commit,
``snapshots/COMMIT/...``), so these tests check that the resolution goes through the
Hub's library and its cache rules, not through our own reading of the folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import CheckpointError
from engine.sources import ModelNotFound, resolve_model

MAIN = "a" * 40
V1 = "b" * 40


def _install(cache: Path, repo_id: str, ref: str, commit: str, files_from: Path | None = None,
             extra: dict[str, bytes] | None = None) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    if files_from is not None:
        for f in files_from.iterdir():
            shutil.copy(f, snapshot / f.name)
    for name, data in (extra or {}).items():
        (snapshot / name).write_bytes(data)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_checkpoint) -> Path:
    cache = tmp_path_factory.mktemp("hub")
    _install(cache, "acme/tiny-coconut", "main", MAIN, Path(tiny_checkpoint()))
    tagged = _install(cache, "acme/tiny-coconut", "v1", V1, Path(tiny_checkpoint()))
    (tagged / "marker-v1.txt").write_text("v1")
    _install(cache, "acme/pickled", "main", MAIN, extra={"config.json": b"{}", "pytorch_model.bin": b"\x80\x04"})
    return cache


def test_a_directory_is_itself(tiny_checkpoint):
    source = resolve_model(tiny_checkpoint())
    assert source.directory == Path(tiny_checkpoint()) and not source.is_gguf


def test_a_hub_id_resolves_in_the_cache_offline(hub_cache):
    source = resolve_model("acme/tiny-coconut", offline=True, cache_dir=hub_cache)
    assert source.directory.name == MAIN and source.name == "acme/tiny-coconut"
    assert (source.directory / "coconut.json").is_file()
    tagged = resolve_model("acme/tiny-coconut", "v1", offline=True, cache_dir=hub_cache)
    assert tagged.directory.name == V1 and (tagged.directory / "marker-v1.txt").is_file()


def test_a_hub_id_not_in_the_cache_names_the_id_and_the_cache(hub_cache):
    with pytest.raises(ModelNotFound) as e:
        resolve_model("acme/absent", offline=True, cache_dir=hub_cache)
    assert "acme/absent" in str(e.value) and str(hub_cache) in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    with pytest.raises(ModelNotFound, match="revision 'v9'"):
        resolve_model("acme/tiny-coconut", "v9", offline=True, cache_dir=hub_cache)


def test_pickled_weights_alone_are_refused(hub_cache):
    with pytest.raises(CheckpointError, match=r"pickled only \(pytorch_model.bin\).*safetensors"):
        resolve_model("acme/pickled", offline=True, cache_dir=hub_cache)


def test_specs_that_name_nothing_say_what_is_expected(tmp_path):
    with pytest.raises(ModelNotFound, match="expected a checkpoint directory, a .gguf file"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a .gguf file"):
        resolve_model(tmp_path / "weights.bin")
    with pytest.raises(ModelNotFound, match="has no file 'm.gguf'"):
        resolve_model(f"{tmp_path}:m.gguf")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model(f"{tmp_path}:m.gguf").gguf_file == "m.gguf"
    assert resolve_model(tmp_path / "m.gguf").name == "m"


def test_a_missing_gguf_extra_is_named(monkeypatch, tmp_path):
    from engine.gguf import convert_gguf

    monkeypatch.setitem(sys.modules, "gguf", None)     # import gguf -> ImportError
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"optional extra 'gguf'.*coconut-serve\[gguf\]"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


def _engine_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_the_cli_takes_a_hub_id_under_hf_hub_offline(hub_cache, tiny_checkpoint):
    """HF_HUB_CACHE and HF_HUB_OFFLINE as the Hub's own tools read them, in a fresh process."""
    from engine import Engine, SamplingParams

    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    done = _engine_cli("generate", "--model", "acme/tiny-coconut", "--revision", "v1", "--json", "--max-tokens",
                       "6", "Tom is a wumpus. Is Tom a wumpus or yumpus?", env=env)
    assert done.returncode == 0, done.stderr
    import json
    got = json.loads(done.stdout.strip().splitlines()[-1])
    [want] = Engine.from_pretrained(tiny_checkpoint()).generate(["Tom is a wumpus. Is Tom a wumpus or yumpus?"],
                                                             SamplingParams(max_tokens=6))
    assert got["token_ids"] == want.token_ids
    done = _engine_cli("serve", "--model", "acme/absent", env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "acme/absent" in done.stderr and str(hub_cache) in done.stderr
