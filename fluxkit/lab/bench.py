"""Latency benchmarks: warm-up excluded, device-synchronized, many runs, medians and tails.

Each call writes into one pre-allocated (512, 512, 3) float32 host buffer, as Vortex does, so the
`copy` phase is the device-to-host copy Vortex pays. Every call gets a prompt of its own (the prompt
cache never hits), as a Director asking for new actors would. `side_by_side` times fluxkit against
the plain diffusers pattern in one process, interleaved in rounds so that drift of a noisy host hits
every variant alike. Every call keeps its wall-clock start (`started`, Unix seconds), so a slow stretch can
be laid beside a log of the card's clocks and throttle reasons taken at the same time.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import re
import statistics
import time
from collections.abc import Iterator

import numpy as np
import torch

from ..checks import check_number
from ..config import PlacementSpec, load_placement, load_preset
from ..errors import FluxkitError, InputError, one_line
from ..generation import FluxModel
from ..sampling import PHASE_RANGE, PHASES
from .metrics import psnr, summarize

DEFAULT_PROMPT = "manic scientist, blue spiked hair, white lab coat"
# One fast-path lever each: the preset fields and placement fields it changes (fluxkit/fastpath.py says what each
# gives). `fluxkit bench --levers` times fluxkit's path as configured against each, side by side.
LEVERS = {
    "eager": ({"compile": False, "cuda_graphs": False}, {}),
    "compiled": ({"compile": True}, {}),  # for the presets that run uncompiled
    "no-cuda-graphs": ({"cuda_graphs": False}, {}),
    "reduce-overhead": ({"compile_mode": "reduce-overhead", "compile_scope": "transformer", "cuda_graphs": False}, {}),
    "untiled-decode": ({}, {"vae_tile_size": None}),
    "whole-transformer": ({"compile_scope": "transformer"}, {}),
    "bitsandbytes-dequantize": ({"dequantize_kernel": "bitsandbytes"}, {}),
}
BOOTSTRAP_RESAMPLES = 2000
KERNEL_CALLS = 3
FAST_PRESET = "bf16"  # the side by side's fastest fluxkit path; the NF4 path is also read as a multiple of it
# Kernels whose time scales with a card's tensor throughput: matrix products, attention and convolutions, by the
# names cuBLAS, cuDNN, CUTLASS, FlashAttention and Inductor's templates give them. bitsandbytes' 4-bit
# matrix-vector kernel (one token: the modulation vectors) reads weights, so it is memory-bound like the rest.
MATRIX_KERNELS = re.compile(r"gemm|nvjet|xmma|cutlass|wgmma|flash|fmha|attention|sdpa|conv|fprop|cudnn|triton_tem",
                            re.IGNORECASE)
VECTOR_KERNELS = re.compile(r"gemv|inference_naive", re.IGNORECASE)
HOST_COPIES = re.compile(r"^Memcpy (HtoD|DtoH)")
KERNEL_CLASSES = ("compute", "memory", "host link")


def call_prompt(prompt: str, i: int) -> str:
    """A distinct prompt per call, so that no call is served from the prompt cache."""
    return f"{prompt}, take {i}"


def output_buffer(model: FluxModel) -> torch.Tensor:
    """The caller's pre-allocated image, as Vortex passes it (height x width x 3, float32), for every timed call."""
    gen = model.preset.generation
    return torch.empty((gen.height, gen.width, 3), dtype=torch.float32)


def timed_calls(model, count: int, prompt: str = DEFAULT_PROMPT, seed: int = 0, output: torch.Tensor | None = None,
                first: int = 0, warmup: int = 0, **kwargs) -> list[dict]:
    """`warmup` untimed calls, then `count` timed ones, each with a prompt of its own (the prompt cache never hits)
    and seed `seed + i`, into a pre-allocated host image as Vortex passes it (so each call ends with the copy to the
    host): per call its wall-clock start (Unix s) and total seconds, and for a FluxModel each phase's seconds (and
    its peaks, when the model is profiling). `model` is a FluxModel or anything with generate(prompt, seed, output)."""
    return list(each_timed_call(model, count, prompt, seed, output, first, warmup, **kwargs))


def each_timed_call(model, count: int, prompt: str = DEFAULT_PROMPT, seed: int = 0,
                    output: torch.Tensor | None = None, first: int = 0, warmup: int = 0, **kwargs) -> Iterator[dict]:
    """`timed_calls`, each row as its call ends: a long run (100 co-tenancy calls) logs its progress, and one that
    fails part-way knows how far it got."""
    output = output_buffer(model) if output is None else output
    for i in range(warmup):
        model.generate(call_prompt(prompt, -1 - i), seed=seed + i, output=output, **kwargs)
    for i in range(first, first + count):
        started, start = time.time(), time.perf_counter()
        model.generate(call_prompt(prompt, i), seed=seed + i, output=output, **kwargs)
        row = {"started": started, "total": time.perf_counter() - start}
        if isinstance(model, FluxModel):
            call = model.last_call
            row.update(call.timings)
            if call.peak is not None:
                row.update(peak=call.peak, peak_reserved=call.peak_reserved)
        yield row


def _series(model: FluxModel, iterations: int, warmup: int, prompt: str, seed: int, **kwargs) -> dict:
    rows = timed_calls(model, iterations, prompt, seed, warmup=warmup, **kwargs)
    summary = {key: summarize([r[key] for r in rows]) for key in ("total", *PHASES)}
    return {"iterations": rows, "summary": summary}


def kernel_class(name: str) -> str:
    """"compute", "memory" or "host link": the roofline a GPU activity of this name is bound by."""
    if HOST_COPIES.match(name):
        return "host link"
    if MATRIX_KERNELS.search(name) and not VECTOR_KERNELS.search(name):
        return "compute"
    return "memory"


def phase_kernel_seconds(activities: list[tuple[str, int, int]], windows: dict[str, list[tuple[int, int]]]) -> dict:
    """Seconds of GPU activity per phase and class: the median over calls of each window's sum. `activities` are
    (name, start ns, duration ns) on the GPU, `windows` each phase's (start ns, end ns) per call on the host
    clock; a phase ends with a device synchronization, so its kernels start inside its window."""
    out = {}
    for phase, spans in windows.items():
        per_call = []
        for start, end in spans:
            sums = dict.fromkeys(KERNEL_CLASSES, 0)
            for name, begin, duration in activities:
                if start <= begin < end:
                    sums[kernel_class(name)] += duration
            per_call.append(sums)
        out[phase] = {c: statistics.median(call[c] for call in per_call) / 1e9 for c in KERNEL_CLASSES}
    return out


def kernel_seconds(model: FluxModel, calls: int = KERNEL_CALLS, prompt: str = DEFAULT_PROMPT, seed: int = 0) -> dict:
    """GPU time per phase, split by roofline (`phase_kernel_seconds`), from `calls` profiled calls. What a phase
    took beyond its kernels is time the GPU waited for the host: `fluxkit.estimate` scales the kernels with a
    card's peaks and keeps the wait as it was."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    profiling, model.profiling = model.profiling, True  # each phase ends in a synchronization: its kernels are its own
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            timed_calls(model, calls, prompt, seed, first=10_000)
    finally:
        model.profiling = profiling
    windows, activities = {p: [] for p in PHASES}, []
    for event in prof.profiler.kineto_results.events():
        name = event.name()
        if event.device_type() == DeviceType.CPU and name.startswith(PHASE_RANGE):
            windows[name[len(PHASE_RANGE):]].append((event.start_ns(), event.start_ns() + event.duration_ns()))
        elif event.device_type() == DeviceType.CUDA and not name.startswith(PHASE_RANGE):
            activities.append((name, event.start_ns(), event.duration_ns()))
    return {"calls": calls, "seconds": phase_kernel_seconds(activities, windows), "activities": len(activities),
            "window_s": {p: statistics.median(end - start for start, end in spans) / 1e9 for p, spans in windows.items()}}


def check_counts(iterations: int, warmup: int) -> None:
    check_number("iterations", iterations, 1, 100_000, integer=True)
    check_number("warmup", warmup, 1, 1000, integer=True)  # one warm-up at least: one-time costs stay out


def run_benchmark(model: FluxModel, iterations: int = 50, warmup: int = 3, prompt: str = DEFAULT_PROMPT,
                  seed: int = 0, negative_prompt: str | None = "blurry, low quality", true_cfg_scale: float = 4.0) -> dict:
    """Time `iterations` generate calls (seconds); with `negative_prompt`, a second true-CFG series too."""
    from .standin import measure_peaks

    check_counts(iterations, warmup)
    cuda = model.device.type == "cuda"
    result = {"model": model.info(), "iterations": iterations, "warmup": warmup, "prompt": prompt, "unit": "s",
              "prompts": "distinct per call (no prompt-cache hits)",
              # what this card (or SM slice) reaches, measured on the same stream as the calls: projections scale
              # by these where both ends measured them
              "peaks": measure_peaks(model.device) if cuda else None,
              "plain": _series(model, iterations, warmup, prompt, seed),
              "kernels": kernel_seconds(model, prompt=prompt, seed=seed) if cuda else None}
    if negative_prompt:
        result["true_cfg"] = _series(model, iterations, warmup, prompt, seed, negative_prompt=negative_prompt,
                                     true_cfg_scale=true_cfg_scale)
        result["true_cfg"].update(negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale)
    return result


# ---- side by side with the plain diffusers pattern ------------------------------------------------------

def check_plain_pattern(preset) -> None:
    """The plain pattern is diffusers' bitsandbytes quantizer: other presets have no plain counterpart here."""
    if preset.quantization.backend not in ("bitsandbytes_4bit", "bitsandbytes_8bit"):
        raise InputError(f"--baseline plain compares with diffusers' bitsandbytes quantizer; preset {preset.name} "
                         f"uses {preset.quantization.backend}: choose a bitsandbytes preset (nf4, nf4-nodq, fp4, int8)")


class PlainPattern:
    """What a new user writes with diffusers: FluxPipeline with PipelineQuantizationConfig (the preset's
    bitsandbytes settings on the transformer and T5), everything on the GPU, eager, output_type="pt"."""

    def __init__(self, folder, preset, device: torch.device) -> None:
        from diffusers import FluxPipeline, PipelineQuantizationConfig

        q = preset.quantization
        dtype = getattr(torch, preset.dtype)
        check_plain_pattern(preset)
        kwargs = {"load_in_8bit": True} if q.backend == "bitsandbytes_8bit" else {
            "load_in_4bit": True, "bnb_4bit_quant_type": q.quant_type, "bnb_4bit_compute_dtype": dtype,
            "bnb_4bit_use_double_quant": q.double_quant}
        config = PipelineQuantizationConfig(quant_backend=q.backend, components_to_quantize=list(q.components),
                                            quant_kwargs=kwargs)
        self.pipe = FluxPipeline.from_pretrained(folder, quantization_config=config, dtype=dtype).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device, self.generation = device, preset.generation

    def generate(self, prompt: str, seed: int, output: torch.Tensor) -> torch.Tensor:
        g = self.generation
        image = self.pipe(prompt, num_inference_steps=g.num_inference_steps, guidance_scale=0.0, height=g.height,
                          width=g.width, max_sequence_length=g.max_sequence_length, output_type="pt",
                          generator=torch.Generator(self.device).manual_seed(seed)).images[0]
        return output.copy_(image.permute(1, 2, 0))


def bootstrap_ratio(a: list[float], b: list[float], seed: int = 0) -> dict:
    """Median(a) / median(b) with a 95% percentile-bootstrap interval (calls resampled with replacement)."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a), np.asarray(b)
    ratios = [np.median(rng.choice(a, a.size)) / np.median(rng.choice(b, b.size)) for _ in range(BOOTSTRAP_RESAMPLES)]
    low, high = np.percentile(ratios, [2.5, 97.5])
    return {"ratio": float(np.median(a) / np.median(b)), "ci95": [float(low), float(high)]}


def side_by_side(variants: dict, iterations: int = 50, rounds: int = 10, warmup: int = 3,
                 prompt: str = DEFAULT_PROMPT, seed: int = 0, also_relative_to: tuple[str, ...] = ()) -> dict:
    """Time each variant (name -> object with generate(prompt, seed, output)) on the same prompts and seeds,
    interleaved: each round runs every variant for iterations / rounds calls, the order rotating per round. Every
    variant is compared with the first (`ratios_to_<first>`) and with each of `also_relative_to`."""
    check_counts(iterations, warmup)
    check_number("rounds", rounds, 1, iterations, integer=True)
    names = list(variants)
    buffer = torch.empty((512, 512, 3), dtype=torch.float32)
    rows = {n: [] for n in names}
    peaks = {n: 0 for n in names}
    images = {n: [] for n in names}
    for n in names:
        timed_calls(variants[n], 0, prompt, seed, output=buffer, warmup=warmup)
    per_round = iterations // rounds
    cuda = torch.cuda.is_available()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            if cuda:  # this process is the lab's own: one reading per variant and round
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            rows[n] += timed_calls(variants[n], 1, prompt, seed, output=buffer, first=r * per_round)
            images[n].append(buffer.clone())
            rows[n] += timed_calls(variants[n], per_round - 1, prompt, seed, output=buffer, first=r * per_round + 1)
            if cuda:
                peaks[n] = max(peaks[n], torch.cuda.max_memory_allocated() - before)
    times = {n: [row["total"] for row in rows[n]] for n in names}
    result = {"iterations": per_round * rounds, "rounds": rounds, "warmup": warmup, "unit": "s",
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "variants": {n: {"summary": summarize(times[n]), "times": times[n],
                               "started": [row["started"] for row in rows[n]], "rise_bytes": peaks[n]} for n in names}}
    for n in names:
        if isinstance(variants[n], FluxModel):  # they time their phases
            result["variants"][n]["phases"] = {p: summarize([row[p] for row in rows[n]]) for p in PHASES}
    baseline = names[0]
    for reference in (baseline, *also_relative_to):
        result["ratios_to_" + reference] = {n: bootstrap_ratio(times[n], times[reference])
                                            for n in names[1:] if n != reference}
    result["agreement_psnr_db"] = {n: min(psnr(x, y) for x, y in zip(images[n], images[baseline]))
                                   for n in names[1:]}
    return result


def load_side_by_side(model: str, device: str = "cuda", quantization: str = "nf4",
                      fluxkit_model: FluxModel | None = None, levers: tuple[str, ...] = ()) -> tuple[dict, dict, dict]:
    """The plain pattern, fluxkit's default path (`fluxkit_model` if given), fluxkit's fastest bf16 path and
    fluxkit with each of `levers` changed (`fluxkit_<lever>`) in one process, as `_load_each` returns them. With
    levers, a lever's ratio to the plain pattern comes from the same run as the default's."""
    from ..hub import resolve_model
    from ..loading import load_flux_schnell

    folder = resolve_model(model).path
    factories = {"plain": lambda: PlainPattern(folder, load_preset(quantization), torch.device(device)),
                 "fluxkit": lambda: fluxkit_model or load_flux_schnell(device, quantization, folder, placement="resident"),
                 f"fluxkit_{FAST_PRESET}": lambda: load_flux_schnell(device, FAST_PRESET, folder, placement="resident")}
    for lever, (preset, spec) in lever_settings(quantization, "resident", levers).items():
        factories[f"fluxkit_{lever}"] = functools.partial(load_flux_schnell, device, preset, folder, placement=spec)
    variants, resident, skipped = _load_each(factories)
    if fluxkit_model is not None:  # loaded before: it added nothing here
        resident["fluxkit"] = None
    return variants, resident, skipped


def fast_reference(variants: dict) -> tuple[str, ...]:
    """The bf16 path of a `load_side_by_side`, where it loaded: fluxkit's time is also read as a multiple of it."""
    name = f"fluxkit_{FAST_PRESET}"
    return (name,) if name in variants else ()


def _load_each(factories: dict) -> tuple[dict, dict, dict]:
    """Call each factory in turn: the variants, the GPU bytes each added (None on a CPU), and why each one that
    failed to load (a compile this device cannot do, memory) did not. The first is what the others are compared
    with: it must load."""
    cuda = torch.cuda.is_available()
    variants, resident, skipped = {}, {}, {}
    for i, (name, factory) in enumerate(factories.items()):
        before = torch.cuda.memory_allocated() if cuda else 0
        try:
            variants[name] = factory()
        except (FluxkitError, RuntimeError) as err:  # the rest still run; the result says why this one did not
            if i == 0:
                raise
            skipped[name] = one_line(err)
        if name in skipped:  # out of the except block: its traceback no longer holds the partial model
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            continue
        resident[name] = torch.cuda.memory_allocated() - before if cuda else None
    return variants, resident, skipped


def lever_settings(quantization: str, placement: str | PlacementSpec, levers: tuple[str, ...]) -> dict:
    """Lever name -> (preset, placement spec) with that lever changed from the preset and placement as configured."""
    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown:
        raise InputError(f"levers {', '.join(unknown)}: no such lever; choose from {', '.join(LEVERS)}")
    preset = load_preset(quantization)
    spec = load_placement(placement)
    settings = {}
    for lever in levers:
        preset_fields, placement_fields = LEVERS[lever]
        settings[lever] = (dataclasses.replace(preset, **preset_fields), dataclasses.replace(spec, **placement_fields))
        if settings[lever] == (preset, spec):  # timed beside itself, it would pass for a measured lever
            raise InputError(f"lever {lever}: preset {preset.name} under {spec.name} already runs that way; drop it, "
                             "or choose a placement where it changes something")
    return settings


def load_levers(model: str, device: str, quantization: str = "nf4", placement: str | None = None,
                levers: tuple[str, ...] = tuple(LEVERS)) -> tuple[dict, dict, dict]:
    """fluxkit's path as its preset and placement say ("configured") and with each lever changed, in one process,
    as `_load_each` returns them."""
    from ..loading import load_flux_schnell, plan_load

    planned = plan_load(device, quantization, model, placement=placement)  # `auto` resolved once, for every lever
    settings = lever_settings(quantization, planned.placement, levers)
    folder = planned.source.path
    settings = {"configured": (planned.preset, planned.placement), **settings}
    return _load_each({name: functools.partial(load_flux_schnell, device, p, folder, placement=s)
                       for name, (p, s) in settings.items()})


def run_side_by_side(model: FluxModel, requested: bool, iterations: int = 50, rounds: int = 10, seed: int = 0) -> dict:
    """`side_by_side` of the plain pattern, `model` and bf16 on the model's GPU, or why it did not run."""
    if not requested:
        return {"applicable": False, "reason": "not requested (parameter baseline=False; it loads two more models)"}
    if model.device.type != "cuda":
        return {"applicable": False, "reason": "diffusers' bitsandbytes quantizer needs a GPU for the plain pattern"}
    variants, resident, skipped = load_side_by_side(str(model.source.path), str(model.device), model.preset.name,
                                                    fluxkit_model=model)
    result = side_by_side(variants, iterations=iterations, rounds=min(rounds, iterations), seed=seed,
                          also_relative_to=fast_reference(variants))
    result.update(applicable=True, resident_bytes=resident, skipped=skipped)
    return result
