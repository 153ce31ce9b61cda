"""The software and hardware a run happened on, recorded in every report."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from .hub import cached_models, hf_cache_dir
from .memory import both_units

PACKAGES = ("torch", "diffusers", "transformers", "bitsandbytes", "accelerate", "torchao", "open_clip_torch", "papermill")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cuda_device() -> dict | None:
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
            "free": both_units(free), "total": both_units(total)}


def hf_hub_offline() -> bool:
    """Whether huggingface_hub will refuse the network (read once, when it was imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def environment() -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(), **package_versions(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
            "cuda_device": cuda_device(), "hf_hub_offline": hf_hub_offline(), "hf_cache": hf_cache_dir(),
            "cached_flux_models": cached_models()}
