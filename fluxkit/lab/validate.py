"""`fluxkit validate`: run the notebooks through papermill into reports/<name>/ and judge the budgets.

The report is built in a hidden folder beside its destination, `.<name>.incomplete`, and moved into
place only when it is complete (executed notebooks, HTML, plots, metrics.json, summary.md), replacing an
earlier report of the same name as a whole. An interrupted or crashed run leaves the earlier report as it
was: no "pass" is ever shown next to notebooks it did not come from. Its hidden folder stays, so that
`resume=True` (`fluxkit validate --resume`) can go on from the first notebook that did not finish, with
the same parameters: a full-size run takes twenty minutes and a GPU lease can end in the middle of it.
Returns a non-zero exit code when a notebook fails (its executed copy is still saved) or a budget fails.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..checks import MAX_SEED, check_number
from ..config import Preset, load_placement, load_preset, preset_to_dict
from ..environment import environment
from ..errors import InputError
from ..hub import resolve_model
from ..placement import describe
from ..preflight import compute_dtype, resolve_device
from ..version import __version__
from .references import cases_for, reference_key
from .report import (
    SCHEMA_VERSION,
    evaluate_budgets,
    save_section,
    summary_markdown,
    validate_metrics,
    weights_statement,
)

if TYPE_CHECKING:
    from ..loading import LoadPlan

log = logging.getLogger("fluxkit")

NOTEBOOK_DIR = Path(__file__).parent / "notebooks"  # the notebooks fluxkit ships (the repository's notebooks/)
NOTEBOOKS = ("01_vram_profile", "02_latency", "03_quality_regression", "04_quantization_tradeoffs")
SECTIONS = {"01_vram_profile": "vram", "02_latency": "latency", "03_quality_regression": "quality",
            "04_quantization_tradeoffs": "sweep"}
KERNEL = "fluxkit"
RUN_FILE = "run.json"  # in the incomplete folder: parameters and notebook status, for --resume
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


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


def check_report_name(name: object) -> str:
    """A report name is one folder name inside the reports folder: no separators, no '..', no absolute path."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InputError(f"name={name!r}: a report name is one folder name (letters, digits, '.', '_', '-'; up to "
                         "128 characters, not starting with '.'); it is created inside the reports folder")
    return name


def default_name(model: str, device: str, quantization: str, placement: str) -> str:
    import torch

    source = resolve_model(model)
    weights = f"synthetic-{source.synthetic['preset']}" if source.synthetic else source.model_id.split("/")[-1]
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda"):
        dev = torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-")
    return check_report_name(f"{datetime.date.today().isoformat()}-{dev}-{weights}-{quantization}-{placement}")


def check_references(model: str, device: str, preset: Preset, placement: str) -> None:
    """Refuse now, not after the GPU work of three notebooks, when the quality notebook has nothing to compare."""
    source = resolve_model(model)
    dtype = compute_dtype(preset, resolve_device(device))
    cases_for(reference_key(source, preset, load_placement(placement), dtype), source.model_id, placement)


def html_of(notebook: Path) -> Path:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(notebook))
    out = notebook.with_suffix(".html")
    out.write_text(body)
    return out


def _move_into_place(work: Path, out_dir: Path) -> None:
    """Replace `out_dir` by the finished `work` folder as a whole."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.replaced-{os.getpid()}")
        out_dir.rename(old)
    work.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class ValidateRun:
    """One report's run, its inputs checked and nothing written yet."""

    planned: LoadPlan
    name: str
    out_dir: Path
    parameters: dict
    resume: bool


def prepare(model: str = "auto", device: str = "auto", quantization: str = "nf4", placement: str | None = None,
            name: str | None = None, out_root: str | Path = "reports", iterations: int = 50, drift_calls: int = 20,
            seed: int = 0, clip_model: str = "ViT-L-14", clip_pretrained: str = "openai", baseline: bool = False,
            sweep_presets: list[str] | None = None, resume: bool = False, sms: int | None = None) -> ValidateRun:
    """Every input of a report checked, before any notebook (of any report: one per placement) starts. `sms`: the
    latency notebook runs on that many SMs of the GPU, an RTX 3060 stand-in (fluxkit/lab/standin.py)."""
    from ..loading import plan_load

    check_number("iterations", iterations, 1, 100_000, integer=True)
    check_number("drift_calls", drift_calls, 2, 100_000, integer=True)
    check_number("seed", seed, 0, MAX_SEED, integer=True)
    if sms is not None:
        from .standin import refused

        reason = refused(sms, device)
        if reason:
            raise InputError(f"sms: {reason}")
    sweep_presets = [load_preset(p).name for p in sweep_presets] if sweep_presets else None
    planned = plan_load(device, quantization, model, placement=placement, preflight_check=False)
    placement = planned.placement.name
    check_references(model, device, planned.preset, placement)
    name = check_report_name(name) if name is not None else default_name(model, device, quantization, placement)
    out_dir = Path(out_root) / name
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a folder; choose another --name or --out-root")
    parameters = dict(model=str(model), device=device, quantization=quantization, placement=placement, seed=seed,
                      out_dir=".", iterations=iterations, drift_calls=drift_calls, baseline=baseline,
                      sweep_presets=sweep_presets, clip_model=clip_model, clip_pretrained=clip_pretrained, sms=sms)
    return ValidateRun(planned, name, out_dir, parameters, resume)


def validate(progress: bool = True, **inputs) -> tuple[Path, int]:
    """Run every notebook and write the report (`prepare` takes `inputs`); returns (report folder, exit code)."""
    return execute(prepare(**inputs), progress)


def execute(run: ValidateRun, progress: bool = True) -> tuple[Path, int]:
    """Run every notebook of a prepared report and write it; returns (report folder, exit code). With `resume`, a
    notebook an interrupted run of the same name and parameters finished is kept only if it proves it (`_proven`)."""
    import papermill
    from tqdm.auto import tqdm

    name, out_dir, parameters, preset = run.name, run.out_dir, run.parameters, run.planned.preset
    out_root = out_dir.parent
    work = out_root / f".{name}.incomplete"
    fingerprint = run_fingerprint(run.planned.source.path, parameters)
    runs = _resumable(work, parameters, fingerprint) if run.resume else {}
    out_root.mkdir(parents=True, exist_ok=True)
    kernel = ensure_kernel()
    if not runs:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
    completed = False
    try:
        for nb in tqdm(NOTEBOOKS, desc="fluxkit validate", unit="notebook", disable=not progress):
            if nb in runs:
                log.info("notebook %s: kept from the interrupted run in %s", nb, work)
                continue
            runs[nb] = _run_notebook(papermill, nb, work, parameters, kernel, fingerprint)
            (work / RUN_FILE).write_text(json.dumps({"parameters": parameters, "notebooks": runs}, indent=2))
        status = {nb: run["status"] for nb, run in runs.items()}
        metrics = _collect(work, name, status, preset, parameters)
        (work / RUN_FILE).unlink()
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (work / "summary.md").write_text(summary_markdown(metrics))
        _move_into_place(work, out_dir)
        completed = True
    finally:
        if not completed and work.exists():
            log.error("validate did not finish: `fluxkit validate --resume` with the same --name goes on from %s", work)
    return out_dir, 0 if metrics["verdict"] == "pass" else 1


def _run_notebook(papermill, nb: str, work: Path, parameters: dict, kernel: str, fingerprint: str) -> dict:
    """Execute one notebook into `work` (saved even when it fails) and record what proves it ran."""
    executed = work / f"{nb}.ipynb"
    try:
        papermill.execute_notebook(str(NOTEBOOK_DIR / f"{nb}.ipynb"), str(executed), parameters=parameters,
                                   kernel_name=kernel, progress_bar=False, cwd=str(work))
        status = "ok"
    except Exception as err:  # papermill's execution error, or a kernel that died: the notebook is saved
        log.error("notebook %s failed: %s", nb, str(err).strip().splitlines()[-1] if str(err).strip() else err)
        status = "failed"
    if executed.exists():
        try:
            html_of(executed)
        except Exception as err:  # a missing nbconvert template must not cost the rest of the report
            log.error("HTML rendering of %s failed: %s", nb, err)
    files = [f.name for f in (executed, executed.with_suffix(".html"), work / f"{SECTIONS[nb]}.json") if f.is_file()]
    return {"status": status, "fingerprint": fingerprint, "files": {f: _sha256(work / f) for f in files}}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_fingerprint(checkpoint: Path, parameters: dict) -> str:
    """What a notebook's result depends on: fluxkit's code and configs, the notebooks, the weights (each weight
    file's name, size and modification time) and the parameters."""
    package = Path(__file__).resolve().parents[1]
    code = sorted(p for p in package.rglob("*") if p.suffix in (".py", ".yaml") and p.is_file())
    code += sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    weights = sorted(p for p in Path(checkpoint).rglob("*") if p.is_file())
    digest = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode())
    for p in code:
        digest.update(p.name.encode() + p.read_bytes())
    for p in weights:
        st = p.stat()
        digest.update(f"{p.relative_to(checkpoint)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def _proven(work: Path, nb: str, run: object, parameters: dict, fingerprint: str) -> str | None:
    """Why a notebook an interrupted run marked finished must run again, or None when its files prove it ran to the
    end: executed cell by cell without an error, by papermill with these parameters, its HTML and section JSON
    present and unchanged since, with the same code, weights and settings."""
    import nbformat

    if not isinstance(run, dict) or run.get("status") != "ok":
        return "it did not finish"
    if run.get("fingerprint") != fingerprint:
        return "fluxkit's code, the notebooks or the weights changed since it ran"
    files = run.get("files")
    for f in (f"{nb}.ipynb", f"{nb}.html", f"{SECTIONS[nb]}.json"):
        if not isinstance(files, dict) or f not in files or not (work / f).is_file():
            return f"{f} is missing"
        if _sha256(work / f) != files[f]:
            return f"{f} changed since the notebook wrote it"
    try:
        executed = nbformat.read(work / f"{nb}.ipynb", as_version=4)
    except Exception as err:  # any unreadable notebook is one that must run again
        return f"{nb}.ipynb cannot be read ({type(err).__name__})"
    if (executed.metadata.get("papermill") or {}).get("parameters") != parameters:
        return f"{nb}.ipynb was not executed by papermill with these parameters"
    for cell in executed.cells:
        if cell.cell_type == "code" and cell.source.strip() and (
                cell.get("execution_count") is None or any(o.get("output_type") == "error" for o in cell.outputs)):
            return f"{nb}.ipynb has a cell that did not run or raised"
    return None


def _resumable(work: Path, parameters: dict, fingerprint: str) -> dict[str, dict]:
    """The notebooks an interrupted run in `work` proved it finished with these parameters; {} when there is none."""
    path = work / RUN_FILE
    if not path.is_file():
        log.info("nothing to resume in %s: every notebook runs", work)
        return {}
    try:
        earlier = json.loads(path.read_text())
        earlier_parameters, runs = earlier["parameters"], earlier["notebooks"]
        if not (isinstance(earlier_parameters, dict) and isinstance(runs, dict)):
            raise TypeError("not a mapping")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"--resume: {path} is damaged ({type(err).__name__}: {err}); delete {work} or run without "
                         "--resume to start over") from None
    changed = sorted(k for k in parameters.keys() | earlier_parameters.keys()
                     if parameters.get(k) != earlier_parameters.get(k))
    if changed:
        raise InputError(f"--resume: the interrupted run in {work} had other values of {', '.join(changed)}; "
                         "rerun with the same values, or without --resume to start over")
    kept = {}
    for nb, run in runs.items():
        if nb not in NOTEBOOKS:
            continue
        why = _proven(work, nb, run, parameters, fingerprint)
        if why:
            log.warning("notebook %s runs again: %s", nb, why)
        else:
            kept[nb] = run
    return kept


def _collect(work: Path, name: str, status: dict, preset, parameters: dict) -> dict:
    sections = {}
    for nb, section in SECTIONS.items():
        path = work / f"{section}.json"
        if status.get(nb) == "ok" and path.is_file():
            sections[section] = json.loads(path.read_text())
    info = json.loads((work / "model.json").read_text()) if (work / "model.json").is_file() else None
    if info is None:  # no notebook got as far as loading the model
        source = resolve_model(parameters["model"])
        info = {"model": source.to_dict(), "device": parameters["device"], "device_name": "unknown",
                "dtype": "unknown", "placement": describe(load_placement(parameters["placement"]), None)}
    metrics = {
        "schema_version": SCHEMA_VERSION, "name": name,
        "created": datetime.datetime.now().isoformat(timespec="seconds"), "fluxkit_version": __version__,
        "environment": environment(), "model": info["model"], "is_synthetic": info["model"]["synthetic"] is not None,
        "weights_statement": weights_statement(info), "quantization": preset.name, "preset": preset_to_dict(preset),
        "placement": info["placement"], "device": info["device"], "device_name": info["device_name"],
        "dtype": info["dtype"], "parameters": parameters,
        "notebooks": {nb: status.get(nb, "not run") for nb in NOTEBOOKS}, **sections,
    }
    metrics["budgets"] = evaluate_budgets(metrics, preset)
    failed = any(v["status"] == "fail" for v in metrics["budgets"]) or any(s != "ok" for s in status.values())
    metrics["verdict"] = "fail" if failed else "pass"
    validate_metrics(metrics)
    return metrics


def record_model(out_dir: str | Path | None, model) -> None:
    """Saved by each notebook once its model is loaded: what ran, for metrics.json."""
    save_section(out_dir, "model", model.info())
