"""Memory accounting: weight bytes per component from the real storage, device memory per phase.

Every figure is given in both GiB (2**30 bytes, what torch.cuda reports) and GB (10**9 bytes, how
budgets such as Vortex's 11.8 GB are written), so no reader has to guess the unit.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

GIB = 2**30
GB = 10**9
CPU_NOTE = "device memory statistics are not available on CPU; only weight bytes were counted"


def both_units(nbytes: int | float) -> dict:
    return {"bytes": int(nbytes), "gib": round(nbytes / GIB, 4), "gb": round(nbytes / GB, 4)}


def _quant_state_bytes(state) -> int:
    """bitsandbytes QuantState: absmax and code tensors, plus the nested state of double quantization."""
    total = 0
    for name in ("absmax", "code", "offset"):
        t = getattr(state, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None)
    return total + (_quant_state_bytes(nested) if nested is not None else 0)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a parameter really occupies: packed 4-bit data plus its QuantState, int8 data plus scales, or the
    inner tensors of a tensor subclass (torchao keeps quantized data and scales inside a bf16-typed wrapper)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    total = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)
    if state is not None:
        total += _quant_state_bytes(state)
    scales = getattr(t, "SCB", None)
    if isinstance(scales, torch.Tensor):
        total += scales.numel() * scales.element_size()
    return total


def module_weight_bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = id(t) if t.device.type == "meta" or is_traceable_wrapper_subclass(t) else t.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor_bytes(t)
    return total


def count_quantized_linears(module: torch.nn.Module) -> dict[str, int]:
    import bitsandbytes as bnb

    return {"Linear4bit": sum(isinstance(m, bnb.nn.Linear4bit) for m in module.modules()),
            "Linear8bitLt": sum(isinstance(m, bnb.nn.Linear8bitLt) for m in module.modules()),
            "Linear": sum(type(m) is torch.nn.Linear for m in module.modules())}


def weight_report(components: dict[str, torch.nn.Module]) -> dict[str, dict]:
    """Weight bytes per component and in total, in bytes, GiB and GB."""
    per = {name: module_weight_bytes(m) for name, m in components.items()}
    report = {name: both_units(b) for name, b in per.items()}
    report["total"] = both_units(sum(per.values()))
    return report


@dataclass
class PhaseMemory:
    """Device memory over one phase, in bytes (None on CPU; the peaks None unless the model is profiling)."""

    phase: str
    allocated: int | None  # at the end of the phase
    reserved: int | None
    peak: int | None = None  # peak allocated during the phase (the process's counter is reset at its start)
    rise: int | None = None  # peak during the phase minus allocated at its start
    peak_reserved: int | None = None  # what the caching allocator held from the card at most

    def to_dict(self) -> dict:
        return asdict(self)


def device_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


@contextmanager
def track_phase(device: torch.device, phase: str, records: list[PhaseMemory], peaks: bool = False):
    """Record the memory allocated and reserved at the end of a phase (None figures on CPU). Without `peaks` this
    reads the allocator's counters only: no device synchronization, and the host's peak statistics stay its own.
    With `peaks` (the lab, in a process of its own) the phase starts by synchronizing and resetting the process's
    peak counters, so that its peak is its own."""
    if not device_available(device):
        yield
        records.append(PhaseMemory(phase, None, None))
        return
    if not peaks:
        yield
        records.append(PhaseMemory(phase, torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)))
        return
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    records.append(PhaseMemory(phase, torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device), peak,
                               peak - start, torch.cuda.max_memory_reserved(device)))


def device_snapshot(device: torch.device) -> dict:
    """Allocated, reserved, peak, free and total memory of a CUDA device, in GiB and GB."""
    if not device_available(device):
        return {"available": False, "note": CPU_NOTE}
    free, total = torch.cuda.mem_get_info(device)
    figures = {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device),
               "peak": torch.cuda.max_memory_allocated(device), "free": free, "total": total}
    return {"available": True, **{k: both_units(v) for k, v in figures.items()}}


def release_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device_available(device):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def device_used(device: torch.device) -> int:
    """Memory in use on the whole card (CUDA context and other processes included), as nvidia-smi shows it."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free
