"""Latency benchmark: warm-up excluded, every phase device-synchronized, many runs, medians and tails.

Each iteration writes into one pre-allocated (512, 512, 3) float32 host buffer, as Vortex does, so
the `copy` phase is the device-to-host copy Vortex pays.
"""
from __future__ import annotations

import time

import torch

from .checks import check_number
from .generation import FluxModel
from .metrics import summarize
from .sampling import PHASES

DEFAULT_PROMPT = "manic scientist, blue spiked hair, white lab coat"


def _series(model: FluxModel, iterations: int, warmup: int, prompt: str, seed: int, **kwargs) -> dict:
    gen = model.preset.generation
    buffer = torch.empty((gen.height, gen.width, 3), dtype=torch.float32)
    for i in range(warmup):
        model.generate(prompt, seed=seed + i, output=buffer, **kwargs)
    rows = []
    for i in range(iterations):
        start = time.perf_counter()
        model.generate(prompt, seed=seed + i, output=buffer, **kwargs)
        total = time.perf_counter() - start
        rows.append({"total": total, **model.last_call.timings})
    summary = {key: summarize([r[key] for r in rows]) for key in ("total", *PHASES)}
    return {"iterations": rows, "summary": summary}


def check_counts(iterations: int, warmup: int) -> None:
    check_number("iterations", iterations, 1, 100_000, integer=True)
    check_number("warmup", warmup, 1, 1000, integer=True)  # one warm-up at least: one-time costs stay out


def run_benchmark(model: FluxModel, iterations: int = 50, warmup: int = 3, prompt: str = DEFAULT_PROMPT,
                  seed: int = 0, negative_prompt: str | None = "blurry, low quality", true_cfg_scale: float = 4.0) -> dict:
    """Time `iterations` generate calls (seconds); with `negative_prompt`, a second true-CFG series too."""
    check_counts(iterations, warmup)
    result = {"model": model.info(), "iterations": iterations, "warmup": warmup, "prompt": prompt, "unit": "s",
              "plain": _series(model, iterations, warmup, prompt, seed)}
    if negative_prompt:
        result["true_cfg"] = _series(model, iterations, warmup, prompt, seed, negative_prompt=negative_prompt,
                                     true_cfg_scale=true_cfg_scale)
        result["true_cfg"].update(negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale)
    return result
