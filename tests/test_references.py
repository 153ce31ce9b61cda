import json
import shutil

import pytest

from fluxkit.references import (REFERENCE_DIR, build_references, matching_cases, model_key, read_manifest,
                                reference_prompts)


def test_committed_references_match_the_tiny_model(tiny_model):
    cases = matching_cases(tiny_model)
    assert {c["name"] for c in cases} == {p["name"] for p in reference_prompts()}
    assert any(c["prompt"] == "manic scientist, blue spiked hair, white lab coat" for c in cases)
    for c in cases:
        assert (REFERENCE_DIR / c["file"]).is_file()
        assert c["model"]["synthetic"] == {"preset": "tiny", "seed": 0}
        for key in ("seed", "steps", "guidance_scale", "height", "width", "device", "dtype", "versions", "sha256"):
            assert key in c


def test_rebuilding_reproduces_the_committed_images(tiny_model, tmp_path):
    cases = build_references(tiny_model, tmp_path)
    committed = {c["name"]: c for c in matching_cases(tiny_model)}
    for c in cases:
        assert c["sha256"] == committed[c["name"]]["sha256"], c["name"]


def test_no_matching_reference_is_refused(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="no reference images.*fluxkit references"):
        matching_cases(tiny_model, tmp_path)
    manifest = read_manifest(REFERENCE_DIR)
    for c in manifest["cases"]:
        c["model"] = {**c["model"], "quantization": "bf16"}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="synthetic-tiny-s0_nf4"):
        matching_cases(tiny_model, tmp_path)


def test_rebuild_keeps_other_models_entries(tiny_model, tmp_path):
    shutil.copy(REFERENCE_DIR / "manifest.json", tmp_path / "manifest.json")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    other = dict(manifest["cases"][0], model={"id": "black-forest-labs/FLUX.1-schnell", "revision": "abc", "quantization": "nf4"})
    manifest["cases"].append(other)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    key = model_key(tiny_model)
    others = [c for c in manifest["cases"] if c["model"] != key]
    build_references(tiny_model, tmp_path)
    after = read_manifest(tmp_path)["cases"]
    assert [c for c in after if c["model"] != key] == others
    assert sum(c["model"].get("revision") == "abc" for c in after) == 1
    assert len([c for c in after if c["model"] == key]) == len(reference_prompts())
