"""The fast path on a CUDA device, every lever in one function (`apply_fast_path`), each beside the rule that
turns it off (`preset_refused` when a preset is read, `graphs_unsupported` per placement).

1. fluxkit's dequantization kernel for bitsandbytes 4-bit layers (fluxkit/dequantize.py): resident NF4 went from
   1.29x to 1.14x bf16's call (H200, full-size synthetic checkpoint).
2. torch.compile of the transformer's repeated blocks (diffusers' `compile_repeated_blocks`: one double-stream and
   one single-stream block traced and reused for all 57, seconds to compile instead of minutes) and, where it
   decodes in one piece, of the VAE decoder (`decoder_stays_eager` says why not where it decodes in tiles).
   `compile_scope: transformer` compiles the whole transformer: NF4 denoise 0.358 -> 0.305 s, but the images moved
   to 30.2 dB from eager NF4's, so `blocks` is the default.
3. CUDA graphs of fluxkit's own (`GraphedCall`): each phase's call captured once per input signature and replayed,
   which keeps the images of the uncaptured path; resident NF4 0.448 -> 0.231 s P50, P99/P50 1.52 -> 1.03 (H200).
   torch.compile's own graphs (`compile_mode: reduce-overhead`) need the whole transformer compiled.
4. One warm-up call while loading (`warm_up`), so that no caller's first image pays for compiling and capturing.

Compiled kernels go to Inductor's cache: TORCHINDUCTOR_CACHE_DIR when the host sets it, else torch's default
folder (the CLI points it at fluxkit's cache). The library never sets it: it belongs to the host's process.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .sampling import decode, embed

if TYPE_CHECKING:
    from .config import PlacementSpec, Preset

log = logging.getLogger("fluxkit")

WARMUP_PROMPT = "a warm-up call: compile and tune every kernel once"
# Runs of a call before its capture: the first compiles, the second runs what a capture will see.
CAPTURE_WARMUP_RUNS = 2
# Input signatures (shapes, dtypes, other arguments) captured per call; further ones run uncaptured, so a caller
# trying many image sizes cannot grow the graphs' memory without bound.
MAX_GRAPHS_PER_CALL = 4


@dataclass
class FastPath:
    """What `apply_fast_path` turned on for one loaded model."""

    dequantize_layers: int = 0  # 4-bit layers on fluxkit's dequantization kernel
    compiled: bool = False
    graphed: dict = field(default_factory=dict)  # phase call -> GraphedCall


def preset_refused(preset: Preset) -> str | None:
    """Why a preset's fast-path settings cannot work together, or None; checked when the preset is read."""
    quantizer = preset.quantization.quantizer
    if preset.dequantize_kernel not in quantizer.dequantize_kernels:
        return (f"dequantize_kernel {preset.dequantize_kernel} decodes bitsandbytes 4-bit weights, and "
                f"quantization.backend is {quantizer.name}; set dequantize_kernel: bitsandbytes")
    if preset.compile_mode == "reduce-overhead" and preset.compile_scope == "blocks":
        return ("compile_mode reduce-overhead with compile_scope blocks: each block's CUDA-graph replay overwrites the "
                "output of the block before it (\"accessing tensor output of CUDAGraphs that has been overwritten\" on "
                "an H200); set compile_scope: transformer")
    if preset.cuda_graphs and preset.compile and preset.compile_mode == "reduce-overhead":
        return ("cuda_graphs with compile_mode reduce-overhead: a graph would be captured around torch.compile's own; "
                "choose one (cuda_graphs: true keeps compile_scope: blocks and its images)")
    refused = preset.cuda_graphs and quantizer.graphs_refused(preset.quantization.quant_type)
    if refused:
        return f"cuda_graphs with {refused}; set cuda_graphs: false"
    if preset.compile and quantizer.compile_refused:
        return f"compile=true with {quantizer.compile_refused}; set compile: false"
    return None


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


def apply_fast_path(pipe, preset: Preset, placement: PlacementSpec, modulation, device: torch.device) -> FastPath:
    """Every lever the preset turns on, in the order they must run; none on a CPU (they are GPU levers)."""
    fast = FastPath()
    if device.type != "cuda":
        return fast
    if preset.dequantize_kernel == "fluxkit":  # Triton's kernels: imported only where they run
        from .dequantize import Linear4bit, use_fluxkit_dequantize

        fast.dequantize_layers = use_fluxkit_dequantize(pipe.transformer, pipe.text_encoder_2)
        if modulation is not None:
            modulation.layer_4bit = Linear4bit  # a parked layer computes what it would compute resident
    if preset.compile:
        compile_components(pipe, preset.compile_mode, preset.compile_scope, placement)
        fast.compiled = True
    if preset.cuda_graphs:
        reason = graphs_unsupported(placement)
        if reason:
            log.info("cuda_graphs off under placement %s: %s", placement.name, reason)
        else:
            pool = torch.cuda.graph_pool_handle()
            fast.graphed = {"embed": GraphedCall(embed, pool), "transformer": GraphedCall(pipe.transformer, pool),
                            "decode": GraphedCall(decode, pool)}
    return fast


def decoder_stays_eager(spec: PlacementSpec) -> str | None:
    """Why a placement's VAE decoder is not compiled, or None. Dynamo traces a compiled module again at every start,
    once per input shape, even with every kernel in the compile cache; a tiled decode feeds it three tile shapes."""
    if spec.vae_tile_size:
        return ("its tiled decode feeds the decoder three tile shapes, each traced again at every start (H200, full-size "
                "synthetic checkpoint, warm cache: warm-up call 22.4 s with the decoder compiled, 7.8 s without; "
                "decode 0.08-0.14 s a call either way)")
    return None


def compile_components(pipe, mode: str, scope: str, placement: PlacementSpec) -> None:
    """Compile the transformer (its repeated blocks, or all of it) and, unless `decoder_stays_eager`, the VAE decoder
    (fullgraph: a graph break is an error)."""
    transformer, decoder = compile_options(mode)
    if scope == "transformer":
        pipe.transformer.compile(**transformer)
    else:
        pipe.transformer.compile_repeated_blocks(**transformer)
    reason = decoder_stays_eager(placement)
    if reason:
        log.info("VAE decoder not compiled under placement %s: %s", placement.name, reason)
    else:
        pipe.vae.decoder.compile(**decoder)


def compile_options(mode: str) -> tuple[dict, dict]:
    """torch.compile's options for the transformer and for the VAE decoder. The decoder gets no CUDA graphs of
    torch.compile's: a replay overwrites its output, which breaks any caller that runs it more than once a call."""
    transformer = {"fullgraph": True, "mode": None if mode == "default" else mode}
    return transformer, {**transformer, "mode": None if mode == "reduce-overhead" else transformer["mode"]}


def warm_up(model) -> None:
    """One call that compiles and captures what the fast path turned on (the load's stage timer counts it)."""
    model.generate(WARMUP_PROMPT, seed=0)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list  # the flattened arguments: static device tensors the replay reads, and the other values as captured
    output: Any  # what the capture returned: device tensors every replay overwrites


class GraphedCall:
    """`fn` replayed from a CUDA graph, captured once per input signature: one host call launches the ~2000 kernels
    of a phase that the host otherwise launches one by one (GPU utilization median 29% on the H200 without).

    Each replay overwrites the graph's own outputs, so they are cloned before returning: that keeps a later replay
    (the next block, the next VAE tile, the next call) from overwriting what the caller holds, which is what breaks
    torch.compile's `reduce-overhead` with regional compilation. The graphs of one model share a memory pool: its
    calls run one at a time (FluxModel's lock) and every output is cloned before the next replay.
    torch.cuda.make_graphed_callables is made for training: it captures the backward too and needs inputs that
    require grad.
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
