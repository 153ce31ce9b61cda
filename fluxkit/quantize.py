"""Pre-quantized checkpoints: quantize once, save, and load later without quantizing again.

`save_quantized` writes a complete FLUX.1-schnell folder in which the components a preset and
placement quantize hold bitsandbytes' serialized 4-bit weights (packed data plus quantization state,
the format diffusers and transformers read back) and a `quantization_config` in their config.json;
everything else is copied. `load_flux_schnell(model=that_folder)` then skips quantize-on-load: the
transformer reads a quarter of the bytes and does no quantization work.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import T5EncoderModel

from .checkpoint import WEIGHT_FILE_BASE, inspect_checkpoint, quantization_config, quantized_components
from .config import AUTO_PLACEMENT, Preset, load_placement, load_preset
from .errors import InputError
from .hub import resolve_model
from .preflight import compute_dtype, resolve_device
from .synthetic import MARKER_FILE, MAX_SHARD_BYTES


def _save_sharded(state: dict[str, torch.Tensor], folder: Path, base: str) -> None:
    names = list(state)
    shards, size = [[]], 0
    for name in names:
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = [f"{base}.safetensors"] if len(shards) == 1 else [
        f"{base}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for filename, shard in zip(files, shards):
        save_file({n: state[n].contiguous() for n in shard}, folder / filename, metadata={"format": "pt"})
    if len(files) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, s in zip(files, shards) for n in s}}
        (folder / f"{base}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_component(source: Path, out: Path, component: str, module: torch.nn.Module, preset: Preset) -> None:
    folder = out / component
    for old in folder.glob("*.safetensors*"):
        old.unlink()
    state = {k: v.detach().to("cpu") for k, v in module.state_dict().items()}
    _save_sharded(state, folder, WEIGHT_FILE_BASE[component])
    (folder / "config.json").write_text((source / component / "config.json").read_text())
    _record_quantization(folder, preset)


def _record_quantization(folder: Path, preset: Preset) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization_config(preset)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_quantized(model: str, out: str | Path, quantization: str | Preset = "nf4", placement: str | None = None,
                   device: str = "auto") -> Path:
    """Quantize `model` per preset (bitsandbytes 4-bit) and write it to `out` as a complete checkpoint folder."""
    from .loading import plan_load

    preset = load_preset(quantization)
    spec = (plan_load(device, preset, model, placement=placement, preflight_check=False).placement
            if (placement or preset.placement) == AUTO_PLACEMENT else load_placement(placement or preset.placement))
    quantizer = preset.quantization.quantizer
    if not quantizer.saves_prequantized:
        raise InputError(f"quantization={preset.name!r}: only bitsandbytes 4-bit presets are saved pre-quantized "
                         "(nf4, nf4-nodq, fp4)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"out={out}: exists and is not empty; choose a new or empty folder")
    source = resolve_model(model)
    inspect_checkpoint(source.path, source.describe())
    if any("quantization_config" in json.loads((source.path / c / "config.json").read_text())
           for c in ("transformer", "text_encoder_2")):
        raise InputError(f"model={model!r} is already pre-quantized")
    dev = resolve_device(device)
    dtype = compute_dtype(preset, dev)  # quantize from what quantize-on-load on this device would start from
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        shutil.copytree(source.path, work, dirs_exist_ok=True, symlinks=False)
        components = quantized_components(preset, spec)
        if "transformer" in components:
            transformer, _ = quantizer.stream_transformer(source.path, preset.quantization, dtype, dev, (), pin=False)
            _write_component(source.path, work, "transformer", transformer, preset)
            del transformer
        if "text_encoder_2" in components:
            device_map = {"": dev} if dev.type == "cuda" else {"": "cpu"}
            t5 = T5EncoderModel.from_pretrained(source.path / "text_encoder_2", dtype=dtype, device_map=device_map,
                                                quantization_config=quantizer.library_config(preset.quantization,
                                                                                             "transformers", dtype))
            for old in (work / "text_encoder_2").glob("*.safetensors*"):
                old.unlink()
            t5.save_pretrained(work / "text_encoder_2")
            del t5
            # transformers records the dtype it quantized from (float32 on a CPU); the folder records the preset's,
            # as for the transformer: what the weights are for, whichever device quantized them
            _record_quantization(work / "text_encoder_2", preset)
        marker = work / MARKER_FILE
        if marker.is_file():
            data = json.loads(marker.read_text())
            data["prequantized"] = {"preset": preset.name, "components": list(components)}
            marker.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        work.rename(out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out
