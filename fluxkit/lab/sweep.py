"""Quantization tradeoffs: every preset, with T5 quantized or not, under a placement, side by side on weight
bytes, load time, GPU memory, latency and fidelity to bf16 images of the same prompts and seeds.

On a GPU each variant runs in a fresh process (`fluxkit.lab.fresh`), so that its memory is its own; on a CPU,
where device memory is not measured, they run in this process; on a Ray cluster each is a task of its own
(`fluxkit.lab.cluster`). Fidelity on random weights
measures quantization error on Gaussian-like weights, not image quality on trained weights: every
result says so, next to the published figures for the real schnell.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Preset, available_presets, load_placement, load_preset
from ..errors import FluxkitError
from ..images import load_png, save_png
from ..loading import WARM_UP_STAGE
from ..memory import GB, device_available, release_device_memory
from .bench import timed_calls
from .fresh import FreshProcessError, call_in_fresh_process, reason
from .metrics import ClipScorer, load_lpips, psnr, ssim, summarize
from .prompts import reference_prompts
from .report import from_jsonable, to_jsonable

log = logging.getLogger(__name__)

REFERENCE = "bf16"
# How long one variant's process may run on a GPU before it is stopped and its row kept with the reason (the longest
# seen, bf16 resident compiled on an H200, full-size synthetic checkpoint, took 123 s from process start to its
# last call).
SWEEP_VARIANT_TIMEOUT_S = 900.0
FIDELITY_NOTE = ("fidelity on random weights measures quantization error on Gaussian-like weights, not image quality "
                 "on trained weights")
# SVDQuant (arXiv 2411.05007), FLUX.1-schnell 4 steps on MJHQ, against bf16 images of the same seeds.
PUBLISHED = {"nf4 (W4A16, real schnell)": {"psnr_db": 18.2, "lpips": 0.257},
             "int8 (W8A8, real schnell)": {"psnr_db": 22.9, "lpips": 0.120}}


@dataclass(frozen=True)
class Variant:
    preset: str
    t5_quantized: bool
    placement: str
    # None: as the preset says (compilation and CUDA graphs only act on a CUDA device); False: neither
    compiled: bool | None = None

    @property
    def name(self) -> str:
        t5 = "" if self.t5_quantized or self.preset == REFERENCE else "+t5-bf16"
        return f"{self.preset}{t5}{'+eager' if self.compiled is False else ''}@{self.placement}"

    def resolved_preset(self) -> Preset:
        preset = load_preset(self.preset)
        if self.compiled is not None:
            preset = dataclasses.replace(preset, compile=self.compiled, cuda_graphs=preset.cuda_graphs and self.compiled)
        if self.t5_quantized:
            return preset
        components = tuple(c for c in preset.quantization.components if c != "text_encoder_2")
        if not components:
            return preset
        return dataclasses.replace(preset, quantization=dataclasses.replace(preset.quantization, components=components))


def variants(presets: list[str] | None = None, placements: tuple[str, ...] = ("resident",),
             t5: tuple[bool, ...] = (True, False)) -> list[Variant]:
    """The reference first, then every preset with T5 quantized and/or not (`t5`), where the preset quantizes it."""
    names = presets or available_presets()
    out = [Variant(REFERENCE, False, placement) for placement in placements]
    for name in names:
        if name == REFERENCE:
            continue
        t5_axis = t5 if "text_encoder_2" in load_preset(name).quantization.components else (False,)
        out += [Variant(name, t5_quantized, placement) for placement in placements for t5_quantized in t5_axis]
    return out


def compile_axis(variant_list: list[Variant], compiled: tuple[bool, ...] = (True, False)) -> list[Variant]:
    """Each variant compiled and/or eager: a GPU sweep's own axis (on a CPU nothing is compiled)."""
    return [dataclasses.replace(v, compiled=c) for v in variant_list for c in compiled]


def measure_variant(model: str, device: str, variant: Variant, prompts: list[dict], iterations: int,
                    image_dir: Path) -> dict:
    """Load one variant, render the prompts into `image_dir`, time `iterations` calls (after one warm-up), then
    (see `prequantized_load`) load it again from a pre-quantized folder."""
    from ..hub import resolve_model
    from ..loading import load_flux_schnell
    from ..quantizers.gguf import gguf_file

    preset = variant.resolved_preset()
    gguf_write_s = None
    if preset.quantization.backend == "gguf" and not preset.quantization.quantizer.unsupported(
            preset.quantization, None, load_placement(variant.placement)):
        # the file is written once per checkpoint and type; the load below reads it, pre-quantized
        start = time.perf_counter()
        gguf_file(Path(resolve_model(model).path), preset.quantization.quant_type)
        gguf_write_s = time.perf_counter() - start
    start = time.perf_counter()
    m = load_flux_schnell(device=device, quantization=preset, model=model, placement=variant.placement)
    load_s = time.perf_counter() - start
    m.profiling = True  # this process is the variant's own: its peaks per call are what the row reports
    on_gpu = device_available(m.device)
    resident = torch.cuda.memory_allocated(m.device) if on_gpu else None
    image_dir.mkdir(parents=True, exist_ok=True)
    peaks = []
    for case in prompts:
        save_png(m.generate(case["prompt"], seed=case["seed"]), image_dir / f"{case['name']}.png")
        peaks.append(m.last_call.peak_reserved)
    rows = timed_calls(m, iterations)
    times = [row["total"] for row in rows]
    peaks += [row.get("peak_reserved") for row in rows]
    info = m.info()
    row = {"variant": variant.name, "preset": variant.preset, "t5_quantized": variant.t5_quantized,
           "placement": variant.placement, "compiled": info["compiled"], "cuda_graphs": info["cuda_graphs"],
           "device_name": info["device_name"], "weights": {k: v["bytes"] for k, v in m.weight_report().items()},
           "load_s": load_s, "load_stages_s": m.stages.seconds, "weights_load_s": m.stages.weights_seconds(),
           "gguf_write_s": gguf_write_s, "compile_s": m.stages.seconds.get(WARM_UP_STAGE), "resident_bytes": resident,
           "peak_reserved_bytes": max(peaks) if on_gpu else None, "planned_resident_bytes": m.plan.resident_bytes,
           "latency": summarize(times)}
    device_used = m.device
    del m
    release_device_memory(device_used)
    row["prequantized"] = prequantized_load(model, device, variant, row["weights_load_s"], image_dir.parent)
    return row


def prequantized_load(model: str, device: str, variant: Variant, quantize_on_load_s: float, work: Path) -> dict:
    """Seconds of reading weights from a pre-quantized folder of this variant (written by `fluxkit quantize`), beside
    quantize-on-load's, or why it was not measured. Compilation plays no part in reading weights: on a GPU, where
    each variant also runs compiled, only the eager one measures it."""
    import shutil

    from ..loading import load_flux_schnell
    from ..quantize import save_quantized

    preset = variant.resolved_preset()
    backend = preset.quantization.backend
    if backend == "none":
        return {"reason": "unquantized: nothing to pre-quantize"}
    if backend == "gguf":
        return {"reason": "loaded from its GGUF file, pre-quantized by design (gguf_write_s: the one-time write)"}
    if not preset.quantization.quantizer.saves_prequantized:
        return {"reason": f"{backend} presets are not saved pre-quantized (fluxkit quantize: bitsandbytes 4-bit)"}
    if variant.compiled:
        return {"reason": "measured on the eager variant (compilation plays no part in reading weights)"}
    folder = work / f"prequantized-{variant.name.replace('@', '_')}"
    try:
        start = time.perf_counter()
        save_quantized(model, folder, preset, variant.placement, device)
        save_s = time.perf_counter() - start
        m = load_flux_schnell(device=device, quantization=dataclasses.replace(preset, compile=False), model=folder,
                              placement=variant.placement)
        loaded = m.stages.weights_seconds()
        del m
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"weights_s": loaded, "quantize_on_load_weights_s": quantize_on_load_s, "save_s": save_s}


def measure_in_fresh_process(model: str, device: str, variant: Variant, iterations: int, image_dir: Path,
                             prompts: list[dict], timeout_s: float | None = None, threads: int | None = None) -> dict:
    """`measure_variant` in a process of its own (its memory, compile and stalls its own), stopped after
    `timeout_s`."""
    try:
        return call_in_fresh_process("fluxkit.lab.sweep:measure_variant_json", dict(
            model=model, device=device, variant=dataclasses.asdict(variant), prompts=prompts, iterations=iterations,
            image_dir=str(image_dir)), timeout_s, threads)
    except FreshProcessError as err:
        if "did not finish within" in str(err):
            raise FreshProcessError(f"did not finish within {timeout_s:g} s (load, compile warm-up, {len(prompts)} "
                                    f"prompts and {iterations} calls); stopped") from None
        raise


def measure_variant_json(model: str, device: str, variant: dict, prompts: list[dict], iterations: int,
                         image_dir: str) -> dict:
    """`measure_variant` with JSON arguments: what a fresh process is asked to run."""
    return measure_variant(model, device, Variant(**variant), prompts, iterations, Path(image_dir))


def image_dir(work: Path, variant: Variant) -> Path:
    """Where a variant's images wait to be scored."""
    return work / variant.name.replace("@", "_")


def skipped_row(variant: Variant, reason: str) -> dict:
    """The row of a variant that did not run: it stays in the result, with the reason."""
    return {"variant": variant.name, "preset": variant.preset, "placement": variant.placement,
            "t5_quantized": variant.t5_quantized, "compiled": variant.compiled, "skipped": reason}


def sweep(model: str, device: str, variant_list: list[Variant], clip: ClipScorer, iterations: int = 5,
          prompts: list[dict] | None = None, variant_timeout_s: float = SWEEP_VARIANT_TIMEOUT_S,
          partial: Path | None = None, compiled: tuple[bool, ...] = (True, False), ray: str | None = None) -> dict:
    """Measure every variant, then score its images against the reference variant's (same prompts and seeds).

    On a GPU each variant runs compiled and/or eager (`compiled`), each in a process of its own, stopped after
    `variant_timeout_s` with its row saying so; on a CPU they run in this process. With `ray` (an address, `auto`,
    or `local` for a cluster of this machine's GPUs started here) each variant is a Ray task on a GPU of the cluster
    where it has GPUs (this process needs none), else on its CPUs, again in a process of its own, and a worker lost
    mid-variant is retried once (`fluxkit.lab.cluster`).
    Each row is appended to `partial` (JSON lines) as soon as it is measured, so a run stopped part-way keeps the
    memory and latency of the variants it finished (fidelity is scored at the end)."""
    import shutil
    import tempfile

    prompts = prompts or reference_prompts()[:2]
    work = Path(tempfile.mkdtemp(prefix="fluxkit-sweep-"))

    def keep(row: dict) -> None:  # a long sweep says how far it has got, and keeps what it has measured
        log.info("sweep variant %s: %s", row["variant"], row.get("skipped", "measured"))
        if partial is not None:
            with open(partial, "a") as f:
                f.write(json.dumps(to_jsonable({k: v for k, v in row.items() if k != "images"})) + "\n")

    try:
        if ray is not None:  # where the tasks run, GPUs or CPUs, is the cluster's to say
            from .cluster import sweep_on_ray

            rows = sweep_on_ray(ray, model, device, variant_list, compiled, prompts, iterations, work,
                                variant_timeout_s, keep)
        else:
            gpu = torch.cuda.is_available() and device != "cpu"
            rows = [_measure_here(model, device, v, prompts, iterations, image_dir(work, v), variant_timeout_s, gpu,
                                  keep) for v in (compile_axis(variant_list, compiled) if gpu else variant_list)]
        return _scored(model, device, rows, prompts, clip)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure_here(model: str, device: str, variant: Variant, prompts: list[dict], iterations: int, image_dir: Path,
                  timeout_s: float, fresh: bool, keep) -> dict:
    """One variant on this machine: in a fresh process (a GPU's), or in this one (a CPU's)."""
    try:
        if fresh:
            row = measure_in_fresh_process(model, device, variant, iterations, image_dir, prompts, timeout_s)
        else:
            row = measure_variant(model, device, variant, prompts, iterations, image_dir)
        row["images"] = image_dir
    except (FluxkitError, RuntimeError) as err:  # a variant this device cannot run stays, with the reason
        row = skipped_row(variant, reason(err))
    keep(row)
    return row


def _scored(model: str, device: str, rows: list[dict], prompts: list[dict], clip: ClipScorer) -> dict:
    """The result: each measured row's fidelity to the reference variant's images (the same prompts and seeds)."""
    reference = next((r for r in rows if r["preset"] == REFERENCE and "skipped" not in r), None)  # compiled first
    lpips, lpips_note = load_lpips()
    if reference is not None:  # each image through CLIP once (ViT-L/14 takes about a second an image on a CPU)
        references = [load_png(Path(reference["images"]) / f"{c['name']}.png") for c in prompts]
        reference_features = [clip.image_features(image) for image in references]
    for row in rows:
        if "skipped" in row or reference is None:
            continue
        images = [load_png(Path(row["images"]) / f"{c['name']}.png") for c in prompts]
        pairs = list(zip(images, references))
        cosines = [float(clip.image_features(image) @ features) for image, features in zip(images, reference_features)]
        row["fidelity"] = {"psnr_db": min(psnr(a, b) for a, b in pairs), "ssim": min(ssim(a, b) for a, b in pairs),
                           "clip_image_cosine": min(cosines)}
        if lpips:  # the worst prompt, as for the others
            row["fidelity"]["lpips"] = max(lpips(a, b) for a, b in pairs)
    for row in rows:
        row.pop("images", None)  # scored; the images of random weights are not kept
    return {"model": model, "device": device, "rows": rows, "reference": REFERENCE, "prompts": prompts,
            "clip": clip.describe(), "lpips": lpips_note,
            "fidelity_note": FIDELITY_NOTE, "published": PUBLISHED}


def load_result(path: str | Path) -> dict:
    """A `sweep.json` written by `fluxkit sweep` (on a GPU host, say), ready for `fits`, `load_times` and the plots."""
    return from_jsonable(json.loads(Path(path).read_text()))


# What times a variant's run, or says where it ran: the only columns a rerun of the same sweep, on Ray or not, on the
# same kind of card, may change.
TIMING_COLUMNS = frozenset({"latency", "load_s", "load_stages_s", "weights_load_s", "compile_s", "gguf_write_s",
                            "prequantized", "ran_on"})


def content_differences(rows: list[dict], other: list[dict]) -> list[str]:
    """Where two sweeps' rows differ in anything but timing (`TIMING_COLUMNS`): "variant: column" for each, and a
    variant that only one of them has. Empty: the same results."""
    by_name = {r["variant"]: r for r in other}
    found = [f"{name}: only in the second" for name in by_name.keys() - {r["variant"] for r in rows}]
    for row in rows:
        twin = by_name.get(row["variant"])
        if twin is None:
            found.append(f"{row['variant']}: only in the first")
            continue
        found += [f"{row['variant']}: {column}" for column in sorted((row.keys() | twin.keys()) - TIMING_COLUMNS)
                  if row.get(column) != twin.get(column)]
    return found


def fits(result: dict, budget_gb: float) -> dict:
    """Which variants fit a GPU budget (peak reserved, or the plan's resident bytes where memory was not measured),
    and the fastest of those."""
    marked = []
    for row in result["rows"]:
        if "skipped" in row:
            continue
        needed = row["peak_reserved_bytes"] or row["planned_resident_bytes"]
        marked.append({"variant": row["variant"], "needed_gb": round(needed / GB, 3), "fits": needed <= budget_gb * GB,
                       "measured": row["peak_reserved_bytes"] is not None, "p50_s": row["latency"]["p50"]})
    fastest = min((m for m in marked if m["fits"]), key=lambda m: m["p50_s"], default=None)
    return {"budget_gb": budget_gb, "variants": marked, "fastest_within": fastest and fastest["variant"]}


def load_times(result: dict) -> list[dict]:
    """Per variant: seconds reading weights with quantize-on-load, and from a pre-quantized folder or why not."""
    return [{"variant": r["variant"], "quantize_on_load_s": round(r["weights_load_s"], 3),
             "prequantized_s": (round(r["prequantized"]["weights_s"], 3) if "weights_s" in r["prequantized"]
                                else r["prequantized"]["reason"])}
            for r in result["rows"] if "skipped" not in r]


def write_csv(result: dict, path: str | Path) -> Path:
    path = Path(path)
    columns = ["variant", "preset", "t5_quantized", "placement", "compiled", "weights_gb", "load_s",
               "weights_load_s", "prequantized_weights_load_s", "gguf_write_s", "compile_s", "resident_gb",
               "peak_reserved_gb", "p50_s", "p99_s", "psnr_db", "ssim",
               "clip_image_cosine", "lpips", "skipped"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in result["rows"]:
            gb = (lambda v: None if v is None else round(v / GB, 4))
            fidelity = r.get("fidelity", {})
            writer.writerow({"variant": r["variant"], "preset": r["preset"], "t5_quantized": r["t5_quantized"],
                             "placement": r["placement"], "compiled": r["compiled"], "skipped": r.get("skipped", ""),
                             **({} if "skipped" in r else {
                                 "weights_gb": gb(r["weights"]["total"]), "load_s": round(r["load_s"], 3),
                                 "weights_load_s": round(r["weights_load_s"], 3),
                                 "prequantized_weights_load_s": r["prequantized"].get("weights_s"),
                                 "gguf_write_s": r["gguf_write_s"] and round(r["gguf_write_s"], 3),
                                 "compile_s": r["compile_s"], "resident_gb": gb(r["resident_bytes"]),
                                 "peak_reserved_gb": gb(r["peak_reserved_bytes"]), "p50_s": r["latency"]["p50"],
                                 "p99_s": r["latency"]["p99"], **fidelity})})
    return path
