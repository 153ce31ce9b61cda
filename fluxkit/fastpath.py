"""The fast path on a CUDA device: torch.compile of the transformer's repeated blocks and of the VAE decoder.

Regional compilation (diffusers' `compile_repeated_blocks`) traces one double-stream and one
single-stream block and reuses them for all 57, so compiling costs seconds rather than the minutes a
whole-model compile takes. A preset's `compile_scope: transformer` compiles the whole transformer instead,
as the FACTS baseline did; measured side by side (H200, full-size synthetic checkpoint, run 17) it took the NF4
denoise from 0.358 to 0.305 s but moved the images to 30.2 dB from eager NF4's, so `blocks` stays the default.
CUDA graphs (`compile_mode: reduce-overhead`) need the whole transformer compiled (preset validation says why).
Compiled kernels go to a persistent cache (fluxkit's cache folder unless TORCHINDUCTOR_CACHE_DIR is set),
so a restarted process reuses them. `load_flux_schnell` runs one warm-up call after compiling, so no
caller's first image pays for compilation. What each lever was predicted and measured to give is in
notes/fast_path.md.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .synthetic import cache_root

WARMUP_PROMPT = "a warm-up call: compile and tune every kernel once"


def compile_cache_dir() -> Path:
    """Where compiled kernels persist between processes."""
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or cache_root() / "inductor")


def compile_components(pipe, mode: str, scope: str = "blocks") -> None:
    """Compile the transformer (its repeated blocks, or all of it) and the VAE decoder (fullgraph: a graph break is
    an error)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    transformer, decoder = compile_options(mode)
    if scope == "transformer":
        pipe.transformer.compile(**transformer)
    else:
        pipe.transformer.compile_repeated_blocks(**transformer)
    pipe.vae.decoder.compile(**decoder)


def compile_options(mode: str) -> tuple[dict, dict]:
    """torch.compile's options for the transformer and for the VAE decoder. The decoder gets no CUDA graphs: it runs
    once per tile, and each replay would overwrite the tile before it (H200, run 18)."""
    transformer = {"fullgraph": True, "mode": None if mode == "default" else mode}
    return transformer, {**transformer, "mode": None if mode == "reduce-overhead" else transformer["mode"]}


def warm_up(model) -> float:
    """One call that triggers compilation; returns its seconds."""
    start = time.perf_counter()
    model.generate(WARMUP_PROMPT, seed=0)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter() - start
