"""Quantization tradeoffs: every preset, with T5 quantized or not, under a placement, side by side on weight
bytes, load time, GPU memory, latency and fidelity to bf16 images of the same prompts and seeds.

On a GPU each variant runs in a fresh process (`python -m fluxkit.sweep`), so that its memory is its own;
on a CPU, where device memory is not measured, they run in this process. Fidelity on random weights
measures quantization error on Gaussian-like weights, not image quality on trained weights: every
result says so, next to the published figures for the real schnell.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .bench import DEFAULT_PROMPT, call_prompt
from .config import SWEEP_VARIANT_TIMEOUT_S, Preset, available_presets, load_placement, load_preset
from .errors import FluxkitError, InputError, one_line
from .images import load_png, save_png
from .memory import GB, device_available, release_device_memory
from .metrics import ClipScorer, load_lpips, psnr, ssim, summarize
from .references import reference_prompts
from .report import from_jsonable, to_jsonable

log = logging.getLogger(__name__)

REFERENCE = "bf16"
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
    from .hub import resolve_model
    from .loading import load_flux_schnell, weight_seconds
    from .quantization import gguf_file, unsupported_placement

    preset = variant.resolved_preset()
    gguf_write_s = None
    if preset.quantization.backend == "gguf" and not unsupported_placement(preset.quantization,
                                                                          load_placement(variant.placement)):
        # the file is written once per checkpoint and type; the load below reads it, pre-quantized
        start = time.perf_counter()
        gguf_file(Path(resolve_model(model).path), preset.quantization.quant_type)
        gguf_write_s = time.perf_counter() - start
    start = time.perf_counter()
    m = load_flux_schnell(device=device, quantization=preset, model=model, placement=variant.placement)
    load_s = time.perf_counter() - start
    on_gpu = device_available(m.device)
    resident = torch.cuda.memory_allocated(m.device) if on_gpu else None
    image_dir.mkdir(parents=True, exist_ok=True)
    peaks = []
    for case in prompts:
        save_png(m.generate(case["prompt"], seed=case["seed"]), image_dir / f"{case['name']}.png")
        peaks.append(m.last_call.peak_reserved)
    times = []
    for i in range(iterations):
        t0 = time.perf_counter()
        m.generate(call_prompt(DEFAULT_PROMPT, i), seed=i)
        times.append(time.perf_counter() - t0)
        peaks.append(m.last_call.peak_reserved)
    info = m.info()
    row = {"variant": variant.name, "preset": variant.preset, "t5_quantized": variant.t5_quantized,
           "placement": variant.placement, "compiled": info["compiled"], "cuda_graphs": info["cuda_graphs"],
           "device_name": info["device_name"], "weights": {k: v["bytes"] for k, v in m.weight_report().items()},
           "load_s": load_s, "load_stages_s": m.load_stages, "weights_load_s": weight_seconds(m.load_stages),
           "gguf_write_s": gguf_write_s,
           "compile_s": m.compile_seconds, "resident_bytes": resident,
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

    from .loading import load_flux_schnell, weight_seconds
    from .quantize import save_quantized

    preset = variant.resolved_preset()
    backend = preset.quantization.backend
    if backend == "none":
        return {"reason": "unquantized: nothing to pre-quantize"}
    if backend == "gguf":
        return {"reason": "loaded from its GGUF file, pre-quantized by design (gguf_write_s: the one-time write)"}
    if backend != "bitsandbytes_4bit":
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
        loaded = weight_seconds(m.load_stages)
        del m
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"weights_s": loaded, "quantize_on_load_weights_s": quantize_on_load_s, "save_s": save_s}


def _measure_in_fresh_process(model: str, device: str, variant: Variant, iterations: int, image_dir: Path,
                              prompts: list[dict], timeout_s: float) -> dict:
    image_dir.mkdir(parents=True, exist_ok=True)
    (image_dir / "prompts.json").write_text(json.dumps(prompts))
    command = [sys.executable, "-m", "fluxkit.sweep", "--model", model, "--device", device,
               "--preset", variant.preset, "--t5", "quantized" if variant.t5_quantized else "bf16",
               "--placement", variant.placement, "--compile", "on" if variant.compiled else "off",
               "--iterations", str(iterations), "--prompts", str(image_dir / "prompts.json"), "--images", str(image_dir)]
    try:  # a variant that stalls (a compile that never ends) must not take the rest of the sweep with it
        run = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"did not finish within {timeout_s:g} s (load, compile warm-up, {len(prompts)} prompts and "
                           f"{iterations} calls); stopped") from None
    if run.returncode != 0:  # a crash the process could not report itself
        lines = run.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit {run.returncode}")
    row = json.loads(run.stdout.strip().splitlines()[-1])
    if "error" in row:
        raise RuntimeError(row["error"])
    return row


def load_prompts(path: str | Path | None = None, count: int | None = None) -> list[dict]:
    """Prompt cases ({name, prompt, seed}) from a YAML or JSON file with a `cases` list, or the reference prompts."""
    import yaml

    if path is None:
        cases = reference_prompts()
    else:
        data = yaml.safe_load(Path(path).read_text())
        cases = data["cases"] if isinstance(data, dict) and "cases" in data else data
        if not (isinstance(cases, list) and cases and all(isinstance(c, dict) and {"name", "prompt", "seed"} <= set(c)
                                                          for c in cases)):
            raise InputError(f"prompts={path}: expected a list `cases` of {{name, prompt, seed}} entries")
    return cases[:count] if count else cases


def sweep(model: str, device: str, variant_list: list[Variant], clip: ClipScorer, iterations: int = 5,
          prompts: list[dict] | None = None, variant_timeout_s: float = SWEEP_VARIANT_TIMEOUT_S,
          partial: Path | None = None, compiled: tuple[bool, ...] = (True, False)) -> dict:
    """Measure every variant, then score its images against the reference variant's (same prompts and seeds).

    On a GPU each variant runs compiled and/or eager (`compiled`), each in a process of its own; one that runs
    longer than `variant_timeout_s` is stopped and its row says so. Each
    row is appended to `partial` (JSON lines) as soon as it is measured, so a run stopped part-way keeps the
    memory and latency of the variants it finished (fidelity is scored at the end)."""
    import shutil
    import tempfile

    prompts = prompts or load_prompts(count=2)
    fresh = torch.cuda.is_available() and device != "cpu"
    if fresh:
        variant_list = compile_axis(variant_list, compiled)
    work = Path(tempfile.mkdtemp(prefix="fluxkit-sweep-"))
    try:
        return _sweep(model, device, variant_list, clip, iterations, prompts, fresh, work, variant_timeout_s, partial)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _sweep(model: str, device: str, variant_list: list[Variant], clip: ClipScorer, iterations: int,
           prompts: list[dict], fresh: bool, out_dir: Path, variant_timeout_s: float, partial: Path | None) -> dict:
    rows = []
    for i, variant in enumerate(variant_list, 1):
        image_dir = out_dir / variant.name.replace("@", "_")
        start = time.perf_counter()
        try:
            if fresh:
                row = _measure_in_fresh_process(model, device, variant, iterations, image_dir, prompts, variant_timeout_s)
            else:
                row = measure_variant(model, device, variant, prompts, iterations, image_dir)
        except (FluxkitError, RuntimeError) as err:  # a variant this device cannot run stays, with the reason
            row = {"variant": variant.name, "preset": variant.preset, "placement": variant.placement,
                   "t5_quantized": variant.t5_quantized, "compiled": variant.compiled,
                   "skipped": f"{type(err).__name__}: {err}"}
        # a long sweep says how far it has got, and keeps what it has measured
        log.info("sweep variant %d/%d %s: %.0f s", i, len(variant_list), variant.name, time.perf_counter() - start)
        if partial is not None:
            with open(partial, "a") as f:
                f.write(json.dumps(to_jsonable(row)) + "\n")
        if "skipped" not in row:
            row["images"] = image_dir
        rows.append(row)
    reference = next((r for r in rows if r["preset"] == REFERENCE and "skipped" not in r), None)  # compiled first
    lpips, lpips_note = load_lpips()
    for row in rows:
        if "skipped" in row or reference is None:
            continue
        pairs = [(load_png(Path(row["images"]) / f"{c['name']}.png"),
                  load_png(Path(reference["images"]) / f"{c['name']}.png")) for c in prompts]
        row["fidelity"] = {"psnr_db": min(psnr(a, b) for a, b in pairs), "ssim": min(ssim(a, b) for a, b in pairs),
                           "clip_image_cosine": min(clip.image_cosine(a, b) for a, b in pairs)}
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


def _main() -> None:
    parser = argparse.ArgumentParser(description="measure one sweep variant in this process; prints one JSON line")
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--preset", required=True)
    parser.add_argument("--t5", choices=("quantized", "bf16"), default="quantized")
    parser.add_argument("--placement", default="resident")
    parser.add_argument("--compile", choices=("on", "off"), default="on")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--prompts", required=True, help="a JSON list of {name, prompt, seed}")
    parser.add_argument("--images", required=True)
    args = parser.parse_args()
    variant = Variant(args.preset, args.t5 == "quantized", load_placement(args.placement).name, args.compile == "on")
    try:
        row = measure_variant(args.model, args.device, variant, load_prompts(args.prompts), args.iterations,
                              Path(args.images))
    except (FluxkitError, RuntimeError) as err:  # the whole reason, on one line, for the sweep's row
        row = {"error": one_line(err)}
    print(json.dumps(row))


if __name__ == "__main__":
    _main()
