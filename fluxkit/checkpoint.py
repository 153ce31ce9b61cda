"""What a checkpoint folder holds, and whether it is intact, read without loading a single weight.

`inspect_checkpoint` checks, in this order, and raises `VortexInitializationError` naming the file:
`model_index.json` (valid JSON, the FLUX.1-schnell classes, checked before anything is imported), each
component's config (builds the component on the meta device), and each safetensors shard (header
readable, file as long as the header says, every tensor the config needs present with its shape).
The meta-device components it returns are what pre-flight and `fluxkit plan` count bytes on.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import PlacementSpec, Preset
from .errors import InputError, VortexInitializationError

WEIGHT_COMPONENTS = ("transformer", "text_encoder_2", "text_encoder", "vae")
# The classes of FLUX.1-schnell's model_index.json; nothing else is ever imported from a checkpoint.
EXPECTED_CLASSES = {
    "scheduler": ("diffusers", ("FlowMatchEulerDiscreteScheduler",)),
    "text_encoder": ("transformers", ("CLIPTextModel",)),
    "text_encoder_2": ("transformers", ("T5EncoderModel",)),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
    "tokenizer_2": ("transformers", ("T5TokenizerFast", "T5Tokenizer")),
    "transformer": ("diffusers", ("FluxTransformer2DModel",)),
    "vae": ("diffusers", ("AutoencoderKL",)),
}
WEIGHT_FILE_BASE = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                    "text_encoder": "model", "text_encoder_2": "model"}
MAX_HEADER_BYTES = 100 * 2**20
REDOWNLOAD = ("re-run `fluxkit download` (real weights) or `fluxkit synth` (synthetic) into a fresh folder; "
              "the file named above is damaged or missing")


def _damaged(name: str, folder: Path, problem: str) -> VortexInitializationError:
    return VortexInitializationError(f"{name}: checkpoint at {folder} is damaged: {problem}.", remediation=REDOWNLOAD)


def _read_json(path: Path, name: str, folder: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise _damaged(name, folder, f"{path.relative_to(folder)} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(name, folder, f"{path.relative_to(folder)} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise _damaged(name, folder, f"{path.relative_to(folder)} holds {type(data).__name__}, not a JSON object")
    return data


def check_model_index(folder: Path, name: str) -> None:
    """The pipeline and component classes are FLUX.1-schnell's, before any of them is imported."""
    index = _read_json(folder / "model_index.json", name, folder)
    if index.get("_class_name") != "FluxPipeline":
        raise _damaged(name, folder, f"model_index.json names pipeline {index.get('_class_name')!r}, not FluxPipeline")
    for component, value in index.items():
        if component.startswith("_") or value in (None, [None, None]):
            continue
        if component not in EXPECTED_CLASSES:
            raise _damaged(name, folder, f"model_index.json has an unexpected component {component!r}")
        library, classes = EXPECTED_CLASSES[component]
        if not (isinstance(value, list) and len(value) == 2 and value[0] == library and value[1] in classes):
            raise _damaged(name, folder, f"model_index.json gives {component} as {value!r}; FLUX.1-schnell uses "
                                         f"[{library!r}, {classes[0]!r}]")
    missing = [c for c in EXPECTED_CLASSES if c not in index]
    if missing:
        raise _damaged(name, folder, f"model_index.json lacks {', '.join(missing)}")


def _build_meta(component: str, config: dict) -> torch.nn.Module:
    """One weight component on the meta device, from its (already parsed) config."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    config = {k: v for k, v in config.items() if k != "quantization_config"}
    with torch.device("meta"):
        if component == "transformer":
            return FluxTransformer2DModel.from_config(config)
        if component == "vae":
            return AutoencoderKL.from_config(config)
        if component == "text_encoder":
            return CLIPTextModel(CLIPTextConfig(**config))
        return T5EncoderModel(T5Config(**config))


def component_config(folder: Path, component: str, name: str = "checkpoint") -> dict:
    return _read_json(folder / component / "config.json", name, folder)


def meta_components(folder: Path, name: str = "checkpoint") -> dict[str, torch.nn.Module]:
    """Each weight component built on the meta device from its config (no weights read)."""
    components = {}
    for component in WEIGHT_COMPONENTS:
        config = component_config(folder, component, name)
        try:
            components[component] = _build_meta(component, config)
        except Exception as err:  # a config the class cannot build from: wrong types, impossible sizes
            raise _damaged(name, folder, f"{component}/config.json does not describe a valid "
                                         f"{EXPECTED_CLASSES[component][1][0]} ({type(err).__name__}: {err})") from err
    return components


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {dtype, shape, data_offsets}; raises ValueError when the file is not whole."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{size} bytes, shorter than a safetensors header")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"header length {length} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    try:
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (TypeError, KeyError, ValueError, IndexError):
        raise ValueError("header entries lack data_offsets") from None
    if 8 + length + end != size:
        raise ValueError(f"header describes {8 + length + end} bytes but the file has {size} (truncated or padded)")
    return header


def weight_files(folder: Path, component: str, name: str = "checkpoint") -> list[Path]:
    """The safetensors files of a component: the single file, or every shard its index names."""
    base = folder / component / WEIGHT_FILE_BASE[component]
    single, index = base.with_suffix(".safetensors"), Path(f"{base}.safetensors.index.json")
    if index.is_file():
        weight_map = _read_json(index, name, folder).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise _damaged(name, folder, f"{index.relative_to(folder)} has no weight_map")
        return [folder / component / f for f in sorted(set(map(str, weight_map.values())))]
    if single.is_file():
        return [single]
    raise _damaged(name, folder, f"{component}/ has no {single.name} and no {index.name}")


def _expected_tensors(module: torch.nn.Module) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """(aliases, shape) of every tensor a component needs; tied parameters count once under any alias."""
    groups: dict[int, list[str]] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
        shapes[id(p)] = tuple(p.shape)
    for owner_name, owner in module.named_modules():
        for b_name, b in owner.named_buffers(recurse=False):
            if b_name not in owner._non_persistent_buffers_set:
                n = f"{owner_name}.{b_name}" if owner_name else b_name
                groups.setdefault(id(b), []).append(n)
                shapes[id(b)] = tuple(b.shape)
    return [(tuple(names), shapes[key]) for key, names in groups.items()]


def check_weights(folder: Path, component: str, module: torch.nn.Module, name: str = "checkpoint") -> None:
    """Every shard whole and every tensor the config needs present with its shape (quantized folders: whole only)."""
    found: dict[str, tuple[int, ...]] = {}
    for path in weight_files(folder, component, name):
        if not path.is_file():
            raise _damaged(name, folder, f"{path.relative_to(folder)} is missing")
        try:
            header = read_safetensors_header(path)
        except (OSError, ValueError) as err:
            raise _damaged(name, folder, f"{path.relative_to(folder)} is not a whole safetensors file ({err})") from None
        found.update({k: tuple(v.get("shape", ())) for k, v in header.items()})
    if "quantization_config" in component_config(folder, component, name):
        return  # a pre-quantized component: packed shapes differ from the config's; the loader checks them
    for aliases, shape in _expected_tensors(module):
        present = [a for a in aliases if a in found]
        if not present:
            raise _damaged(name, folder, f"{component} weights lack {aliases[0]} (shape {list(shape)})")
        if found[present[0]] != shape:
            raise _damaged(name, folder, f"{component} weight {present[0]} has shape {list(found[present[0]])} but "
                                         f"{component}/config.json implies {list(shape)}")


def inspect_checkpoint(folder: Path, name: str = "checkpoint") -> dict[str, torch.nn.Module]:
    """Check the whole folder without loading weights; returns its components on the meta device."""
    check_model_index(folder, name)
    for sub in EXPECTED_CLASSES:
        if not (folder / sub).is_dir():
            raise _damaged(name, folder, f"the {sub}/ folder is missing")
    components = meta_components(folder, name)
    for component, module in components.items():
        check_weights(folder, component, module, name)
    return components


# ---- pre-quantized checkpoints (written by fluxkit.quantize) ------------------------------------------

def quantized_components(preset: Preset, placement: PlacementSpec) -> tuple[str, ...]:
    """What a placement keeps quantized: a streamed T5 runs in the model dtype."""
    return tuple(c for c in preset.quantization.components
                 if not (c == "text_encoder_2" and placement.text_encoder_2 == "stream"))


def quantization_config(preset: Preset) -> dict:
    """The `quantization_config` diffusers and transformers write for a bitsandbytes 4-bit model."""
    q = preset.quantization
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": q.quant_type, "bnb_4bit_use_double_quant": q.double_quant,
            "bnb_4bit_compute_dtype": preset.dtype, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": None, "llm_int8_enable_fp32_cpu_offload": False}


def check_prequantized(config: dict, preset: Preset, component: str) -> None:
    """A pre-quantized component must have been quantized the way the preset asks."""
    saved = config.get("quantization_config")
    q = preset.quantization
    if component not in q.components or q.backend != "bitsandbytes_4bit":
        raise InputError(f"the checkpoint's {component} is pre-quantized but preset {preset.name} keeps it unquantized; "
                         "load the original checkpoint, or use the preset it was quantized with")
    if (saved.get("bnb_4bit_quant_type"), bool(saved.get("bnb_4bit_use_double_quant"))) != (q.quant_type, q.double_quant):
        raise InputError(f"the checkpoint's {component} is pre-quantized as {saved.get('bnb_4bit_quant_type')} "
                         f"(double quant {bool(saved.get('bnb_4bit_use_double_quant'))}) but preset {preset.name} asks for "
                         f"{q.quant_type} (double quant {q.double_quant}); use the matching preset")


def check_prequantized_folder(folder: Path, preset: Preset, placement: PlacementSpec) -> bool:
    """Whether a checkpoint holds pre-quantized components, after checking they suit the preset and placement."""
    found = False
    for component in ("transformer", "text_encoder_2"):
        config = json.loads((Path(folder) / component / "config.json").read_text())
        if "quantization_config" not in config:
            continue
        found = True
        check_prequantized(config, preset, component)
        if component == "text_encoder_2" and placement.text_encoder_2 == "stream":
            raise InputError(f"the checkpoint's T5 is pre-quantized but placement {placement.name} streams T5 in the "
                             f"model dtype; save it with `fluxkit quantize --placement {placement.name}` (T5 kept "
                             "unquantized) or choose another placement")
    return found
