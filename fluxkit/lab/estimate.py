"""Projecting latency to GPUs nobody here has, from measurements on one that is here. An ESTIMATE.

Per phase (text encode, denoise, decode, copy), a GPU's time splits three ways, measured with the profiler on
the card at hand (`fluxkit.bench.kernel_seconds`): matrix kernels (products, attention, convolutions), bound
by tensor throughput; the other kernels, bound by memory bandwidth; and copies over the host link. Each part
scales with its published peak, and what the phase took beyond its GPU work (the GPU waiting on the host)
stays as measured:

    t_target = max(compute_s * F_src / F_tgt + memory_s * B_src / B_tgt, link_s * P_src / P_tgt) + wait_s

A wall-clock fraction of one roofline would carry the source's host waits into the target's compute term, and
on a slower card multiply them by the peak ratio (a projection from a host-bound H200 to an RTX 3060: x39).
The FLOPs (`torch.utils.flop_counter.FlopCounterMode` on meta-device components) and the bytes each phase
moves give the achieved fraction of each peak on the source, for the record.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import torch
import yaml

from ..config import CONFIG_DIR, GenerationSpec, PlacementSpec, Preset, build
from ..errors import InputError
from ..plan import Plan, component_tensors
from ..quantizers import PLAIN
from ..sampling import PHASES
from .bench import KERNEL_CLASSES

ASSUMPTIONS = ("published peak figures (fluxkit/configs/gpus.yaml); matrix kernels keep the fraction of the tensor "
               "peak, other kernels the fraction of memory bandwidth, host copies the fraction of the link measured on "
               "the source GPU, and copies overlap kernels as they did there; the time the GPU waited on the host stays "
               "as measured (pessimistic for slower cards, which hide it); P99/P50 as measured; same software stack")


@dataclass(frozen=True)
class GpuSpec:
    name: str
    match: str
    bf16_tflops: float
    memory_gbps: float
    pcie_gbps: float


def gpus() -> dict[str, GpuSpec]:
    data = yaml.safe_load((CONFIG_DIR / "gpus.yaml").read_text())
    return {key: build(GpuSpec, spec, f"gpus.yaml.{key}") for key, spec in data.items()}


def gpu(key: str) -> GpuSpec:
    specs = gpus()
    if key not in specs:
        raise InputError(f"gpu={key!r}: no published figures; choose one of {', '.join(specs)}")
    return specs[key]


def gpu_of(device_name: str) -> str:
    """The key of the spec that matches a torch device name."""
    for key, spec in gpus().items():
        if spec.match.lower() in device_name.lower():
            return key
    raise InputError(f"no published figures for {device_name!r}; add it to fluxkit/configs/gpus.yaml")


@dataclass(frozen=True)
class Work:
    flops: float
    device_bytes: float
    link_bytes: float


def count_flops(meta: dict[str, torch.nn.Module], generation: GenerationSpec, cfg: bool = False) -> dict[str, float]:
    """FLOPs per phase of one call, counted on meta-device components (shapes only: no weights, no device)."""
    from torch.utils.flop_counter import FlopCounterMode

    g = generation
    tokens = (g.height // 16) * (g.width // 16)
    m = torch.device("meta")
    conditions = 2 if cfg else 1
    out = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as count:
            meta["text_encoder"](torch.zeros(1, 77, dtype=torch.long, device=m))
            meta["text_encoder_2"](torch.zeros(1, g.max_sequence_length, dtype=torch.long, device=m))
        out["text_encode"] = count.get_total_flops() * conditions
        c = meta["transformer"].config
        with FlopCounterMode(display=False) as count:
            meta["transformer"](hidden_states=torch.zeros(1, tokens, c.in_channels, device=m),
                                timestep=torch.zeros(1, device=m), guidance=None,
                                pooled_projections=torch.zeros(1, c.pooled_projection_dim, device=m),
                                encoder_hidden_states=torch.zeros(1, g.max_sequence_length, c.joint_attention_dim,
                                                                  device=m),
                                txt_ids=torch.zeros(g.max_sequence_length, 3, device=m),
                                img_ids=torch.zeros(tokens, 3, device=m), return_dict=False)
        out["denoise"] = count.get_total_flops() * g.num_inference_steps * conditions
        latent_channels = meta["vae"].config.latent_channels
        with FlopCounterMode(display=False) as count:
            meta["vae"].decode(torch.zeros(1, latent_channels, g.height // 8, g.width // 8, device=m), return_dict=False)
        out["decode"] = count.get_total_flops()
    out["copy"] = 0.0
    return out


def _read_bytes(module: torch.nn.Module, preset: Preset, quantized: bool) -> float:
    """Bytes one forward pass reads from device memory for weights, plus what a backend that dequantizes to the
    compute dtype before each product writes and reads again (bitsandbytes 4-bit: 4 bytes per weight)."""
    spec = preset.quantization
    quantizer = spec.quantizer if quantized else PLAIN
    stored = sum(sum(v) for v in component_tensors(module, spec, 2, quantizer).values())
    if not quantizer.dequantized_bytes_per_weight:
        return float(stored)
    dequantized = sum(module.get_submodule(n).weight.numel() for n in quantizer.selected(module))
    return float(stored + quantizer.dequantized_bytes_per_weight * dequantized)


def phase_work(meta: dict[str, torch.nn.Module], preset: Preset, placement: PlacementSpec, plan: Plan,
               generation: GenerationSpec, cfg: bool = False) -> dict[str, Work]:
    """FLOPs, device-memory bytes and host-link bytes per phase of one call."""
    g = generation
    flops = count_flops(meta, g, cfg)
    passes = g.num_inference_steps * (2 if cfg else 1)
    encoders = 2 if cfg else 1
    q = preset.quantization.components
    t5_quantized = "text_encoder_2" in q and placement.text_encoder_2 != "stream"
    moved = {name: plan.components[name].moved_per_call for name in plan.components}
    device = {
        "text_encode": encoders * (_read_bytes(meta["text_encoder_2"], preset, t5_quantized)
                                   + _read_bytes(meta["text_encoder"], preset, False)),
        "denoise": passes * _read_bytes(meta["transformer"], preset, "transformer" in q),
        "decode": _read_bytes(meta["vae"].decoder, preset, False),
        "copy": 0.0,
    }
    link = {"text_encode": moved["text_encoder_2"] + moved["text_encoder"], "denoise": moved["transformer"],
            "decode": moved["vae"], "copy": g.height * g.width * 3 * 4}
    return {p: Work(flops[p], device[p], link[p]) for p in PHASES}


def _peaks(spec: GpuSpec) -> dict[str, float]:
    return {"compute": spec.bf16_tflops * 1e12, "memory": spec.memory_gbps * 1e9, "host link": spec.pcie_gbps * 1e9}


def measured_spec(bench: dict) -> GpuSpec | None:
    """The card (or SM slice) a bench ran on, with the peaks measured there (`bench["peaks"]`), its host link
    published; None for a bench without measured peaks."""
    peaks = bench.get("peaks")
    if not peaks:
        return None
    link = gpu(gpu_of(bench["model"]["device_name"])).pcie_gbps
    stand_in = bench.get("stand_in")
    name = bench["model"]["device_name"] + (f", {stand_in['sms']} of {stand_in['total_sms']} SMs" if stand_in else "")
    return GpuSpec(name, "", peaks["bf16_tflops"], peaks["copy_gbps"], link)


def project(work: dict[str, Work], measured_s: dict[str, float], kernel_s: dict[str, dict[str, float]],
            source: GpuSpec, targets: dict[str, GpuSpec], p50: float, p99: float) -> dict:
    """Per phase: the GPU time per class and the host wait on `source`, the achieved fraction of each peak, and
    projected seconds on each target. The P99 adds the source's P99 - P50 to the projected P50: the tail of a call
    is the host's (its waits and jitter), which a slower card does not scale (it scaled by P99/P50 before, and
    missed by +54% on an 8-SM slice of an H200 whose calls varied by 2% where the whole card's varied by 43%)."""
    peaks = _peaks(source)
    phases = {}
    for phase in PHASES:
        k, w = kernel_s[phase], work[phase]
        done = {"compute": w.flops, "memory": w.device_bytes, "host link": w.link_bytes}
        wait = max(0.0, measured_s[phase] - max(k["compute"] + k["memory"], k["host link"]))
        row = {**asdict(w), "measured_s": measured_s[phase], "kernel_s": dict(k), "wait_s": wait,
               "achieved_fraction": {c: done[c] / (peaks[c] * k[c]) if k[c] > 0 else None for c in KERNEL_CLASSES},
               "projected_s": {}}
        for key, spec in targets.items():
            target = _peaks(spec)
            scaled = {c: k[c] * peaks[c] / target[c] for c in KERNEL_CLASSES}
            row["projected_s"][key] = max(scaled["compute"] + scaled["memory"], scaled["host link"]) + wait
        phases[phase] = row
    totals = {key: sum(phases[p]["projected_s"][key] for p in PHASES) for key in targets}
    return {"measured_on": source.name, "source_peaks": asdict(source), "phases": phases, "projected_p50_s": totals,
            "projected_p99_s": {k: v + (p99 - p50) for k, v in totals.items()}, "p99_minus_p50_s": p99 - p50,
            "measured_p50_s": sum(measured_s.values()), "assumptions": ASSUMPTIONS, "label": "ESTIMATE",
            "targets": {k: asdict(v) for k, v in targets.items()}}


def check_bench(bench: dict, where: str) -> dict:
    """A `fluxkit bench --json` result, checked for what a projection reads; errors name the file and the key."""
    from ..config import available_placements, available_presets

    def need(path: str, kind: type):
        value = bench
        for key in path.split("."):
            if not isinstance(value, dict) or key not in value:
                raise InputError(f"{where}: lacks {path}; pass a `fluxkit bench --json` result")
            value = value[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InputError(f"{where}: {path} is {value!r}, not {kind.__name__ if isinstance(kind, type) else 'a number'}")
        return value

    if need("model.preset", str) not in available_presets():
        raise InputError(f"{where}: model.preset {bench['model']['preset']!r} is not a preset of this fluxkit "
                         f"({', '.join(available_presets())})")
    if need("model.placement.name", str) not in available_placements():
        raise InputError(f"{where}: model.placement.name {bench['model']['placement']['name']!r} is not a placement")
    need("model.device_name", str)
    need("model.model", dict)
    for phase in ("total", *PHASES):
        for stat in ("p50", "p99"):
            need(f"plain.summary.{phase}.{stat}", (int, float))
    if bench.get("kernels") is not None:
        for phase in PHASES:
            for c in KERNEL_CLASSES:
                need(f"kernels.seconds.{phase}.{c}", (int, float))
    return bench


def setup_from_bench(bench: dict, where: str) -> tuple:
    """The meta components, preset, placement and plan a bench result was measured with."""
    from ..config import load_placement, load_preset
    from ..plan import components_for, plan_placement

    info = bench["model"]
    preset, placement = load_preset(info["preset"]), load_placement(info["placement"]["name"])
    synthetic = info["model"].get("synthetic")
    try:
        meta, _ = components_for(f"synthetic-{synthetic['preset']}" if synthetic else info["model"]["path"])
    except InputError as err:
        raise InputError(f"{where}: the checkpoint it was measured on is not here ({err})") from None
    return meta, preset, placement, plan_placement(meta, preset, placement)


def estimate_from_bench(bench: dict, meta: dict, preset: Preset, placement: PlacementSpec, plan: Plan,
                        targets: list[str] | dict[str, GpuSpec], source: GpuSpec | None = None,
                        work: dict[str, Work] | None = None) -> dict:
    """Project a `run_benchmark` result (its plain series: per-phase medians) to `targets` (keys of gpus.yaml, or
    specs by name). `source`: the peaks to scale from; by default the measured ones of an SM slice (a stand-in),
    else the card's published figures, as the targets' are. `work`: `phase_work`'s result, where the caller has it
    (counting FLOPs on the full-size model takes seconds)."""
    if not bench.get("kernels"):
        raise InputError("this benchmark has no GPU kernel times (made on a CPU, or by a fluxkit before projections "
                         "split them): run `fluxkit bench --json` again on the GPU to project from")
    summary = bench["plain"]["summary"]
    measured = {p: summary[p]["p50"] for p in PHASES}
    work = work or phase_work(meta, preset, placement, plan, preset.generation)
    if source is None:
        source = measured_spec(bench) if bench.get("stand_in") else gpu(gpu_of(bench["model"]["device_name"]))
    specs = targets if isinstance(targets, dict) else {key: gpu(key) for key in targets}
    result = project(work, measured, bench["kernels"]["seconds"], source, specs, summary["total"]["p50"],
                     summary["total"]["p99"])
    result.update(preset=preset.name, placement=placement.name, device_name=bench["model"]["device_name"])
    return result


def cross_check(source_bench: dict, target_bench: dict, meta: dict, preset: Preset, placement: PlacementSpec,
                plan: Plan) -> dict:
    """Measure on one card (or slice), project the other, compare with what the other measured: error per phase.
    Where both runs measured their peaks (`fluxkit bench` does on a GPU), the projection scales by those; else by
    the published figures."""
    measured_with = (target_bench["model"]["preset"], target_bench["model"]["placement"]["name"])
    if measured_with != (preset.name, placement.name):
        raise InputError(f"the run to check against was measured with preset {measured_with[0]} under "
                         f"{measured_with[1]}, the projection is of {preset.name} under {placement.name}; compare "
                         "runs of the same preset and placement")
    source, target = measured_spec(source_bench), measured_spec(target_bench)
    if source is None or target is None:
        source = dataclasses.replace(gpu(gpu_of(source_bench["model"]["device_name"])),
                                     name=source_bench["model"]["device_name"])
        target = dataclasses.replace(gpu(gpu_of(target_bench["model"]["device_name"])),
                                     name=target_bench["model"]["device_name"])
    estimate = estimate_from_bench(source_bench, meta, preset, placement, plan, {"target": target}, source)
    measured = {p: target_bench["plain"]["summary"][p]["p50"] for p in PHASES}
    projected = {p: estimate["phases"][p]["projected_s"]["target"] for p in PHASES}
    errors = {p: projected[p] / measured[p] - 1 for p in PHASES if measured[p] > 0}
    summary = target_bench["plain"]["summary"]["total"]
    total = estimate["projected_p50_s"]["target"] / summary["p50"] - 1
    return {"source": source.name, "target": target.name, "projected_s": projected, "measured_s": measured,
            "error_by_phase": errors, "end_to_end_error": total, "usable": abs(total) <= 0.15,
            "projected_p99_s": estimate["projected_p99_s"]["target"], "measured_p99_s": summary["p99"],
            "p99_error": estimate["projected_p99_s"]["target"] / summary["p99"] - 1}


DEFAULT_TARGETS = ("rtx3060", "rtx4090", "l4", "a100", "h100", "h200")


def for_model(model, bench: dict, targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict:
    """The projection of a benchmark of a loaded model, or why there is none (a CPU run, an unknown GPU)."""
    from ..checkpoint import meta_components

    if model.device.type != "cuda":
        return {"applicable": False, "reason": "measured on CPU: projections start from a GPU measurement"}
    try:
        gpu_of(model.info()["device_name"])
    except InputError as err:
        return {"applicable": False, "reason": str(err)}
    meta = meta_components(model.source.path)
    return {"applicable": True, **estimate_from_bench(bench, meta, model.preset, model.placement, model.plan,
                                                      list(targets))}
