"""Where the bytes go: per preset and placement, GPU bytes resident and at peak, host bytes, bytes moved per call.

Everything here is counted on components built on the meta device from a checkpoint's configs, so it
runs on a laptop in seconds and reads no weights. Pre-flight uses the same plan to refuse a load that
cannot fit, and `fluxkit plan` prints it for every preset and placement.

A quantized nn.Linear holds what bitsandbytes allocates for it: packed weights (4 bits or 8 bits per
weight) plus its quantization state; on a CUDA device every allocation is rounded up to 512 bytes,
which is what `torch.cuda.memory_allocated()` reports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import meta_components
from .config import (
    DEFAULT_MODEL,
    PlacementSpec,
    Preset,
    QuantizationSpec,
    available_placements,
    available_presets,
    load_placement,
    load_preset,
)
from .errors import InputError
from .hub import cached_snapshot
from .memory import GB
from .quantizers import PLAIN, for_component
from .synthetic import PRESETS, meta_model

CUDA_ALLOCATION_GRANULE = 512
MODULATION_SUFFIXES = ("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear")
COMPONENT_ORDER = ("transformer", "text_encoder_2", "text_encoder", "vae")


def is_modulation(name: str) -> bool:
    """The transformer's AdaLN modulation projections: applied to one conditioning vector per step, never per token."""
    return name.endswith(MODULATION_SUFFIXES)


def component_tensors(module: torch.nn.Module, spec: QuantizationSpec, dtype_bytes: int,
                      quantizer=PLAIN) -> dict[str, list[int]]:
    """Owner module name -> bytes of each tensor it will hold once loaded (stored as `quantizer` stores it)."""
    selected = quantizer.selected(module)
    out: dict[str, list[int]] = {}
    seen: set[int] = set()
    for name, mod in module.named_modules():
        for p_name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if id(t) in seen:
                continue
            seen.add(id(t))
            if name in selected:
                sizes = quantizer.tensor_bytes(mod, p_name, t, dtype_bytes, spec)
            else:  # floating tensors load in the model dtype; index buffers (CLIP's position_ids) keep theirs
                sizes = [t.numel() * (dtype_bytes if t.is_floating_point() else t.element_size())]
            out.setdefault(name, []).extend(sizes)
    return out


def _raw(sizes) -> int:
    return sum(sizes)


def _allocated(sizes) -> int:
    return sum(math.ceil(s / CUDA_ALLOCATION_GRANULE) * CUDA_ALLOCATION_GRANULE for s in sizes)


@dataclass(frozen=True)
class Placed:
    """One component's bytes under a placement."""

    weight_bytes: int  # what its tensors occupy, wherever they are
    gpu_bytes: int  # on the GPU between calls, as memory_allocated() counts it
    host_bytes: int  # in host memory between calls
    moved_per_call: int  # host -> GPU per call
    where: str  # one line for tables


@dataclass(frozen=True)
class Plan:
    preset: str
    placement: str
    quantization: QuantizationSpec
    components: dict[str, Placed]
    streamed_modulation: tuple[str, ...]
    working_bytes: int
    peak_component_bytes: int  # the most that is on the GPU at once before working memory
    budget_bytes: int
    notes: tuple[str, ...] = field(default=())
    refused: str | None = None  # why the loader refuses this preset under this placement

    @property
    def resident_bytes(self) -> int:
        return sum(c.gpu_bytes for c in self.components.values())

    @property
    def peak_bytes(self) -> int:
        return self.peak_component_bytes + self.working_bytes

    @property
    def host_bytes(self) -> int:
        return sum(c.host_bytes for c in self.components.values())

    @property
    def moved_per_call(self) -> int:
        return sum(c.moved_per_call for c in self.components.values())

    @property
    def fits(self) -> bool:
        return self.refused is None and self.peak_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        return {"preset": self.preset, "placement": self.placement, "resident_bytes": self.resident_bytes,
                "peak_bytes": self.peak_bytes, "host_bytes": self.host_bytes, "moved_per_call": self.moved_per_call,
                "working_bytes": self.working_bytes, "budget_bytes": self.budget_bytes, "fits": self.fits,
                "streamed_modulation": list(self.streamed_modulation), "notes": list(self.notes),
                "refused": self.refused, "components": {k: vars(v) for k, v in self.components.items()}}


def plan_placement(meta: dict[str, torch.nn.Module], preset: Preset, placement: PlacementSpec,
                   dtype_bytes: int = 2, budget_bytes: int | None = None) -> Plan:
    """Bytes per component for `preset` under `placement`; `budget_bytes` (default: Vortex's GPU share) is
    what `modulation: fit` fills and what `fits` is judged against."""
    spec = preset.quantization
    budget = int(preset.budgets.flux_share_gb * GB) if budget_bytes is None else int(budget_bytes)
    notes = []
    tensors = {}
    for name in COMPONENT_ORDER:
        quantizer = for_component(spec, name, streamed_t5=placement.text_encoder_2 == "stream")
        tensors[name] = component_tensors(meta[name], spec, dtype_bytes, quantizer)
    if "text_encoder_2" in spec.components and placement.text_encoder_2 == "stream":
        notes.append("T5 is streamed in the model dtype: group offloading moves plain tensors, so the preset's "
                     "T5 quantization does not apply")

    streamed: tuple[str, ...] = ()
    working = int(placement.working_memory_gb * GB)
    transformer = tensors["transformer"]
    if placement.modulation == "fit":
        fixed = sum(_allocated(s) for n, s in transformer.items() if not is_modulation(n))
        fixed += sum(_allocated(s) for c, t in tensors.items() if c not in ("transformer", "text_encoder_2")
                     for s in t.values())
        room = budget - int(placement.fill_headroom_gb * GB) - working - fixed
        spilled: list[str] = []  # modulation layers in model order stay resident until the first that does not fit
        for n, s in transformer.items():
            if not is_modulation(n):
                continue
            if not spilled and _allocated(s) <= room:
                room -= _allocated(s)
            else:
                spilled.append(n)
        streamed = tuple(spilled)

    components = {}
    for name, owned in tensors.items():
        raw = sum(_raw(s) for s in owned.values())
        if placement.offload_between_calls:
            components[name] = Placed(raw, 0, raw, raw, "host, moved to the GPU while it runs")
        elif name == "text_encoder_2" and placement.text_encoder_2 == "stream":
            components[name] = Placed(raw, 0, raw, raw, "pinned host memory, streamed layer by layer")
        elif name == "transformer" and streamed:
            off = sum(_raw(owned[n]) for n in streamed)
            gpu = sum(_allocated(s) for n, s in owned.items() if n not in streamed)
            components[name] = Placed(raw, gpu, off, off, f"GPU; {len(streamed)} of {sum(map(is_modulation, owned))} "
                                                          "modulation layers streamed once per call")
        else:
            components[name] = Placed(raw, sum(_allocated(s) for s in owned.values()), 0, 0, "GPU")
    if placement.offload_between_calls:
        peak = max(sum(_allocated(s) for s in owned.values()) for owned in tensors.values())
    else:
        peak = sum(c.gpu_bytes for c in components.values())
    return Plan(preset.name, placement.name, spec, components, streamed, working, peak, budget, tuple(notes),
                spec.quantizer.unsupported(spec, None, placement))


def recommend(plans: list[Plan]) -> Plan | None:
    """The fitting plan that moves the fewest bytes per call; ties go to more weight bytes, then to NF4 over FP4
    (NF4's levels match normally distributed weights: lower error at the same size, QLoRA, arXiv 2305.14314)."""
    fitting = [p for p in plans if p.fits]
    if not fitting:
        return None
    return min(fitting, key=lambda p: (p.moved_per_call, -p.components["transformer"].weight_bytes,
                                       p.quantization.quant_type != "nf4"))


def plan_all(meta: dict[str, torch.nn.Module], budget_bytes: int | None = None, dtype_bytes: int = 2) -> list[Plan]:
    """Every preset under every placement."""
    return [plan_placement(meta, load_preset(q), load_placement(p), dtype_bytes, budget_bytes)
            for q in available_presets() for p in available_placements()]


def components_for(model: str) -> tuple[dict[str, torch.nn.Module], str]:
    """Meta-device components of `model` from its configs only (no weights read, nothing built or downloaded)."""
    if model.startswith("synthetic-") and model.removeprefix("synthetic-") in PRESETS:
        return meta_model(model.removeprefix("synthetic-")), f"{model} (fluxkit's configs)"
    if Path(model).expanduser().is_dir():
        return meta_components(Path(model).expanduser(), model), f"{model} (its configs)"
    folder = cached_snapshot(model, None) if model.count("/") == 1 else None
    if folder is not None:
        return meta_components(folder, model), f"{model}@{folder.name} (configs from the local cache)"
    if model == DEFAULT_MODEL:
        return meta_model("full"), f"{model} (not cached: its configs as fluxkit ships them)"
    raise InputError(f"model={model!r}: not a folder, not in the local cache, and not {DEFAULT_MODEL}")
