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

from dataclasses import asdict, dataclass

import torch
import yaml

from .bench import KERNEL_CLASSES
from .config import CONFIG_DIR, GenerationSpec, PlacementSpec, Preset, _build
from .errors import InputError
from .plan import Plan, component_tensors
from .quantization import converted, keep_in_fp32
from .sampling import PHASES

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
    return {key: _build(GpuSpec, spec, f"gpus.yaml.{key}") for key, spec in data.items()}


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
    """Bytes one forward pass reads from device memory for weights; bitsandbytes 4-bit dequantizes each weight to
    bf16 (written, then read by the matmul): 4 more bytes per weight."""
    spec = preset.quantization if quantized else None
    stored = sum(sum(v) for v in component_tensors(module, spec, 2).values())
    if spec is None or spec.backend != "bitsandbytes_4bit":
        return float(stored)
    skip = keep_in_fp32(module)
    dequantized = sum(m.weight.numel() for n, m in module.named_modules() if converted(n, m, skip))
    return float(stored + 4 * dequantized)


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


def project(work: dict[str, Work], measured_s: dict[str, float], kernel_s: dict[str, dict[str, float]],
            measured_on: str, targets: list[str], p99_over_p50: float) -> dict:
    """Per phase: the GPU time per class and the host wait on `measured_on`, the achieved fraction of each peak,
    and projected seconds on each target."""
    source = _peaks(gpu(measured_on))
    phases = {}
    for phase in PHASES:
        k, w = kernel_s[phase], work[phase]
        done = {"compute": w.flops, "memory": w.device_bytes, "host link": w.link_bytes}
        wait = max(0.0, measured_s[phase] - max(k["compute"] + k["memory"], k["host link"]))
        row = {**asdict(w), "measured_s": measured_s[phase], "kernel_s": dict(k), "wait_s": wait,
               "achieved_fraction": {c: done[c] / (source[c] * k[c]) if k[c] > 0 else None for c in KERNEL_CLASSES},
               "projected_s": {}}
        for key in targets:
            target = _peaks(gpu(key))
            scaled = {c: k[c] * source[c] / target[c] for c in KERNEL_CLASSES}
            row["projected_s"][key] = max(scaled["compute"] + scaled["memory"], scaled["host link"]) + wait
        phases[phase] = row
    totals = {key: sum(phases[p]["projected_s"][key] for p in PHASES) for key in targets}
    return {"measured_on": measured_on, "phases": phases, "projected_p50_s": totals,
            "projected_p99_s": {k: v * p99_over_p50 for k, v in totals.items()}, "p99_over_p50": p99_over_p50,
            "measured_p50_s": sum(measured_s.values()), "assumptions": ASSUMPTIONS, "label": "ESTIMATE"}


def estimate_from_bench(bench: dict, meta: dict, preset: Preset, placement: PlacementSpec, plan: Plan,
                        targets: list[str]) -> dict:
    """Project a `run_benchmark` result (its plain series: per-phase medians) to `targets`."""
    if not bench.get("kernels"):
        raise InputError("this benchmark has no GPU kernel times (made on a CPU, or by a fluxkit before projections "
                         "split them): run `fluxkit bench --json` again on the GPU to project from")
    summary = bench["plain"]["summary"]
    measured = {p: summary[p]["p50"] for p in PHASES}
    work = phase_work(meta, preset, placement, plan, preset.generation)
    result = project(work, measured, bench["kernels"]["seconds"], gpu_of(bench["model"]["device_name"]), targets,
                     summary["total"]["p99"] / summary["total"]["p50"])
    result.update(preset=preset.name, placement=placement.name, device_name=bench["model"]["device_name"])
    return result


def cross_check(source_bench: dict, target_bench: dict, meta: dict, preset: Preset, placement: PlacementSpec,
                plan: Plan) -> dict:
    """Measure on one card, project the other, compare with what the other measured: error per phase."""
    measured_with = (target_bench["model"]["preset"], target_bench["model"]["placement"]["name"])
    if measured_with != (preset.name, placement.name):
        raise InputError(f"the run to check against was measured with preset {measured_with[0]} under "
                         f"{measured_with[1]}, the projection is of {preset.name} under {placement.name}; compare "
                         "runs of the same preset and placement")
    target = gpu_of(target_bench["model"]["device_name"])
    estimate = estimate_from_bench(source_bench, meta, preset, placement, plan, [target])
    measured = {p: target_bench["plain"]["summary"][p]["p50"] for p in PHASES}
    errors = {p: estimate["phases"][p]["projected_s"][target] / measured[p] - 1 for p in PHASES if measured[p] > 0}
    total = estimate["projected_p50_s"][target] / target_bench["plain"]["summary"]["total"]["p50"] - 1
    return {"source": estimate["device_name"], "target": target_bench["model"]["device_name"],
            "projected_s": {p: estimate["phases"][p]["projected_s"][target] for p in PHASES}, "measured_s": measured,
            "error_by_phase": errors, "end_to_end_error": total, "usable": abs(total) <= 0.15}


DEFAULT_TARGETS = ("rtx3060", "rtx4090", "l4", "a100", "h100", "h200")


def for_model(model, bench: dict, targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict:
    """The projection of a benchmark of a loaded model, or why there is none (a CPU run, an unknown GPU)."""
    from .checkpoint import meta_components

    if model.device.type != "cuda":
        return {"applicable": False, "reason": "measured on CPU: projections start from a GPU measurement"}
    try:
        gpu_of(model.info()["device_name"])
    except InputError as err:
        return {"applicable": False, "reason": str(err)}
    meta = meta_components(model.source.path)
    return {"applicable": True, **estimate_from_bench(bench, meta, model.preset, model.placement, model.plan,
                                                      list(targets))}
