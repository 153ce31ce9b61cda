"""Reference images: render them for a model, and regenerate-and-compare against them.

`reference_images/manifest.json` records, per image, everything needed to make it again (prompt,
seed, steps, size, model and revision or synthetic preset and seed, quantization, device, dtype,
library versions) and its sha256, so a changed reference file is caught before it is trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from .config import CONFIG_DIR
from .environment import package_versions
from .generation import FluxModel
from .metrics import ClipScorer, psnr, ssim

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "reference_images"  # the repository's own set
MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


def reference_dir() -> Path:
    """FLUXKIT_REFERENCE_DIR when set (another set of references), else the repository's reference_images/."""
    return Path(os.environ.get("FLUXKIT_REFERENCE_DIR") or REFERENCE_DIR)


def reference_prompts() -> list[dict]:
    return yaml.safe_load((CONFIG_DIR / "reference_prompts.yaml").read_text())["cases"]


def model_key(model: FluxModel) -> dict:
    """What a reference must share with the model under test to be comparable."""
    src = model.source
    if src.synthetic:
        weights = {"synthetic": {"preset": src.synthetic["preset"], "seed": src.synthetic["seed"]}}
    else:
        weights = {"id": src.model_id, "revision": src.revision}
    return {**weights, "quantization": model.preset.name}


def _slug(key: dict) -> str:
    if "synthetic" in key:
        return f"synthetic-{key['synthetic']['preset']}-s{key['synthetic']['seed']}_{key['quantization']}"
    return f"{key['id'].split('/')[-1]}-{(key['revision'] or 'local')[:8]}_{key['quantization']}"


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.detach().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def load_image(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)


def read_manifest(ref_dir: Path | None = None) -> dict:
    path = Path(ref_dir or reference_dir()) / MANIFEST
    if not path.is_file():
        return {"schema_version": SCHEMA_VERSION, "cases": []}
    return json.loads(path.read_text())


def build_references(model: FluxModel, ref_dir: Path | None = None) -> list[dict]:
    """Render every reference prompt with `model`; replace this model's entries in the manifest."""
    ref_dir = Path(ref_dir or reference_dir())
    ref_dir.mkdir(parents=True, exist_ok=True)
    key = model_key(model)
    gen = model.preset.generation
    cases = []
    for spec in reference_prompts():
        image = model.generate(spec["prompt"], seed=spec["seed"])
        filename = f"{_slug(key)}_{spec['name']}.png"
        Image.fromarray(to_uint8(image)).save(ref_dir / filename)
        cases.append({
            "name": spec["name"], "file": filename, "prompt": spec["prompt"], "negative_prompt": "",
            "seed": spec["seed"], "steps": gen.num_inference_steps, "guidance_scale": gen.guidance_scale,
            "height": gen.height, "width": gen.width, "max_sequence_length": gen.max_sequence_length,
            "model": key, "device": model.info()["device_name"], "dtype": model.info()["dtype"],
            "versions": package_versions(), "sha256": hashlib.sha256((ref_dir / filename).read_bytes()).hexdigest()})
    manifest = read_manifest(ref_dir)
    manifest["cases"] = [c for c in manifest["cases"] if c["model"] != key] + cases
    (ref_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return cases


def matching_cases(model: FluxModel, ref_dir: Path | None = None) -> list[dict]:
    """The manifest's cases made with this model and quantization; refuses when there are none."""
    ref_dir = Path(ref_dir or reference_dir())
    key = model_key(model)
    cases = [c for c in read_manifest(ref_dir)["cases"] if c["model"] == key]
    if not cases:
        raise ValueError(f"no reference images in {ref_dir} match the model under test ({_slug(key)}); "
                         f"render them with `fluxkit references --model {model.source.model_id} "
                         f"--quantization {model.preset.name}` and commit them")
    return cases


def compare_case(model: FluxModel, case: dict, clip: ClipScorer, cosine_min: float,
                 ref_dir: Path | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Regenerate one case and compare it with its reference image."""
    path = Path(ref_dir or reference_dir()) / case["file"]
    intact = path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == case["sha256"]
    reference = load_image(path)
    current = torch.from_numpy(to_uint8(model.generate(
        case["prompt"], negative_prompt=case["negative_prompt"], num_inference_steps=case["steps"], seed=case["seed"],
        height=case["height"], width=case["width"])).astype(np.float32) / 255.0)
    cosine = clip.image_cosine(current, reference)
    result = {"name": case["name"], "prompt": case["prompt"], "seed": case["seed"], "reference_intact": intact,
              "clip_score": clip.clip_score(current, case["prompt"]),
              "reference_clip_score": clip.clip_score(reference, case["prompt"]),
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
