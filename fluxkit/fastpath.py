"""The fast path on a CUDA device: torch.compile of the transformer's repeated blocks and of the VAE decoder.

Regional compilation (diffusers' `compile_repeated_blocks`) traces one double-stream and one
single-stream block and reuses them for all 57, so compiling costs seconds rather than the minutes a
whole-model compile takes. A preset's `compile_scope: transformer` compiles the whole transformer instead,
as the FACTS baseline did; measured side by side (H200, full-size synthetic checkpoint, run 17) it took the NF4
denoise from 0.358 to 0.305 s but moved the images to 30.2 dB from eager NF4's, so `blocks` stays the default.
torch.compile's own CUDA graphs (`compile_mode: reduce-overhead`) need the whole transformer compiled (preset
validation says why); a preset's `cuda_graphs: true` instead captures each phase's call as it runs (regional compile,
tiled decode and all) in a graph of fluxkit's own (`GraphedCall`), which keeps the images of the uncaptured path:
on the H200 (full-size synthetic checkpoint, run 19) it took resident NF4 from 0.448 to 0.231 s P50 and P99/P50
from 1.52 to 1.03.
Compiled kernels go to a persistent cache (fluxkit's cache folder unless TORCHINDUCTOR_CACHE_DIR is set),
so a restarted process reuses them. `load_flux_schnell` runs one warm-up call after compiling, so no
caller's first image pays for compilation. What each lever was predicted and measured to give is in
notes/fast_path.md.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .config import PlacementSpec
from .sampling import decode, embed
from .synthetic import cache_root

log = logging.getLogger("fluxkit")

WARMUP_PROMPT = "a warm-up call: compile and tune every kernel once"
# Runs of a call before its capture: the first compiles, the second runs what a capture will see.
CAPTURE_WARMUP_RUNS = 2
# Input signatures (shapes, dtypes, other arguments) captured per call; further ones run uncaptured, so a caller
# trying many image sizes cannot grow the graphs' memory without bound.
MAX_GRAPHS_PER_CALL = 4


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


def graphs_unsupported(spec: PlacementSpec) -> str | None:
    """Why a placement's calls cannot be replayed from CUDA graphs, or None: a graph replays fixed device work, and
    these placements decide on the host, call by call, what moves where."""
    if spec.text_encoder_2 == "stream":
        return "T5 streams from host memory through offloading hooks"
    if spec.modulation == "fit":
        return "the modulation tables are selected on the host at every step"
    if spec.offload_between_calls:
        return "components move between host and GPU at every call"
    return None


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list  # the flattened arguments: static device tensors the replay reads, and the other values as captured
    output: Any  # what the capture returned: device tensors every replay overwrites


class GraphedCall:
    """`fn` replayed from a CUDA graph, captured once per input signature: one host call launches the ~2000 kernels
    of a phase that the host otherwise launches one by one (GPU utilization median 29% on the H200, run 17).

    Each replay overwrites the graph's own outputs, so they are cloned before returning: that keeps a later replay
    (the next block, the next VAE tile, the next call) from overwriting what the caller holds, which is what broke
    torch.compile's `reduce-overhead` in run 18. The graphs of one model share a memory pool: its calls run one at a
    time (FluxModel's lock) and every output is cloned before the next replay. torch.cuda.make_graphed_callables
    is made for training: it captures the backward too and needs inputs that require grad.
    """

    def __init__(self, fn: Callable, pool) -> None:
        self.fn = fn
        self.pool = pool
        self.graphs: dict[tuple, Captured] = {}

    def __call__(self, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        key = (spec, tuple(_signature(x) for x in leaves))
        captured = self.graphs.get(key)
        if captured is None:
            if len(self.graphs) >= MAX_GRAPHS_PER_CALL:
                return self.fn(*args, **kwargs)
            captured = self.graphs[key] = self._capture(leaves, spec)
        for static, x in zip(captured.inputs, leaves):
            if isinstance(x, torch.Tensor):
                static.copy_(x)
        captured.graph.replay()
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, captured.output)

    def _capture(self, leaves: list, spec) -> Captured:
        off_device = [tuple(x.shape) for x in leaves if isinstance(x, torch.Tensor) and x.device.type != "cuda"]
        if off_device:
            raise ValueError(f"a CUDA graph reads its inputs from device memory; tensors of shapes {off_device} are "
                             "on the host: move them to the GPU before the call")
        inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = tree_unflatten(inputs, spec)
        # Warm up on a side stream, as torch.cuda.graph's documentation asks: lazy initialization (compilation,
        # cuBLAS workspaces) must happen outside the capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(CAPTURE_WARMUP_RUNS):
                self.fn(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.fn(*args, **kwargs)
        return Captured(graph, inputs, output)


def _signature(x: object) -> object:
    """What a capture depends on: a tensor's shape, dtype and device; any other argument itself (hashable)."""
    return ("tensor", tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else x


def graphed_calls(pipe, spec: PlacementSpec) -> dict[str, GraphedCall]:
    """The three device phases of a call, each replayed from CUDA graphs: text encoders, transformer, VAE decode;
    none where the placement rules them out (logged, as compile on a CPU is)."""
    reason = graphs_unsupported(spec)
    if reason:
        log.info("cuda_graphs off under placement %s: %s", spec.name, reason)
        return {}
    pool = torch.cuda.graph_pool_handle()
    return {"embed": GraphedCall(embed, pool), "transformer": GraphedCall(pipe.transformer, pool),
            "decode": GraphedCall(decode, pool)}
