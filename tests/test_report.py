"""evaluate_budgets decides pass / fail / not applicable: table-driven on constructed metrics."""
import copy

import pytest

from fluxkit import load_preset
from fluxkit.lab.report import evaluate_budgets

GB = 10**9


def _beside(outcome="ran", placement="vortex", process_peak=11.67):
    """A co-tenancy row as `fluxkit.profiling.beside_vortex` writes it."""
    row = {"placement": placement, "applicable": True, "outcome": outcome, "cap_gb": 11.8, "ballast_bytes": int(5.8 * GB)}
    return {"ran": {**row, "calls": 100, "process_peak_reserved_bytes": int(process_peak * GB)},
            "refused": {**row, "required_gb": 11.5, "available_gb": 6.0},
            "failed": {**row, "call": 7, "phase": "denoise"}}[outcome]


def _metrics(resident=5.6, peak=5.8, reserved=5.95, rise=0.2, drift=0.0, p99=0.7, device="NVIDIA H100 80GB HBM3",
             size="full", on_gpu=True, cosine=0.99, beside=None):
    units = (lambda gb: {"bytes": int(gb * GB), "gb": gb, "gib": gb * GB / 2**30})
    return {"model": {"synthetic": {"preset": size, "seed": 0}}, "device_name": device, "placement": {"name": "vortex"},
            "latency": {"plain": {"summary": {"total": {"p99": p99}}}},
            "vram": {"device_memory_available": on_gpu, "drift_calls": 100,
                     "resident_after_load": units(resident) if on_gpu else None,
                     "peak_during_generate": units(peak) if on_gpu else None,
                     "reserved_peak_during_generate": units(reserved) if on_gpu else None,
                     "rise_during_generate": units(rise) if on_gpu else None,
                     "drift": units(drift) if on_gpu else None, "beside_vortex": beside},
            "quality": {"clip_real": True, "cases": [{"name": "a", "clip_image_cosine": cosine,
                                                      "passed": cosine >= 0.7}]}}


P, F, N = "pass", "fail", "not applicable"
CASES = {
    "vortex fits": (dict(), dict(flux_resident=P, flux_peak=P, vortex_total=P, generate_rise=P, drift=P,
                                 p99_latency=N, clip_image_cosine_min=P)),
    "resident placement": (dict(resident=10.7, peak=11.3, reserved=11.4),
                           dict(flux_resident=F, flux_peak=F, vortex_total=F, generate_rise=P)),
    "below the band": (dict(resident=5.0, peak=5.3, reserved=5.4), dict(flux_resident=F, flux_peak=P, vortex_total=P)),
    "reserved over the total": (dict(reserved=6.05), dict(flux_peak=P, vortex_total=F)),
    "peak reserved over the peak budget": (dict(reserved=6.6), dict(flux_peak=F)),
    "rise and drift": (dict(rise=0.6, drift=0.06), dict(generate_rise=F, drift=F)),
    "negative drift counts": (dict(drift=-0.06), dict(drift=F)),
    "tiny weights on a GPU": (dict(size="tiny"), dict(flux_resident=N, flux_peak=N, vortex_total=N, generate_rise=N,
                                                     drift=P, p99_latency=N)),
    "CPU": (dict(on_gpu=False, size="tiny", device="cpu"), dict(flux_resident=N, flux_peak=N, vortex_total=N,
                                                                generate_rise=N, drift=N)),
    "target card, fast enough": (dict(device="NVIDIA GeForce RTX 3060", p99=11.0), dict(p99_latency=P)),
    "target card, too slow": (dict(device="NVIDIA GeForce RTX 3060", p99=12.5), dict(p99_latency=F)),
    "quality case fails": (dict(cosine=0.5), dict(clip_image_cosine_min=F)),
    # judged on the co-tenancy run of the report's placement when there is one, not on the uncapped reserve
    "ran beside Vortex within the cap": (dict(reserved=6.16, beside=[_beside()]), dict(flux_peak=P, vortex_total=P)),
    "over the cap beside Vortex": (dict(beside=[_beside(process_peak=11.85)]), dict(vortex_total=F)),
    "refused beside Vortex": (dict(beside=[_beside("refused")]), dict(vortex_total=F)),
    "a call failed beside Vortex": (dict(beside=[_beside("failed")]), dict(vortex_total=F)),
    "co-tenancy of another placement only": (dict(reserved=6.16, beside=[_beside(placement="resident")]),
                                             dict(vortex_total=F)),
    "co-tenancy on CPU": (dict(reserved=6.16, beside=[{"placement": "vortex", "applicable": False, "reason": "x"}]),
                          dict(vortex_total=F)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_budget_verdicts(case):
    changes, expected = CASES[case]
    verdicts = {v["name"]: v for v in evaluate_budgets(_metrics(**changes), load_preset("nf4"))}
    assert {name: verdicts[name]["status"] for name in expected} == expected
    for v in verdicts.values():
        assert v["status"] != N or v["note"], f"{v['name']}: not applicable without a reason"


def test_units_are_stated():
    verdicts = {v["name"]: v for v in evaluate_budgets(_metrics(), load_preset("nf4"))}
    assert verdicts["flux_resident"]["unit"] == "GB" and "GiB" in verdicts["flux_resident"]["note"]
    assert verdicts["vortex_total"]["value"] == pytest.approx(5.95 + 5.8) and "uncapped" in verdicts["vortex_total"]["note"]
    beside = {v["name"]: v for v in evaluate_budgets(_metrics(beside=[_beside()]), load_preset("nf4"))}["vortex_total"]
    assert beside["value"] == pytest.approx(11.67) and "ballast" in beside["note"] and "capped at 11.8" in beside["note"]


def test_missing_sections_give_no_verdicts():
    metrics = _metrics()
    for section in ("latency", "vram", "quality"):
        partial = copy.deepcopy(metrics)
        del partial[section]
        assert evaluate_budgets(partial, load_preset("nf4"))
    assert evaluate_budgets({"model": metrics["model"], "device_name": "x"}, load_preset("nf4")) == []
