"""The SM-slice stand-in (`fluxkit bench --sms`, fluxkit/lab/standin.py): on the CPU its checks and refusals, the
projection's arithmetic with a slice as the target, and the report and plot of the committed stand-in run; on a GPU,
a clean exit after a slice."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_estimate import _bench

from fluxkit.errors import InputError
from fluxkit.lab import plots, standin
from fluxkit.lab.estimate import cross_check, estimate_from_bench, measured_spec
from fluxkit.lab.report import STAND_IN_PASS, evaluate_budgets
from helpers import run_cli, run_main

# The stand-in run of 2026-12-05 on an H200: the benches (whole card, 66/33/16/8 SMs) and the co-tenancy check on 8 SMs
RUN_DIR = Path(__file__).resolve().parents[1] / "reports" / "H200-2026-12-05-runs" / "standin"
RUN = RUN_DIR / "standin.json"


@pytest.mark.parametrize("sms,match", [(True, "sms must be an int"), ("8", "sms must be an int"),
                                       (8, "needs a CUDA GPU")])
def test_a_slice_is_refused_with_the_reason(sms, match):
    assert match in standin.refused(sms, "cpu")


@pytest.mark.parametrize("args,match", [
    (["bench", "--sms", "8", "--device", "cpu"], "--sms: an SM slice confines CUDA work: it needs a CUDA GPU"),
    (["bench", "--sms", "0"], "argument --sms: 0 is outside"),
    (["bench", "--sms", "8", "--levers", "eager"], "--sms times one configuration"),
    (["validate", "--sms", "8", "--device", "cpu"], "sms: an SM slice confines CUDA work"),
])
def test_the_cli_refuses_a_slice_before_any_load(args, match):
    code, _, err = run_main(*args)
    assert code == 2 and err.count("\n") == 1 and match in err, err


def test_a_slice_s_record_holds_no_live_cuda_object():
    """The context and its stream are live CUDA objects: a report that copied them failed to be written (H200)."""
    piece = standin.SMSlice(8, "NVIDIA H200", 132, {"bf16_tflops": 52.0, "copy_gbps": 648.0}, context=object(),
                            stream=object())
    assert json.loads(json.dumps(piece.to_dict())) == {"sms": 8, "device_name": "NVIDIA H200", "total_sms": 132,
                                                      "peaks": {"bf16_tflops": 52.0, "copy_gbps": 648.0}}


def test_projection_to_a_slice_scales_by_the_measured_peaks(tiny_dir):
    """Both runs measured their peaks: the projection scales each class of kernel time by their ratio (compute by
    the product's rate, the rest by the copy's), and keeps the host link and the waits."""
    from fluxkit import load_placement, load_preset
    from fluxkit.checkpoint import meta_components
    from fluxkit.plan import plan_placement

    phases = {"text_encode": 0.2, "denoise": 0.3, "decode": 0.05, "copy": 0.002}
    whole = {**_bench("NVIDIA H200", phases, tiny_dir), "peaks": {"bf16_tflops": 720.0, "copy_gbps": 4100.0}}
    sliced = {**_bench("NVIDIA H200", {p: 2 * v for p, v in phases.items()}, tiny_dir),
              "peaks": {"bf16_tflops": 72.0, "copy_gbps": 820.0},
              "stand_in": {"sms": 8, "total_sms": 132, "device_name": "NVIDIA H200", "peaks": {}}}
    spec = measured_spec(sliced)
    assert (spec.name, spec.bf16_tflops, spec.memory_gbps) == ("NVIDIA H200, 8 of 132 SMs", 72.0, 820.0)
    meta, preset, placement = meta_components(tiny_dir), load_preset("nf4"), load_placement("vortex")
    plan = plan_placement(meta, preset, placement)
    check = cross_check(whole, sliced, meta, preset, placement, plan)
    # denoise: compute 0.15 s x 10, memory 0.075 s x 5, the wait (0.3 - 0.225) kept: 1.5 + 0.375 + 0.075
    assert check["projected_s"]["denoise"] == pytest.approx(1.95)
    assert check["target"] == "NVIDIA H200, 8 of 132 SMs" and check["error_by_phase"]["denoise"] == pytest.approx(
        1.95 / 0.6 - 1)
    # a stand-in run projects from its own measured peaks: to the 3060, compute x 72 / 25.5, memory x 820 / 360
    card = estimate_from_bench(sliced, meta, preset, placement, plan, ["rtx3060"])
    assert card["source_peaks"]["bf16_tflops"] == 72.0
    assert card["phases"]["denoise"]["projected_s"]["rtx3060"] == pytest.approx(0.3 * 72 / 25.5 + 0.15 * 820 / 360
                                                                                + 0.15)


@pytest.fixture(scope="module")
def run():
    return json.loads(RUN.read_text())


@pytest.fixture(scope="module")
def analysis(run):
    return standin.analyse(run)


def test_the_estimator_holds_across_a_16x_range_of_compute(analysis):
    rows = analysis["check"]
    assert [r["sms"] for r in rows] == [66, 33, 16, 8]
    assert all(r["usable"] for r in rows), [round(r["p50_error"], 3) for r in rows]  # within 15% end to end


def test_the_3060_from_the_8_sm_slice_and_its_report(run, analysis, tmp_path):
    card = analysis["rtx3060"]
    assert card["from_sms"] == 8 and "not a measurement of an RTX 3060" in card["label"]
    for link in ("PCIe 4.0 x16", "PCIe 3.0 x16"):
        low, high = card[link]["p99_spread_s"]
        assert low <= card[link]["p99_s"] <= high < 12.0  # the task's P99, with the spread
    assert card["PCIe 3.0 x16"]["p50_s"] > card["PCIe 4.0 x16"]["p50_s"]  # T5 streams over the slower link
    text = standin.markdown(analysis)
    assert "| 8 | 2.481 |" in text and "PCIe 3.0 x16" in text
    plots.standin(run, analysis, tmp_path)
    assert (tmp_path / "standin.png").stat().st_size > 10_000


def test_validate_judges_the_stand_in_on_its_own_line(run):
    from fluxkit import load_preset

    bench = run["full_card_bench"]
    stand_in = {"sms": 8, "total_sms": 132, "device_name": "NVIDIA H200", "peaks": {"bf16_tflops": 52.0,
                                                                                   "copy_gbps": 648.0},
                "rtx3060": {"applicable": True, "label": standin.LABEL,
                            "p99_s": {"PCIe 4.0 x16": 4.8, "PCIe 3.0 x16": 5.1}}}
    metrics = {"model": bench["model"]["model"], "device_name": "NVIDIA H200", "placement": bench["model"]["placement"],
               "latency": {**bench, "stand_in": stand_in}}
    verdicts = {v["name"]: v for v in evaluate_budgets(metrics, load_preset("nf4"))}
    assert verdicts["p99_latency"]["status"] == "not applicable"  # no RTX 3060 was measured
    line = verdicts["p99_latency_stand_in"]
    assert line["status"] == STAND_IN_PASS and line["value"] == 5.1 and "not a measurement" in line["note"]


def _slice_bench(whole: dict, sms: int, peaks: dict, total: dict, phases: dict) -> dict:
    """A slice's `fluxkit bench --sms N --json`, as the bench writes it, with the figures given."""
    summary = {**{p: {"p50": v, "p99": v} for p, v in phases.items()}, "total": total}
    return {**whole, "plain": {"summary": summary}, "peaks": peaks,
            "stand_in": {"sms": sms, "total_sms": 132, "device_name": whole["model"]["device_name"], "peaks": peaks}}


def test_a_stand_in_run_from_its_benches_and_the_co_tenancy_check(run, analysis, tmp_path):
    """`collect` turns the benches' JSON (the whole card's, each slice's) and the co-tenancy check's row into what
    `analyse` reads: the estimator checked per phase too, and the task's P50/P99/P99.9 beside the rest of Vortex on
    the slice with the RTX 3060 derived from it phase by phase."""
    from fluxkit.lab.estimate import setup_from_bench

    whole = {**run["full_card_bench"], "peaks": run["slice_peaks"]["whole_card"]}
    by_sms = run["slice_peaks"]["by_sms"]
    projected = {row["sms"]: row["projected_phases_s"] for row in analysis["check"]}
    benches = [whole] + [_slice_bench(whole, s["sms"], by_sms[str(s["sms"])], {
        "n": s["calls"], **{k: s[f"{k}_s"] for k in ("p50", "p90", "p99", "p99_9", "mean", "std")}},
        {p: 1.1 * v for p, v in projected[s["sms"]].items()}) for s in run["slices"]]  # each phase 10% slower
    phases = {p: {"p50": v, "p99": v + 0.01, "p99_9": v + 0.02} for p, v in projected[8].items()}
    cotenancy = [{"placement": "vortex", "outcome": "ran", "calls": 100, "cap_gb": 11.8, "resident_bytes": 5.551e9,
                  "process_peak_reserved_bytes": 11.641e9, "drift_bytes": 0, "cap_kept": True, "prompt_cache_hits": 0,
                  "stand_in": {"sms": 8, "total_sms": 132, "device_name": "NVIDIA H200", "peaks": by_sms["8"]},
                  "latency": {"p50": 2.437, "p99": 2.496, "p99_9": 2.51}, "phases": phases}]
    text = standin.write_report(standin.collect(benches, cotenancy), tmp_path)
    data = json.loads((tmp_path / "standin.json").read_text())
    result = standin.analyse(data)
    for row, committed in zip(result["check"], analysis["check"]):
        assert row["projected_p50_s"] == pytest.approx(committed["projected_p50_s"])
        assert row["phase_errors"] == pytest.approx({p: 1 / 1.1 - 1 for p in row["phase_errors"]})
    card = result["beside_vortex"]["rtx3060"]
    for link in standin.RTX3060.values():  # the same slice, the co-tenancy's P50 in place of the bench's
        assert card[link]["p50_s"] / result["rtx3060"][link]["p50_s"] == pytest.approx(
            2.437 / run["slices"][0]["p50_s"])
        assert card[link]["p99_9_s"] - card[link]["p50_s"] == pytest.approx(2.51 - 2.437)
    # each phase measured as projected on the slice: on the 3060, each is the projection to the 3060 itself
    meta, preset, placement, plan = setup_from_bench(whole, "test")
    to_3060 = estimate_from_bench(whole, meta, preset, placement, plan, ["rtx3060"], measured_spec(whole))
    assert {p: t["p50_s"] for p, t in card["PCIe 4.0 x16"]["phases_s"].items()} == pytest.approx(
        {p: to_3060["phases"][p]["projected_s"]["rtx3060"] for p in phases})
    assert card["PCIe 4.0 x16"]["phases_s"]["denoise"]["p99_s"] - card["PCIe 4.0 x16"]["phases_s"]["denoise"][
        "p50_s"] == pytest.approx(0.01)
    assert text == standin.markdown(result) == (tmp_path / "standin.md").read_text()
    assert ("Beside the rest of Vortex on 8 SMs (100 calls, a new prompt each: 0 prompt-cache hits; 11.8 GB cap): "
            "5.551 GB resident") in text
    assert "| denoise | " in text and "| text_encode error |" in text
    assert (tmp_path / "standin.png").stat().st_size > 10_000
    with pytest.raises(InputError, match="needs one whole-card bench"):
        standin.collect(benches[1:])
    with pytest.raises(InputError, match="the 8-SM slice's bench"):
        standin.collect([b for b in benches if b.get("stand_in", {}).get("sms") != 8])


def test_the_committed_report_comes_from_its_runs_own_json(run, analysis):
    """The committed benches' and co-tenancy check's JSON, through `collect` and `analyse`, give the committed
    report's figures (to 1e-9: the projection's FLOP counts are the same on any CPU, its sums may differ in the last
    bit); the co-tenancy check ran 100 calls on 8 SMs, each with a new prompt."""
    benches = [json.loads(f.read_text()) for f in sorted(RUN_DIR.glob("bench_sms_*.json"))]
    data = standin.collect(benches, json.loads((RUN_DIR / "cotenancy_sms_8.json").read_text()))
    result = standin.analyse(data)
    assert [r["sms"] for r in result["check"]] == [66, 33, 16, 8]
    for row, committed in zip(result["check"], analysis["check"]):
        assert row["p50_error"] == pytest.approx(committed["p50_error"], abs=1e-9)
    vortex = result["beside_vortex"]
    assert (vortex["sms"], vortex["calls"], vortex["prompt_cache_hits"], vortex["cap_kept"]) == (8, 100, 0, True)
    assert vortex["rtx3060"]["PCIe 4.0 x16"]["p99_s"] == pytest.approx(
        analysis["beside_vortex"]["rtx3060"]["PCIe 4.0 x16"]["p99_s"], abs=1e-9)
    assert vortex["rtx3060"]["PCIe 3.0 x16"]["p99_s"] < 12.0  # the task's P99, on the stand-in scaled


# A notebook's kernel, as 02_latency under `fluxkit validate --sms`: the slice and the model made on it stay globals
# until the interpreter exits, which frees them in no set order (the slice first, in a module's dict order).
SESSION_ON_A_SLICE = """import sys
import fluxkit
from fluxkit.lab import standin
stand_in = standin.open_slice(8, "cuda")
with standin.on(stand_in):
    m = fluxkit.load_flux_schnell(device="cuda", quantization="nf4", model=sys.argv[1])
    image = m.generate("a red fox", seed=0)
print("generated")
"""


@pytest.mark.gpu
@pytest.mark.parametrize("way", ["bench", "session"])
def test_a_process_that_used_a_slice_exits_cleanly(way, tiny_dir, tmp_path):
    """Status 0 whatever is still alive at exit: a green context destroyed before a tensor made on its stream aborted
    the process when the tensor was freed ("context is destroyed", status 134, H200), after its output was written."""
    if way == "bench":
        run = run_cli("bench", "--model", str(tiny_dir), "--device", "cuda", "--sms", "8", "--iterations", "2",
                      "--no-true-cfg", "--json", str(tmp_path / "bench.json"))
    else:
        run = subprocess.run([sys.executable, "-c", SESSION_ON_A_SLICE, str(tiny_dir)], capture_output=True,
                             text=True, timeout=900)
    assert run.returncode == 0 and "context is destroyed" not in run.stderr, run.stderr[-3000:]
    if way == "bench":
        assert json.loads((tmp_path / "bench.json").read_text())["stand_in"]["sms"] == 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine makes the context")
@pytest.mark.filterwarnings("ignore:Error while querying CUDA driver version")
def test_a_context_torch_cannot_make_is_refused_with_its_reason():
    """torch's own refusal (its build has no CUDA here) reaches the user as one InputError; a call torch does not
    take (torch 2.14 made `create`'s arguments keyword-only) would be a TypeError, a bug in fluxkit, not a refusal."""
    with pytest.raises(InputError, match="cannot make a green context"):
        standin._green_context(8, 0)
