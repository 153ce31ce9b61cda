"""`fluxkit validate`: run the notebooks through papermill into reports/<name>/ and judge the budgets.

Writes the executed notebooks, their HTML, the plots (PNG), metrics.json and summary.md. Returns a
non-zero exit code when a notebook fails (its executed copy is still saved) or a budget fails.
"""
from __future__ import annotations

import datetime
import json
import logging
import sys
from pathlib import Path

from .config import load_preset, preset_to_dict
from .environment import environment
from .hub import resolve_model
from .report import (evaluate_budgets, save_section, summary_markdown, validate_metrics,
                     weights_statement)

log = logging.getLogger("fluxkit")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ("01_vram_profile", "02_latency", "03_quality_regression")
SECTIONS = {"01_vram_profile": "vram", "02_latency": "latency", "03_quality_regression": "quality"}
KERNEL = "fluxkit"


def ensure_kernel() -> str:
    """Install the `fluxkit` kernelspec for this interpreter (absolute path) if it is missing."""
    from jupyter_client.kernelspec import KernelSpecManager

    if KERNEL not in KernelSpecManager().find_kernel_specs():
        from ipykernel.kernelspec import install

        try:
            install(prefix=sys.prefix, kernel_name=KERNEL, display_name="fluxkit")
        except OSError:  # read-only interpreter prefix: install for this user instead
            install(user=True, kernel_name=KERNEL, display_name="fluxkit")
    return KERNEL


def default_name(model: str, device: str, quantization: str) -> str:
    import torch

    source = resolve_model(model)
    weights = f"synthetic-{source.synthetic['preset']}" if source.synthetic else source.model_id.split("/")[-1]
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda"):
        dev = torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-")
    return f"{datetime.date.today().isoformat()}-{dev}-{weights}-{quantization}"


def html_of(notebook: Path) -> Path:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(notebook))
    out = notebook.with_suffix(".html")
    out.write_text(body)
    return out


def validate(model: str = "auto", device: str = "auto", quantization: str = "nf4", name: str | None = None,
             out_root: str | Path = "reports", iterations: int = 50, drift_calls: int = 20, seed: int = 0,
             clip_model: str = "ViT-L-14", clip_pretrained: str = "openai", progress: bool = True) -> tuple[Path, int]:
    """Run every notebook and write the report; returns (report folder, exit code)."""
    import papermill
    from tqdm.auto import tqdm

    from . import __version__

    preset = load_preset(quantization)
    out_dir = Path(out_root) / (name or default_name(model, device, quantization))
    out_dir.mkdir(parents=True, exist_ok=True)
    kernel = ensure_kernel()
    parameters = dict(model=model, device=device, quantization=quantization, seed=seed, out_dir=str(out_dir.resolve()),
                      iterations=iterations, drift_calls=drift_calls, clip_model=clip_model,
                      clip_pretrained=clip_pretrained)
    status = {}
    for nb in tqdm(NOTEBOOKS, desc="fluxkit validate", unit="notebook", disable=not progress):
        executed = out_dir / f"{nb}.ipynb"
        try:
            papermill.execute_notebook(str(NOTEBOOK_DIR / f"{nb}.ipynb"), str(executed), parameters=parameters,
                                       kernel_name=kernel, progress_bar=False, cwd=str(out_dir))
            status[nb] = "ok"
        except Exception as err:  # papermill's execution error, or a kernel that died: the notebook is saved
            log.error("notebook %s failed: %s", nb, str(err).strip().splitlines()[-1] if str(err).strip() else err)
            status[nb] = "failed"
        if executed.exists():
            try:
                html_of(executed)
            except Exception as err:  # a missing nbconvert template must not cost the rest of the report
                log.error("HTML rendering of %s failed: %s", nb, err)
    metrics = _collect(out_dir, status, preset, parameters, __version__)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "summary.md").write_text(summary_markdown(metrics))
    return out_dir, 0 if metrics["verdict"] == "pass" else 1


def _collect(out_dir: Path, status: dict, preset, parameters: dict, version: str) -> dict:
    sections = {}
    for nb, section in SECTIONS.items():
        path = out_dir / f"{section}.json"
        if status.get(nb) == "ok" and path.is_file():
            sections[section] = json.loads(path.read_text())
    info = json.loads((out_dir / "model.json").read_text()) if (out_dir / "model.json").is_file() else None
    if info is None:  # no notebook got as far as loading the model
        source = resolve_model(parameters["model"])
        info = {"model": source.to_dict(), "device": parameters["device"], "device_name": "unknown",
                "dtype": "unknown"}
    metrics = {
        "schema_version": 1, "name": out_dir.name, "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "fluxkit_version": version, "environment": environment(), "model": info["model"],
        "is_synthetic": info["model"]["synthetic"] is not None, "weights_statement": weights_statement(info),
        "quantization": preset.name, "preset": preset_to_dict(preset), "device": info["device"],
        "device_name": info["device_name"], "dtype": info["dtype"], "parameters": parameters,
        "notebooks": {nb: status.get(nb, "not run") for nb in NOTEBOOKS}, **sections,
    }
    metrics["budgets"] = evaluate_budgets(metrics, preset)
    failed = any(v["status"] == "fail" for v in metrics["budgets"]) or any(s != "ok" for s in status.values())
    metrics["verdict"] = "fail" if failed else "pass"
    validate_metrics(metrics)
    return metrics


def record_model(out_dir: str | Path, model) -> None:
    """Saved by each notebook once its model is loaded: what ran, for metrics.json."""
    save_section(out_dir, "model", model.info())
