"""Helpers shared by the tests: the CLI in a subprocess, folder digests, damaged checkpoints, fast validate settings."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fluxkit.config import load_placement, load_preset

PROMPT = "manic scientist, blue spiked hair, white lab coat"
# validate on the tiny checkpoint in seconds: few calls, the small CLIP backbone
FAST_VALIDATE = dict(model="auto", device="cpu", iterations=3, drift_calls=2, clip_model="ViT-B-32",
                     clip_pretrained="openai", sweep_presets=["nf4"], progress=False)


def run_cli(*args: str, env_extra: dict | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    env.pop("HF_HUB_OFFLINE", None)  # the CLI must set it itself
    return subprocess.run([sys.executable, "-m", "fluxkit.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900, cwd=cwd)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def t5_unquantized(name: str = "nf4"):
    """A preset that quantizes the transformer only: placements then differ only in where things run."""
    preset = load_preset(name)
    return dataclasses.replace(preset, quantization=dataclasses.replace(preset.quantization, components=("transformer",)))


def with_budgets(preset, **changes):
    return dataclasses.replace(preset, budgets=dataclasses.replace(preset.budgets, **changes))


def resident_like(model_dir, placement: str, device: str):
    """Everything resident, with the T5-unquantized preset, decoding in `placement`'s tiles: the tiles change pixels,
    where the weights live must not."""
    from fluxkit import load_flux_schnell

    spec = dataclasses.replace(load_placement("resident"), vae_tile_size=load_placement(placement).vae_tile_size)
    return load_flux_schnell(device=device, quantization=t5_unquantized(), model=model_dir, placement=spec)


def resident_images(model_dir, device: str, seed: int):
    """`seed`'s image from `resident_like` a placement, rendered once per tile size."""
    images = {}

    def image(placement: str):
        tile = load_placement(placement).vae_tile_size
        if tile not in images:
            images[tile] = resident_like(model_dir, placement, device).generate(PROMPT, seed=seed)
        return images[tile]
    return image


@contextlib.contextmanager
def uncaptured(model):
    """The model's calls without its CUDA graphs, through the same compiled modules: what the graphs must equal."""
    graphed, model.graphed = model.graphed, {}
    try:
        yield model
    finally:
        model.graphed = graphed


def process_settings() -> dict:
    """torch's process-wide settings, flat: what a library loaded into Vortex's process must leave as it found them."""
    import torch

    flat = {f"inductor.{k}": v for k, v in torch._inductor.config.get_config_copy().items()}
    flat |= {f"dynamo.{k}": v for k, v in torch._dynamo.config.get_config_copy().items()}
    return flat | {"float32_matmul_precision": torch.get_float32_matmul_precision(),
                   "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
                   "cudnn_benchmark": torch.backends.cudnn.benchmark, "default_dtype": torch.get_default_dtype(),
                   "deterministic": torch.are_deterministic_algorithms_enabled(), "grad": torch.is_grad_enabled()}


def settings_changed_by_loads(model_dir, presets: list[str]) -> dict[str, list[str]]:
    """Run in a fresh process (nothing loaded before): preset -> the settings its load changed."""
    from fluxkit import load_flux_schnell

    changed = {}
    for preset in presets:
        before = process_settings()
        load_flux_schnell(device="cpu", quantization=preset, model=model_dir)
        after = process_settings()
        changed[preset] = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return changed
