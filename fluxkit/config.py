"""Presets and placements: YAML files in fluxkit/configs/ validated into frozen dataclasses.

Every setting a run depends on (model id and revision, quantization, resolution, steps, where each
component lives, budgets) is read from here and nowhere else, so a report can name the preset and
placement and mean all of it. A preset file holds what differs from `configs/defaults.yaml`; the dataclasses have
no defaults of their own. Keys, types and ranges are checked: a typo, `height: '512'` or `drift_mb: .nan` is an
error that names the file and the key, never a silently different run.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .checks import check_choice
from .errors import InputError, InputTypeError
from .quantizers import BACKENDS, QUANTIZABLE_COMPONENTS

DEFAULT_MODEL = "black-forest-labs/FLUX.1-schnell"
CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULTS_FILE = CONFIG_DIR / "defaults.yaml"
PLACEMENTS_FILE = CONFIG_DIR / "placements.yaml"
AUTO_PLACEMENT = "auto"  # chosen at load time from the plan (preflight.choose_placement)
DTYPES = ("bfloat16", "float16", "float32")
TEXT_ENCODER_2_MODES = ("gpu", "stream")
MODULATION_MODES = ("gpu", "fit")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
# What torch.compile wraps: the transformer's repeated blocks (regional: seconds to compile) or the whole transformer.
COMPILE_SCOPES = ("blocks", "transformer")
# Which kernel dequantizes bitsandbytes 4-bit weights for products of many tokens on a GPU (fluxkit/dequantize.py).
DEQUANTIZE_KERNELS = ("bitsandbytes", "fluxkit")


class ConfigError(InputError):
    """A preset or placement file is wrong; the message names the file and the key."""


def _range(low: float, high: float, *, open_low: bool = False) -> dict:
    """Field metadata: the value's allowed range (every number must also be finite)."""
    return {"range": (low, high, open_low)}


@dataclass(frozen=True)
class ModelSpec:
    id: str
    revision: str


@dataclass(frozen=True)
class QuantizationSpec:
    """Which components are quantized, and how; the compute dtype is the preset's `dtype`."""

    backend: str
    components: tuple[str, ...]
    quant_type: str = ""  # the backend's kind where it has several (bitsandbytes_8bit has one)
    double_quant: bool = False  # bitsandbytes 4-bit: 8-bit absmax per block

    def __post_init__(self) -> None:
        _check_choice("quantization.backend", self.backend, tuple(BACKENDS))
        for c in self.components:
            _check_choice("quantization.components", c, QUANTIZABLE_COMPONENTS)
        problem = BACKENDS[self.backend].check(self)
        if problem:
            raise ConfigError(problem)

    @property
    def quantizer(self):
        return BACKENDS[self.backend]


@dataclass(frozen=True)
class GenerationSpec:
    height: int = field(metadata=_range(64, 2048))
    width: int = field(metadata=_range(64, 2048))
    num_inference_steps: int = field(metadata=_range(1, 50))
    max_sequence_length: int = field(metadata=_range(1, 512))

    def __post_init__(self) -> None:
        _check_ranges(self, "generation")
        for name in ("height", "width"):
            if getattr(self, name) % 16:
                raise ConfigError(f"generation.{name}={getattr(self, name)}: must be a multiple of 16 in 64..2048")


@dataclass(frozen=True)
class Budgets:
    """Pass/fail limits. Units are in the names: GB / MB = 10**9 / 10**6 bytes (how Vortex writes its budgets)."""

    p99_latency_s: float = field(metadata=_range(0, 3600, open_low=True))
    latency_target_device: str
    flux_resident_gb: tuple[float, float] = field(metadata=_range(0, 1e4))  # memory_allocated() after loading
    flux_peak_gb: float = field(metadata=_range(0, 1e4, open_low=True))  # peak allocated and reserved during a call
    vortex_total_gb: float = field(metadata=_range(0, 1e4, open_low=True))  # Flux's peak reserved + the rest of Vortex
    rest_of_vortex_gb: float = field(metadata=_range(0, 1e4, open_low=True))
    generate_rise_mb: float = field(metadata=_range(0, 1e6, open_low=True))
    drift_mb: float = field(metadata=_range(0, 1e6, open_low=True))
    clip_cosine_min: float = field(metadata=_range(-1, 1))

    def __post_init__(self) -> None:
        _check_ranges(self, "budgets")
        low, high = self.flux_resident_gb
        if not low <= high:
            raise ConfigError(f"budgets.flux_resident_gb={list(self.flux_resident_gb)}: expected [low, high], low <= high")
        if not self.rest_of_vortex_gb < self.vortex_total_gb:
            raise ConfigError(f"budgets.rest_of_vortex_gb={self.rest_of_vortex_gb} must be below "
                              f"budgets.vortex_total_gb={self.vortex_total_gb}")

    @property
    def flux_share_gb(self) -> float:
        """What Vortex leaves Flux on the card."""
        return self.vortex_total_gb - self.rest_of_vortex_gb


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelSpec
    quantization: QuantizationSpec
    generation: GenerationSpec
    budgets: Budgets
    dtype: str
    placement: str  # a placement of placements.yaml, or `auto`
    prompt_cache_size: int = field(metadata=_range(0, 100_000))
    compile: bool
    compile_mode: str
    compile_scope: str
    # Each phase's device work replayed from CUDA graphs (fastpath.GraphedCall) where the placement allows it.
    cuda_graphs: bool
    # Which kernel dequantizes bitsandbytes 4-bit weights for products of many tokens on a GPU (DEQUANTIZE_KERNELS).
    dequantize_kernel: str

    def __post_init__(self) -> None:
        _check_ranges(self, f"preset {self.name}")
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("dequantize_kernel", self.dequantize_kernel, DEQUANTIZE_KERNELS)
        _check_choice("compile_mode", self.compile_mode, COMPILE_MODES)
        _check_choice("compile_scope", self.compile_scope, COMPILE_SCOPES)
        _check_choice("placement", self.placement, (AUTO_PLACEMENT, *available_placements()))
        from .fastpath import preset_refused  # the fast path's refusal rules live beside the fast path

        problem = preset_refused(self)
        if problem:
            raise ConfigError(f"preset {self.name}: {problem}")


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
    working_memory_gb: float = field(default=0.8, metadata=_range(0, 1e3))
    fill_headroom_gb: float = field(default=0.0, metadata=_range(0, 1e3))

    def __post_init__(self) -> None:
        _check_ranges(self, self.name)
        _check_choice(f"{self.name}.text_encoder_2", self.text_encoder_2, TEXT_ENCODER_2_MODES)
        _check_choice(f"{self.name}.modulation", self.modulation, MODULATION_MODES)
        if self.vae_tile_size is not None and (self.vae_tile_size < 64 or self.vae_tile_size % 64):
            raise ConfigError(f"{self.name}.vae_tile_size={self.vae_tile_size}: must be a multiple of 64, or null")
        if self.offload_between_calls and (self.text_encoder_2 != "gpu" or self.modulation != "gpu"):
            raise ConfigError(f"{self.name}: offload_between_calls moves whole components; use it with "
                              "text_encoder_2: gpu and modulation: gpu")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    check_choice(name, value, choices, errors=(ConfigError, ConfigError))


def _check_ranges(obj: Any, where: str) -> None:
    """Every number of a config dataclass finite and inside its field's range (NaN would make a budget unfailable)."""
    for f in dataclasses.fields(obj):
        if "range" not in f.metadata:
            continue
        low, high, open_low = f.metadata["range"]
        value = getattr(obj, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if not (math.isfinite(v) and (low < v if open_low else low <= v) and v <= high):
                raise ConfigError(f"{where}.{f.name}={v}: must be a finite number in "
                                  f"{'(' if open_low else '['}{low:g}, {high:g}]")


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
        return build(hint, value, where)
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


def build(cls: type, data: Any, where: str) -> Any:
    """Build a dataclass from a mapping, refusing unknown and missing keys so that a typo is never ignored."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(map(str, set(data) - names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    return cls(**{key: _coerce(hints[key], value, f"{where}.{key}") for key, value in data.items()})


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path.name}: not valid YAML ({' '.join(str(err).split())})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read ({err})") from None


def _merged(defaults: dict, overrides: Any) -> Any:
    """`overrides` over `defaults`, mapping by mapping (a preset sets only what differs)."""
    if not isinstance(overrides, dict):
        return overrides
    out = dict(defaults)
    for key, value in overrides.items():
        out[key] = _merged(defaults[key], value) if isinstance(defaults.get(key), dict) else value
    return out


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
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: expected a mapping of preset settings, got {type(data).__name__}")
    return build(Preset, _merged(_read_yaml(DEFAULTS_FILE), data), path.name)


def _placements() -> dict[str, PlacementSpec]:
    data = _read_yaml(PLACEMENTS_FILE)
    return {name: build(PlacementSpec, {"name": name, **spec}, f"{PLACEMENTS_FILE.name}.{name}")
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
