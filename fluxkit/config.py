"""Presets and placements: YAML files in fluxkit/configs/ validated into frozen dataclasses.

Every setting a run depends on (model id and revision, quantization, resolution, steps, where each
component lives, budgets) is read from here and nowhere else, so a report can name the preset and
placement and mean all of it. Keys and types are checked: a typo or `height: '512'` is an error that
names the file and the key, never a silently different run.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .errors import InputError, InputTypeError

DEFAULT_MODEL = "black-forest-labs/FLUX.1-schnell"
CONFIG_DIR = Path(__file__).parent / "configs"
PLACEMENTS_FILE = CONFIG_DIR / "placements.yaml"
QUANTIZABLE_COMPONENTS = ("transformer", "text_encoder_2")
# quant_type per backend: bitsandbytes 4-bit data types, torchao configs (fluxkit/quantization.py), and the storage
# dtype of diffusers' layerwise casting. bitsandbytes 8-bit has one kind.
QUANT_TYPES = {"none": (), "bitsandbytes_4bit": ("nf4", "fp4"), "bitsandbytes_8bit": (),
               "torchao": ("int8_weight_only", "float8_weight_only", "float8_dynamic", "int4_weight_only"),
               "layerwise_casting": ("float8_e4m3fn", "float8_e5m2"), "gguf": ("q8_0", "q4_0")}
BACKENDS = tuple(QUANT_TYPES)
DTYPES = ("bfloat16", "float16", "float32")
TEXT_ENCODER_2_MODES = ("gpu", "stream")
MODULATION_MODES = ("gpu", "fit")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
# What torch.compile wraps: the transformer's repeated blocks (regional: seconds to compile) or the whole transformer.
COMPILE_SCOPES = ("blocks", "transformer")
# Which kernel dequantizes bitsandbytes 4-bit weights for products of many tokens on a GPU (fluxkit/dequantize.py).
DEQUANTIZE_KERNELS = ("bitsandbytes", "fluxkit")
# One fast-path lever each: the preset fields and placement fields it changes (notes/fast_path.md says what each
# is predicted to give). `fluxkit bench --levers` times fluxkit's path as configured against each, side by side.
LEVERS = {
    "eager": ({"compile": False, "cuda_graphs": False}, {}),
    "compiled": ({"compile": True}, {}),  # for the presets that run uncompiled
    "no-cuda-graphs": ({"cuda_graphs": False}, {}),
    "reduce-overhead": ({"compile_mode": "reduce-overhead", "compile_scope": "transformer", "cuda_graphs": False}, {}),
    "untiled-decode": ({}, {"vae_tile_size": None}),
    "whole-transformer": ({"compile_scope": "transformer"}, {}),
    "bitsandbytes-dequantize": ({"dequantize_kernel": "bitsandbytes"}, {}),
}

# Quantized kernels whose per-call work a CUDA graph cannot replay: (backend, quant_type or None for all) -> what a
# capture does with them (H200, runs 23-24; tests/test_gpu_graphs.py holds every preset that turns graphs on).
GRAPHS_REFUSED = {
    ("bitsandbytes_8bit", None): "bitsandbytes 8-bit: LLM.int8 picks each call's outlier columns with torch.argwhere, "
                                 "a shape the host must read, which a capture refuses (cudaErrorStreamCaptureInvalidated)",
    ("layerwise_casting", None): "layerwise casting: diffusers' hooks replace each layer's weights inside every forward "
                                 "(module.to), so a replay reads float8 weights freed after the capture (NaN images)",
    ("gguf", "q4_0"): "GGUF q4_0: diffusers builds its shift table on the host at every dequantization "
                      "(torch.tensor), a copy from pageable memory that a capture refuses",
}

# How long `fluxkit sweep` lets one variant's process run on a GPU before stopping it and keeping its row with the
# reason (the longest seen, bf16 resident compiled on an H200, full-size synthetic checkpoint, took 123 s from process
# start to its last call).
SWEEP_VARIANT_TIMEOUT_S = 900.0


class ConfigError(InputError):
    """A preset or placement file is wrong; the message names the file and the key."""


@dataclass(frozen=True)
class ModelSpec:
    id: str
    revision: str = "main"


@dataclass(frozen=True)
class QuantizationSpec:
    """Which components are quantized, and how; the compute dtype is the preset's `dtype`."""

    backend: str = "none"
    quant_type: str = "nf4"
    double_quant: bool = False
    components: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_choice("quantization.backend", self.backend, BACKENDS)
        if QUANT_TYPES[self.backend]:
            _check_choice("quantization.quant_type", self.quant_type, QUANT_TYPES[self.backend])
        for c in self.components:
            _check_choice("quantization.components", c, QUANTIZABLE_COMPONENTS)
        if self.backend == "none" and self.components:
            raise ConfigError("quantization.components must be empty when quantization.backend is 'none'")
        if self.backend != "none" and not self.components:
            raise ConfigError(f"quantization.components is empty: name what {self.backend} should quantize")
        if self.backend == "gguf" and self.components != ("transformer",):
            raise ConfigError("quantization.components must be [transformer] for gguf: diffusers loads GGUF "
                              "files for its own models only")


def graphs_refused(quantization: QuantizationSpec) -> str | None:
    """Why CUDA graphs cannot replay this quantization's kernels, or None."""
    return (GRAPHS_REFUSED.get((quantization.backend, quantization.quant_type))
            or GRAPHS_REFUSED.get((quantization.backend, None)))


@dataclass(frozen=True)
class GenerationSpec:
    height: int = 512
    width: int = 512
    num_inference_steps: int = 4
    max_sequence_length: int = 256

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if not 64 <= value <= 2048 or value % 16:
                raise ConfigError(f"generation.{name}={value}: must be a multiple of 16 in 64..2048")
        if not 1 <= self.num_inference_steps <= 50:
            raise ConfigError(f"generation.num_inference_steps={self.num_inference_steps}: must be in 1..50")
        if not 1 <= self.max_sequence_length <= 512:
            raise ConfigError(f"generation.max_sequence_length={self.max_sequence_length}: must be in 1..512")


@dataclass(frozen=True)
class Budgets:
    """Pass/fail limits. Units are in the names: GB / MB = 10**9 / 10**6 bytes (how Vortex writes its budgets)."""

    p99_latency_s: float = 12.0
    latency_target_device: str = "NVIDIA GeForce RTX 3060"
    flux_resident_gb: tuple[float, float] = (5.5, 6.5)  # memory_allocated() after loading, fresh process
    flux_peak_gb: float = 6.5  # peak allocated and peak reserved during a call
    vortex_total_gb: float = 11.8  # Flux's peak reserved + the rest of Vortex
    rest_of_vortex_gb: float = 5.8
    generate_rise_mb: float = 500.0
    drift_mb: float = 50.0
    clip_cosine_min: float = 0.70

    def __post_init__(self) -> None:
        low, high = self.flux_resident_gb
        if not 0 <= low <= high:
            raise ConfigError(f"budgets.flux_resident_gb={list(self.flux_resident_gb)}: expected [low, high], low <= high")
        if not 0 < self.rest_of_vortex_gb < self.vortex_total_gb:
            raise ConfigError("budgets.rest_of_vortex_gb must be positive and below budgets.vortex_total_gb")

    @property
    def flux_share_gb(self) -> float:
        """What Vortex leaves Flux on the card."""
        return self.vortex_total_gb - self.rest_of_vortex_gb


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelSpec
    quantization: QuantizationSpec = dataclasses.field(default_factory=QuantizationSpec)
    generation: GenerationSpec = dataclasses.field(default_factory=GenerationSpec)
    budgets: Budgets = dataclasses.field(default_factory=Budgets)
    dtype: str = "bfloat16"
    placement: str = "resident"
    prompt_cache_size: int = 32
    compile: bool = True
    compile_mode: str = "default"
    compile_scope: str = "blocks"
    # Each phase's device work replayed from CUDA graphs (fastpath.GraphedCall) where the placement allows it.
    cuda_graphs: bool = False
    # Which kernel dequantizes bitsandbytes 4-bit weights for products of many tokens on a GPU (DEQUANTIZE_KERNELS).
    dequantize_kernel: str = "bitsandbytes"

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("dequantize_kernel", self.dequantize_kernel, DEQUANTIZE_KERNELS)
        if self.dequantize_kernel == "fluxkit" and self.quantization.backend != "bitsandbytes_4bit":
            raise ConfigError(f"preset {self.name}: dequantize_kernel fluxkit decodes bitsandbytes 4-bit weights, and "
                              f"quantization.backend is {self.quantization.backend}; set dequantize_kernel: "
                              "bitsandbytes")
        _check_choice("compile_mode", self.compile_mode, COMPILE_MODES)
        _check_choice("compile_scope", self.compile_scope, COMPILE_SCOPES)
        _check_choice("placement", self.placement, tuple(available_placements()))
        if self.prompt_cache_size < 0:
            raise ConfigError(f"prompt_cache_size={self.prompt_cache_size}: must be >= 0 (0 turns the cache off)")
        if self.compile_mode == "reduce-overhead" and self.compile_scope == "blocks":
            raise ConfigError(f"preset {self.name}: compile_mode reduce-overhead with compile_scope blocks: each block's "
                              "CUDA-graph replay overwrites the output of the block before it (\"accessing tensor "
                              "output of CUDAGraphs that has been overwritten\" on an H200); set compile_scope: "
                              "transformer")
        if self.cuda_graphs and self.compile and self.compile_mode == "reduce-overhead":
            raise ConfigError(f"preset {self.name}: cuda_graphs with compile_mode reduce-overhead: a graph would be "
                              "captured around torch.compile's own; choose one (cuda_graphs: true keeps "
                              "compile_scope: blocks and its images)")
        refused = self.cuda_graphs and graphs_refused(self.quantization)
        if refused:
            raise ConfigError(f"preset {self.name}: cuda_graphs with {refused}; set cuda_graphs: false")
        if self.compile and self.quantization.backend == "layerwise_casting":
            raise ConfigError(f"preset {self.name}: compile=true with layerwise casting: diffusers casts each layer's "
                              "weights inside its forward (module.to), which torch.compile(fullgraph=True) refuses "
                              "(nn.Parameter() constructor); set compile: false")


@dataclass(frozen=True)
class PlacementSpec:
    """Where each component lives between and during calls.

    `text_encoder_2`: `gpu` (resident, quantized as the preset says) or `stream` (bf16 in pinned host
    memory, streamed to the GPU layer by layer while it runs). `modulation`: `gpu` (the transformer's
    AdaLN modulation layers stay resident and run every step) or `fit` (they run once per call for all
    steps; those that do not fit the GPU share stay in pinned host memory and are streamed).
    `offload_between_calls`: diffusers model CPU offload, nothing resident between calls.
    `working_memory_gb`: the most one call adds on top of the resident weights (measured on the GPU host).
    """

    name: str
    description: str
    text_encoder_2: str = "gpu"
    modulation: str = "gpu"
    offload_between_calls: bool = False
    vae_tile_size: int | None = None
    working_memory_gb: float = 0.8
    fill_headroom_gb: float = 0.0

    def __post_init__(self) -> None:
        _check_choice(f"{self.name}.text_encoder_2", self.text_encoder_2, TEXT_ENCODER_2_MODES)
        _check_choice(f"{self.name}.modulation", self.modulation, MODULATION_MODES)
        if self.vae_tile_size is not None and (self.vae_tile_size < 64 or self.vae_tile_size % 64):
            raise ConfigError(f"{self.name}.vae_tile_size={self.vae_tile_size}: must be a multiple of 64, or null")
        if self.offload_between_calls and (self.text_encoder_2 != "gpu" or self.modulation != "gpu"):
            raise ConfigError(f"{self.name}: offload_between_calls moves whole components; use it with "
                              "text_encoder_2: gpu and modulation: gpu")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(map(str, choices))}")


def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check a YAML value against a type hint; numbers in a float field become floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r} ({type(value).__name__})")
        if args[-1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}[hint]
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    return float(value) if hint is float else value


def _build(cls: type, data: Any, where: str) -> Any:
    """Build a dataclass from a mapping, refusing unknown keys so that a typo is never ignored."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(sorted(names))}")
    kwargs = {key: _coerce(hints[key], value, f"{where}.{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required key is missing
        raise ConfigError(f"{where}: {err}") from None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path.name}: not valid YAML ({err})") from None


def available_presets() -> list[str]:
    return sorted(p.stem.removeprefix("flux_schnell_") for p in CONFIG_DIR.glob("flux_schnell_*.yaml"))


def load_preset(name_or_path: str | Path | Preset = "nf4") -> Preset:
    """A preset by short name (`nf4`, `bf16`, ...) or from a YAML file path; a Preset is returned as is."""
    if isinstance(name_or_path, Preset):
        return name_or_path
    if not isinstance(name_or_path, (str, Path)):
        raise InputTypeError(f"quantization must be a preset name ({', '.join(available_presets())}), a YAML "
                             f"path or a Preset; got {type(name_or_path).__name__}")
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"flux_schnell_{name_or_path}.yaml"
        if not path.is_file():
            raise InputError(f"quantization={str(name_or_path)!r}: no such preset; choose one of "
                             f"{', '.join(available_presets())}")
    elif not path.is_file():
        raise InputError(f"quantization={str(name_or_path)!r}: no such preset file")
    return _build(Preset, _read_yaml(path), path.name)


def _placements() -> dict[str, PlacementSpec]:
    data = _read_yaml(PLACEMENTS_FILE)
    return {name: _build(PlacementSpec, {"name": name, **spec}, f"{PLACEMENTS_FILE.name}.{name}")
            for name, spec in data.items()}


def available_placements() -> list[str]:
    return list(_read_yaml(PLACEMENTS_FILE))


def load_placement(name: str | PlacementSpec) -> PlacementSpec:
    if isinstance(name, PlacementSpec):
        return name
    if not isinstance(name, str):
        raise InputTypeError(f"placement must be a str, one of {', '.join(available_placements())}; "
                             f"got {type(name).__name__}")
    placements = _placements()
    if name not in placements:
        raise InputError(f"placement={name!r}: no such placement; choose one of {', '.join(placements)}")
    return placements[name]


def preset_to_dict(preset: Preset) -> dict:
    return dataclasses.asdict(preset)
