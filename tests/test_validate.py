"""`fluxkit validate` end to end on the tiny synthetic checkpoint (CPU)."""
import json
import shutil

import pytest
from PIL import Image

from fluxkit import validate as validate_module
from fluxkit.references import REFERENCE_DIR
from fluxkit.report import validate_metrics

FAST = dict(model="auto", device="cpu", iterations=3, drift_calls=2, clip_model="ViT-B-32", clip_pretrained="openai",
            progress=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory, cache_dir):
    out_root = tmp_path_factory.mktemp("reports")
    out_dir, code = validate_module.validate(name="tiny", out_root=out_root, **FAST)
    return out_dir, code


def test_every_report_file_exists(report):
    out_dir, code = report
    assert code == 0, (out_dir / "summary.md").read_text()
    for nb in validate_module.NOTEBOOKS:
        assert (out_dir / f"{nb}.ipynb").is_file() and (out_dir / f"{nb}.html").is_file()
    for png in ("vram_weights", "vram_timeline", "vram_drift", "latency_distribution", "latency_trace", "quality_grid"):
        assert (out_dir / f"{png}.png").stat().st_size > 1000
    assert (out_dir / "summary.md").is_file() and (out_dir / "metrics.json").is_file()


def test_metrics_follow_the_schema_and_say_synthetic(report):
    out_dir, _ = report
    metrics = json.loads((out_dir / "metrics.json").read_text())
    validate_metrics(metrics)
    assert metrics["is_synthetic"] and "SYNTHETIC" in metrics["weights_statement"]
    assert metrics["latency"]["plain"]["summary"]["total"]["n"] == 3
    verdicts = {b["name"]: b["status"] for b in metrics["budgets"]}
    assert verdicts["p99_latency"] == "not applicable"  # not an RTX 3060, not full-size weights
    assert verdicts["generate_rise"] == "not applicable" and verdicts["drift"] == "not applicable"
    assert verdicts["clip_image_cosine_min"] == "pass"
    summary = (out_dir / "summary.md").read_text()
    assert summary.splitlines()[2].startswith("- Weights: SYNTHETIC")
    assert "plumbing check" in summary


def test_schema_rejects_a_broken_metrics_file(report):
    import jsonschema

    out_dir, _ = report
    metrics = json.loads((out_dir / "metrics.json").read_text())
    metrics["budgets"][0]["status"] = "passed-ish"
    with pytest.raises(jsonschema.ValidationError):
        validate_metrics(metrics)


def test_altered_reference_fails_and_names_the_case(tmp_path, monkeypatch, cache_dir):
    refs = tmp_path / "refs"
    shutil.copytree(REFERENCE_DIR, refs)
    image = Image.open(refs / "synthetic-tiny-s0_nf4_lighthouse.png")
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(refs / "synthetic-tiny-s0_nf4_lighthouse.png")
    monkeypatch.setenv("FLUXKIT_REFERENCE_DIR", str(refs))
    out_dir, code = validate_module.validate(name="altered", out_root=tmp_path, **FAST)
    assert code != 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    failed = [c["name"] for c in metrics["quality"]["cases"] if not c["passed"]]
    assert failed == ["lighthouse"]
    summary = (out_dir / "summary.md").read_text()
    assert "failed cases: lighthouse" in summary and "Overall: **fail**" in summary


def test_a_failing_notebook_is_saved_and_fails_the_run(tmp_path, cache_dir):
    # fp4 on the tiny checkpoint has no reference images: the quality notebook refuses
    out_dir, code = validate_module.validate(name="fp4", out_root=tmp_path, quantization="fp4", **FAST)
    assert code != 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["notebooks"] == {"01_vram_profile": "ok", "02_latency": "ok", "03_quality_regression": "failed"}
    executed = (out_dir / "03_quality_regression.ipynb").read_text()
    assert "no reference images" in executed and "fluxkit references" in executed
    assert (out_dir / "03_quality_regression.html").is_file()
    assert "Overall: **fail**" in (out_dir / "summary.md").read_text()
