"""Quantization applied after loading: torchao tensor subclasses and diffusers' layerwise casting.

bitsandbytes presets quantize while loading (loading.py); these backends load a component in the model
dtype and convert it in place, one Linear at a time on the target device, so the bf16 component never sits
whole on the GPU. torchao converts the Linears bitsandbytes would (every nn.Linear outside the model's
`_keep_in_fp32_modules`); layerwise casting stores the layers diffusers' own rule selects. `plan.py` counts
both with the functions here. A quantization this device cannot run (float8 matmuls below compute capability
8.9, int4 without its kernel package) is refused by `unsupported` before anything is loaded.
"""
from __future__ import annotations

import re

import torch

from .config import QuantizationSpec

POST_LOAD_BACKENDS = ("torchao", "layerwise_casting")
INT4_GROUP = 128  # torchao Int4WeightOnlyConfig's group size


def unsupported(spec: QuantizationSpec, device: torch.device) -> str | None:
    """Why this device cannot run a preset's quantization, or None; checked before anything is loaded."""
    if spec.backend != "torchao" or not spec.components:
        return None
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "torchao is not installed (pip install torchao)"
    if spec.quant_type == "float8_dynamic" and (device.type != "cuda"
                                                or torch.cuda.get_device_capability(device) < (8, 9)):
        return "float8 matmuls need a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper)"
    if spec.quant_type == "int4_weight_only":
        try:
            import mslk  # noqa: F401  torchao's int4 kernels
        except ImportError:
            return "torchao's int4 weight-only kernels need the mslk package (mslk >= 1.0), which is not installed"
        if device.type != "cuda":
            return "torchao's int4 weight-only kernels run on CUDA only"
    return None


def torchao_config(quant_type: str):
    """The torchao config object of a preset's `quant_type`."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    return {"int8_weight_only": lambda: Int8WeightOnlyConfig(),
            "float8_weight_only": lambda: Float8WeightOnlyConfig(),
            "float8_dynamic": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
            "int4_weight_only": lambda: Int4WeightOnlyConfig(group_size=INT4_GROUP)}[quant_type]()


def converted(name: str, module: torch.nn.Module, skip: tuple[str, ...]) -> bool:
    """Whether a Linear is quantized: the rule bitsandbytes' loaders apply, used for every backend."""
    return type(module) is torch.nn.Linear and not any(s in name.split(".") for s in skip)


def keep_in_fp32(module: torch.nn.Module) -> tuple[str, ...]:
    return tuple(getattr(module, "_keep_in_fp32_modules", None) or ())


def layerwise_patterns(module: torch.nn.Module) -> tuple[str, ...]:
    """The skip patterns `ModelMixin.enable_layerwise_casting` builds: diffusers' defaults, the modules kept in
    float32 (T5's `wo`, whose caller casts its input to the weight's dtype) and the model's own patterns."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    return tuple(DEFAULT_SKIP_MODULES_PATTERN) + keep_in_fp32(module) + tuple(
        getattr(module, "_skip_layerwise_casting_patterns", None) or ())


# Adapted from diffusers.hooks.layerwise_casting._apply_layerwise_casting: which modules it casts, without casting.
def layerwise_cast_modules(module: torch.nn.Module, patterns: tuple[str, ...], prefix: str = "") -> list[str]:
    """Names of the modules diffusers' layerwise casting stores in the storage dtype."""
    from diffusers.hooks.layerwise_casting import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    if prefix and any(re.search(p, prefix) for p in patterns):
        return []
    if isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
        return [prefix]
    return [n for child, sub in module.named_children()
            for n in layerwise_cast_modules(sub, patterns, f"{prefix}.{child}" if prefix else child)]


def convert_after_load(module: torch.nn.Module, spec: QuantizationSpec, device: torch.device,
                       dtype: torch.dtype) -> torch.nn.Module:
    """Convert a component loaded in `dtype` on the host, and put it on `device`."""
    if spec.backend == "layerwise_casting":
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(module, storage_dtype=getattr(torch, spec.quant_type), compute_dtype=dtype,
                                skip_modules_pattern=layerwise_patterns(module))
        return module.to(device)
    from torchao.quantization import quantize_

    skip = keep_in_fp32(module)
    quantize_(module, torchao_config(spec.quant_type), filter_fn=lambda m, name: converted(name, m, skip),
              device=device)
    return module.to(device)
