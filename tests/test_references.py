"""Reference images: what made each one is recorded; regenerated images match within the stated tolerance
across machines and bit for bit within one."""
import json
import shutil

import pytest
import torch

from fluxkit.images import load_png
from fluxkit.lab.metrics import psnr
from fluxkit.lab.references import (
    CROSS_MACHINE_PSNR_DB,
    REFERENCE_DIR,
    build_references,
    matching_cases,
    model_key,
    read_manifest,
    reference_prompts,
    regenerate,
)


def test_committed_references_record_what_made_them(tiny_model):
    cases = matching_cases(tiny_model)
    assert {c["name"] for c in cases} == {p["name"] for p in reference_prompts()}
    for c in cases:
        assert (REFERENCE_DIR / c["file"]).is_file()
        assert c["model"] == model_key(tiny_model) and c["model"]["double_quant"] is True
        assert set(c["request"]) == {"prompt", "negative_prompt", "seed", "num_inference_steps", "true_cfg_scale",
                                     "height", "width", "max_sequence_length"}
        for key in ("placement", "device", "machine", "versions", "fluxkit_version", "sha256"):
            assert c[key], key


def test_regenerated_references_match_within_the_cross_machine_tolerance(tiny_model):
    for case in matching_cases(tiny_model):
        current = regenerate(tiny_model, case)
        assert psnr(current, load_png(REFERENCE_DIR / case["file"])) >= CROSS_MACHINE_PSNR_DB, case["name"]


def test_within_one_machine_rebuilding_is_bit_identical(tiny_model, tmp_path):
    first = build_references(tiny_model, tmp_path / "a")
    second = build_references(tiny_model, tmp_path / "b")
    assert [c["sha256"] for c in first] == [c["sha256"] for c in second]
    for c in first:
        assert torch.equal(load_png(tmp_path / "a" / c["file"]), regenerate(tiny_model, c))


def test_existing_references_are_not_overwritten_without_asking(tiny_model, tmp_path):
    refs = tmp_path / "refs"
    shutil.copytree(REFERENCE_DIR, refs)
    before = {p.name: p.read_bytes() for p in refs.iterdir()}
    with pytest.raises(ValueError, match="already holds reference images.*overwrite=True"):
        build_references(tiny_model, refs)
    assert {p.name: p.read_bytes() for p in refs.iterdir()} == before
    build_references(tiny_model, refs, overwrite=True)
    assert len([c for c in read_manifest(refs)["cases"] if c["model"] == model_key(tiny_model)]) == 4


def test_no_matching_reference_is_refused(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="no reference images.*fluxkit references"):
        matching_cases(tiny_model, tmp_path)
    manifest = read_manifest(REFERENCE_DIR)
    for c in manifest["cases"]:
        c["model"] = {**c["model"], "double_quant": not c["model"].get("double_quant")}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="synthetic-tiny-s0_nf4"):
        matching_cases(tiny_model, tmp_path)


def test_rebuild_keeps_other_models_entries(tiny_model, tmp_path):
    manifest = read_manifest(REFERENCE_DIR)
    other = dict(matching_cases(tiny_model)[0], model={"id": "black-forest-labs/FLUX.1-schnell", "revision": "abc"},
                 file="FLUX.1-schnell-abc_nf4_manic-scientist.png")
    manifest["cases"].append(other)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    key = model_key(tiny_model)
    others = [c for c in manifest["cases"] if c["model"] != key]
    build_references(tiny_model, tmp_path, overwrite=True)
    after = read_manifest(tmp_path)["cases"]
    assert [c for c in after if c["model"] != key] == others
    assert len([c for c in after if c["model"] == key]) == len(reference_prompts())


def test_a_rebuild_drops_the_cases_of_other_settings_whose_files_it_wrote_over(tiny_model, tmp_path):
    """The decode's tile size changes pixels but not file names: the tiled cases must not outlive their images."""
    manifest = read_manifest(REFERENCE_DIR)
    tiled = [dict(c, model={**c["model"], "vae_tile_size": 256}) for c in matching_cases(tiny_model)]
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "cases": tiled}))
    with pytest.raises(ValueError, match="no reference images.*--placement resident"):  # another tile size: no match
        matching_cases(tiny_model, tmp_path)
    for c in tiled:
        shutil.copy(REFERENCE_DIR / c["file"], tmp_path / c["file"])
    build_references(tiny_model, tmp_path, overwrite=True)
    after = read_manifest(tmp_path)["cases"]
    assert [c["model"]["vae_tile_size"] for c in after] == [None] * len(reference_prompts())
