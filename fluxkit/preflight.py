"""Before any weight is read: which device, how much of its memory this process may take, and which placement.

fluxkit is a guest in its host's process: it reads the host's memory cap (`set_per_process_memory_fraction`) and
lowers it only when asked to (`vram_limit_gb`), never raises it. `placement="auto"` (every preset's default) picks,
from the plan, the fastest placement whose planned peak fits both the preset's Flux share (Vortex's 11.8 GB budget
less the 5.8 GB the rest of Vortex keeps) and the memory this process may still take, and logs which and why.
"""
from __future__ import annotations

import logging

import torch

from .config import AUTO_PLACEMENT, PlacementSpec, Preset, available_placements, load_placement
from .errors import LoadInputError, LoadInputTypeError, VortexInitializationError
from .memory import GB
from .plan import Plan, plan_placement

log = logging.getLogger("fluxkit")

FITS_REMEDY = ("choose the vortex placement (the whole model within a 6 GB share), free GPU memory held by other "
               "processes, or use a GPU with more memory; `fluxkit plan` lists what fits")


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


def process_cap_bytes(device: torch.device) -> int:
    """The most this process's caching allocator may reserve on `device`: the card times the host's fraction."""
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    return int(torch.cuda.get_device_properties(device).total_memory * fraction)


def lower_cap(device: torch.device, vram_limit_gb: float | None) -> None:
    """Cap the process at `vram_limit_gb` (as on a smaller card) when asked, and only below what the host set."""
    if vram_limit_gb is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, vram_limit_gb * GB / total)
    if fraction < torch.cuda.get_per_process_memory_fraction(device):
        torch.cuda.set_per_process_memory_fraction(fraction, device)


def available_bytes(device: torch.device) -> int:
    """GPU memory this process may still take: free on the card, and what is left under the process's cap."""
    free, _ = torch.cuda.mem_get_info(device)
    return min(free, process_cap_bytes(device) - torch.cuda.memory_reserved(device))


def check_fits(plan: Plan, available: int) -> None:
    """Raise VortexInitializationError, with its structured fields, when the plan's peak exceeds what is available."""
    if plan.peak_bytes <= available:
        return
    raise VortexInitializationError(
        f"FLUX.1-schnell with preset {plan.preset} and placement {plan.placement} needs about "
        f"{plan.peak_bytes / GB:.2f} GB of GPU memory at its peak ({plan.resident_bytes / GB:.2f} GB resident plus "
        f"{plan.working_bytes / GB:.2f} GB working memory), but {available / GB:.2f} GB is available to this process.",
        required_vram_gb=round(plan.peak_bytes / GB, 3), available_vram_gb=round(available / GB, 3),
        remediation=FITS_REMEDY)


def choose_placement(meta: dict, preset: Preset, placement: str | PlacementSpec, device: torch.device,
                     dtype_bytes: int, available: int | None) -> tuple[PlacementSpec, Plan, str]:
    """The placement to load with, its plan, and why it was chosen. An explicit placement is taken as given; `auto`
    takes the fastest (fewest bytes moved per call) whose planned peak fits the Flux share and `available` (None:
    not checked)."""
    if placement != AUTO_PLACEMENT:
        spec = load_placement(placement)
        return spec, plan_placement(meta, preset, spec, dtype_bytes), "asked for"
    if device.type != "cuda":
        spec = load_placement("resident")
        return spec, plan_placement(meta, preset, spec, dtype_bytes), "auto: on a CPU the GPU share does not apply"
    share = int(preset.budgets.flux_share_gb * GB)
    plans = [plan_placement(meta, preset, load_placement(name), dtype_bytes) for name in available_placements()]
    in_share = [p for p in plans if p.fits]
    fitting = [p for p in in_share if available is None or p.peak_bytes <= available]
    if not fitting:
        smallest = min(in_share or [p for p in plans if p.refused is None], key=lambda p: p.peak_bytes)
        where = "the Flux share" if not in_share else "the GPU memory this process may take"
        raise VortexInitializationError(
            f"No placement of preset {preset.name} fits {where}: the smallest, {smallest.placement}, needs "
            f"{smallest.peak_bytes / GB:.2f} GB at its peak; the share is {share / GB:.2f} GB (budgets.vortex_total_gb "
            f"- budgets.rest_of_vortex_gb)" + (f" and {available / GB:.2f} GB is available" if available is not None
                                                 else "") + ".",
            required_vram_gb=round(smallest.peak_bytes / GB, 3),
            available_vram_gb=None if available is None else round(available / GB, 3),
            remediation="free GPU memory, choose a smaller preset (`fluxkit plan` lists what fits), or pass "
                        "placement='resident' to use the card beyond the share")
    best = min(fitting, key=lambda p: p.moved_per_call)
    skipped = [f"{p.placement} needs {p.peak_bytes / GB:.2f} GB" for p in plans
               if p.moved_per_call < best.moved_per_call and p not in fitting]
    reason = (f"auto: {best.placement} is the fastest placement within the {share / GB:.2f} GB Flux share"
              + (f" and the {available / GB:.2f} GB available" if available is not None else "")
              + (f" ({'; '.join(skipped)} at its peak)" if skipped else "")
              + f"; peak {best.peak_bytes / GB:.2f} GB")
    return load_placement(best.placement), best, reason
