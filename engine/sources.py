"""Where a model comes from: what a user types after ``--model``, resolved to local files.

``resolve_model(spec, revision=None)`` accepts what other servers accept and returns a
``ModelSource``:

- a local checkpoint directory (``models/prosqa-coconut``, any ``save_pretrained`` output);
- a ``.gguf`` file, or ``DIR:FILE.gguf`` (a file inside a directory, as ``transformers
  serve`` writes it): ``ModelSource.gguf_file`` is set and ``engine.gguf`` dequantizes it;
- a Hugging Face Hub id ``org/name`` (``--revision``: a branch, tag or commit), resolved
  by ``huggingface_hub`` into its cache, which honours ``HF_HOME`` / ``HF_HUB_CACHE``,
  ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` as the Hub's own tools do; ``org/name:FILE.gguf``
  takes one GGUF file of a repository. Only safetensors weights are downloaded or taken:
  a repository whose weights are pickled alone (``*.bin``, ``*.pt``) is refused, saying so.

A local path wins over a Hub id of the same spelling (as in transformers). Offline and
not in the cache: ``ModelNotFound`` naming the id and the cache folder. This module
knows names and files; it loads nothing (``engine.checkpoint`` does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import CheckpointError

# What a checkpoint directory needs besides its weights: configs, tokenizer files, chat
# templates, the COCONUT side files (coconut.json, stop classifier, projection).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "merges*",
                "vocab*"]
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


MODEL_HELP = ("the model: a checkpoint directory, a .gguf file (or DIR:FILE.gguf), or a Hugging Face Hub "
              "id org/name (or org/name:FILE.gguf) from the Hub's cache (default: the bundled model)")
REVISION_HELP = "a Hub id's branch, tag or commit (default: main)"


def add_model_arguments(parser, model_help: str = MODEL_HELP) -> None:
    """``--model`` and ``--revision``, as every command that names a model takes them."""
    parser.add_argument("--model", default=None, help=model_help)
    parser.add_argument("--revision", default=None, help=REVISION_HELP)


class ModelNotFound(CheckpointError):
    """The spec names nothing this machine has or can fetch."""


@dataclass(frozen=True)
class ModelSource:
    """A model's local files: a directory, and the GGUF file in it when the weights are one."""

    directory: Path
    gguf_file: str | None = None
    spec: str = ""             # what the user wrote
    hub_id: str | None = None

    @property
    def name(self) -> str:
        """The name the API reports by default: the Hub id, the GGUF file's stem, or the
        directory's name."""
        if self.gguf_file:
            return Path(self.gguf_file).stem
        return self.hub_id or self.directory.name

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and ".." not in spec


def resolve_model(spec: str | Path, revision: str | None = None, *, offline: bool | None = None,
                  cache_dir: str | Path | None = None) -> ModelSource:
    """``spec`` as local files (see the module's docstring). ``offline`` None: the Hub's own
    setting (``HF_HUB_OFFLINE``). Raises ``ModelNotFound`` / ``CheckpointError`` naming the
    spec and what was expected."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelSource(path, spec=text)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(f"--model {text}: a file, but not a .gguf file (expected a checkpoint "
                                  f"directory, a .gguf file or a Hugging Face Hub id org/name)")
        return ModelSource(path.parent, path.name, spec=text)
    base, sep, file = text.rpartition(":")
    if sep and file.lower().endswith(".gguf") and base:
        if Path(base).expanduser().is_dir():
            local = Path(base).expanduser()
            if not (local / file).is_file():
                raise ModelNotFound(f"--model {text}: {local} has no file {file!r}")
            return ModelSource(local, file, spec=text)
        if looks_like_hub_id(base):
            return _hub_gguf(base, file, revision, offline, cache_dir, text)
    if looks_like_hub_id(text):
        return _hub_snapshot(text, revision, offline, cache_dir)
    raise ModelNotFound(f"--model {text}: no such directory or .gguf file, and not a Hugging Face Hub id "
                        f"(expected a checkpoint directory, a .gguf file, DIR:FILE.gguf, org/name or "
                        f"org/name:FILE.gguf)")


def _hub_offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def _cache_folder(cache_dir: str | Path | None) -> str:
    from huggingface_hub import constants
    return str(cache_dir or constants.HF_HUB_CACHE)


def _not_cached(repo_id: str, revision: str | None, cache_dir, reason: str) -> ModelNotFound:
    at = f" at revision {revision!r}" if revision else ""
    return ModelNotFound(f"--model {repo_id}{at}: not in the Hugging Face cache {_cache_folder(cache_dir)} "
                         f"and {reason} (download it where the Hub is reachable, e.g. `hf download "
                         f"{repo_id}`, with HF_HOME pointing at the same cache, or pass a local directory)")


def _hub_snapshot(repo_id: str, revision: str | None, offline: bool | None,
                  cache_dir: str | Path | None) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    local_only = _hub_offline(offline)
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS,
                                   local_files_only=local_only)
    except GatedRepoError as e:
        raise ModelNotFound(f"--model {repo_id}: a gated repository; accept its terms on the Hub and set "
                            f"HF_TOKEN ({e})") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"--model {repo_id}: no such repository on the Hugging Face Hub (or it is private: "
                            f"set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ModelNotFound(f"--model {repo_id}: no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        reason = "the Hub is offline (HF_HUB_OFFLINE=1)" if local_only else "the Hub cannot be reached"
        raise _not_cached(repo_id, revision, cache_dir, reason) from None
    directory = Path(folder)
    _check_snapshot(repo_id, directory)
    return ModelSource(directory, spec=repo_id, hub_id=repo_id)


def _check_snapshot(repo_id: str, directory: Path) -> None:
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLED_SUFFIXES)
    if pickled:
        raise CheckpointError(f"--model {repo_id}: the repository's weights are pickled only ({', '.join(pickled)}); "
                              f"this server loads safetensors weights only (pickle can run code): use a "
                              f"repository with *.safetensors, or convert it where you trust it")
    raise CheckpointError(f"--model {repo_id}: the snapshot {directory} has no *.safetensors weights: only "
                          f"safetensors weights are downloaded or loaded (pickle can run code), so a repository "
                          f"whose weights are pickled alone (*.bin, *.pt) is not taken")


def _hub_gguf(repo_id: str, file: str, revision: str | None, offline: bool | None,
              cache_dir: str | Path | None, spec: str) -> ModelSource:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    local_only = _hub_offline(offline)
    try:
        path = Path(hf_hub_download(repo_id, file, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_only))
    except EntryNotFoundError:
        raise ModelNotFound(f"--model {spec}: the repository has no file {file!r}") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"--model {spec}: no such repository on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        reason = "the Hub is offline (HF_HUB_OFFLINE=1)" if local_only else "the Hub cannot be reached"
        raise _not_cached(f"{repo_id}:{file}", revision, cache_dir, reason) from None
    return ModelSource(path.parent, path.name, spec=spec, hub_id=repo_id)
