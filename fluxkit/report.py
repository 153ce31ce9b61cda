"""Report contents: per-notebook sections, budget verdicts, metrics.json (versioned schema), summary.md.

A budget that only means something on the target GPU or on full-size weights is reported as
"not applicable" with the reason, never silently passed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .config import Preset

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "schemas" / "metrics.schema.json"
PASS, FAIL, NA = "pass", "fail", "not applicable"


def weights_statement(model_info: dict) -> str:
    synthetic = model_info["model"]["synthetic"]
    if synthetic:
        return (f"Weights: SYNTHETIC ({synthetic['preset']}, seed {synthetic['seed']}, random values). Memory and "
                "speed figures hold for the real model at the same size; image-quality figures mean nothing.")
    return f"Weights: real {model_info['model']['description']}."


def save_section(out_dir: str | Path | None, name: str, data: dict) -> Path | None:
    """One notebook's figures, merged into metrics.json by `fluxkit validate` (nothing saved without out_dir)."""
    if not out_dir:
        return None
    path = Path(out_dir) / f"{name}.json"
    path.write_text(json.dumps(to_jsonable(data), indent=2) + "\n")
    return path


def to_jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def _verdict(name: str, value, limit, unit: str, ok: bool | None, note: str = "") -> dict:
    status = NA if ok is None else (PASS if ok else FAIL)
    return {"name": name, "value": value, "limit": limit, "unit": unit, "status": status, "note": note}


def evaluate_budgets(metrics: dict, preset: Preset) -> list[dict]:
    """Verdicts for every budget of the preset from the figures the notebooks saved."""
    b = preset.budgets
    model = metrics["model"]
    full_size = model["synthetic"] is None or model["synthetic"]["preset"] == "full"
    size_note = "" if full_size else "needs full-size weights (this run used the tiny synthetic checkpoint)"
    vram, latency, quality = metrics.get("vram"), metrics.get("latency"), metrics.get("quality")
    on_gpu = bool(vram and vram.get("device_memory_available"))
    gpu_note = "" if on_gpu else "device memory is not measured on CPU"
    out = []

    if latency:
        p99 = latency["plain"]["summary"]["total"]["p99"]
        on_target = b.latency_target_device.lower() in metrics["device_name"].lower()
        note = "" if on_target and full_size else (
            f"budget is for {b.latency_target_device}; measured on {metrics['device_name']}" if full_size else size_note)
        out.append(_verdict("p99_latency", round(p99, 4), b.p99_latency_s, "s", (p99 < b.p99_latency_s)
                            if on_target and full_size else None, note))
    if vram:
        tw = vram["weights"]["transformer"]["gib"]
        band = b.transformer_weights_gib
        applicable = band is not None and full_size
        out.append(_verdict("transformer_weights", tw, list(band) if band else None, "GiB",
                            (band[0] <= tw <= band[1]) if applicable else None,
                            size_note if band is not None and not full_size else ("" if band else "no band for this preset")))
        gpu_full = on_gpu and full_size
        note = gpu_note or size_note
        rise = vram["rise_during_generate"]["bytes"] / 1e6 if on_gpu else None
        out.append(_verdict("generate_rise", rise and round(rise, 1), b.generate_rise_mb, "MB",
                            (rise < b.generate_rise_mb) if gpu_full else None, "" if gpu_full else note))
        drift = vram["drift"]["bytes"] / 1e6 if on_gpu else None
        out.append(_verdict("drift", drift and round(drift, 2), b.drift_mb, "MB",
                            (abs(drift) < b.drift_mb) if on_gpu else None, gpu_note))
        held = vram["reserved_peak_during_generate"]["gb"] if on_gpu else None
        detail = (f"peak reserved by the allocator; peak allocated {vram['peak_during_generate']['gb']} GB, whole card "
                  f"in use {vram['device_used_after_generate']['gb']} GB (CUDA context included)") if on_gpu else ""
        out.append(_verdict("total_vram", held, b.total_vram_gb, "GB", (held <= b.total_vram_gb) if gpu_full else None,
                            detail if gpu_full else "; ".join(filter(None, (note, detail)))))
    if quality:
        cosines = [c["clip_image_cosine"] for c in quality["cases"]]
        failed = [c["name"] for c in quality["cases"] if not c["passed"]]
        note = f"failed cases: {', '.join(failed)}" if failed else ""
        if not quality["clip_real"]:
            note = (note + "; " if note else "") + "random-init CLIP: plumbing check, not a quality measure"
        out.append(_verdict("clip_image_cosine_min", round(min(cosines), 4), b.clip_cosine_min, "cosine",
                            not failed, note))
    return out


def summary_markdown(metrics: dict) -> str:
    lines = [f"# fluxkit validation: {metrics['name']}", "",
             f"- {metrics['weights_statement']}",
             f"- Model: {metrics['model']['description']}; preset `{metrics['quantization']}`; device "
             f"{metrics['device_name']} ({metrics['device']}); dtype {metrics['dtype']}"]
    if metrics.get("quality"):
        lines.append(f"- CLIP backbone: {metrics['quality']['clip']}")
    lines += [f"- Created {metrics['created']} with fluxkit {metrics['fluxkit_version']}", "",
              "| budget | value | limit | unit | verdict | note |", "|---|---|---|---|---|---|"]
    for v in metrics["budgets"]:
        limit = "-".join(map(str, v["limit"])) if isinstance(v["limit"], list) else v["limit"]
        lines.append(f"| {v['name']} | {v['value']} | {limit} | {v['unit']} | **{v['status']}** | {v['note']} |")
    lines += ["", "| notebook | status | html |", "|---|---|---|"]
    for name, status in metrics["notebooks"].items():
        lines.append(f"| {name} | {status} | [{name}.html]({name}.html) |")
    lat = metrics.get("latency")
    if lat:
        lines += ["", "Latency (s, after warm-up, device-synchronized):", "",
                  "| series | n | p50 | p90 | p99 | p99.9 | mean | std | outliers |", "|---|---|---|---|---|---|---|---|---|"]
        for series in ("plain", "true_cfg"):
            if series in lat:
                s = lat[series]["summary"]["total"]
                lines.append(f"| {series} | {s['n']} | {s['p50']:.4f} | {s['p90']:.4f} | {s['p99']:.4f} | "
                             f"{s['p99_9']:.4f} | {s['mean']:.4f} | {s['std']:.4f} | {len(s['outliers'])} |")
    lines += ["", f"Overall: **{metrics['verdict']}**", ""]
    return "\n".join(lines)


def validate_metrics(metrics: dict) -> None:
    import jsonschema

    jsonschema.validate(metrics, json.loads(SCHEMA_PATH.read_text()))


def conclusion(section: str, data: dict, model) -> str:
    """The verdicts one notebook can give on its own, as text for its last cell."""
    info = model.info()
    metrics = {"model": info["model"], "device_name": info["device_name"], section: data}
    lines = [weights_statement(info)]
    for v in evaluate_budgets(metrics, model.preset):
        lines.append(f"{v['name']}: {v['value']} {v['unit']} (limit {v['limit']}) -> {v['status']}"
                     + (f" [{v['note']}]" if v["note"] else ""))
    return "\n".join(lines)
