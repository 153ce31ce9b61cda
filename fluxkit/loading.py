"""Loading FLUX.1-schnell: argument checks, checkpoint inspection, pre-flight, per-component load, placement.

On a GPU each quantized component goes through its library's own quantizer at load time (diffusers'
BitsAndBytesConfig for the transformer, transformers' for T5). diffusers' quantizer refuses to run
without a GPU, so on CPU the transformer is loaded unquantized and its nn.Linear layers are then
replaced by the same bitsandbytes layers (Linear4bit / Linear8bitLt, same quant type, block size and
kernels); transformers' quantizer runs on CPU as it is. README says what each covers.

Every failure to load, whatever its cause, leaves as VortexInitializationError (logged as one JSON
record first): bad arguments, missing or damaged weights, not enough memory, an OOM while loading.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from .checkpoint import check_prequantized_folder, inspect_checkpoint
from .checks import check_number, parse_positive_float
from .config import PlacementSpec, Preset, QuantizationSpec, load_placement, load_preset
from .errors import (
    FluxkitError,
    GenerationError,
    InputError,
    InputTypeError,
    LoadInputError,
    LoadInputTypeError,
    VortexInitializationError,
    one_line,
)
from .fastpath import compile_components, graphed_calls, warm_up
from .generation import FluxModel
from .hub import DEFAULT_MODEL, ModelSource, resolve_model
from .memory import GB, PhaseMemory, release_device_memory, track_phase
from .placement import ModulationTables, quantize_to_host, stream_text_encoder
from .plan import Plan, plan_placement
from .quantization import POST_LOAD_BACKENDS, convert_after_load, converted, gguf_file, keep_in_fp32, unsupported

log = logging.getLogger("fluxkit")

LOAD_ERRORS = (LoadInputError, LoadInputTypeError)


def resolve_device(device: object) -> torch.device:
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, (str, torch.device)):
        raise LoadInputTypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LoadInputError(f"device={device!r}: not a torch device; use 'cuda', 'cuda:N', 'cpu' or 'auto'") from None
    if dev.type not in ("cuda", "cpu"):
        raise LoadInputError(f"device={device!r}: fluxkit runs on 'cuda' or 'cpu'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VortexInitializationError(
            "device='cuda' was asked for but this machine has no usable CUDA GPU.", available_vram_gb=0.0,
            remediation="pass device='cpu' (or 'auto'), or run on a machine with a CUDA GPU")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise LoadInputError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
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
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=spec.double_quant)


def _bnb_layer(linear: torch.nn.Linear, spec: QuantizationSpec, dtype: torch.dtype) -> torch.nn.Module:
    """An empty (meta) bitsandbytes layer of the same shape, as diffusers' quantizer makes it."""
    import bitsandbytes as bnb

    if spec.backend == "bitsandbytes_8bit":
        return bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                                   has_fp16_weights=False, device="meta")
    return bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype=dtype,
                             compress_statistics=spec.double_quant, quant_type=spec.quant_type, device="meta")


def _quantized_weight(tensor: torch.Tensor, layer: torch.nn.Module, spec: QuantizationSpec, device: torch.device):
    """bitsandbytes quantizes a weight when it is moved to its device (on that device)."""
    import bitsandbytes as bnb

    if spec.backend == "bitsandbytes_8bit":
        return bnb.nn.Int8Params(tensor, requires_grad=False, has_fp16_weights=False).to(device)
    return bnb.nn.Params4bit(tensor, requires_grad=False, quant_type=spec.quant_type,
                             compress_statistics=spec.double_quant, module=layer).to(device)


def stream_quantized_transformer(folder: Path, spec: QuantizationSpec, dtype: torch.dtype, device: torch.device,
                                 streamed: tuple[str, ...], pin: bool):
    """The quantized transformer, read tensor by tensor from its safetensors and quantized on `device` one at a
    time; the `streamed` modulation layers are quantized the same way and parked in host memory.

    diffusers' loader puts a quantized model on one device, and its CPU offload holds skipped layers unquantized;
    here neither the whole bf16 transformer (24 GB) in host memory nor more than one layer beyond the resident
    weights on the GPU is ever needed, which is what lets the vortex placement load inside its share.
    """
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    from .checkpoint import weight_files

    config = FluxTransformer2DModel.load_config(folder / "transformer")
    prequantized = "quantization_config" in config
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config({k: v for k, v in config.items() if k != "quantization_config"})
    skip = keep_in_fp32(model)
    names = {n for n, m in model.named_modules() if converted(n, m, skip)}
    stats = 6 if spec.double_quant else 4  # packed weight, absmax, quant_map, [nested absmax and map,] state blob
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for name in names - set(streamed):
        owner, attr = name.rsplit(".", 1) if "." in name else ("", name)
        setattr(model.get_submodule(owner), attr, _bnb_layer(model.get_submodule(name), spec, dtype))
    pending: dict[str, dict[str, torch.Tensor]] = {n: {} for n in streamed}
    parked = {}
    for path in weight_files(folder, "transformer"):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                if prequantized and (".weight." in key or (key.endswith(".weight") and key[:-7] in names)):
                    module_name = key.split(".weight")[0]
                    packed.setdefault(module_name, {})[key[len(module_name) + 1:]] = f.get_tensor(key)
                    if len(packed[module_name]) == stats:  # complete: rebuild the 4-bit weight without quantizing
                        weight = _prequantized_weight(packed.pop(module_name), module_name, model, streamed, device)
                        if module_name in pending:
                            pending[module_name]["weight"] = weight
                            _park_when_complete(pending, parked, module_name, spec, device, dtype, pin)
                    continue
                module_name, param = key.rsplit(".", 1)
                tensor = f.get_tensor(key).to(dtype)
                if module_name in pending:
                    pending[module_name][param] = tensor
                    _park_when_complete(pending, parked, module_name, spec, device, dtype, pin)
                    continue
                module = model.get_submodule(module_name)
                if module_name in names and param == "weight":
                    module.weight = _quantized_weight(tensor, module, spec, device)
                elif param in module._buffers:
                    module._buffers[param] = tensor.to(device)
                else:
                    module._parameters[param] = torch.nn.Parameter(tensor.to(device), requires_grad=False)
    for name in streamed:
        owner, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(owner), attr, torch.nn.Identity())  # replaced by ModulationTables
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    incomplete = list(pending) + list(packed)
    if left or incomplete:
        raise ValueError(f"transformer weights lack {(left or incomplete)[0]}")
    return model.eval(), parked


def _prequantized_weight(weights: dict[str, torch.Tensor], name: str, model, streamed, device: torch.device):
    """A saved 4-bit weight (packed data and quantization state) back as a Params4bit: on its module when resident,
    returned on the host when the layer is streamed."""
    import bitsandbytes as bnb

    stats = {k: v for k, v in weights.items() if k != "weight"}
    if name in streamed:
        return bnb.nn.Params4bit.from_prequantized(weights["weight"], stats, requires_grad=False, device="cpu")
    layer = model.get_submodule(name)
    layer.weight = bnb.nn.Params4bit.from_prequantized(weights["weight"], stats, requires_grad=False, device=device,
                                                       module=layer)
    return layer.weight


def _park_when_complete(pending: dict, parked: dict, name: str, spec: QuantizationSpec, device: torch.device,
                        dtype: torch.dtype, pin: bool) -> None:
    """Once a streamed layer's weight and bias are read: quantize it on the device (or take its saved 4-bit weight)
    and park it in host memory."""
    from .placement import _Parked

    parts = pending[name]
    if set(parts) != {"weight", "bias"}:
        return
    holder = torch.nn.Module()
    holder.bias = torch.nn.Parameter(parts["bias"], requires_grad=False)
    if getattr(parts["weight"], "quant_state", None) is not None:  # saved pre-quantized
        holder.weight = parts["weight"]
        parked[name] = _Parked.from_linear(holder, pin)
    else:
        holder.weight = torch.nn.Parameter(parts["weight"], requires_grad=False)
        parked[name] = quantize_to_host(holder, spec, device, dtype, pin)
    del pending[name]


# ---- pre-flight -------------------------------------------------------------------------------------

def available_bytes(device: torch.device, vram_limit_gb: float | None) -> int:
    """GPU memory this process may still take: free memory, or what is left of the cap."""
    free, _ = torch.cuda.mem_get_info(device)
    if vram_limit_gb is None:
        return free
    return min(free, int(vram_limit_gb * GB) - torch.cuda.memory_reserved(device))


def check_fits(plan: Plan, available: int, vram_limit_gb: float | None) -> None:
    """Raise VortexInitializationError, with its structured fields, when the plan's peak exceeds what is available."""
    if plan.peak_bytes <= available:
        return
    cap = f" (capped by vram_limit_gb={vram_limit_gb})" if vram_limit_gb is not None else ""
    raise VortexInitializationError(
        f"FLUX.1-schnell with preset {plan.preset} and placement {plan.placement} needs about "
        f"{plan.peak_bytes / GB:.2f} GB of GPU memory at its peak ({plan.resident_bytes / GB:.2f} GB resident plus "
        f"{plan.working_bytes / GB:.2f} GB working memory), but {available / GB:.2f} GB is available{cap}.",
        required_vram_gb=round(plan.peak_bytes / GB, 3), available_vram_gb=round(available / GB, 3),
        remediation="choose the vortex placement (the whole model within a 6 GB share), free GPU memory held by "
                    "other processes, or use a GPU with more memory; `fluxkit plan` lists what fits")


# ---- load -------------------------------------------------------------------------------------------

CHECKS_STAGE, COMPILE_STAGE = "checks and plan", "fast-path warm-up call"


def weight_seconds(stages: dict[str, float]) -> float:
    """What a load spent reading (and quantizing) weights: every stage but the checks and the compile warm-up."""
    return sum(seconds for stage, seconds in stages.items() if stage not in (CHECKS_STAGE, COMPILE_STAGE))


class LoadStages:
    """Seconds of each load stage, and on a GPU its device memory (`fluxkit -v` logs both): where a start goes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, stage: str) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self._last = now
        memory = (f", allocated {torch.cuda.memory_allocated(self.device) / GB:.3f} GB, reserved "
                  f"{torch.cuda.memory_reserved(self.device) / GB:.3f} GB, peak allocated since last stage "
                  f"{torch.cuda.max_memory_allocated(self.device) / GB:.3f} GB") if cuda else ""
        log.info("load stage %-22s %7.1f s%s", stage, self.seconds[stage], memory)
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)


def load_failure(source: str, preset: Preset, stage: str, err: Exception) -> VortexInitializationError:
    """The error for a load that failed other than by running out of memory, with the remedy for where it failed:
    a compiler that cannot build this preset's kernels, or a call a CUDA graph cannot capture, is no sign of a
    damaged checkpoint."""
    cause = one_line(err)
    if stage == COMPILE_STAGE:
        levers = [(name, switch) for name, switch, on in (
            ("torch.compile", "compile: false", preset.compile),
            ("CUDA graph capture", "cuda_graphs: false", preset.cuda_graphs),
            ("fluxkit's dequantization kernel", "dequantize_kernel: bitsandbytes", preset.dequantize_kernel == "fluxkit"),
        ) if on]
        switches = " or ".join(f"`{switch}`" for _, switch in levers)
        return VortexInitializationError(
            f"{' and '.join(name for name, _ in levers)} of {source} ({preset.name}) failed during the {stage}: {cause}",
            remediation=f"run {preset.name} without it ({switches} in its preset file; "
                        "`fluxkit sweep --compile off`), which loads the same weights; if that runs, report this "
                        "message to fluxkit")
    return VortexInitializationError(
        f"Loading {source} failed: {cause}",
        remediation="rebuild or re-download the checkpoint (`fluxkit synth`, `fluxkit download`); if it is "
                    "intact, report this message as a fluxkit bug")


def _apply_vram_limit(device: torch.device, vram_limit_gb: float | None) -> None:
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = 1.0 if vram_limit_gb is None else min(1.0, vram_limit_gb * GB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)


def _load_transformer(folder: Path, preset: Preset, placement: PlacementSpec, plan: Plan, device: torch.device,
                      dtype: torch.dtype):
    """The transformer, quantized per preset; modulation layers the plan streams end up parked in host memory.

    A quantized transformer on a GPU with nothing streamed goes through diffusers' quantizer (the plain
    pattern); on CPU (where diffusers' quantizer refuses to run) and whenever layers are streamed, fluxkit
    reads and quantizes it tensor by tensor with the same bitsandbytes layers.
    """
    from diffusers import FluxTransformer2DModel

    spec = preset.quantization
    streamed = plan.streamed_modulation
    pin = device.type == "cuda"
    parked = {}
    if spec.backend == "gguf":  # `unsupported` refuses streamed layers for gguf
        from diffusers import GGUFQuantizationConfig

        transformer = FluxTransformer2DModel.from_single_file(
            str(gguf_file(folder, spec.quant_type)), config=str(folder), subfolder="transformer", torch_dtype=dtype,
            quantization_config=GGUFQuantizationConfig(compute_dtype=dtype)).to(device)
    elif "transformer" not in spec.components or spec.backend in POST_LOAD_BACKENDS:
        transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", dtype=dtype)
        parked = {n: quantize_to_host(transformer.get_submodule(n), spec, device, dtype, pin) for n in streamed}
        for n in streamed:  # keep the parked layers' weights off the device
            owner, attr = n.rsplit(".", 1)
            setattr(transformer.get_submodule(owner), attr, torch.nn.Identity())
        transformer = (convert_after_load(transformer, spec, device, dtype) if "transformer" in spec.components
                       else transformer.to(device))
    elif device.type == "cuda" and not streamed:
        prequantized = "quantization_config" in FluxTransformer2DModel.load_config(folder / "transformer")
        transformer = FluxTransformer2DModel.from_pretrained(  # a saved quantization_config is read from the folder
            folder / "transformer", dtype=dtype, device_map={"": device},
            quantization_config=None if prequantized else bnb_config(spec, "diffusers", dtype))
    else:
        transformer, parked = stream_quantized_transformer(folder, spec, dtype, device, streamed, pin)
    tables = ModulationTables(transformer, parked, device, dtype) if placement.modulation == "fit" else None
    return transformer, tables


def _load_text_encoder_2(folder: Path, preset: Preset, placement: PlacementSpec, device: torch.device,
                         dtype: torch.dtype):
    from transformers import T5EncoderModel

    path = folder / "text_encoder_2"
    spec = preset.quantization
    if placement.text_encoder_2 == "stream":
        t5 = T5EncoderModel.from_pretrained(path, dtype=dtype)
        if device.type == "cuda":
            stream_text_encoder(t5, device)
        return t5
    if "text_encoder_2" in spec.components and spec.backend in POST_LOAD_BACKENDS:
        return convert_after_load(T5EncoderModel.from_pretrained(path, dtype=dtype), spec, device, dtype)
    if "text_encoder_2" in spec.components:
        device_map = {"": device} if device.type == "cuda" else {"": "cpu"}
        prequantized = "quantization_config" in json.loads((path / "config.json").read_text())
        return T5EncoderModel.from_pretrained(path, dtype=dtype, device_map=device_map, quantization_config=None
                                              if prequantized else bnb_config(spec, "transformers", dtype))
    return T5EncoderModel.from_pretrained(path, dtype=dtype).to(device)


def _load_pipeline(source: ModelSource, preset: Preset, placement: PlacementSpec, plan: Plan, device: torch.device,
                   dtype: torch.dtype, stages: LoadStages):
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel

    folder = source.path
    index = json.loads((folder / "model_index.json").read_text())  # its classes were checked by inspect_checkpoint
    offload = placement.offload_between_calls and device.type == "cuda"
    transformer, tables = _load_transformer(folder, preset, placement, plan, device, dtype)
    stages.done("transformer")
    if offload:
        transformer.to("cpu")  # before T5 arrives: at most one quantized component on the GPU while loading
    t5 = _load_text_encoder_2(folder, preset, placement, device, dtype)
    stages.done("text_encoder_2")
    if offload:
        t5.to("cpu")
    here = "cpu" if offload else device
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=AutoencoderKL.from_pretrained(folder / "vae", dtype=dtype).to(here),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype).to(here),
        tokenizer=getattr(transformers, index["tokenizer"][1]).from_pretrained(folder / "tokenizer"),
        text_encoder_2=t5,
        tokenizer_2=getattr(transformers, index["tokenizer_2"][1]).from_pretrained(folder / "tokenizer_2"),
        transformer=transformer)
    if placement.vae_tile_size:
        pipe.vae.enable_tiling()
        pipe.vae.tile_sample_min_size = placement.vae_tile_size
        pipe.vae.tile_latent_min_size = placement.vae_tile_size // pipe.vae_scale_factor
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    pipe.set_progress_bar_config(disable=True)
    stages.done("text_encoder, vae")
    return pipe, tables


def _check_arguments(quantization, placement, model, revision, vram_limit_gb, preflight_check):
    try:
        preset = load_preset(quantization)
        spec = load_placement(placement if placement is not None else preset.placement)
    except InputTypeError as err:
        raise LoadInputTypeError(str(err)) from None
    except InputError as err:
        raise LoadInputError(str(err)) from None
    if not isinstance(model, (str, os.PathLike)):
        raise LoadInputTypeError(f"model must be a str or a path, got {type(model).__name__}")
    if revision is not None and not isinstance(revision, str):
        raise LoadInputTypeError(f"revision must be a str or None, got {type(revision).__name__}")
    if not isinstance(preflight_check, bool):
        raise LoadInputTypeError(f"preflight_check must be True or False, got {type(preflight_check).__name__}")
    if vram_limit_gb is None and os.environ.get("FLUXKIT_VRAM_LIMIT_GB"):
        vram_limit_gb = parse_positive_float("FLUXKIT_VRAM_LIMIT_GB", os.environ["FLUXKIT_VRAM_LIMIT_GB"],
                                             errors=LOAD_ERRORS)
    if vram_limit_gb is not None:
        check_number("vram_limit_gb", vram_limit_gb, 0.001, 1e6, errors=LOAD_ERRORS)
    return preset, spec, vram_limit_gb


def load_flux_schnell(device: str | torch.device = "cuda", quantization: str | Preset = "nf4",
                      model: str | os.PathLike = DEFAULT_MODEL, *, placement: str | PlacementSpec | None = None,
                      revision: str | None = None, vram_limit_gb: float | None = None,
                      preflight_check: bool = True) -> FluxModel:
    """Load FLUX.1-schnell, quantized per preset and placed per placement, ready for `FluxModel.generate`.

    `model` is a Hub id resolved from the local cache only, a checkpoint folder, `synthetic-tiny` /
    `synthetic-full`, or `auto`. `placement` (default: the preset's) is `resident`, `vortex` (the
    whole model within Vortex's GPU share) or `offload`. `vram_limit_gb` (or env FLUXKIT_VRAM_LIMIT_GB)
    caps the GPU memory this process may use, as on a smaller card. `preflight_check=False` skips the
    estimate and lets the allocator decide (a real OOM is still converted). Every failure raises
    VortexInitializationError.
    """
    try:
        return _load(device, quantization, model, placement, revision, vram_limit_gb, preflight_check)
    except VortexInitializationError as err:
        log.error(json.dumps(err.record()), extra={"structured": True})
        raise


def _load(device, quantization, model, placement, revision, vram_limit_gb, preflight_check) -> FluxModel:
    preset, spec, vram_limit_gb = _check_arguments(quantization, placement, model, revision, vram_limit_gb,
                                                   preflight_check)
    dev = resolve_device(device)
    reason = unsupported(preset.quantization, dev, spec)
    if reason:
        raise VortexInitializationError(f"preset {preset.name} cannot run on {dev} under placement {spec.name}: "
                                        f"{reason}.", remediation="choose another preset (`fluxkit plan` lists "
                                        "them), placement or device")
    if revision is None and str(model) in (preset.model.id, "auto"):
        revision = preset.model.revision
    start = time.perf_counter()
    stages = LoadStages(dev)
    try:
        source = resolve_model(model, revision)
        meta = inspect_checkpoint(source.path, source.describe())
    except FluxkitError:
        raise
    except Exception as err:  # an unreadable folder, a full disk while building a synthetic checkpoint
        raise VortexInitializationError(f"{model}: the checkpoint could not be read ({type(err).__name__}: {err}).",
                                        remediation="check the path and its permissions, or rebuild it") from err
    try:
        check_prequantized_folder(source.path, preset, spec)
    except InputError as err:
        raise LoadInputError(str(err), remediation="load the checkpoint with the preset and placement it was "
                                                   "quantized for, or the original checkpoint") from None
    dtype = compute_dtype(preset, dev)
    plan = plan_placement(meta, preset, spec, dtype.itemsize)
    _apply_vram_limit(dev, vram_limit_gb)
    if dev.type == "cuda" and preflight_check:
        check_fits(plan, available_bytes(dev, vram_limit_gb), vram_limit_gb)
    stages.done(CHECKS_STAGE)  # includes building a synthetic checkpoint the first time it is asked for
    records: list[PhaseMemory] = []
    out_of_memory, failure, stage = False, None, "weight loading"
    try:
        with track_phase(dev, "load", records):  # what Flux keeps on the GPU once loaded, warm-up included
            pipe, tables = _load_pipeline(source, preset, spec, plan, dev, dtype, stages)
            model = FluxModel(pipe, preset=preset, placement=spec, plan=plan, source=source, device=dev, dtype=dtype,
                              load_seconds=0.0, load_memory=None, modulation=tables)
            if dev.type == "cuda" and preset.dequantize_kernel == "fluxkit":
                from .dequantize import Linear4bit, use_fluxkit_dequantize  # Triton's kernels: imported where they run

                model.fluxkit_dequantize_layers = use_fluxkit_dequantize(pipe.transformer, pipe.text_encoder_2)
                if tables is not None:
                    tables.layer_4bit = Linear4bit
            if dev.type == "cuda" and (preset.compile or preset.cuda_graphs):
                stage = COMPILE_STAGE
                if preset.compile:
                    compile_components(pipe, preset.compile_mode, preset.compile_scope)
                if preset.cuda_graphs:
                    model.graphed = graphed_calls(pipe, spec)
                model.compile_seconds = warm_up(model)
                stages.done(COMPILE_STAGE)
    except torch.OutOfMemoryError:
        out_of_memory = True  # handled below, once the traceback (and the partial weights it holds) is gone
    except Exception as err:  # damage that only shows while reading (a corrupt tensor), a compile that fails
        out_of_memory = isinstance(err, GenerationError) and err.out_of_memory  # the warm-up call's own OOM
        failure = None if out_of_memory else err
    if failure is not None:
        release_device_memory(dev)
        raise load_failure(source.describe(), preset, stage, failure) from failure
    if out_of_memory:
        release_device_memory(dev)
        raise VortexInitializationError(
            f"CUDA ran out of memory while loading FLUX.1-schnell ({preset.name}, {spec.name}) during the {stage}, with "
            f"{torch.cuda.max_memory_reserved(dev) / GB:.3f} GB reserved at the peak; partial weights were released.",
            required_vram_gb=round(plan.peak_bytes / GB, 3),
            available_vram_gb=round(available_bytes(dev, vram_limit_gb) / GB, 3),
            remediation="free GPU memory held by other processes, raise vram_limit_gb, choose the vortex placement, "
                        "or use a GPU with more memory")
    model.load_memory = records[0]
    model.load_seconds = time.perf_counter() - start
    model.load_stages = stages.seconds
    log.info("loaded %s (%s, %s) on %s in %.1f s", source.describe(), preset.name, spec.name, dev, model.load_seconds)
    return model
