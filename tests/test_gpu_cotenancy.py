"""GPU: Flux beside the rest of Vortex on one card. The process is capped at Vortex's 11.8 GB and a ballast
tensor takes the rest of Vortex's 5.8 GB before Flux loads: the vortex placement must load and run 100 calls
without an OOM or drift, and the resident placement must be refused by pre-flight. Run this file in its own
process (a fresh CUDA context): `pytest -s tests/test_gpu_cotenancy.py`."""
import time

import pytest
import torch

from fluxkit import VortexInitializationError, load_flux_schnell, load_preset
from fluxkit.memory import release_device_memory
from fluxkit.metrics import summarize
from helpers import PROMPT

pytestmark = pytest.mark.gpu
GB = 10**9


@pytest.fixture
def rest_of_vortex():
    budgets = load_preset("nf4").budgets
    torch.cuda.set_per_process_memory_fraction(budgets.vortex_total_gb * GB / torch.cuda.get_device_properties(0).total_memory)
    ballast = torch.empty(int(budgets.rest_of_vortex_gb * GB), dtype=torch.uint8, device="cuda")
    yield budgets, torch.cuda.memory_allocated()  # the allocator rounds the ballast up to 2 MiB
    del ballast
    release_device_memory(torch.device("cuda"))
    torch.cuda.set_per_process_memory_fraction(1.0)


# First in the file: a vortex failure below would still hold its memory (its traceback keeps the model).
def test_resident_placement_is_refused_beside_the_rest_of_vortex(full_dir, rest_of_vortex):
    budgets, ballast = rest_of_vortex
    with pytest.raises(VortexInitializationError) as info:
        load_flux_schnell(device="cuda", model=full_dir, placement="resident",
                          vram_limit_gb=budgets.vortex_total_gb)
    err = info.value
    print(f"\nresident refused: required {err.required_vram_gb} GB, available {err.available_vram_gb} GB")
    assert err.required_vram_gb > err.available_vram_gb
    assert err.available_vram_gb == pytest.approx(budgets.flux_share_gb, abs=0.05)
    assert torch.cuda.memory_allocated() == ballast  # refused before anything was loaded


def _largest_rises(calls: list) -> str:
    """Per phase, the largest rise above the phase's start over the calls so far, in GB: the working memory a
    placement needs, measured under the cap."""
    rises: dict[str, int] = {}
    for call in calls:
        for m in call.memory:
            rises[m.phase] = max(rises.get(m.phase, 0), m.rise)
    return ", ".join(f"{phase} +{rise / GB:.3f}" for phase, rise in rises.items())


def test_vortex_placement_runs_beside_the_rest_of_vortex(full_dir, rest_of_vortex):
    budgets, before = rest_of_vortex
    model = load_flux_schnell(device="cuda", model=full_dir, placement="vortex", vram_limit_gb=budgets.vortex_total_gb)
    resident = torch.cuda.memory_allocated() - before
    print(f"\nFlux resident {resident / GB:.3f} GB ({resident / 2**30:.3f} GiB), planned {model.plan.resident_bytes / GB:.3f}")
    buffer = torch.empty((512, 512, 3), dtype=torch.float32)
    calls, times = [], []
    try:
        model.generate(PROMPT, seed=0, output=buffer)  # warm-up
        calls.append(model.last_call)
        torch.cuda.synchronize()
        start_alloc = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for i in range(100):
            t0 = time.perf_counter()
            model.generate(PROMPT if i % 2 else f"{PROMPT}, variant {i}", seed=i, output=buffer)
            times.append(time.perf_counter() - t0)
            calls.append(model.last_call)
    finally:  # also when a call runs out of memory: what the calls before it needed
        print(f"\n{len(calls)} calls; largest rise per phase: {_largest_rises(calls)}")
    torch.cuda.synchronize()
    drift = torch.cuda.memory_allocated() - start_alloc
    s = summarize(times)
    peak_reserved = torch.cuda.max_memory_reserved()
    print(f"vortex beside {budgets.rest_of_vortex_gb} GB ballast, cap {budgets.vortex_total_gb} GB: process peak reserved "
          f"{peak_reserved / GB:.3f} GB, drift {drift / 1e6:.2f} MB over 100 calls, P50 {s['p50']:.3f} s, "
          f"P99 {s['p99']:.3f} s, streamed modulation layers {len(model.modulation.parked)}")
    assert abs(drift) < budgets.drift_mb * 1e6
    assert peak_reserved <= budgets.vortex_total_gb * GB
