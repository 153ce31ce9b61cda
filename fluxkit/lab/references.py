"""Reference images: render them for a model, and regenerate-and-compare against them.

`reference_images/manifest.json` records, per image, what made it: the generation request, the
weights, the settings that change pixels (quantization, dtype, which components are quantized), the
device and CPU kernel path, library versions, and the file's sha256. Float arithmetic differs in the
last bits between machines, so a regenerated image is compared with a stated tolerance
(`CROSS_MACHINE_PSNR_DB`); bit-for-bit equality holds only within one machine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from ..config import PlacementSpec, Preset
from ..environment import package_versions
from ..errors import InputError
from ..generation import FluxModel
from ..hub import ModelSource
from ..images import load_png, quantize_like_png, save_png
from ..version import __version__
from .metrics import ClipScorer, psnr, ssim
from .prompts import reference_prompts

REFERENCE_DIR = Path(__file__).parent / "reference_images"  # the set fluxkit ships (the repository's reference_images/)
MANIFEST = "manifest.json"
SCHEMA_VERSION = 3  # 3: the model key records the VAE decode's tile size
# Measured: tiny references regenerated on another x86-64 CPU differ by 1/255 in 1.6-4.7% of pixels (PSNR
# 61-66 dB); on this machine with ATEN_CPU_CAPABILITY=default, in ~20% of pixels (PSNR 59-60 dB). 40 dB leaves
# room for other kernel paths and still catches any real change.
CROSS_MACHINE_PSNR_DB = 40.0


def reference_dir() -> Path:
    """FLUXKIT_REFERENCE_DIR when set (another set of references), else the set fluxkit ships."""
    value = os.environ.get("FLUXKIT_REFERENCE_DIR")
    if value and Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
        raise InputError(f"FLUXKIT_REFERENCE_DIR={value}: is not a folder; point it at a folder of reference images")
    return Path(value).expanduser() if value else REFERENCE_DIR


def model_key(model: FluxModel) -> dict:
    """What a reference must share with the model under test to be comparable: weights and pixel-changing settings."""
    return reference_key(model.source, model.preset, model.placement, model.dtype)


def reference_key(source: ModelSource, preset: Preset, placement: PlacementSpec, dtype: torch.dtype) -> dict:
    """`model_key` from what is known before loading (validate checks its references before any GPU work)."""
    if source.synthetic:
        weights = {"synthetic": {"preset": source.synthetic["preset"], "seed": source.synthetic["seed"]}}
    else:
        weights = {"id": source.model_id, "revision": source.revision}
    q = preset.quantization
    quantized = sorted(c for c in q.components if not (c == "text_encoder_2" and placement.text_encoder_2 == "stream"))
    return {**weights, "quantization": preset.name, "backend": q.backend, "quant_type": q.quant_type,
            "double_quant": q.double_quant, "quantized_components": quantized,
            "dtype": str(dtype).removeprefix("torch."), "vae_tile_size": placement.vae_tile_size}


def _slug(key: dict) -> str:
    weights = (f"synthetic-{key['synthetic']['preset']}-s{key['synthetic']['seed']}" if "synthetic" in key
               else f"{key['id'].split('/')[-1]}-{(key['revision'] or 'local')[:8]}")
    t5 = "" if "text_encoder_2" in key["quantized_components"] or key["backend"] == "none" else "-t5bf16"
    return f"{weights}_{key['quantization']}{t5}"


def machine() -> dict:
    """Where an image was computed: what decides its last bits."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "threads": torch.get_num_threads()}


def read_manifest(ref_dir: Path | None = None) -> dict:
    """The manifest of a reference folder (an empty one where there is none); a damaged one is refused by name."""
    path = Path(ref_dir or reference_dir()) / MANIFEST
    if not path.exists():
        return {"schema_version": SCHEMA_VERSION, "cases": []}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not valid JSON ({' '.join(str(err).split())}); restore it from version control "
                         "or render the references again into an empty folder") from None
    cases = manifest.get("cases") if isinstance(manifest, dict) else None
    if not isinstance(cases, list) or not all(isinstance(c, dict) and {"file", "model", "request", "sha256"} <= set(c)
                                              for c in cases):
        raise InputError(f"{path}: expected {{schema_version, cases: [{{file, model, request, sha256, ...}}]}}; "
                         "restore it from version control or render the references again into an empty folder")
    return manifest


def check_can_write(planned, ref_dir: Path | None = None, overwrite: bool = False) -> None:
    """Refuse, before a model loads, to write over a reference set it would replace without `overwrite`
    (`planned`: what `loading.plan_load` says will load)."""
    ref_dir = Path(ref_dir or reference_dir())
    key = reference_key(planned.source, planned.preset, planned.placement, planned.dtype)
    existing = [c["file"] for c in read_manifest(ref_dir)["cases"] if c["model"] == key] + sorted(
        n for n in _file_names(key) if (ref_dir / n).exists())
    if existing and not overwrite:
        raise InputError(f"{ref_dir} already holds reference images for {_slug(key)} ({len(set(existing))} files); "
                         "pass overwrite=True (CLI: --overwrite) to replace them, or choose another folder (--out)")


def _file_names(key: dict) -> set[str]:
    return {f"{_slug(key)}_{s['name']}.png" for s in reference_prompts()}


def build_references(model: FluxModel, ref_dir: Path | None = None, overwrite: bool = False) -> list[dict]:
    """Render every reference prompt with `model` and record them; existing images of this model are replaced
    only with `overwrite=True`."""
    ref_dir = Path(ref_dir or reference_dir())
    key = model_key(model)
    check_can_write(model, ref_dir, overwrite)
    manifest = read_manifest(ref_dir)
    specs = reference_prompts()
    names = _file_names(key)
    ref_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for spec in specs:
        image = model.generate(spec["prompt"], seed=spec["seed"])
        request = model.last_call.request
        filename = f"{_slug(key)}_{spec['name']}.png"
        save_png(image, ref_dir / filename)
        cases.append({"name": spec["name"], "file": filename, "request": dataclasses.asdict(request), "model": key,
                      "placement": model.placement.name, "device": model.info()["device_name"], "machine": machine(),
                      "fluxkit_version": __version__, "versions": package_versions(),
                      "sha256": hashlib.sha256((ref_dir / filename).read_bytes()).hexdigest()})
    # a case of other settings whose file was just written over (the same file name) goes with it
    manifest = {"schema_version": SCHEMA_VERSION,
                "cases": [c for c in manifest["cases"] if c["model"] != key and c["file"] not in names] + cases}
    (ref_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return cases


def matching_cases(model: FluxModel, ref_dir: Path | None = None) -> list[dict]:
    """The manifest's cases made with this model's weights and settings; refuses when there are none."""
    return cases_for(model_key(model), model.source.model_id, model.placement.name, ref_dir)


def cases_for(key: dict, model_id: str, placement: str, ref_dir: Path | None = None) -> list[dict]:
    ref_dir = Path(ref_dir or reference_dir())
    cases = [c for c in read_manifest(ref_dir)["cases"] if c["model"] == key]
    if not cases:
        raise InputError(f"no reference images in {ref_dir} match the model under test ({_slug(key)}); render them "
                         f"with `fluxkit references --model {model_id} --quantization {key['quantization']} "
                         f"--placement {placement}` and commit them")
    return cases


def regenerate(model: FluxModel, case: dict) -> torch.Tensor:
    """The image of a manifest case made again by `model`, as its PNG would load back."""
    r = case["request"]
    return quantize_like_png(model.generate(r["prompt"], negative_prompt=r["negative_prompt"],
                                            num_inference_steps=r["num_inference_steps"], seed=r["seed"],
                                            true_cfg_scale=r["true_cfg_scale"], height=r["height"], width=r["width"]))


def compare_case(model: FluxModel, case: dict, clip: ClipScorer, cosine_min: float,
                 ref_dir: Path | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Regenerate one case and compare it with its reference image."""
    path = Path(ref_dir or reference_dir()) / case["file"]
    intact = path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == case["sha256"]
    reference = load_png(path)
    current = regenerate(model, case)
    features, reference_features = clip.image_features(current), clip.image_features(reference)
    cosine = float(features @ reference_features)
    result = {"name": case["name"], "prompt": case["request"]["prompt"], "seed": case["request"]["seed"],
              "reference_intact": intact, "clip_score": clip.score(features, case["request"]["prompt"]),
              "reference_clip_score": clip.score(reference_features, case["request"]["prompt"]),
              "clip_image_cosine": cosine, "psnr_db": psnr(current, reference), "ssim": ssim(current, reference),
              "max_abs_diff": float((current - reference).abs().max())}
    reasons = []
    if not intact:
        reasons.append("reference file does not match its manifest sha256 (changed since it was recorded)")
    if cosine < cosine_min:
        reasons.append(f"CLIP image cosine {cosine:.3f} < {cosine_min}")
    result.update(passed=not reasons, reasons=reasons)
    return result, current, reference


def compare_all(model: FluxModel, clip: ClipScorer, ref_dir: Path | None = None) -> tuple[list[dict], list]:
    """Every matching case compared: (results, [(name, current, reference), ...] for plotting)."""
    results, images = [], []
    for case in matching_cases(model, ref_dir):
        result, current, reference = compare_case(model, case, clip, model.preset.budgets.clip_cosine_min, ref_dir)
        results.append(result)
        images.append((case["name"], current, reference))
    return results, images
