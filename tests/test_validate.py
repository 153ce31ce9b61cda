"""`fluxkit validate` end to end on the tiny synthetic checkpoint (CPU), and what it does when things go wrong."""
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from fluxkit import load_flux_schnell
from fluxkit import validate as validate_module
from fluxkit.errors import InputError
from fluxkit.references import REFERENCE_DIR, build_references
from fluxkit.report import validate_metrics
from fluxkit.synthetic import write_synthetic
from helpers import FAST_VALIDATE


def _flip(png):
    Image.open(png).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(png)


@pytest.fixture(scope="module")
def report(tmp_path_factory, cache_dir):
    out_root = tmp_path_factory.mktemp("reports")
    return validate_module.validate(name="tiny", out_root=out_root, **FAST_VALIDATE)


def test_every_report_file_exists(report):
    out_dir, code = report
    assert code == 0, (out_dir / "summary.md").read_text()
    for nb in validate_module.NOTEBOOKS:
        assert (out_dir / f"{nb}.ipynb").is_file() and (out_dir / f"{nb}.html").is_file()
    for png in ("vram_placements", "vram_weights", "vram_timeline", "vram_drift", "latency_distribution",
                "latency_trace", "latency_projection", "latency_side_by_side", "quality_grid", "sweep_pareto",
                "sweep_weights"):
        assert (out_dir / f"{png}.png").stat().st_size > 1000, png
    assert (out_dir / "summary.md").is_file() and (out_dir / "metrics.json").is_file()
    assert (out_dir / "sweep.json").is_file() and (out_dir / "sweep.csv").is_file()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_metrics_follow_the_schema_and_say_synthetic(report):
    out_dir, _ = report
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


def test_schema_rejects_a_broken_metrics_file(report):
    import jsonschema

    metrics = json.loads((report[0] / "metrics.json").read_text())
    metrics["budgets"][0]["status"] = "passed-ish"
    with pytest.raises(jsonschema.ValidationError):
        validate_metrics(metrics)


def test_altered_reference_fails_and_names_the_case(tmp_path, monkeypatch, cache_dir):
    refs = tmp_path / "refs"
    shutil.copytree(REFERENCE_DIR, refs)
    _flip(refs / "synthetic-tiny-s0_nf4_lighthouse.png")
    monkeypatch.setenv("FLUXKIT_REFERENCE_DIR", str(refs))
    out_dir, code = validate_module.validate(name="altered", out_root=tmp_path, **FAST_VALIDATE)
    assert code != 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert [c["name"] for c in metrics["quality"]["cases"] if not c["passed"]] == ["lighthouse"]
    summary = (out_dir / "summary.md").read_text()
    assert "failed cases: lighthouse" in summary and "Overall: **fail**" in summary


@pytest.mark.parametrize("name", ["../../x", "/abs/path", "a/b", ".hidden", "..", ""])
def test_report_names_stay_inside_the_reports_folder(tmp_path, name):
    with pytest.raises(ValueError, match="one folder name"):
        validate_module.validate(name=name, out_root=tmp_path / "reports", **FAST_VALIDATE)
    assert not (tmp_path / "x").exists() and not list(tmp_path.rglob("*.ipynb"))


def test_a_rerun_that_fails_replaces_the_report_as_a_whole(report, tmp_path, monkeypatch, cache_dir):
    """Same name, another model whose reference image was altered: the new report names the new model and fails."""
    out_root = tmp_path / "reports"
    shutil.copytree(report[0], out_root / "same")
    other = write_synthetic(tmp_path / "other-weights", "tiny", seed=1)
    refs = tmp_path / "refs"
    build_references(load_flux_schnell(device="cpu", model=other), refs)
    _flip(refs / "synthetic-tiny-s1_nf4_lighthouse.png")
    monkeypatch.setenv("FLUXKIT_REFERENCE_DIR", str(refs))
    out_dir, code = validate_module.validate(**{**FAST_VALIDATE, "model": str(other)}, name="same", out_root=out_root)
    assert code != 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["model"]["synthetic"]["seed"] == 1 and metrics["verdict"] == "fail"
    assert "seed 1" in (out_dir / "summary.md").read_text() and "Overall: **fail**" in (out_dir / "summary.md").read_text()
    assert json.loads((out_dir / "model.json").read_text())["model"]["synthetic"]["seed"] == 1


def test_a_model_without_references_is_refused_before_any_notebook_runs(tmp_path, cache_dir):
    """The vortex placement streams T5 unquantized, so its images differ from the resident references."""
    with pytest.raises(InputError, match="no reference images .*fluxkit references .*--placement vortex"):
        validate_module.validate(**FAST_VALIDATE, name="vortex", out_root=tmp_path, placement="vortex")
    assert not list(tmp_path.iterdir())  # no report, not even a hidden work folder


def test_an_interrupted_rerun_leaves_the_earlier_report_untouched_and_resumes(report, tmp_path, monkeypatch):
    import papermill

    out_root = tmp_path / "reports"
    shutil.copytree(report[0], out_root / "same")
    before = {p.name: p.read_bytes() for p in (out_root / "same").iterdir()}
    real = papermill.execute_notebook
    calls = []

    def interrupted(*args, **kwargs):  # the lease ends during the second notebook
        calls.append(Path(args[0]).stem)
        if calls == list(validate_module.NOTEBOOKS[:2]):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        validate_module.validate(name="same", out_root=out_root, **FAST_VALIDATE)
    assert {p.name: p.read_bytes() for p in (out_root / "same").iterdir()} == before
    assert sorted(p.name for p in out_root.iterdir()) == [".same.incomplete", "same"]  # hidden, never a report

    with pytest.raises(InputError, match="other values of iterations"):
        validate_module.validate(name="same", out_root=out_root, resume=True, **{**FAST_VALIDATE, "iterations": 4})
    calls.clear()
    out_dir, code = validate_module.validate(name="same", out_root=out_root, resume=True, **FAST_VALIDATE)
    assert calls == list(validate_module.NOTEBOOKS[1:])  # the finished notebook is kept, the rest run
    assert code == 0 and sorted(p.name for p in out_root.iterdir()) == ["same"]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(metrics["notebooks"].values()) == {"ok"} and "vram" in metrics and "latency" in metrics
    assert not (out_dir / validate_module.RUN_FILE).exists()


def test_a_failing_notebook_is_saved_and_fails_the_run(tmp_path, monkeypatch, cache_dir):
    refs = tmp_path / "refs"  # the manifest lists an image that is gone: the quality notebook fails on it
    shutil.copytree(REFERENCE_DIR, refs)
    (refs / "synthetic-tiny-s0_nf4_lighthouse.png").unlink()
    monkeypatch.setenv("FLUXKIT_REFERENCE_DIR", str(refs))
    out_dir, code = validate_module.validate(**{**FAST_VALIDATE, "sweep_presets": ["fp4"]}, name="missing",
                                             out_root=tmp_path / "reports")
    assert code != 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert {row["preset"] for row in metrics["sweep"]["rows"]} == {"bf16", "fp4"}  # the sweep kept to the preset asked
    assert metrics["notebooks"] == {"01_vram_profile": "ok", "02_latency": "ok", "03_quality_regression": "failed",
                                    "04_quantization_tradeoffs": "ok"}
    executed = (out_dir / "03_quality_regression.ipynb").read_text()
    assert "synthetic-tiny-s0_nf4_lighthouse.png" in executed
    assert (out_dir / "03_quality_regression.html").is_file()
    assert "Overall: **fail**" in (out_dir / "summary.md").read_text()
