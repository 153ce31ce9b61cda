"""Report contents: per-notebook sections, budget verdicts, metrics.json (versioned schema), summary.md.

A budget that only means something on the target GPU or on full-size weights is reported as
"not applicable" with the reason, never silently passed. Memory budgets read memory the way Vortex
does: `memory_allocated()` after loading in a fresh process, peaks during a call, GB = 10**9 bytes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..config import Preset
from ..memory import GB, GIB

SCHEMA_VERSION = 2
SCHEMA_PATH = Path(__file__).parent / "schemas" / "metrics.schema.json"
PASS, FAIL, NA = "pass", "fail", "not applicable"
# A figure derived from an SM-slice stand-in (fluxkit/lab/standin.py) is judged on its own line and does not decide
# the overall verdict: it is a measurement scaled, not a measurement of the target card.
STAND_IN_PASS, STAND_IN_FAIL = "pass on the stand-in", "fail on the stand-in"


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


def from_jsonable(value):
    """The inverse of `to_jsonable`: "inf", "-inf" and "nan" back to floats (a saved sweep.json plotted again)."""
    if value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    return value


def _verdict(name: str, value, limit, unit: str, ok: bool | None, note: str = "") -> dict:
    status = NA if ok is None else (PASS if ok else FAIL)
    return {"name": name, "value": value, "limit": limit, "unit": unit, "status": status, "note": note}


def _gb(nbytes: int | float) -> float:
    return round(nbytes / GB, 4)


def evaluate_budgets(metrics: dict, preset: Preset) -> list[dict]:
    """Verdicts for every budget of the preset from the figures the notebooks saved."""
    b = preset.budgets
    synthetic = metrics["model"]["synthetic"]
    full_size = synthetic is None or synthetic["preset"] == "full"
    size_note = "needs full-size weights (this run used the tiny synthetic checkpoint)"
    vram, latency, quality = metrics.get("vram"), metrics.get("latency"), metrics.get("quality")
    on_gpu = bool(vram and vram.get("device_memory_available"))
    judged = on_gpu and full_size
    why_not = "" if judged else ("device memory is not measured on CPU" if vram and not on_gpu else size_note)
    out = []

    if latency:
        p99 = latency["plain"]["summary"]["total"]["p99"]
        on_target = b.latency_target_device.lower() in metrics["device_name"].lower()
        note = "" if on_target and full_size else (
            f"budget is for {b.latency_target_device}; measured on {metrics['device_name']}" if full_size else size_note)
        projection = latency.get("estimate") or {}
        if projection.get("applicable") and not on_target and full_size:
            key = next((k for k in projection["projected_p99_s"] if k == "rtx3060"), None)
            if key:
                note += (f"; projected for the RTX 3060 ({projection['placement']} placement): P99 "
                         f"{projection['projected_p99_s'][key]:.2f} s (ESTIMATE: each phase's GPU time scaled by "
                         "published peaks)")
        out.append(_verdict("p99_latency", round(p99, 4), b.p99_latency_s, "s",
                            (p99 < b.p99_latency_s) if on_target and full_size else None, note))
        stand_in = latency.get("stand_in") or {}
        derived = stand_in.get("rtx3060") or {}
        if derived.get("applicable") and full_size and not on_target:
            worst = max(derived["p99_s"].values())
            measured = latency["plain"]["summary"]["total"]
            out.append({"name": "p99_latency_stand_in", "value": round(worst, 3), "limit": b.p99_latency_s,
                        "unit": "s", "status": STAND_IN_PASS if worst < b.p99_latency_s else STAND_IN_FAIL,
                        "note": f"{derived['label']}. {stand_in['sms']} of {stand_in['total_sms']} SMs of "
                                f"{stand_in['device_name']} ({stand_in['peaks']['bf16_tflops']} TFLOP/s bf16, "
                                f"{stand_in['peaks']['copy_gbps']} GB/s copy), measured P50 {measured['p50']:.3f} s, "
                                "P99 {:.3f} s; the RTX 3060's P99 on ".format(measured["p99"])
                                + ", ".join(f"{link}: {s:.2f} s" for link, s in derived["p99_s"].items())})
    if vram:
        resident = vram["resident_after_load"]["bytes"] if on_gpu else None
        low, high = b.flux_resident_gb
        out.append(_verdict("flux_resident", resident and _gb(resident), [low, high], "GB",
                            (low * GB <= resident <= high * GB) if judged else None,
                            f"memory_allocated() after loading = {resident / GIB:.4f} GiB" if judged else why_not))
        if on_gpu:
            peak_alloc = vram["peak_during_generate"]["bytes"]
            peak_reserved = vram["reserved_peak_during_generate"]["bytes"]
        peak = max(peak_alloc, peak_reserved) if on_gpu else None
        out.append(_verdict("flux_peak", peak and _gb(peak), b.flux_peak_gb, "GB",
                            (peak <= b.flux_peak_gb * GB) if judged else None,
                            f"peak allocated {_gb(peak_alloc)} GB, peak reserved {_gb(peak_reserved)} GB "
                            f"({peak / GIB:.4f} GiB at most)" if judged else why_not))
        out.append(_vortex_total(vram, metrics["placement"]["name"], b, peak_reserved) if judged
                   else _verdict("vortex_total", None, b.vortex_total_gb, "GB", None, why_not))
        rise = vram["rise_during_generate"]["bytes"] / 1e6 if on_gpu else None
        out.append(_verdict("generate_rise", rise and round(rise, 1), b.generate_rise_mb, "MB",
                            (rise < b.generate_rise_mb) if judged else None, "" if judged else why_not))
        drift = vram["drift"]["bytes"] / 1e6 if on_gpu else None
        out.append(_verdict("drift", drift and round(drift, 2), b.drift_mb, "MB",
                            (abs(drift) < b.drift_mb) if on_gpu else None,
                            f"over {vram['drift_calls']} calls" if on_gpu else "device memory is not measured on CPU"))
    if quality:
        cosines = [c["clip_image_cosine"] for c in quality["cases"]]
        failed = [c["name"] for c in quality["cases"] if not c["passed"]]
        note = f"failed cases: {', '.join(failed)}" if failed else ""
        if not quality["clip_real"]:
            note = (note + "; " if note else "") + "random-init CLIP: plumbing check, not a quality measure"
        out.append(_verdict("clip_image_cosine_min", round(min(cosines), 4), b.clip_cosine_min, "cosine",
                            not failed, note))
    return out


def _vortex_total(vram: dict, placement: str, b, peak_reserved: int) -> dict:
    """Judged on the co-tenancy run when there is one (the process capped at the total, the rest of Vortex held
    by a ballast: what Vortex lives with); otherwise on the uncapped peak reserved plus the rest of Vortex, which
    is stricter, since an uncapped allocator keeps blocks cached that a capped one frees and reuses."""
    beside = next((r for r in vram.get("beside_vortex") or [] if r["placement"] == placement and r.get("applicable")),
                  None)
    if beside is None:
        total = peak_reserved + b.rest_of_vortex_gb * GB
        return _verdict("vortex_total", _gb(total), b.vortex_total_gb, "GB", total <= b.vortex_total_gb * GB,
                        f"uncapped: Flux peak reserved {_gb(peak_reserved)} GB + rest of Vortex {b.rest_of_vortex_gb} "
                        "GB (no co-tenancy run)")
    where = f"beside a {_gb(beside['ballast_bytes'])} GB ballast, process capped at {beside['cap_gb']} GB"
    if beside["outcome"] == "refused":
        return _verdict("vortex_total", None, b.vortex_total_gb, "GB", False,
                        f"refused at load {where}: required {beside['required_gb']} GB, available "
                        f"{beside['available_gb']} GB")
    if beside["outcome"] == "failed":
        return _verdict("vortex_total", None, b.vortex_total_gb, "GB", False,
                        f"call {beside['call']} failed in {beside['phase']} {where}")
    total = beside["process_peak_reserved_bytes"]
    return _verdict("vortex_total", _gb(total), b.vortex_total_gb, "GB", total <= b.vortex_total_gb * GB,
                    f"process peak reserved over {beside['calls']} calls {where} (ballast included)")


def figures(metrics: dict) -> list[tuple[str, str]]:
    """Reported figures that are not pass/fail lines (units in the text)."""
    vram = metrics.get("vram")
    if not vram:
        return []
    w = vram["weights"]
    rows = [("transformer weights", f"{w['transformer']['gib']} GiB ({w['transformer']['gb']} GB)"),
            ("all weights", f"{w['total']['gib']} GiB ({w['total']['gb']} GB)")]
    plan = vram["plan"]
    rows.append(("planned resident / peak", f"{_gb(plan['resident_bytes'])} / {_gb(plan['peak_bytes'])} GB"))
    rows.append(("host memory for streamed weights", f"{_gb(plan['host_bytes'])} GB"))
    if vram["device_memory_available"]:
        rows.append(("whole card in use after a call (CUDA context included)",
                     f"{vram['device_used_after_generate']['gb']} GB"))
    return rows


def summary_markdown(metrics: dict) -> str:
    placement = metrics.get("placement") or {}
    lines = [f"# fluxkit validation: {metrics['name']}", "",
             f"- {metrics['weights_statement']}",
             f"- Model: {metrics['model']['description']}; preset `{metrics['quantization']}`; placement "
             f"`{placement.get('name', 'unknown')}`; device {metrics['device_name']} ({metrics['device']}); "
             f"dtype {metrics['dtype']}"]
    if metrics.get("quality"):
        lines.append(f"- CLIP backbone: {metrics['quality']['clip']}")
    lines += [f"- Created {metrics['created']} with fluxkit {metrics['fluxkit_version']}", "",
              "| budget | value | limit | unit | verdict | note |", "|---|---|---|---|---|---|"]
    for v in metrics["budgets"]:
        limit = "-".join(map(str, v["limit"])) if isinstance(v["limit"], list) else v["limit"]
        lines.append(f"| {v['name']} | {v['value']} | {limit} | {v['unit']} | **{v['status']}** | {v['note']} |")
    rows = figures(metrics)
    if rows:
        lines += ["", "| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
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
    lines += ["", f"Overall: **{metrics['verdict']}** ({overall_scope(metrics)})", ""]
    return "\n".join(lines)


def overall_scope(metrics: dict) -> str:
    """What the overall verdict covers: a pass on a CPU or a tiny checkpoint judged few budgets, and says so (a
    stand-in line is judged apart and counts in neither)."""
    counts = {s: sum(v["status"] == s for v in metrics["budgets"]) for s in (PASS, FAIL, NA)}
    scope = f"{counts[PASS] + counts[FAIL]} of {sum(counts.values())} budgets judged here, {counts[FAIL]} failed"
    if counts[NA]:
        scope += f"; {counts[NA]} not applicable on this run, each with its reason above"
    failed = [nb for nb, status in metrics["notebooks"].items() if status != "ok"]
    if failed:
        scope += f"; notebooks not ok: {', '.join(failed)}"
    return scope


def validate_metrics(metrics: dict) -> None:
    import jsonschema

    jsonschema.validate(metrics, json.loads(SCHEMA_PATH.read_text()))


def conclusion(section: str, data: dict, model) -> str:
    """The verdicts one notebook can give on its own, as text for its last cell."""
    info = model.info()
    metrics = {"model": info["model"], "device_name": info["device_name"], "placement": info["placement"], section: data}
    lines = [weights_statement(info)]
    for v in evaluate_budgets(metrics, model.preset):
        lines.append(f"{v['name']}: {v['value']} {v['unit']} (limit {v['limit']}) -> {v['status']}"
                     + (f" [{v['note']}]" if v["note"] else ""))
    return "\n".join(lines)
