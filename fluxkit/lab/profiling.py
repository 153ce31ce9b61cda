"""VRAM profiles: one loaded model in depth, every placement side by side, and Flux beside the rest of Vortex.

Vortex reads `torch.cuda.memory_allocated()` right after loading Flux in a fresh process, so the
side-by-side comparison loads each placement in its own subprocess (`fluxkit.lab.fresh`)
and reports it the same way, next to the planner's prediction for it. The co-tenancy check runs the
same way: its memory cap and ballast belong to the process.
"""
from __future__ import annotations

import logging

import torch

from ..checks import check_number
from ..config import available_placements, available_presets, load_placement, load_preset
from ..errors import FluxkitError, GenerationError, InputError, VortexInitializationError
from ..memory import CPU_NOTE, GB, both_units, device_available, device_used
from ..plan import plan_placement
from ..sampling import PHASES
from ..synthetic import meta_model
from .bench import DEFAULT_PROMPT, call_prompt, each_timed_call, timed_calls
from .fresh import call_in_fresh_process, reason
from .metrics import summarize

log = logging.getLogger(__name__)


def host_rss() -> int | None:
    """Resident host memory of this process, bytes (Linux; None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def profile_vram(model, drift_calls: int = 20, prompt: str = DEFAULT_PROMPT, seed: int = 0) -> dict:
    """The VRAM picture of a loaded model: weights per component (measured, and planned for every preset and
    placement from the same configs and from FLUX.1-schnell's), memory per phase of one call, the rise during
    a call, and the drift over `drift_calls` calls."""
    from ..checkpoint import meta_components

    if isinstance(drift_calls, bool) or not isinstance(drift_calls, int) or drift_calls < 2:
        raise InputError(f"drift_calls={drift_calls!r}: need at least 2 calls to measure drift")
    device = model.device
    has_device = device_available(device)

    def plans(meta: dict, dtype_bytes: int) -> dict:
        return {q: {p: plan_placement(meta, load_preset(q), load_placement(p), dtype_bytes).to_dict()
                    for p in available_placements()} for q in available_presets()}

    # A new prompt every call, as Vortex's actors come: a call served from the prompt cache skips T5, and its
    # profile missed the text encode's memory (H100, vortex: a rise of 0.160 GB against 0.267 GB with T5 running).
    timed_calls(model, 0, prompt, seed, warmup=1)  # one-time allocations are not drift
    before = torch.cuda.memory_allocated(device) if has_device else None
    profiling, model.profiling = model.profiling, True  # this call's phases with their own peaks
    try:
        model.generate(call_prompt(prompt, 0), seed=seed)
    finally:
        model.profiling = profiling
    call = model.last_call
    allocated = []
    for i in range(drift_calls):
        model.generate(call_prompt(prompt, i + 1), seed=seed + i)
        if has_device:
            torch.cuda.synchronize(device)
            allocated.append(torch.cuda.memory_allocated(device))
    return {
        "device_memory_available": has_device,
        "note": None if has_device else CPU_NOTE,
        "placement": model.info()["placement"],
        "weights": model.weight_report(),
        "plan": model.plan.to_dict(),
        "plans_this_checkpoint": plans(meta_components(model.source.path), model.dtype.itemsize),
        "plans_full_size": plans(meta_model("full"), 2),
        "resident_after_load": both_units(model.load_memory.allocated) if has_device else None,
        "timeline": [model.load_memory.to_dict()] + [m.to_dict() for m in call.memory],
        "rise_during_generate": both_units(call.peak - before) if has_device else None,
        "peak_during_generate": both_units(call.peak) if has_device else None,
        "reserved_peak_during_generate": both_units(call.peak_reserved) if has_device else None,
        "device_used_after_generate": both_units(device_used(device)) if has_device else None,
        "drift_calls": drift_calls,
        "drift_allocated_bytes": allocated,
        "drift": both_units(allocated[-1] - allocated[0]) if has_device else None,
    }


def measure_placement(model: str, device: str, quantization: str, placement: str, calls: int = 5,
                      prompt: str = DEFAULT_PROMPT, seed: int = 0) -> dict:
    """Load one placement and time `calls` generates (after one warm-up); meant for a fresh process."""
    from ..loading import load_flux_schnell

    rss_before = host_rss()
    m = load_flux_schnell(device=device, quantization=quantization, model=model, placement=placement)
    m.profiling = True  # a process of its own: each call's peaks are its own
    on_gpu = device_available(m.device)
    resident = torch.cuda.memory_allocated(m.device) if on_gpu else None
    rss_loaded = host_rss()
    rows = timed_calls(m, calls, prompt, seed, warmup=1)  # a new prompt each call: T5 runs every time
    times = [row["total"] for row in rows]
    peaks, reserved = [row.get("peak") for row in rows], [row.get("peak_reserved") for row in rows]
    result = {"placement": placement, "quantization": quantization, "device_name": m.info()["device_name"],
              "plan": m.plan.to_dict(), "load_seconds": round(m.load_seconds, 3),
              "host_rss_added": None if rss_before is None else rss_loaded - rss_before,
              "latency": summarize(times), "resident": resident,
              "peak_allocated": max(peaks) if on_gpu else None, "peak_reserved": max(reserved) if on_gpu else None,
              "phases": [p.to_dict() for p in m.last_call.memory]}
    if on_gpu:
        result["rise"] = result["peak_allocated"] - resident
    return result


def _in_fresh_process(function: str, kwargs: dict, timeout_s: float | None = None) -> dict:
    """On a GPU, in a fresh process (stopped after `timeout_s`): the memory Vortex reads after loading is that
    process's own. On a CPU, where no device memory is read, in this one."""
    try:
        if not _on_gpu(kwargs["device"]):
            return globals()[function](**kwargs)
        return call_in_fresh_process(f"fluxkit.lab.profiling:{function}", kwargs, timeout_s)
    except (FluxkitError, RuntimeError) as err:
        return {"placement": kwargs["placement"], "error": reason(err)}


def _on_gpu(device: str) -> bool:
    return device != "cpu" and torch.cuda.is_available()


def compare_placements(model: str, device: str, quantization: str, placements: list[str] | None = None,
                       calls: int = 5, seed: int = 0) -> list[dict]:
    """`measure_placement` for each placement, each in a fresh Python process on a GPU (as Vortex measures)."""
    check_number("calls", calls, 1, 100_000, integer=True)  # before a process loads 12 B parameters to time none
    return [_in_fresh_process("measure_placement", dict(model=str(model), device=device, quantization=quantization,
                                                        placement=placement, calls=calls, seed=seed))
            for placement in placements or available_placements()]


def beside_vortex(model: str, device: str, quantization: str, placement: str = "auto", calls: int = 100,
                  prompt: str = DEFAULT_PROMPT, seed: int = 0, sms: int | None = None) -> dict:
    """Vortex's co-tenancy check in this process (meant to be a fresh one), the host's way: the process capped at
    `budgets.vortex_total_gb` and its peak counters reset once, a ballast tensor holding the rest of Vortex's share,
    then Flux loaded with `placement` and nothing else (no `vram_limit_gb`: the cap is the host's), and `calls`
    generates into a pre-allocated buffer. The host's one peak reading covers the load and every call. The outcome
    is "refused" (at load, with the pre-flight's or the out-of-memory's figures), "failed" (a call's
    GenerationError, e.g. out of memory) or "ran", with the figures of what ran. `sms`: all of it (the ballast, the
    load and the calls) on that many SMs of the GPU, the RTX 3060 stand-in of fluxkit/lab/standin.py."""
    from . import standin

    if sms is None:
        return _beside_vortex(model, device, quantization, placement, calls, prompt, seed)
    piece = standin.open_slice(sms, device)
    with standin.on(piece):
        row = _beside_vortex(model, device, quantization, placement, calls, prompt, seed)
    return {**row, "stand_in": piece.to_dict()}


def _beside_vortex(model: str, device: str, quantization: str, placement: str, calls: int, prompt: str,
                   seed: int) -> dict:
    from ..loading import load_flux_schnell
    from ..preflight import process_cap_bytes, resolve_device

    dev = resolve_device(device)
    preset = load_preset(quantization)
    if placement != "auto":
        placement = load_placement(placement).name  # bad names fail before any work
    row = {"placement": placement, "quantization": quantization}
    if not device_available(dev):
        return {**row, "applicable": False, "reason": "needs a CUDA device: the cap and the ballast are device memory"}
    budgets, size = preset.budgets, preset.generation
    torch.cuda.set_per_process_memory_fraction(
        budgets.vortex_total_gb * GB / torch.cuda.get_device_properties(dev).total_memory, dev)
    cap = process_cap_bytes(dev)
    torch.cuda.reset_peak_memory_stats(dev)  # the host's one reset: its reading spans the load and every call
    ballast = torch.empty(int(budgets.rest_of_vortex_gb * GB), dtype=torch.uint8, device=dev)  # held until return
    before = torch.cuda.memory_allocated(dev)  # the allocator rounds the ballast up to 2 MiB
    row.update(applicable=True, device_name=torch.cuda.get_device_name(dev), cap_gb=budgets.vortex_total_gb,
               ballast_bytes=ballast.numel())
    try:
        m = load_flux_schnell(device=dev, quantization=preset, model=model, placement=placement)
    except VortexInitializationError as err:
        return {**row, "outcome": "refused", "required_gb": err.required_vram_gb, "available_gb": err.available_vram_gb,
                "left_allocated_bytes": torch.cuda.memory_allocated(dev) - before, "message": err.message}
    row.update(placement=m.placement.name, placement_reason=m.placement_reason,
               resident_bytes=torch.cuda.memory_allocated(dev) - before, planned_resident_bytes=m.plan.resident_bytes,
               quantized_layers=m.quantized_layers)
    buffer = torch.empty((size.height, size.width, 3), dtype=torch.float32)
    rows = []
    try:
        timed_calls(m, 0, prompt, seed, output=buffer, warmup=1)
        start, hits = torch.cuda.memory_allocated(dev), m.prompt_cache.hits
        for r in each_timed_call(m, calls, prompt, seed, output=buffer):  # a new prompt each, as Vortex's actors
            rows.append(r)
            log.info("co-tenancy call %d/%d: %.3f s %s", len(rows), calls, r["total"],  # a run cut short keeps these
                     " ".join(f"{p} {r[p]:.3f}" for p in PHASES))
    except GenerationError as err:
        return {**row, "outcome": "failed", "call": len(rows), "phase": err.phase, "message": str(err)}
    torch.cuda.synchronize(dev)
    return {**row, "outcome": "ran", "calls": calls, "drift_bytes": torch.cuda.memory_allocated(dev) - start,
            "process_peak_reserved_bytes": torch.cuda.max_memory_reserved(dev),
            "process_peak_allocated_bytes": torch.cuda.max_memory_allocated(dev),
            "cap_kept": process_cap_bytes(dev) == cap, "prompt_cache_hits": m.prompt_cache.hits - hits,
            "latency": summarize([r["total"] for r in rows]),
            "phases": {p: summarize([r[p] for r in rows]) for p in PHASES}}


def cotenancy(model: str, device: str, quantization: str, placements: list[str], calls: int = 100,
              seed: int = 0, sms: int | None = None, timeout_s: float | None = None) -> list[dict]:
    """`beside_vortex` for each placement, each in a fresh Python process stopped after `timeout_s` (its row then
    says so, and the log where it stalled); on a CPU, each row says why not."""
    check_number("calls", calls, 1, 100_000, integer=True)
    return [_in_fresh_process("beside_vortex", dict(model=str(model), device=device, quantization=quantization,
                                                    placement=placement, calls=calls, seed=seed, sms=sms), timeout_s)
            for placement in placements]


def cotenancy_table(rows: list[dict]) -> list[dict]:
    """The co-tenancy view (GB = 10**9 bytes): what happened to each placement beside the rest of Vortex."""
    table = []
    for r in rows:
        if "error" in r or not r.get("applicable"):
            table.append({"placement": r["placement"], "outcome": r.get("error") or r["reason"]})
        elif r["outcome"] == "refused":
            table.append({"placement": r["placement"], "outcome": "refused at load",
                          "required_gb": r["required_gb"], "available_gb": r["available_gb"]})
        elif r["outcome"] == "failed":
            table.append({"placement": r["placement"], "outcome": f"failed at call {r['call']} in {r['phase']}",
                          "resident_gb": round(r["resident_bytes"] / GB, 3)})
        else:
            table.append({"placement": r["placement"], "outcome": f"ran {r['calls']} calls",
                          "resident_gb": round(r["resident_bytes"] / GB, 3),
                          "process_peak_reserved_gb": round(r["process_peak_reserved_bytes"] / GB, 3),
                          "cap_gb": r["cap_gb"], "drift_mb": round(r["drift_bytes"] / 1e6, 2),
                          "p50_s": round(r["latency"]["p50"], 4), "p99_s": round(r["latency"]["p99"], 4)})
    return table


def placement_table(rows: list[dict]) -> list[dict]:
    """The side-by-side view (GB = 10**9 bytes): resident, peak, rise, host memory, P50; planned beside measured."""
    table = []
    for r in rows:
        if "error" in r:
            table.append({"placement": r["placement"], "error": r["error"]})
            continue
        gb = (lambda v: None if v is None else round(v / GB, 3))
        planned = r["plan"]["resident_bytes"]
        error = None if r["resident"] is None else r["resident"] - planned
        table.append({"placement": r["placement"], "resident_gb": gb(r["resident"]), "planned_resident_gb": gb(planned),
                      "resident_error_gb": gb(error),  # a relative error of a plan of 0 bytes means nothing
                      "resident_error_pct": None if error is None or planned == 0 else round(100 * error / planned, 2),
                      "peak_allocated_gb": gb(r["peak_allocated"]), "peak_reserved_gb": gb(r["peak_reserved"]),
                      "planned_peak_gb": gb(r["plan"]["peak_bytes"]), "rise_mb": None if r.get("rise") is None
                      else round(r["rise"] / 1e6, 1), "host_gb": gb(r["plan"]["host_bytes"]),
                      "host_rss_added_gb": gb(r["host_rss_added"]), "p50_s": round(r["latency"]["p50"], 4)})
    return table
