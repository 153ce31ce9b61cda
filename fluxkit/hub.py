"""Where weights come from: a local folder, the local Hugging Face cache, or (only when asked) the Hub.

Loading never touches the network. `download` is the one function that does, and it fetches only
the diffusers folders of the repository, not the 23 GB single-file checkpoint that sits beside them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_MODEL
from .errors import InputError, VortexInitializationError
from .synthetic import PRESETS, ensure_synthetic, read_marker

COMPONENT_FOLDERS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae")
# The diffusers layout only: configs, tokenizers and safetensors in the component folders.
DOWNLOAD_PATTERNS = ["model_index.json"] + [
    f"{folder}/{pattern}" for folder in COMPONENT_FOLDERS
    for pattern in ("*.json", "*.safetensors", "*.txt", "*.model")]


@dataclass(frozen=True)
class ModelSource:
    """A resolved checkpoint folder and what it is, for reports."""

    path: Path
    model_id: str
    revision: str | None
    synthetic: dict | None

    def describe(self) -> str:
        if self.synthetic:
            return f"synthetic {self.synthetic['preset']} (seed {self.synthetic['seed']}, random weights)"
        return f"{self.model_id}@{self.revision}" if self.revision else str(self.path)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "model_id": self.model_id, "revision": self.revision,
                "synthetic": self.synthetic, "description": self.describe()}


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def resolve_model(model: str | os.PathLike, revision: str | None = None) -> ModelSource:
    """Resolve `model` without any network access.

    `model` is a folder, a Hub id looked up in the local cache only, `synthetic-tiny` / `synthetic-full`
    (built into fluxkit's cache on demand), or `auto`: the real FLUX.1-schnell if cached, else the tiny
    synthetic checkpoint.
    """
    name = str(model)
    if name == "auto":
        folder = cached_snapshot(DEFAULT_MODEL, revision)
        if folder is not None:
            return ModelSource(folder, DEFAULT_MODEL, folder.name, read_marker(folder))
        name = "synthetic-tiny"
    if name.startswith("synthetic-") and name.removeprefix("synthetic-") in PRESETS:
        try:
            path = ensure_synthetic(name.removeprefix("synthetic-"), seed=0)
        except InputError as err:  # an extra that is not installed
            raise VortexInitializationError(f"model={name!r}: {err}.", remediation="install the extra named above, "
                                            "or pass a checkpoint folder") from None
        return ModelSource(path, name, None, read_marker(path))
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource(path.resolve(), name, None, read_marker(path))
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise VortexInitializationError(
            f"model={name!r} is neither a folder nor a Hugging Face repository id.",
            remediation="pass a checkpoint folder, a repository id such as black-forest-labs/FLUX.1-schnell, "
                        "synthetic-tiny, synthetic-full, or auto")
    folder = cached_snapshot(name, revision)
    if folder is None:
        raise VortexInitializationError(
            f"Weights for {name} (revision {revision or 'main'}) are not in the local Hugging Face cache "
            f"({hf_cache_dir()}); fluxkit never downloads while loading.",
            remediation=f"run `fluxkit download --model {name}` on a machine with network access (HF_HOME picks the "
                        "cache), or pass model=<folder>; `fluxkit synth` writes a synthetic checkpoint for tests")
    return ModelSource(folder, name, folder.name, read_marker(folder))  # a synthetic one says so, wherever it is


def cached_snapshot(name: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, local_files_only=True, allow_patterns=DOWNLOAD_PATTERNS))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None
    except HFValidationError as err:
        raise VortexInitializationError(f"model={name!r} is not a valid Hugging Face repository id ({err}).",
                                        remediation="pass a checkpoint folder or an id such as "
                                                    "black-forest-labs/FLUX.1-schnell") from None


def download(model: str = DEFAULT_MODEL, revision: str | None = None, token: str | None = None) -> Path:
    """Fetch the diffusers folders of `model` into the Hugging Face cache (network required)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, revision=revision, allow_patterns=DOWNLOAD_PATTERNS, token=token))


def cached_models() -> list[dict]:
    """FLUX repositories present in the local Hugging Face cache, with their snapshots."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return []
    return [{"repo_id": repo.repo_id, "size_gb": round(repo.size_on_disk / 1e9, 2),
             "revisions": sorted(r.commit_hash for r in repo.revisions)}
            for repo in info.repos if repo.repo_type == "model" and "flux" in repo.repo_id.lower()]
