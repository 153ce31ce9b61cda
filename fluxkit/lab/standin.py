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
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

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
    """A slice of `sms` SMs, its peaks measured; refused with the reason where it cannot be made."""
    reason = refused(sms, device)
    if reason:
        raise InputError(f"--sms: {reason}")
    device = torch.device("cuda" if device == "auto" else device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        context = torch.cuda.green_contexts.GreenContext.create(sms, index)
    except (RuntimeError, TypeError) as err:  # a driver without green contexts
        raise InputError(f"--sms: this driver or card cannot make a green context ({err})") from None
    props = torch.cuda.get_device_properties(index)
    piece = SMSlice(sms, props.name, props.multi_processor_count, context=context, stream=context.Stream())
    with on(piece):
        piece.peaks = measure_peaks(torch.device("cuda", index))
    return piece


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


def close(piece: SMSlice) -> None:
    """Release the slice before the interpreter exits: a green context destroyed during interpreter teardown aborted
    the process (after its output was written) on the H200 host."""
    torch.cuda.synchronize()
    piece.stream = None
    piece.context = None


RTX3060 = {"rtx3060": "PCIe 4.0 x16", "rtx3060-pcie3": "PCIe 3.0 x16"}
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


def analyse(data: dict) -> dict:
    """What a stand-in run (`data`: the whole card's bench, the slices' P50 and P99, their peaks) says: the
    estimator checked against every slice (`check`), and the RTX 3060 from the 8-SM slice (`rtx3060`)."""
    from .estimate import phase_work, setup_from_bench

    bench = data["full_card_bench"]
    meta, preset, placement, plan = setup_from_bench(bench, "the stand-in's whole-card bench")
    work = phase_work(meta, preset, placement, plan, preset.generation)  # FLOPs of the full model: counted once
    setup = (bench, meta, preset, placement, plan, work)
    check = estimator_check(data, setup)
    return {"check": check, "rtx3060": rtx3060(data, check, setup)}


def estimator_check(data: dict, setup: tuple) -> list[dict]:
    """The whole-card bench projected to each slice of `data["slices"]`, with the slice's peaks (as fractions of the
    whole card's, measured the same way) as the target's, against what the slice measured: P50 and P99 end to
    end."""
    from .estimate import GpuSpec, estimate_from_bench, measured_spec

    bench, meta, preset, placement, plan, work = setup
    source = measured_spec(bench)
    whole = data["slice_peaks"]["whole_card"]
    rows = []
    for measured in sorted(data["slices"], key=lambda s: -s["sms"]):
        peaks = data["slice_peaks"]["by_sms"][str(measured["sms"])]
        target = GpuSpec(f"{measured['sms']} SMs", "", source.bf16_tflops * peaks["bf16_tflops"] / whole["bf16_tflops"],
                         source.memory_gbps * peaks["copy_gbps"] / whole["copy_gbps"], source.pcie_gbps)
        estimate = estimate_from_bench(bench, meta, preset, placement, plan, {"slice": target}, source, work)
        p50, p99 = estimate["projected_p50_s"]["slice"], estimate["projected_p99_s"]["slice"]
        rows.append({"sms": measured["sms"], "measured_p50_s": measured["p50_s"], "projected_p50_s": p50,
                     "p50_error": p50 / measured["p50_s"] - 1, "measured_p99_s": measured["p99_s"],
                     "projected_p99_s": p99, "p99_error": p99 / measured["p99_s"] - 1,
                     "usable": abs(p50 / measured["p50_s"] - 1) <= 0.15,
                     "projected_phases_s": {p: r["projected_s"]["slice"] for p, r in estimate["phases"].items()}})
    return rows


def rtx3060(data: dict, check: list[dict], setup: tuple, sms: int = 8) -> dict:
    """The RTX 3060 from the `sms`-SM slice: the slice's measured P50 scaled phase by phase by the ratio of its peaks
    to the 3060's published ones, the host link by the H200's to PCIe 4.0 or 3.0 x16; the P99 adds the slice's
    measured P99 - P50. The spread runs from a 3060 that reaches its published peaks to one that reaches the same
    fraction of them as the H200 reaches of its own, widened by the estimator's error across the slices."""
    from .estimate import GpuSpec, estimate_from_bench, gpu, gpu_of, measured_spec

    bench, meta, preset, placement, plan, work = setup
    measured_peaks, published = measured_spec(bench), gpu(gpu_of(bench["model"]["device_name"]))
    by_sms = {row["sms"]: row for row in check}
    errors = [row["p50_error"] for row in check]
    [measured] = [s for s in data["slices"] if s["sms"] == sms]
    calibration = measured["p50_s"] / by_sms[sms]["projected_p50_s"]  # the slice as measured, not as projected
    tail = measured["p99_s"] - measured["p50_s"]
    out = {"label": LABEL, "from_sms": sms, "measured_p50_s": measured["p50_s"], "measured_p99_s": measured["p99_s"],
           "estimator_error_range": [min(errors), max(errors)]}
    for key, link in RTX3060.items():
        card = gpu(key)
        # the same fraction of its peaks as the H200 reached of its own: the pessimistic end
        fraction = GpuSpec(card.name, "", card.bf16_tflops * measured_peaks.bf16_tflops / published.bf16_tflops,
                           card.memory_gbps * measured_peaks.memory_gbps / published.memory_gbps, card.pcie_gbps)
        estimate = estimate_from_bench(bench, meta, preset, placement, plan, {"peak": card, "as_h200": fraction},
                                       measured_peaks, work)
        p50 = estimate["projected_p50_s"]["peak"] * calibration
        worst = estimate["projected_p50_s"]["as_h200"] * calibration
        out[link] = {"p50_s": p50, "p99_s": p50 + tail,
                     "p99_spread_s": [(p50 + tail) * (1 + min(min(errors), 0)),
                                      (worst + tail) * (1 + max(max(errors), 0))]}
    return out


def markdown(analysis: dict) -> str:
    """The stand-in report's tables, from `analyse`."""
    lines = ["| SMs | measured P50 s | projected P50 s | error | measured P99 s | projected P99 s | error |",
             "|---|---|---|---|---|---|---|"]
    for row in analysis["check"]:
        lines.append(f"| {row['sms']} | {row['measured_p50_s']:.3f} | {row['projected_p50_s']:.3f} | "
                     f"{row['p50_error']:+.1%} | {row['measured_p99_s']:.3f} | {row['projected_p99_s']:.3f} | "
                     f"{row['p99_error']:+.1%} |")
    card = analysis["rtx3060"]
    lines += ["", f"{card['label']}.", "", "| host link | 3060 P50 s | 3060 P99 s | P99 spread s |", "|---|---|---|---|"]
    for link in RTX3060.values():
        low, high = card[link]["p99_spread_s"]
        lines.append(f"| {link} | {card[link]['p50_s']:.2f} | {card[link]['p99_s']:.2f} | {low:.2f}-{high:.2f} |")
    return "\n".join(lines) + "\n"
