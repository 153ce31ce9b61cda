"""The latency projection's arithmetic on constructed inputs, and the side-by-side machinery on CPU."""
import dataclasses
import json

import pytest

from fluxkit import load_flux_schnell, load_placement, load_preset
from fluxkit.bench import bootstrap_ratio, lever_settings, load_levers, side_by_side
from fluxkit.checkpoint import meta_components
from fluxkit.errors import InputError
from fluxkit.estimate import Work, count_flops, cross_check, estimate_from_bench, gpu, gpu_of, project
from fluxkit.plan import plan_placement
from fluxkit.sampling import PHASES
from helpers import PROMPT, run_cli

ZERO = Work(0.0, 0.0, 0.0)


def _work(**phases):
    return {p: phases.get(p, ZERO) for p in PHASES}


def _measured(**phases):
    return {p: phases.get(p, 0.0) for p in PHASES}


def test_a_compute_bound_phase_scales_with_tensor_throughput():
    result = project(_work(denoise=Work(1e12, 0.0, 0.0)), _measured(denoise=0.01), "h100", ["rtx3060"], 1.0)
    row = result["phases"]["denoise"]
    assert row["bound"] == "compute"
    assert row["achieved_fraction"] == pytest.approx(1e12 / 989e12 / 0.01)
    assert row["projected_s"]["rtx3060"] == pytest.approx(0.01 * 989 / 25.5)  # by hand: same fraction of the peak


def test_a_memory_bound_phase_scales_with_bandwidth_and_a_link_bound_one_with_the_link():
    work = _work(text_encode=Work(0.0, 10e9, 0.0), copy=Work(0.0, 0.0, 3e6))
    result = project(work, _measured(text_encode=0.01, copy=0.001), "h200", ["rtx3060"], 1.2)
    assert result["phases"]["text_encode"]["projected_s"]["rtx3060"] == pytest.approx(0.01 * 4800 / 360)
    assert result["phases"]["copy"]["bound"] == "host link"
    assert result["phases"]["copy"]["projected_s"]["rtx3060"] == pytest.approx(0.001 * 50 / 25)
    total = 0.01 * 4800 / 360 + 0.001 * 50 / 25
    assert result["projected_p50_s"]["rtx3060"] == pytest.approx(total)
    assert result["projected_p99_s"]["rtx3060"] == pytest.approx(1.2 * total)
    assert result["label"] == "ESTIMATE" and "published peak" in result["assumptions"]


def test_the_binding_roofline_can_change_between_cards():
    # 150 FLOP per byte: memory-bound on an H100 (ridge at 295), compute-bound on an RTX 3060 (ridge at 71)
    work = _work(decode=Work(1.5e12, 10e9, 0.0))
    row = project(work, _measured(decode=0.006), "h100", ["rtx3060"], 1.0)["phases"]["decode"]
    assert row["bound"] == "memory" and row["target_bound"]["rtx3060"] == "compute"
    fraction = (10e9 / 3350e9) / 0.006
    assert row["projected_s"]["rtx3060"] == pytest.approx(1.5e12 / 25.5e12 / fraction)


def test_gpus_are_matched_by_device_name():
    assert gpu_of("NVIDIA H100 80GB HBM3") == "h100" and gpu_of("NVIDIA H200") == "h200"
    assert gpu_of("NVIDIA GeForce RTX 3060") == "rtx3060"
    assert gpu("rtx3060").bf16_tflops == 25.5
    with pytest.raises(InputError, match="no published figures"):
        gpu_of("Some Future GPU")
    with pytest.raises(InputError, match="gpu='v100'"):
        gpu("v100")


def test_flops_are_counted_on_the_meta_device(tiny_dir):
    meta = meta_components(tiny_dir)
    preset = load_preset("nf4")
    flops = count_flops(meta, preset.generation)
    assert all(flops[p] > 0 for p in ("text_encode", "denoise", "decode")) and flops["copy"] == 0
    import dataclasses

    two = dataclasses.replace(preset.generation, num_inference_steps=2)
    assert count_flops(meta, two)["denoise"] == pytest.approx(flops["denoise"] / 2)
    assert count_flops(meta, preset.generation, cfg=True)["denoise"] == pytest.approx(2 * flops["denoise"])


def _bench(device_name: str, phase_s: dict, tiny_dir) -> dict:
    total = sum(phase_s.values())
    summary = {p: {"p50": v, "p99": v} for p, v in phase_s.items()}
    summary["total"] = {"p50": total, "p99": 1.1 * total}
    return {"model": {"device_name": device_name, "preset": "nf4", "placement": {"name": "vortex"},
                      "model": {"synthetic": {"preset": "tiny", "seed": 0}, "path": str(tiny_dir)}},
            "plain": {"summary": summary}}


def test_cross_check_against_the_card_it_projects(tiny_dir):
    meta, preset, placement = meta_components(tiny_dir), load_preset("nf4"), load_placement("vortex")
    plan = plan_placement(meta, preset, placement)
    source = _bench("NVIDIA H200", {"text_encode": 0.2, "denoise": 0.3, "decode": 0.05, "copy": 0.002}, tiny_dir)
    projected = estimate_from_bench(source, meta, preset, placement, plan, ["h100"])
    target = _bench("NVIDIA H100 80GB HBM3", {p: projected["phases"][p]["projected_s"]["h100"] for p in PHASES},
                    tiny_dir)
    check = cross_check(source, target, meta, preset, placement, plan)
    assert check["end_to_end_error"] == pytest.approx(0.0, abs=1e-9) and check["usable"]
    slower = _bench("NVIDIA H100 80GB HBM3", {p: 1.3 * v for p, v in check["measured_s"].items()}, tiny_dir)
    assert not cross_check(source, slower, meta, preset, placement, plan)["usable"]  # 23% off


def test_estimate_cli_from_a_bench_file(tiny_dir, tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_bench("NVIDIA H200", {"text_encode": 0.2, "denoise": 0.3, "decode": 0.05,
                                                      "copy": 0.002}, tiny_dir)))
    run = run_cli("estimate", "--from", str(path), "--gpu", "rtx3060", "--json", str(tmp_path / "out.json"))
    assert run.returncode == 0, run.stderr
    assert "ESTIMATE from NVIDIA H200" in run.stdout and "rtx3060" in run.stdout
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["projected_p50_s"]["rtx3060"] > 0.552
    run = run_cli("estimate", "--model", str(tiny_dir), "--device", "cpu")
    assert run.returncode == 2 and "measures on a GPU" in run.stderr


def test_estimate_cli_checks_a_projection_against_the_other_card(tiny_dir, tmp_path):
    h200, h100, other = tmp_path / "h200.json", tmp_path / "h100.json", tmp_path / "other.json"
    h200.write_text(json.dumps(_bench("NVIDIA H200", {"text_encode": 0.2, "denoise": 0.3, "decode": 0.05,
                                                      "copy": 0.002}, tiny_dir)))
    slower = _bench("NVIDIA H100 80GB HBM3", {"text_encode": 0.4, "denoise": 0.39, "decode": 0.05, "copy": 0.002},
                    tiny_dir)
    h100.write_text(json.dumps(slower))
    run = run_cli("estimate", "--from", str(h200), "--check", str(h100), "--gpu", "h100", "--json",
                  str(tmp_path / "out.json"))
    assert run.returncode == 0, run.stderr
    check = json.loads((tmp_path / "out.json").read_text())["cross_check"]
    assert check["measured_s"]["denoise"] == 0.39 and check["error_by_phase"]["denoise"] < 0
    assert check["usable"] is (abs(check["end_to_end_error"]) <= 0.15)
    assert "cross-check: NVIDIA H200 projected to NVIDIA H100 80GB HBM3" in run.stdout
    assert f"error {check['end_to_end_error']:+.1%}" in run.stdout
    slower["model"]["placement"]["name"] = "resident"
    other.write_text(json.dumps(slower))
    run = run_cli("estimate", "--from", str(h200), "--check", str(other))
    assert run.returncode == 2 and "same preset and placement" in run.stderr
    run = run_cli("estimate", "--check", str(h100))
    assert run.returncode == 2 and "--from" in run.stderr


def test_bootstrap_ratio_of_known_samples():
    assert bootstrap_ratio([2.0] * 20, [1.0] * 20) == {"ratio": 2.0, "ci95": [2.0, 2.0]}
    spread = bootstrap_ratio([1.0, 2.0, 3.0] * 10, [1.0] * 30)
    assert spread["ratio"] == 2.0 and spread["ci95"][0] <= 2.0 <= spread["ci95"][1]


def test_side_by_side_interleaves_and_compares(tiny_dir):
    variants = {"plain": load_flux_schnell(device="cpu", model=tiny_dir),
                "same": load_flux_schnell(device="cpu", model=tiny_dir),
                "bf16": load_flux_schnell(device="cpu", quantization="bf16", model=tiny_dir)}
    result = side_by_side(variants, iterations=2, rounds=2, warmup=1, prompt=PROMPT)
    assert result["iterations"] == 2 and all(len(v["times"]) == 2 for v in result["variants"].values())
    assert set(result["ratios_to_plain"]) == {"same", "bf16"}
    assert result["agreement_psnr_db"]["same"] == float("inf")  # same weights, same seeds: the same images
    assert result["agreement_psnr_db"]["bf16"] < float("inf")
    # where fluxkit's time goes, and when each call started (to lay slow calls beside the card's clock log)
    for v in result["variants"].values():
        assert set(v["phases"]) == set(PHASES) and v["phases"]["denoise"]["n"] == 2
        assert v["phases"]["denoise"]["p50"] < v["summary"]["p50"]
        assert v["started"] == sorted(v["started"]) and len(v["started"]) == 2


def test_an_unknown_lever_is_refused_before_anything_loads(tiny_dir):
    with pytest.raises(InputError,
                       match="turbo: no such lever; choose from eager, no-cuda-graphs, reduce-overhead, untiled-decode, "
                             "whole-transformer"):
        load_levers(str(tiny_dir), "cpu", levers=("eager", "turbo"))


def test_each_lever_changes_only_its_own_fields():
    # the baseline's fluxkit_<lever> variants and --levers alone load from these settings
    preset, spec = load_preset("nf4"), load_placement("resident")
    levers = ("eager", "whole-transformer", "untiled-decode", "no-cuda-graphs", "reduce-overhead")
    settings = lever_settings("nf4", "resident", levers)
    assert list(settings) == list(levers)
    changed = {lever: ({f.name for f in dataclasses.fields(p) if getattr(p, f.name) != getattr(preset, f.name)},
                       {f.name for f in dataclasses.fields(s) if getattr(s, f.name) != getattr(spec, f.name)})
               for lever, (p, s) in settings.items()}
    assert changed == {"eager": ({"compile", "cuda_graphs"}, set()), "whole-transformer": ({"compile_scope"}, set()),
                       "untiled-decode": (set(), {"vae_tile_size"}), "no-cuda-graphs": ({"cuda_graphs"}, set()),
                       # torch.compile's graphs need the whole transformer, and replace fluxkit's own
                       "reduce-overhead": ({"compile_mode", "compile_scope", "cuda_graphs"}, set())}
    assert settings["whole-transformer"][0].compile_scope == "transformer" and preset.compile_scope == "blocks"


def test_a_variant_that_fails_to_load_is_kept_with_its_reason():
    """One lever this device cannot compile must not cost the side-by-side run of all the others."""
    from fluxkit.bench import _load_each

    def fails():
        raise RuntimeError("BackendCompilerFailed: no kernel for this card\nlong traceback")

    variants, resident, skipped = _load_each({"plain": object, "fluxkit_reduce-overhead": fails, "fluxkit": object})
    assert list(variants) == ["plain", "fluxkit"] and set(resident) == {"plain", "fluxkit"}
    assert skipped == {"fluxkit_reduce-overhead": "RuntimeError: BackendCompilerFailed: no kernel for this card long "
                                              "traceback"}  # the whole message, on one line
    with pytest.raises(RuntimeError, match="no kernel"):  # what the others are compared with must load
        _load_each({"plain": fails, "fluxkit": object})
