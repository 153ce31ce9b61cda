"""Presets: YAML files in fluxkit/configs/ validated into frozen dataclasses.

Every constant a run depends on (model id and revision, quantization, resolution, steps, budgets)
lives in a preset, so a report can name the preset and mean all of it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
QUANTIZABLE_COMPONENTS = ("transformer", "text_encoder_2", "text_encoder")
BACKENDS = ("none", "bitsandbytes_4bit", "bitsandbytes_8bit")
DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ModelSpec:
    id: str
    revision: str = "main"


@dataclass(frozen=True)
class QuantizationSpec:
    backend: str = "none"
    quant_type: str = "nf4"
    compute_dtype: str = "bfloat16"
    double_quant: bool = False
    components: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_choice("quantization.backend", self.backend, BACKENDS)
        _check_choice("quantization.quant_type", self.quant_type, ("nf4", "fp4"))
        _check_choice("quantization.compute_dtype", self.compute_dtype, DTYPES)
        for c in self.components:
            _check_choice("quantization.components", c, QUANTIZABLE_COMPONENTS)
        if self.backend == "none" and self.components:
            raise ValueError("quantization.components must be empty when quantization.backend is 'none'")
        if self.backend != "none" and not self.components:
            raise ValueError(f"quantization.components is empty: name what {self.backend} should quantize")

    @property
    def bits(self) -> int:
        return {"none": 16, "bitsandbytes_4bit": 4, "bitsandbytes_8bit": 8}[self.backend]


@dataclass(frozen=True)
class GenerationSpec:
    height: int = 512
    width: int = 512
    num_inference_steps: int = 4
    guidance_scale: float = 0.0
    max_sequence_length: int = 256

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value <= 0 or value % 16:
                raise ValueError(f"generation.{name}={value}: must be a positive multiple of 16")
        if not 1 <= self.num_inference_steps <= 50:
            raise ValueError(f"generation.num_inference_steps={self.num_inference_steps}: must be in 1..50")
        if not 1 <= self.max_sequence_length <= 512:
            raise ValueError(f"generation.max_sequence_length={self.max_sequence_length}: must be in 1..512")


@dataclass(frozen=True)
class Budgets:
    """Pass/fail limits. Units are in the names: GiB = 2**30 bytes, GB / MB = 10**9 / 10**6 bytes."""

    p99_latency_s: float = 12.0
    latency_target_device: str = "NVIDIA GeForce RTX 3060"
    transformer_weights_gib: tuple[float, float] | None = None
    generate_rise_mb: float = 500.0
    drift_mb: float = 50.0
    clip_cosine_min: float = 0.70
    total_vram_gb: float = 11.8


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelSpec
    quantization: QuantizationSpec = field(default_factory=QuantizationSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    budgets: Budgets = field(default_factory=Budgets)
    dtype: str = "bfloat16"
    vae_tile_size: int | None = None
    working_memory_gib: float = 0.75

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        if self.vae_tile_size is not None and (self.vae_tile_size < 64 or self.vae_tile_size % 64):
            raise ValueError(f"vae_tile_size={self.vae_tile_size}: must be a multiple of 64, or null")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(str, choices))}")


def _build(cls: type, data: Any, where: str) -> Any:
    """Build a dataclass from a mapping, refusing unknown keys so that a typo is never ignored."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def available_presets() -> list[str]:
    return sorted(p.stem.removeprefix("flux_schnell_") for p in CONFIG_DIR.glob("flux_schnell_*.yaml"))


def load_preset(name_or_path: str | Path = "nf4") -> Preset:
    """Load a preset by short name (`nf4`, `bf16`, `int8`, `fp4`) or from a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"flux_schnell_{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(f"quantization={name_or_path!r}: no such preset; choose one of {', '.join(available_presets())}")
    with open(path) as f:
        data = yaml.safe_load(f)
    return _build(Preset, data, path.name)


def preset_to_dict(preset: Preset) -> dict:
    return dataclasses.asdict(preset)
