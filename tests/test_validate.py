"""`fluxkit validate` end to end on the tiny synthetic checkpoint (CPU), run from an installed wheel outside the
checkout; and what it does when things go wrong: an interrupted run, a resume that must prove what it keeps, a
failing notebook, a rerun that replaces a report as a whole, an altered reference."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from fluxkit.errors import InputError
from fluxkit.lab import validate as validate_module
from fluxkit.lab.metrics import load_clip
from fluxkit.lab.references import REFERENCE_DIR, compare_all
from fluxkit.lab.report import evaluate_budgets, validate_metrics
from helpers import FAST_VALIDATE, bare_env, build_wheel, fresh_environment


def _flip(png):
    Image.open(png).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(png)


VALIDATE = ["--device", "cpu", "--iterations", "3", "--drift-calls", "2", "--clip-model", "ViT-B-32",
            "--sweep-presets", "nf4", "--name", "tiny"]


@pytest.fixture(scope="module")
def installed(tiny_dir, tmp_path_factory):
    """`pip install 'fluxkit[lab]'`: the wheel in a fresh environment, run from a folder outside the checkout."""
    work = tmp_path_factory.mktemp("installed")
    python = fresh_environment(work / "env", build_wheel(work / "wheel"), extras=("lab",))
    env = bare_env(PATH=f"{python.parent}:/usr/bin:/bin", HOME=str(work), FLUXKIT_CACHE=os.environ["FLUXKIT_CACHE"],
                   # nbconvert's HTML templates are data files of the lab's packages, beside (not in) their Python code
                   JUPYTER_PATH=str(Path(sys.prefix) / "share" / "jupyter"))
    return python, work, env


@pytest.fixture(scope="module")
def report(installed, tiny_dir):
    """`fluxkit validate` as a user runs it from the installed wheel, interrupted (Ctrl-C) while its second notebook
    runs, then `--resume`d: the resumed report is the end-to-end run the other tests read. The interrupted folder is
    kept for the resume's checks."""
    python, work, env = installed
    command = [str(python), "-m", "fluxkit.cli", "validate", "--model", str(tiny_dir), *VALIDATE, "--out-root",
               str(work / "reports")]
    started = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work, env=env)
    incomplete = work / "reports" / ".tiny.incomplete"
    while started.poll() is None and not (incomplete / "02_latency.ipynb").exists():
        time.sleep(0.2)
    started.send_signal(signal.SIGINT)
    _, interrupted_err = started.communicate(timeout=300)
    kept = work / "interrupted"
    shutil.copytree(incomplete, kept)
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, cwd=work, env=env, timeout=900)
    return work / "reports" / "tiny", resumed, kept, started.returncode, interrupted_err


def test_an_installed_wheel_validates_to_a_pass(report):
    out_dir, run, kept, interrupted_code, interrupted_err = report
    assert interrupted_code == 130 and "--resume" in interrupted_err  # Ctrl-C: the run says how to go on
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Overall: **pass**" in run.stdout
    # the notebook that finished before Ctrl-C is the one in the report, not a rerun
    assert (out_dir / "01_vram_profile.ipynb").read_bytes() == (kept / "01_vram_profile.ipynb").read_bytes()
    for nb in validate_module.NOTEBOOKS:
        assert (out_dir / f"{nb}.ipynb").is_file() and (out_dir / f"{nb}.html").is_file()
        executed = json.loads((out_dir / f"{nb}.ipynb").read_text())
        assert str(out_dir.parents[1] / "env") in json.dumps(executed["metadata"])  # the installed notebooks ran
    for png in ("vram_placements", "vram_weights", "vram_timeline", "vram_drift", "latency_distribution",
                "latency_trace", "latency_projection", "latency_side_by_side", "quality_grid", "sweep_pareto",
                "sweep_weights"):
        assert (out_dir / f"{png}.png").stat().st_size > 1000, png
    assert (out_dir / "sweep.json").is_file() and (out_dir / "sweep.csv").is_file()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_metrics_follow_the_schema_and_say_synthetic(report):
    out_dir = report[0]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    validate_metrics(metrics)
    assert metrics["is_synthetic"] and "SYNTHETIC" in metrics["weights_statement"]
    assert metrics["latency"]["plain"]["summary"]["total"]["n"] == 3
    assert {r["placement"] for r in metrics["vram"]["placements"]} == {"resident", "vortex", "offload"}
    verdicts = {b["name"]: b["status"] for b in metrics["budgets"]}
    assert verdicts["p99_latency"] == "not applicable"  # not an RTX 3060, not full-size weights
    assert verdicts["flux_resident"] == verdicts["vortex_total"] == verdicts["drift"] == "not applicable"
    assert verdicts["clip_image_cosine_min"] == "pass"
    assert metrics["parameters"]["out_dir"] == "."  # executed notebooks carry no temporary path
    assert {r["variant"] for r in metrics["sweep"]["rows"]} >= {"bf16@resident", "nf4@resident", "nf4+t5-bf16@resident"}
    summary = (out_dir / "summary.md").read_text()
    assert summary.splitlines()[2].startswith("- Weights: SYNTHETIC") and "placement `resident`" in summary
    na = list(verdicts.values()).count("not applicable")  # a pass says how little of the task it judged
    assert (f"Overall: **pass** ({len(verdicts) - na} of {len(verdicts)} budgets judged here, 0 failed; {na} not "
            "applicable on this run") in summary
    metrics["budgets"][0]["status"] = "passed-ish"
    with pytest.raises(Exception, match="passed-ish"):
        validate_metrics(metrics)


def test_altered_reference_fails_and_names_the_case(tiny_model, tmp_path):
    refs = tmp_path / "refs"
    shutil.copytree(REFERENCE_DIR, refs)
    _flip(refs / "synthetic-tiny-s0_nf4_lighthouse.png")
    results, _ = compare_all(tiny_model, load_clip("ViT-B-32", "openai"), refs)
    assert [c["name"] for c in results if not c["passed"]] == ["lighthouse"]
    [failed] = [c for c in results if not c["passed"]]
    assert "does not match its manifest sha256" in failed["reasons"][0]
    info = tiny_model.info()
    quality = {"clip": "ViT-B-32", "clip_real": False, "cases": results}
    [verdict] = evaluate_budgets({"model": info["model"], "device_name": "cpu", "placement": info["placement"],
                                  "quality": quality}, tiny_model.preset)
    assert verdict["status"] == "fail" and "failed cases: lighthouse" in verdict["note"]


@pytest.mark.parametrize("name", ["../../x", "/abs/path", "a/b", ".hidden", "..", ""])
def test_report_names_stay_inside_the_reports_folder(tmp_path, name):
    with pytest.raises(ValueError, match="one folder name"):
        validate_module.validate(name=name, out_root=tmp_path / "reports", **FAST_VALIDATE)
    assert not (tmp_path / "x").exists() and not list(tmp_path.rglob("*.ipynb"))


def test_a_model_without_references_is_refused_before_any_notebook_runs(tmp_path):
    """The vortex placement streams T5 unquantized, so its images differ from the resident references."""
    with pytest.raises(InputError, match="no reference images .*fluxkit references .*--placement vortex"):
        validate_module.validate(**FAST_VALIDATE, name="vortex", out_root=tmp_path, placement="vortex")
    assert not list(tmp_path.iterdir())  # no report, not even a hidden work folder


def _forged(work: Path, tmp_path: Path, name: str, change) -> Path:
    """A copy of an interrupted run's folder with `change(folder, run)` applied to it and its run.json."""
    folder = tmp_path / name / ".tiny.incomplete"
    shutil.copytree(work, folder)
    run = json.loads((folder / validate_module.RUN_FILE).read_text())
    change(folder, run)
    (folder / validate_module.RUN_FILE).write_text(json.dumps(run))
    return folder


def _untouched(folder, run):
    pass


def _all_ok_without_files(folder, run):
    run["notebooks"] = {nb: "ok" for nb in validate_module.NOTEBOOKS}


def _blank_notebook(folder, run):
    shutil.copy(validate_module.NOTEBOOK_DIR / "01_vram_profile.ipynb", folder / "01_vram_profile.ipynb")


def _edited_section(folder, run):
    section = json.loads((folder / "vram.json").read_text())
    section["drift"] = {"bytes": 0, "gib": 0.0, "gb": 0.0}
    (folder / "vram.json").write_text(json.dumps(section))


def _rehashed_blank_notebook(folder, run):
    _blank_notebook(folder, run)
    run["notebooks"]["01_vram_profile"]["files"]["01_vram_profile.ipynb"] = hashlib.sha256(
        (folder / "01_vram_profile.ipynb").read_bytes()).hexdigest()


def _other_fingerprint(folder, run):
    run["notebooks"]["01_vram_profile"]["fingerprint"] = "0" * 64


RESUMABLE = """
import json, sys
from pathlib import Path
from fluxkit.lab.validate import _resumable, run_fingerprint
kept = {}
for folder in map(Path, sys.argv[2:]):
    parameters = json.loads((folder / "run.json").read_text())["parameters"]
    kept[folder.parent.name] = sorted(_resumable(folder, parameters, run_fingerprint(Path(sys.argv[1]), parameters)))
print(json.dumps(kept))
"""


def test_a_resume_keeps_only_what_it_proves(report, installed, tiny_dir, tmp_path):
    """The interrupted run's finished notebook is kept; a forged or edited folder runs again (asked of the installed
    fluxkit that wrote the folder); a damaged run.json is refused in one line."""
    python, work, env = installed
    kept = report[2]
    expected = {"_untouched": ["01_vram_profile"], "_all_ok_without_files": [], "_blank_notebook": [],
                "_edited_section": [], "_rehashed_blank_notebook": [], "_other_fingerprint": []}
    folders = [_forged(kept, tmp_path, name, globals()[name]) for name in expected]
    run = subprocess.run([str(python), "-c", RESUMABLE, str(tiny_dir), *map(str, folders)], capture_output=True,
                         text=True, cwd=work, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == expected
    broken = _forged(kept, tmp_path, "broken", _untouched)
    parameters = json.loads((broken / validate_module.RUN_FILE).read_text())["parameters"]
    (broken / validate_module.RUN_FILE).write_text("{not json")
    with pytest.raises(InputError, match="run.json is damaged .*without --resume"):
        validate_module._resumable(broken, parameters, "unused: refused before any fingerprint is compared")


def test_other_values_are_not_resumed(report, tmp_path):
    out_root = tmp_path / "reports"
    shutil.copytree(report[2], out_root / ".tiny.incomplete")
    with pytest.raises(InputError, match="other values of iterations"):
        validate_module.validate(name="tiny", out_root=out_root, resume=True, **{**FAST_VALIDATE, "iterations": 4})


def test_a_failing_notebook_is_saved_and_its_report_replaces_the_earlier_one_whole(report, tmp_path, monkeypatch):
    """A rerun interrupted in its first notebook leaves the earlier report of the same name as it was, beside a
    hidden incomplete folder. A notebook that fails (papermill raising after it saved the executed copy) fails the
    run; the failing report replaces the earlier one as a whole, never mixed with its files."""
    import papermill

    out_root = tmp_path / "reports"
    shutil.copytree(report[0], out_root / "same")
    before = {p.name: p.read_bytes() for p in (out_root / "same").iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        validate_module.validate(name="same", out_root=out_root, **FAST_VALIDATE)
    assert {p.name: p.read_bytes() for p in (out_root / "same").iterdir()} == before
    assert sorted(p.name for p in out_root.iterdir()) == [".same.incomplete", "same"]  # hidden, never a report

    def failing(source, executed, **kwargs):
        Path(executed).write_text(Path(source).read_text())
        raise papermill.PapermillExecutionError(0, 1, "boom", "RuntimeError", "a cell failed", [])

    monkeypatch.setattr(papermill, "execute_notebook", failing)
    out_dir, code = validate_module.validate(name="same", out_root=out_root, **FAST_VALIDATE)
    assert code != 0 and sorted(p.name for p in out_root.iterdir()) == ["same"]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(metrics["notebooks"].values()) == {"failed"} and metrics["verdict"] == "fail"
    assert all((out_dir / f"{nb}.ipynb").is_file() and (out_dir / f"{nb}.html").is_file()
               for nb in validate_module.NOTEBOOKS)
    summary = (out_dir / "summary.md").read_text()
    assert not (out_dir / "vram.json").exists() and "Overall: **fail**" in summary
    assert f"; notebooks not ok: {', '.join(validate_module.NOTEBOOKS)})" in summary
    assert not (out_dir / validate_module.RUN_FILE).exists()


def test_the_vram_notebook_plots_a_gpu_run_s_profile(tmp_path):
    """The profile a GPU run wrote (H200, 2026-12-05) plots: its load has no peak, since a guest's load leaves the
    process's peak counters to its host, and 01_vram_profile failed on that None there."""
    from fluxkit.lab import plots
    from fluxkit.lab.profiling import placement_table

    run = Path(__file__).resolve().parents[1] / "reports" / "H200-2026-12-05b-runs" / "H200-tiny-sms8"
    profile = json.loads((run / "vram.json").read_text())
    assert profile["device_memory_available"] and profile["timeline"][0]["peak"] is None
    plots.placements(placement_table(profile["placements"]), 6.0, tmp_path)
    plots.weight_bars(profile, tmp_path)
    plots.memory_timeline(profile, 6.0, tmp_path)
    plots.drift(profile, 50.0, tmp_path)
    assert {p.name for p in tmp_path.glob("*.png")} == {"vram_placements.png", "vram_weights.png", "vram_timeline.png",
                                                        "vram_drift.png"}
