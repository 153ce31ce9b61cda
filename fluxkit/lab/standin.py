"""A smaller card on a large one: every GPU phase of fluxkit confined to N SMs of the GPU with a CUDA green context.

No RTX 3060 is lent here, but an H200 confined to 8 of its 132 SMs reaches ~52 TFLOP/s bf16 and ~650 GB/s, about
2.0x a 3060 in compute and 1.8x in bandwidth: the only lent card balanced like one (its host link stays the
H200's). `SMSlice` measures what the slice reached (a bf16 matrix product and a device copy, inside it), and the
measurement scaled by the ratio of those peaks to a card's published ones is the stand-in's figure for that card:
a stand-in measurement scaled, never a measurement of that card.

The load and every call must run on the slice's stream: the caching allocator keeps blocks per stream, and a load
on the default stream with calls on the slice's ran out of memory under a cap it otherwise kept (H200, 8 SMs, 5.8 GB
ballast). `torch.cuda.green_contexts` needs torch 2.11 or newer and a driver with green contexts (CUDA 12.4+); the
split's granularity on an H200 is 8 SMs (asking for 2 or 4 gives 8).

A slice lives until the process exits, as torch's own pooled streams do: a green context destroyed while a tensor
made on its stream was still alive aborted the process when that tensor was freed ("context is destroyed", status
134, H200), and a notebook's kernel or a script frees its globals in no set order at exit.
"""
from __future__ import annotations

import ctypes
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError

# The probe of a slice's peaks: one of FLUX's token-wise products (1280 tokens x 3072 -> 12288), and a 512 MiB copy.
GEMM_SHAPE = (1280, 3072, 12288)
COPY_BYTES = 512 * 2**20
GEMM_REPEATS, COPY_REPEATS = 20, 10


def refused(sms: object, device: torch.device | str) -> str | None:
    """Why a slice of `sms` SMs cannot be made on `device`, or None."""
    if isinstance(sms, bool) or not isinstance(sms, int):
        return f"sms must be an int, got {type(sms).__name__}"
    device = torch.device("cuda" if device == "auto" else device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "an SM slice confines CUDA work: it needs a CUDA GPU (this run is on the CPU)"
    if not hasattr(torch.cuda, "green_contexts"):
        return f"torch {torch.__version__} has no torch.cuda.green_contexts (torch 2.11 or newer has)"
    total = torch.cuda.get_device_properties(device).multi_processor_count
    if not 1 <= sms <= total:
        return f"sms={sms}: {torch.cuda.get_device_name(device)} has {total} SMs; give 1..{total}"
    return None


@dataclass
class SMSlice:
    """A green context of `sms` SMs of one GPU, its stream, and the peaks measured inside it."""

    sms: int
    device_name: str
    total_sms: int
    peaks: dict = field(default_factory=dict)  # bf16_tflops, copy_gbps: measured inside the slice
    context: object = field(default=None, repr=False)
    stream: object = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """What a report keeps (the context and its stream are live CUDA objects: never copied)."""
        return {"sms": self.sms, "device_name": self.device_name, "total_sms": self.total_sms,
                "peaks": dict(self.peaks)}


def open_slice(sms: int, device: torch.device | str = "cuda") -> SMSlice:
    """A slice of `sms` SMs, its peaks measured; refused with the reason where it cannot be made. It is kept until the
    process exits: open one a process (a stand-in run is one configuration)."""
    reason = refused(sms, device)
    if reason:
        raise InputError(f"--sms: {reason}")
    device = torch.device("cuda" if device == "auto" else device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    context = _green_context(sms, index)
    props = torch.cuda.get_device_properties(index)
    piece = SMSlice(sms, props.name, props.multi_processor_count, context=context, stream=context.Stream())
    with on(piece):
        piece.peaks = measure_peaks(torch.device("cuda", index))
    return piece


def _green_context(sms: int, index: int):
    """A green context of `sms` SMs of GPU `index`, never destroyed (see the module's docstring)."""
    try:  # by keyword: torch 2.11 takes (num_sms, device_id), torch 2.14 takes them by keyword only
        context = torch.cuda.green_contexts.GreenContext.create(num_sms=sms, device_id=index)
    except RuntimeError as err:  # a driver, a build or a card without green contexts
        raise InputError(f"--sms: this driver or card cannot make a green context ({err})") from None
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(context))  # one reference nothing releases: the driver frees it at exit
    return context


@contextmanager
def on(piece: SMSlice | None):
    """Everything inside runs on the slice's stream (the load included); None: as it is."""
    if piece is None:
        yield
        return
    with torch.cuda.stream(piece.stream):
        yield


def measure_peaks(device: torch.device) -> dict:
    """bf16 matrix TFLOP/s and copy GB/s (bytes read plus written) on the current stream, timed with events after a
    warm-up; what the slice reached, which is what a projection from it scales by."""
    gemm_s, copy_s = _probe(device)
    torch.cuda.empty_cache()  # the probe's 1.1 GB back to the card before a cap or a ballast is set
    m, k, n = GEMM_SHAPE
    return {"bf16_tflops": round(2 * m * k * n / gemm_s / 1e12, 2), "copy_gbps": round(2 * COPY_BYTES / copy_s / 1e9, 1)}


def _probe(device: torch.device) -> tuple[float, float]:
    """Seconds of one product and of one copy."""
    m, k, n = GEMM_SHAPE
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16, generator=g)
    src = torch.randn(COPY_BYTES // 4, device=device, generator=g)
    dst = torch.empty_like(src)

    def timed(fn, repeats: int) -> float:
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream = torch.cuda.current_stream(device)
        start.record(stream)
        for _ in range(repeats):
            fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1000 / repeats

    return timed(lambda: a @ b, GEMM_REPEATS), timed(lambda: dst.copy_(src), COPY_REPEATS)


RTX3060 = {"rtx3060": "PCIe 4.0 x16", "rtx3060-pcie3": "PCIe 3.0 x16"}
RTX3060_SMS = 8  # the H200 slice balanced like a 3060: 2.0x its compute, 1.8x its bandwidth
LABEL = ("STAND-IN: measured on an SM slice of a larger GPU, each phase scaled by the ratio of the slice's measured "
         "peaks to the RTX 3060's published ones; not a measurement of an RTX 3060")


def record(piece: SMSlice, bench: dict, model) -> dict:
    """`bench` (run on `piece`) marked as a stand-in run, with what it says of an RTX 3060 on either host link."""
    from .estimate import for_model, gpu

    bench["stand_in"] = piece.to_dict()
    estimate = for_model(model, bench, tuple(RTX3060))
    card = gpu("rtx3060")
    bench["stand_in"]["rtx3060"] = {
        "label": LABEL, "applicable": estimate["applicable"],
        "slice_over_rtx3060": {"compute": piece.peaks["bf16_tflops"] / card.bf16_tflops,
                               "memory": piece.peaks["copy_gbps"] / card.memory_gbps},
        **({"p50_s": {link: estimate["projected_p50_s"][key] for key, link in RTX3060.items()},
            "p99_s": {link: estimate["projected_p99_s"][key] for key, link in RTX3060.items()},
            "phases_s": {phase: {link: row["projected_s"][key] for key, link in RTX3060.items()}
                         for phase, row in estimate["phases"].items()}} if estimate["applicable"] else
           {"reason": estimate["reason"]})}
    return bench["stand_in"]


# ---- what a stand-in run says: the estimator checked across slices, and the RTX 3060 from the 8-SM slice ------


def collect(benches: list[dict], cotenancy: list[dict] | None = None) -> dict:
    """A stand-in run, what `analyse` reads, from `fluxkit bench --json` results (the whole card's, without `--sms`,
    and each slice's) and, where it ran, the co-tenancy check on a slice (`profiling.cotenancy(..., sms=N)`)."""
    from ..sampling import PHASES
    from .estimate import check_bench

    for b in benches:
        check_bench(b, f"the bench on {b['stand_in']['sms']} SMs" if b.get("stand_in") else "the whole card's bench")
    whole = [b for b in benches if not b.get("stand_in")]
    if len(whole) != 1:
        raise InputError(f"a stand-in run needs one whole-card bench (without --sms), got {len(whole)}")
    [bench] = whole
    setups = {(b["model"]["preset"], b["model"]["placement"]["name"], b["model"]["device_name"]) for b in benches}
    if len(setups) != 1:
        raise InputError(f"the benches were measured with different presets, placements or cards ({sorted(setups)}); "
                         "a stand-in run compares slices of one card under one configuration")
    sliced = [b for b in benches if b.get("stand_in")]
    if RTX3060_SMS not in {b["stand_in"]["sms"] for b in sliced}:
        raise InputError(f"a stand-in run needs the {RTX3060_SMS}-SM slice's bench (fluxkit bench --sms "
                         f"{RTX3060_SMS}): the RTX 3060 is derived from it")
    slices = []
    for b in sliced:
        summary = b["plain"]["summary"]
        slices.append({"sms": b["stand_in"]["sms"], "calls": summary["total"]["n"], "peaks": b["stand_in"]["peaks"],
                       **{f"{k}_s": summary["total"][k] for k in ("p50", "p90", "p99", "p99_9", "mean", "std")},
                       "phases_s": {phase: summary[phase]["p50"] for phase in PHASES}})
    data = {"full_card_bench": bench, "total_sms": sliced[0]["stand_in"]["total_sms"],
            "slices": sorted(slices, key=lambda s: s["sms"]),
            "slice_peaks": {"source": "measured inside each slice by its own bench (fluxkit bench --sms)",
                            "whole_card": bench["peaks"], "by_sms": {str(s["sms"]): s["peaks"] for s in slices}}}
    ran = [row for row in cotenancy or [] if row.get("outcome") == "ran" and row.get("stand_in")]
    if ran:
        data["beside_vortex"] = ran[0]
    return data


def analyse(data: dict) -> dict:
    """What a stand-in run (`data`: the whole card's bench, the slices' P50 and P99, their peaks; `collect` makes
    it) says: the estimator checked against every slice (`check`), the RTX 3060 from the 8-SM slice (`rtx3060`)
    and, where the co-tenancy check ran on a slice, the task's P50/P99/P99.9 beside the rest of Vortex there and the
    RTX 3060 from it (`beside_vortex`)."""
    from .estimate import phase_work, setup_from_bench

    bench = data["full_card_bench"]
    meta, preset, placement, plan = setup_from_bench(bench, "the stand-in's whole-card bench")
    work = phase_work(meta, preset, placement, plan, preset.generation)  # FLOPs of the full model: counted once
    setup = (bench, meta, preset, placement, plan, work)
    check = estimator_check(data, setup)
    errors = [row["p50_error"] for row in check]
    [measured] = [s for s in data["slices"] if s["sms"] == RTX3060_SMS]
    [projected] = [row for row in check if row["sms"] == RTX3060_SMS]
    result = {"check": check, "rtx3060": rtx3060(measured, projected["projected_phases_s"],
                                                  projected["projected_p50_s"], errors, setup)}
    if data.get("beside_vortex"):
        result["beside_vortex"] = beside_vortex(data["beside_vortex"], data["slice_peaks"]["whole_card"], errors,
                                                setup)
    return result


def _to_slice(setup: tuple, sms: int, peaks: dict, whole: dict) -> dict:
    """The whole card's bench projected to a slice that reached `peaks` (`whole`: the whole card's, measured the
    same way): P50, P99 and each phase."""
    from .estimate import GpuSpec, estimate_from_bench, measured_spec

    bench, meta, preset, placement, plan, work = setup
    source = measured_spec(bench)
    target = GpuSpec(f"{sms} SMs", "", source.bf16_tflops * peaks["bf16_tflops"] / whole["bf16_tflops"],
                     source.memory_gbps * peaks["copy_gbps"] / whole["copy_gbps"], source.pcie_gbps)
    estimate = estimate_from_bench(bench, meta, preset, placement, plan, {"slice": target}, source, work)
    return {"p50_s": estimate["projected_p50_s"]["slice"], "p99_s": estimate["projected_p99_s"]["slice"],
            "phases_s": {p: r["projected_s"]["slice"] for p, r in estimate["phases"].items()}}


def estimator_check(data: dict, setup: tuple) -> list[dict]:
    """The whole-card bench projected to each slice of `data["slices"]`, with the slice's peaks (as fractions of the
    whole card's, measured the same way) as the target's, against what the slice measured: P50 and P99 end to
    end, and each phase where the slice's run kept its phases."""
    whole = data["slice_peaks"]["whole_card"]
    rows = []
    for measured in sorted(data["slices"], key=lambda s: -s["sms"]):
        projected = _to_slice(setup, measured["sms"], data["slice_peaks"]["by_sms"][str(measured["sms"])], whole)
        p50, p99 = projected["p50_s"], projected["p99_s"]
        row = {"sms": measured["sms"], "measured_p50_s": measured["p50_s"], "projected_p50_s": p50,
               "p50_error": p50 / measured["p50_s"] - 1, "measured_p99_s": measured["p99_s"],
               "projected_p99_s": p99, "p99_error": p99 / measured["p99_s"] - 1,
               "usable": abs(p50 / measured["p50_s"] - 1) <= 0.15, "projected_phases_s": projected["phases_s"]}
        if measured.get("phases_s"):
            row["phase_errors"] = {p: projected["phases_s"][p] / s - 1 for p, s in measured["phases_s"].items() if s > 0}
        rows.append(row)
    return rows


def rtx3060(measured: dict, slice_phases: dict, slice_p50: float, errors: list[float], setup: tuple) -> dict:
    """The RTX 3060 from a slice's measurement (`measured`: its sms, P50, P99, and P99.9 and each phase's where it
    has them; `slice_phases`, `slice_p50`: the whole card's bench projected to that slice): each phase of the
    projection to the 3060 calibrated by that phase's measured over projected time on the slice, the host link by the
    H200's to PCIe 4.0 or 3.0 x16; the tails add the slice's measured P99 - P50 (P99.9 - P50). The spread runs from
    a 3060 that reaches its published peaks to one that reaches the same fraction of them as the H200 reaches of its
    own, widened by the estimator's error across the slices (`errors`)."""
    from .estimate import GpuSpec, estimate_from_bench, gpu, gpu_of, measured_spec

    bench, meta, preset, placement, plan, work = setup
    measured_peaks, published = measured_spec(bench), gpu(gpu_of(bench["model"]["device_name"]))
    calibration = measured["p50_s"] / slice_p50  # the slice as measured, not as projected
    tails = {key: measured[f"{key}_s"] - measured["p50_s"] for key in ("p99", "p99_9") if f"{key}_s" in measured}
    phases = measured.get("phases", {})
    out = {"label": LABEL, "from_sms": measured["sms"], "measured_p50_s": measured["p50_s"],
           "measured_p99_s": measured["p99_s"], "estimator_error_range": [min(errors), max(errors)]}
    for key, link in RTX3060.items():
        card = gpu(key)
        # the same fraction of its peaks as the H200 reached of its own: the pessimistic end
        fraction = GpuSpec(card.name, "", card.bf16_tflops * measured_peaks.bf16_tflops / published.bf16_tflops,
                           card.memory_gbps * measured_peaks.memory_gbps / published.memory_gbps, card.pcie_gbps)
        estimate = estimate_from_bench(bench, meta, preset, placement, plan, {"peak": card, "as_h200": fraction},
                                       measured_peaks, work)
        p50 = estimate["projected_p50_s"]["peak"] * calibration
        worst = estimate["projected_p50_s"]["as_h200"] * calibration
        out[link] = {"p50_s": p50, **{f"{key}_s": p50 + tail for key, tail in tails.items()},
                     "p99_spread_s": [(p50 + tails["p99"]) * (1 + min(min(errors), 0)),
                                      (worst + tails["p99"]) * (1 + max(max(errors), 0))]}
        if phases:
            out[link]["phases_s"] = {}
        for phase, t in phases.items():
            if slice_phases.get(phase):  # each phase calibrated on its own: its measured over its projected time
                p50 = estimate["phases"][phase]["projected_s"]["peak"] * t["p50"] / slice_phases[phase]
                out[link]["phases_s"][phase] = {"p50_s": p50, "p99_s": p50 + t["p99"] - t["p50"],
                                                "p99_9_s": p50 + t["p99_9"] - t["p50"]}
    return out


def beside_vortex(row: dict, whole: dict, errors: list[float], setup: tuple) -> dict:
    """The co-tenancy check on a slice (`row`: `profiling.beside_vortex` with `sms`): what it measured, P50, P99
    and P99.9 end to end and per phase, and the RTX 3060 derived from it (`rtx3060`), with the slice's own peaks."""
    sms = row["stand_in"]["sms"]
    measured = {"sms": sms, **{f"{k}_s": row["latency"][k] for k in ("p50", "p99", "p99_9")},
                "phases": row["phases"]}
    projected = _to_slice(setup, sms, row["stand_in"]["peaks"], whole)
    return {"sms": sms, "calls": row["calls"], "cap_gb": row["cap_gb"], "resident_gb": row["resident_bytes"] / 1e9,
            "peak_reserved_gb": row["process_peak_reserved_bytes"] / 1e9, "drift_mb": row["drift_bytes"] / 1e6,
            "cap_kept": row["cap_kept"], "prompt_cache_hits": row["prompt_cache_hits"], "peaks": row["stand_in"]["peaks"],
            "measured": {"total": row["latency"], **row["phases"]},
            "rtx3060": rtx3060(measured, projected["phases_s"], projected["p50_s"], errors, setup)}


def markdown(analysis: dict) -> str:
    """The stand-in report's tables, from `analyse`."""
    lines = ["| SMs | measured P50 s | projected P50 s | error | measured P99 s | projected P99 s | error |",
             "|---|---|---|---|---|---|---|"]
    for row in analysis["check"]:
        lines.append(f"| {row['sms']} | {row['measured_p50_s']:.3f} | {row['projected_p50_s']:.3f} | "
                     f"{row['p50_error']:+.1%} | {row['measured_p99_s']:.3f} | {row['projected_p99_s']:.3f} | "
                     f"{row['p99_error']:+.1%} |")
    if any("phase_errors" in row for row in analysis["check"]):
        lines += ["", "| SMs | " + " | ".join(f"{p} error" for p in analysis["check"][0]["projected_phases_s"]) + " |",
                  "|---|" + "---|" * len(analysis["check"][0]["projected_phases_s"])]
        for row in (r for r in analysis["check"] if "phase_errors" in r):
            lines.append(f"| {row['sms']} | " + " | ".join(
                f"{row['phase_errors'][p]:+.1%}" if p in row["phase_errors"] else "-"
                for p in row["projected_phases_s"]) + " |")
    card = analysis["rtx3060"]
    lines += ["", f"{card['label']}.", "", "| host link | 3060 P50 s | 3060 P99 s | P99 spread s |", "|---|---|---|---|"]
    for link in RTX3060.values():
        low, high = card[link]["p99_spread_s"]
        lines.append(f"| {link} | {card[link]['p50_s']:.2f} | {card[link]['p99_s']:.2f} | {low:.2f}-{high:.2f} |")
    if "beside_vortex" in analysis:
        lines += ["", *_beside_vortex_markdown(analysis["beside_vortex"])]
    return "\n".join(lines) + "\n"


def write_report(data: dict, out_dir: Path) -> str:
    """A stand-in run's report in `out_dir`: the run (`standin.json`), its tables (`standin.md`, returned) and its
    plot (`standin.png`)."""
    from . import plots
    from .report import to_jsonable

    analysis = analyse(data)
    text = markdown(analysis)
    (out_dir / "standin.json").write_text(json.dumps(to_jsonable(data), indent=1) + "\n")
    (out_dir / "standin.md").write_text(text)
    plots.standin(data, analysis, out_dir)
    return text


def _beside_vortex_markdown(run: dict) -> list[str]:
    card = run["rtx3060"]
    lines = [f"Beside the rest of Vortex on {run['sms']} SMs ({run['calls']} calls, a new prompt each: "
             f"{run['prompt_cache_hits']} prompt-cache hits; {run['cap_gb']} GB cap): "
             f"{run['resident_gb']:.3f} GB resident, {run['peak_reserved_gb']:.3f} GB peak reserved, drift "
             f"{run['drift_mb']:+.1f} MB, cap kept: {run['cap_kept']}.", "",
             "| phase | P50 s | P99 s | P99.9 s | " + " | ".join(f"3060 P50 / P99 s ({link})" for link in RTX3060.values())
             + " |", "|---|---|---|---|" + "---|" * len(RTX3060)]
    for phase, t in run["measured"].items():
        derived = [card[link] if phase == "total" else card[link].get("phases_s", {}).get(phase)
                   for link in RTX3060.values()]
        lines.append(f"| {phase} | {t['p50']:.3f} | {t['p99']:.3f} | {t['p99_9']:.3f} | " + " | ".join(
            f"{d['p50_s']:.2f} / {d['p99_s']:.2f}" if d else "-" for d in derived) + " |")
    return lines
