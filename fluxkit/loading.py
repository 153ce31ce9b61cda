"""Loading FLUX.1-schnell with bitsandbytes quantization: pre-flight, load, OOM conversion.

On a GPU every quantized component goes through the library's own quantizer at load time
(diffusers' BitsAndBytesConfig for the transformer, transformers' for T5), in one
PipelineQuantizationConfig: the plain pattern the field uses. diffusers' quantizer refuses to run
without a GPU, so on CPU a diffusers component is loaded unquantized and its nn.Linear layers are
then replaced by the same bitsandbytes layers (Linear4bit / Linear8bitLt, same quant type, block
size and kernels); transformers' quantizer runs on CPU as it is. README says what each covers.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

from .config import Preset, QuantizationSpec, load_preset
from .errors import VortexInitializationError
from .hub import DEFAULT_MODEL, ModelSource, resolve_model
from .memory import GB, GIB, PhaseMemory, release_device_memory, track_phase

log = logging.getLogger("fluxkit")

DIFFUSERS_COMPONENTS = ("transformer", "vae")
WEIGHT_COMPONENTS = ("transformer", "text_encoder_2", "text_encoder", "vae")
NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize: one float32 absmax per 64 weights


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r}: not a torch device ({err}); use 'cuda', 'cpu' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VortexInitializationError(
            "device='cuda' was asked for but this machine has no usable CUDA GPU.", required_vram_gb=None,
            available_vram_gb=0.0, remediation="pass device='cpu' (or 'auto'), or run on a machine with a CUDA GPU")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: fluxkit runs on 'cuda' or 'cpu'")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def compute_dtype(preset: Preset, device: torch.device) -> torch.dtype:
    """The preset's dtype on a GPU; float32 on CPU, where bf16 convolutions run ~40x slower."""
    return getattr(torch, preset.dtype) if device.type == "cuda" else torch.float32


def bnb_config(spec: QuantizationSpec, library: str, dtype: torch.dtype):
    """The bitsandbytes config object of `library` ('diffusers' or 'transformers') for one component."""
    if library == "diffusers":
        from diffusers import BitsAndBytesConfig
    else:
        from transformers import BitsAndBytesConfig
    if spec.backend == "bitsandbytes_8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=spec.double_quant)


def quantize_linear_layers(module: torch.nn.Module, spec: QuantizationSpec, dtype: torch.dtype) -> torch.nn.Module:
    """Replace nn.Linear layers by bitsandbytes layers in place, quantizing their current weights (CPU path)."""
    import bitsandbytes as bnb

    for name, child in list(module.named_modules()):
        for attr, linear in list(child.named_children()):
            if type(linear) is not torch.nn.Linear:
                continue
            has_bias = linear.bias is not None
            if spec.backend == "bitsandbytes_8bit":
                layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_bias, has_fp16_weights=False,
                                            device="meta")
                layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
            else:
                layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, has_bias, compute_dtype=dtype,
                                          compress_statistics=spec.double_quant, quant_type=spec.quant_type,
                                          device="meta")
                layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type=spec.quant_type,
                                                 compress_statistics=spec.double_quant, module=layer)
            if has_bias:
                layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            setattr(child, attr, layer.to("cpu"))
    return module


# ---- pre-flight -------------------------------------------------------------------------------------

def _quantized_weight_bytes(numel: int, out_features: int, spec: QuantizationSpec) -> float:
    if spec.backend == "bitsandbytes_8bit":
        return numel + out_features * 4
    blocks = math.ceil(numel / NF4_BLOCK)
    if spec.double_quant:  # absmax re-quantized to 8 bits in blocks of 256, plus its own float32 scales
        return numel / 2 + blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 16 * 4
    return numel / 2 + blocks * 4 + 16 * 4


def meta_components(folder: Path) -> dict[str, torch.nn.Module]:
    """Each weight component of a checkpoint folder built on the meta device from its config (no weights read)."""
    import json

    index = json.loads((Path(folder) / "model_index.json").read_text())
    components = {}
    for name in WEIGHT_COMPONENTS:
        library, cls_name = index[name]
        cls = getattr(__import__(library, fromlist=[cls_name]), cls_name)
        with torch.device("meta"):
            if library == "diffusers":
                components[name] = cls.from_config(cls.load_config(Path(folder) / name))
            else:
                from transformers import AutoConfig

                components[name] = cls(AutoConfig.from_pretrained(Path(folder) / name))
    return components


def estimate_weight_bytes(components: dict[str, torch.nn.Module], preset: Preset, dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes each component's weights will take once loaded with `preset`, counted on meta-device modules.

    Quantized components: every nn.Linear weight packed to 4 or 8 bits plus its scales, except the
    modules the model class keeps in full precision (T5's `wo`); all else at `dtype_bytes` each.
    """
    spec = preset.quantization
    estimate = {}
    for name, model in components.items():
        quantized = name in spec.components
        skip = tuple(getattr(model, "_keep_in_fp32_modules", None) or ()) if quantized else ()
        total = 0.0
        seen = set()
        if quantized:
            for mod_name, mod in model.named_modules():
                if type(mod) is torch.nn.Linear and not any(s in mod_name.split(".") for s in skip):
                    total += _quantized_weight_bytes(mod.weight.numel(), mod.out_features, spec)
                    seen.add(id(mod.weight))
        for t in list(model.parameters()) + list(model.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * dtype_bytes
        estimate[name] = int(total)
    return estimate


def check_fits(required_bytes: float, available_bytes: float, preset: Preset, vram_limit_gb: float | None) -> None:
    """Raise VortexInitializationError, with its structured fields, when the need exceeds what is available."""
    if required_bytes <= available_bytes:
        return
    cap = f" (capped by vram_limit_gb={vram_limit_gb})" if vram_limit_gb is not None else ""
    raise VortexInitializationError(
        f"FLUX.1-schnell with preset {preset.name} needs about {required_bytes / GB:.2f} GB of GPU memory "
        f"(weights plus {preset.working_memory_gib} GiB working memory), but {available_bytes / GB:.2f} GB is "
        f"available{cap}.",
        required_vram_gb=round(required_bytes / GB, 3), available_vram_gb=round(available_bytes / GB, 3),
        remediation="free GPU memory held by other processes, use a GPU with more memory, or choose a smaller "
                    "quantization preset (nf4 is the smallest)")


def preflight(source: ModelSource, preset: Preset, device: torch.device, vram_limit_gb: float | None) -> dict:
    """Refuse before loading when the estimated need exceeds the GPU memory this process may use."""
    weights = estimate_weight_bytes(meta_components(source.path), preset, compute_dtype(preset, device).itemsize)
    required = sum(weights.values()) + preset.working_memory_gib * GIB
    result = {"estimated_weight_bytes": weights, "required_gb": round(required / GB, 3), "available_gb": None}
    if device.type != "cuda":
        return result
    free, _ = torch.cuda.mem_get_info(device)
    available = free if vram_limit_gb is None else min(free, vram_limit_gb * GB - torch.cuda.memory_reserved(device))
    result["available_gb"] = round(available / GB, 3)
    check_fits(required, available, preset, vram_limit_gb)
    return result


# ---- load -------------------------------------------------------------------------------------------

def _apply_vram_limit(device: torch.device, vram_limit_gb: float | None) -> None:
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = 1.0 if vram_limit_gb is None else min(1.0, vram_limit_gb * GB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)


def _load_pipeline(source: ModelSource, preset: Preset, device: torch.device, dtype: torch.dtype):
    from diffusers import FluxPipeline, PipelineQuantizationConfig

    spec = preset.quantization
    on_gpu = device.type == "cuda"
    mapping = {name: bnb_config(spec, "diffusers" if name in DIFFUSERS_COMPONENTS else "transformers", dtype)
               for name in spec.components if on_gpu or name not in DIFFUSERS_COMPONENTS}
    kwargs = {"quantization_config": PipelineQuantizationConfig(quant_mapping=mapping)} if mapping else {}
    pipe = FluxPipeline.from_pretrained(source.path, dtype=dtype, use_safetensors=True, **kwargs)
    for name in spec.components:
        if name in DIFFUSERS_COMPONENTS and not on_gpu:
            quantize_linear_layers(getattr(pipe, name), spec, dtype)
    for name in WEIGHT_COMPONENTS:
        module = getattr(pipe, name)
        if not (getattr(module, "is_loaded_in_4bit", False) or getattr(module, "is_loaded_in_8bit", False)):
            module.to(device)
    if preset.vae_tile_size:
        pipe.vae.enable_tiling()
        pipe.vae.tile_sample_min_size = preset.vae_tile_size
        pipe.vae.tile_latent_min_size = preset.vae_tile_size // pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_flux_schnell(device: str | torch.device = "cuda", quantization: str | Preset = "nf4",
                      model: str | os.PathLike = DEFAULT_MODEL, *, revision: str | None = None,
                      vram_limit_gb: float | None = None, preflight_check: bool = True):
    """Load FLUX.1-schnell, quantized per preset, ready for `FluxModel.generate`.

    `model` is a Hub id resolved from the local cache only, a checkpoint folder, `synthetic-tiny` /
    `synthetic-full`, or `auto`. `vram_limit_gb` (or env FLUXKIT_VRAM_LIMIT_GB) caps the GPU memory
    this process may use, as on a smaller card. `preflight_check=False` skips the estimate and lets
    the allocator decide (a real OOM is still converted). Raises VortexInitializationError.
    """
    from .generation import FluxModel

    preset = quantization if isinstance(quantization, Preset) else load_preset(quantization)
    if vram_limit_gb is None and os.environ.get("FLUXKIT_VRAM_LIMIT_GB"):
        vram_limit_gb = float(os.environ["FLUXKIT_VRAM_LIMIT_GB"])
    if vram_limit_gb is not None and not vram_limit_gb > 0:
        raise ValueError(f"vram_limit_gb={vram_limit_gb}: must be a positive number of GB")
    dev = resolve_device(device)
    if revision is None and str(model) in (preset.model.id, "auto"):
        revision = preset.model.revision
    source = resolve_model(model, revision)
    _apply_vram_limit(dev, vram_limit_gb)
    estimate = preflight(source, preset, dev, vram_limit_gb) if preflight_check else None
    dtype = compute_dtype(preset, dev)
    records: list[PhaseMemory] = []
    start = time.perf_counter()
    out_of_memory = False
    try:
        with track_phase(dev, "load", records):
            pipe = _load_pipeline(source, preset, dev, dtype)
    except torch.OutOfMemoryError:
        out_of_memory = True  # handled below, once the traceback (and the partial weights it holds) is gone
    if out_of_memory:
        release_device_memory(dev)
        free, _ = torch.cuda.mem_get_info(dev)
        available = free if vram_limit_gb is None else min(free, vram_limit_gb * GB - torch.cuda.memory_reserved(dev))
        raise VortexInitializationError(
            f"CUDA ran out of memory while loading FLUX.1-schnell ({preset.name}); partial weights were released.",
            required_vram_gb=estimate["required_gb"] if estimate else None,
            available_vram_gb=round(available / GB, 3),
            remediation="free GPU memory held by other processes, raise vram_limit_gb, or use a GPU with more memory")
    load_s = time.perf_counter() - start
    log.info("loaded %s (%s) on %s in %.1f s", source.describe(), preset.name, dev, load_s)
    return FluxModel(pipe, preset=preset, source=source, device=dev, dtype=dtype, load_seconds=load_s,
                     load_memory=records[0], preflight=estimate)
