"""GPU: Flux beside the rest of Vortex on one card (`fluxkit.profiling.cotenancy`, each placement in a fresh
process). The process is capped at Vortex's 11.8 GB and a ballast tensor takes the rest of Vortex's 5.8 GB
before Flux loads: the vortex placement must load and run 100 calls without an OOM or drift, and the resident
placement must be refused at load by pre-flight."""
import json

import pytest

from fluxkit import load_preset
from fluxkit.lab.profiling import cotenancy

pytestmark = pytest.mark.gpu
GB = 10**9


def test_resident_placement_is_refused_beside_the_rest_of_vortex(full_dir):
    budgets = load_preset("nf4").budgets
    [row] = cotenancy(full_dir, "cuda", "nf4", ["resident"])
    print(f"\nresident beside Vortex: {json.dumps(row)}")
    assert row["outcome"] == "refused"
    assert row["required_gb"] > row["available_gb"]
    assert row["available_gb"] == pytest.approx(budgets.flux_share_gb, abs=0.05)
    assert row["left_allocated_bytes"] == 0  # refused before anything was loaded


def test_vortex_placement_runs_beside_the_rest_of_vortex(full_dir, placement="auto"):
    """The host's way: its own cap and one peak reading across the load and 100 calls; the default placement (auto)
    picks vortex there."""
    budgets = load_preset("nf4").budgets
    [row] = cotenancy(full_dir, "cuda", "nf4", [placement], calls=100)
    print(f"\nvortex beside Vortex: {json.dumps(row)}")
    assert row["outcome"] == "ran", row
    print(f"Flux resident {row['resident_bytes'] / GB:.3f} GB ({row['resident_bytes'] / 2**30:.3f} GiB), planned "
          f"{row['planned_resident_bytes'] / GB:.3f}; process peak reserved {row['process_peak_reserved_bytes'] / GB:.3f}"
          f" GB; drift {row['drift_bytes'] / 1e6:.2f} MB; P50 {row['latency']['p50']:.3f} s, P99 "
          f"{row['latency']['p99']:.3f} s; phase P50 (s): "
          + ", ".join(f"{k} {v['p50']:.3f}" for k, v in row["phases"].items()))
    assert row["placement"] == "vortex" and row["cap_kept"] and row["prompt_cache_hits"] == 0  # a new prompt each
    assert abs(row["drift_bytes"]) < budgets.drift_mb * 1e6
    assert row["process_peak_reserved_bytes"] <= budgets.vortex_total_gb * GB
    # the one reading covers the ballast and Flux: nothing reset it in between
    assert row["process_peak_allocated_bytes"] >= row["ballast_bytes"] + row["resident_bytes"]


def test_fluxkit_never_resets_the_host_s_peaks_nor_raises_its_cap(full_dir, monkeypatch):
    import torch

    from fluxkit import load_flux_schnell

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(11.8 * GB / total)  # the host's cap
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: calls.append("reset_peak_memory_stats"))
    try:
        model = load_flux_schnell("cuda", "nf4", full_dir, vram_limit_gb=40.0)  # asks for more than the host allows
        for i in range(3):
            model.generate(f"a cat, take {i}", seed=i)
        assert torch.cuda.get_per_process_memory_fraction() == pytest.approx(11.8 * GB / total)
        assert calls == []
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
