"""Quantization applied after loading (torchao tensor subclasses, diffusers' layerwise casting) and GGUF files.

bitsandbytes presets quantize while loading (loading.py); the post-load backends load a component in the
model dtype and convert it in place, one Linear at a time on the target device, so the bf16 component never
sits whole on the GPU. torchao converts the Linears bitsandbytes would (every nn.Linear outside the model's
`_keep_in_fp32_modules`); layerwise casting stores the layers diffusers' own rule selects. GGUF presets write
the transformer once as a GGUF file (the `gguf` package's reference quantizer, diffusers' tensor names) into
fluxkit's cache and load it through diffusers' `GGUFQuantizationConfig`. `plan.py` counts all of them with
the functions here. A quantization this device or placement cannot run (float8 matmuls below compute
capability 8.9, int4 without its kernel package, GGUF layers streamed) is refused by `unsupported` before
anything is loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from .config import PlacementSpec, QuantizationSpec
from .synthetic import cache_root

POST_LOAD_BACKENDS = ("torchao", "layerwise_casting")
INT4_GROUP = 128  # torchao Int4WeightOnlyConfig's group size
GGUF_BLOCK = 32  # weights per Q8_0 / Q4_0 block: a float16 scale and 32 8-bit or 4-bit values
GGUF_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}


def unsupported(spec: QuantizationSpec, device: torch.device, placement: PlacementSpec) -> str | None:
    """Why this device or placement cannot run a preset's quantization, or None; checked before anything is
    loaded."""
    reason = unsupported_placement(spec, placement)
    if reason or spec.backend not in ("gguf", "torchao"):
        return reason
    if spec.backend == "gguf":
        try:
            import gguf  # noqa: F401
        except ImportError:
            return "the gguf package is not installed (pip install gguf)"
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


def unsupported_placement(spec: QuantizationSpec, placement: PlacementSpec) -> str | None:
    """The part of `unsupported` that holds on every device (the planner marks such plans as not fitting)."""
    if spec.backend == "gguf" and placement.modulation == "fit":
        return (f"placement {placement.name} streams modulation layers one at a time, which fluxkit does for "
                "bitsandbytes and torchao layers only; diffusers loads a GGUF transformer whole")
    return None


def torchao_config(quant_type: str):
    """The torchao config object of a preset's `quant_type`.

    `set_inductor_config=False`: by default torchao turns on Inductor's coordinate-descent tuning for the whole
    process, and a compiled FLUX then tunes every Triton kernel serially at its first call (on an H200, full size,
    torchao-int8wo compiled was still tuning after 15 minutes: runs 16 and 25), as would any model Vortex compiles
    after loading fluxkit."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    keep = {"set_inductor_config": False}
    return {"int8_weight_only": lambda: Int8WeightOnlyConfig(**keep),
            "float8_weight_only": lambda: Float8WeightOnlyConfig(**keep),
            "float8_dynamic": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), **keep),
            "int4_weight_only": lambda: Int4WeightOnlyConfig(group_size=INT4_GROUP, **keep)}[quant_type]()


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


def gguf_quantized(module: torch.nn.Module) -> bool:
    """Whether a Linear's weight is written in GGUF blocks (rows of whole blocks); others stay unquantized."""
    return module.in_features % GGUF_BLOCK == 0


def gguf_file(folder: Path, quant_type: str) -> Path:
    """The transformer of a checkpoint folder as a GGUF file, written on first use into fluxkit's cache and
    keyed by the folder, its shards (name, size, modification time) and the quantization type."""
    shards = sorted((folder / "transformer").glob("*.safetensors"))
    stamp = json.dumps([str(folder.resolve()), quant_type] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                                              for p in shards])
    path = cache_root() / "gguf" / f"{hashlib.sha256(stamp.encode()).hexdigest()[:16]}-{quant_type}.gguf"
    if not path.is_file():
        write_gguf(folder, path, quant_type)
    return path


def write_gguf(folder: Path, out: Path, quant_type: str) -> None:
    """Write the transformer's quantized Linear weights in GGUF blocks and every other tensor in float32, under
    diffusers' names (diffusers then loads it without converting names); moved into place when complete."""
    import gguf
    from safetensors import safe_open

    from .checkpoint import meta_components

    meta = meta_components(folder)["transformer"]
    skip = keep_in_fp32(meta)
    quantized = {f"{n}.weight" for n, m in meta.named_modules() if converted(n, m, skip) and gguf_quantized(m)}
    qtype = getattr(gguf.GGMLQuantizationType, quant_type.upper())
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(str(partial), "flux")
    for shard in sorted((folder / "transformer").glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                array = f.get_tensor(key).float().numpy()
                if key in quantized:
                    data = gguf.quants.quantize(array, qtype)
                    writer.add_tensor(key, data, raw_shape=data.shape, raw_dtype=qtype)
                else:
                    writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(out)


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
