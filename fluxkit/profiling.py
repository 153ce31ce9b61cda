"""VRAM profiles: one loaded model in depth, and every placement side by side, each in a fresh process.

Vortex reads `torch.cuda.memory_allocated()` right after loading Flux in a fresh process, so the
side-by-side comparison loads each placement in its own subprocess (`python -m fluxkit.profiling`)
and reports it the same way, next to the planner's prediction for it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from .bench import DEFAULT_PROMPT, call_prompt
from .config import available_placements, available_presets, load_placement, load_preset
from .errors import InputError
from .memory import CPU_NOTE, GB, both_units, device_available, device_used
from .metrics import summarize
from .plan import plan_placement
from .synthetic import meta_model


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
    from .checkpoint import meta_components

    if isinstance(drift_calls, bool) or not isinstance(drift_calls, int) or drift_calls < 2:
        raise InputError(f"drift_calls={drift_calls!r}: need at least 2 calls to measure drift")
    device = model.device
    has_device = device_available(device)

    def plans(meta: dict, dtype_bytes: int) -> dict:
        return {q: {p: plan_placement(meta, load_preset(q), load_placement(p), dtype_bytes).to_dict()
                    for p in available_placements()} for q in available_presets()}

    model.generate(prompt, seed=seed)  # warm-up: one-time allocations are not drift
    before = torch.cuda.memory_allocated(device) if has_device else None
    model.generate(prompt, seed=seed)
    call = model.last_call
    allocated = []
    for i in range(drift_calls):
        model.generate(prompt, seed=seed + i)
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
    from .loading import load_flux_schnell

    rss_before = host_rss()
    m = load_flux_schnell(device=device, quantization=quantization, model=model, placement=placement)
    on_gpu = device_available(m.device)
    resident = torch.cuda.memory_allocated(m.device) if on_gpu else None
    rss_loaded = host_rss()
    m.generate(call_prompt(prompt, -1), seed=seed)
    times, peaks, reserved = [], [], []
    for i in range(calls):  # a new prompt each call: T5 runs every time
        start = time.perf_counter()
        m.generate(call_prompt(prompt, i), seed=seed + i)
        times.append(time.perf_counter() - start)
        peaks.append(m.last_call.peak)
        reserved.append(m.last_call.peak_reserved)
    result = {"placement": placement, "quantization": quantization, "device_name": m.info()["device_name"],
              "plan": m.plan.to_dict(), "load_seconds": round(m.load_seconds, 3),
              "host_rss_added": None if rss_before is None else rss_loaded - rss_before,
              "latency": summarize(times), "resident": resident,
              "peak_allocated": max(peaks) if on_gpu else None, "peak_reserved": max(reserved) if on_gpu else None,
              "load_peak_reserved": m.load_memory.peak_reserved,
              "phases": [p.to_dict() for p in m.last_call.memory]}
    if on_gpu:
        result["resident_error"] = (resident - m.plan.resident_bytes) / max(m.plan.resident_bytes, 1)
        result["rise"] = result["peak_allocated"] - resident
    return result


def compare_placements(model: str, device: str, quantization: str, placements: list[str] | None = None,
                       calls: int = 5, seed: int = 0) -> list[dict]:
    """`measure_placement` for each placement, each in a fresh Python process (as Vortex measures)."""
    rows = []
    for placement in placements or available_placements():
        run = subprocess.run([sys.executable, "-m", "fluxkit.profiling", "--model", str(model), "--device", device,
                              "--quantization", quantization, "--placement", placement, "--calls", str(calls),
                              "--seed", str(seed)], capture_output=True, text=True, env=os.environ.copy())
        if run.returncode != 0:
            lines = run.stderr.strip().splitlines()
            rows.append({"placement": placement, "error": lines[-1] if lines else f"exit {run.returncode}"})
            continue
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    return rows


def placement_table(rows: list[dict]) -> list[dict]:
    """The side-by-side view (GB = 10**9 bytes): resident, peak, rise, host memory, P50; planned beside measured."""
    table = []
    for r in rows:
        if "error" in r:
            table.append({"placement": r["placement"], "error": r["error"]})
            continue
        gb = (lambda v: None if v is None else round(v / GB, 3))
        table.append({"placement": r["placement"], "resident_gb": gb(r["resident"]),
                      "planned_resident_gb": gb(r["plan"]["resident_bytes"]),
                      "resident_error_pct": None if r["resident"] is None else round(100 * r["resident_error"], 2),
                      "peak_allocated_gb": gb(r["peak_allocated"]), "peak_reserved_gb": gb(r["peak_reserved"]),
                      "planned_peak_gb": gb(r["plan"]["peak_bytes"]), "rise_mb": None if r.get("rise") is None
                      else round(r["rise"] / 1e6, 1), "host_gb": gb(r["plan"]["host_bytes"]),
                      "host_rss_added_gb": gb(r["host_rss_added"]), "p50_s": round(r["latency"]["p50"], 4)})
    return table


def _main() -> None:
    parser = argparse.ArgumentParser(description="measure one placement in this process; prints one JSON line")
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--placement", required=True)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="log each load stage's device memory")
    args = parser.parse_args()
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(measure_placement(args.model, args.device, args.quantization, args.placement, args.calls,
                                       seed=args.seed)))


if __name__ == "__main__":
    _main()
