"""What a checkpoint folder holds, and whether it is intact, read without loading a single weight.

`inspect_checkpoint` checks, in this order, and raises `VortexInitializationError` naming the file:
`model_index.json` (valid JSON, the FLUX.1-schnell classes, checked before anything is imported), each
component's config (builds the component on the meta device), and each safetensors shard (header
readable, file as long as the header says, every tensor the config needs present with its shape).
The meta-device components it returns are what pre-flight and `fluxkit plan` count bytes on.
"""
from __future__ import annotations

import json
import math
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
REQUANTIZE = ("quantize the original checkpoint again with `fluxkit quantize` into a fresh folder; the pre-quantized "
              "tensor named above is damaged")
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
    """Every shard whole and every tensor the config needs present with its shape; in a pre-quantized component,
    every tensor of each 4-bit weight too, with the shape and dtype its quantization implies."""
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in weight_files(folder, component, name):
        if not path.is_file():
            raise _damaged(name, folder, f"{path.relative_to(folder)} is missing")
        try:
            header = read_safetensors_header(path)
        except (OSError, ValueError) as err:
            raise _damaged(name, folder, f"{path.relative_to(folder)} is not a whole safetensors file ({err})") from None
        found.update({k: (tuple(v.get("shape", ())), v.get("dtype")) for k, v in header.items()})
    saved = saved_quantization(component_config(folder, component, name), component, folder, name)
    packed = _packed_tensors(module, saved) if saved else {}
    for aliases, shape in _expected_tensors(module):
        if aliases[0] in packed:
            continue
        present = [a for a in aliases if a in found]
        if not present:
            raise _damaged(name, folder, f"{component} weights lack {aliases[0]} (shape {list(shape)})")
        if found[present[0]][0] != shape:
            raise _damaged(name, folder, f"{component} weight {present[0]} has shape {list(found[present[0]][0])} but "
                                         f"{component}/config.json implies {list(shape)}")
    for key, (shape, dtype) in ((k, v) for tensors in packed.values() for k, v in tensors.items()):
        if key not in found:
            raise _damaged(name, folder, f"pre-quantized {component} lacks {key}")
        if found[key] != (shape, dtype) and not (shape is None and found[key][1] == dtype and len(found[key][0]) == 1):
            raise _damaged(name, folder, f"pre-quantized {component} tensor {key} is {found[key][1]} of shape "
                                         f"{list(found[key][0])}, but its config and quantization imply {dtype} of shape "
                                         f"{list(shape)}")
    if saved:
        known = {a for aliases, _ in _expected_tensors(module) for a in aliases} | {
            k for tensors in packed.values() for k in tensors}
        unexpected = sorted(set(found) - known)
        if unexpected:
            raise _damaged(name, folder, f"pre-quantized {component} holds unexpected tensor {unexpected[0]}")


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

NF4_BLOCK, NESTED_BLOCK = 64, 256  # the block sizes bitsandbytes uses and fluxkit writes
# transformers writes these beside fluxkit's keys when it saves a bitsandbytes model; they must keep these values
TRANSFORMERS_DEFAULTS = {"llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False}


def saved_quantization(config: dict, component: str, folder: Path, name: str) -> dict | None:
    """A component config's `quantization_config`: None when there is none (or null), refused when it is not a
    mapping."""
    saved = config.get("quantization_config")
    if saved is None:
        return None
    if not isinstance(saved, dict):
        raise _damaged(name, folder, f"{component}/config.json has quantization_config {saved!r}, not a mapping")
    return saved


def _packed_tensors(module: torch.nn.Module, saved: dict) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
    """Per 4-bit weight (its parameter name), the tensors bitsandbytes serializes it as: key -> (shape, dtype)."""
    from .quantizers import converted, keep_in_fp32

    quant_type, nested = saved.get("bnb_4bit_quant_type"), bool(saved.get("bnb_4bit_use_double_quant"))
    skip = keep_in_fp32(module)
    out = {}
    for n, m in module.named_modules():
        if not converted(n, m, skip):
            continue
        numel = m.in_features * m.out_features
        blocks = math.ceil(numel / NF4_BLOCK)
        w = f"{n}.weight"
        tensors = {w: ((math.ceil(numel / 2), 1), "U8"), f"{w}.quant_map": ((16,), "F32"),
                   f"{w}.absmax": ((blocks,), "U8" if nested else "F32")}
        if nested:
            tensors.update({f"{w}.nested_absmax": ((math.ceil(blocks / NESTED_BLOCK),), "F32"),
                            f"{w}.nested_quant_map": ((256,), "F32")})
        tensors[f"{w}.quant_state.bitsandbytes__{quant_type}"] = (None, "U8")
        out[w] = tensors
    return out

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


def check_prequantized(saved: dict, preset: Preset, component: str) -> None:
    """A pre-quantized component must have been quantized exactly as the preset asks: the preset is the one source
    of its settings, so every field the folder records must match it (a folder quantized on any device records the
    preset's compute dtype; the device it loads on computes in its own, as quantize-on-load does)."""
    q = preset.quantization
    if component not in q.components or not q.quantizer.saves_prequantized:
        raise InputError(f"the checkpoint's {component} is pre-quantized but preset {preset.name} keeps it unquantized; "
                         "load the original checkpoint, or use the preset it was quantized with")
    expected = quantization_config(preset)
    for key in {**expected, **saved}:
        want = expected.get(key, TRANSFORMERS_DEFAULTS.get(key, "absent"))
        if key.startswith("_load_in_"):  # transformers' private copies of load_in_4bit / load_in_8bit
            want = expected.get(key[1:], "absent")
        if want == "absent":
            raise InputError(f"the checkpoint's {component} is pre-quantized with quantization_config.{key}="
                             f"{saved[key]!r}, a setting fluxkit's presets do not have; quantize the original "
                             "checkpoint again with `fluxkit quantize`")
        if saved.get(key, "absent") != want:
            raise InputError(f"the checkpoint's {component} is pre-quantized with quantization_config.{key}="
                             f"{saved.get(key, 'absent')!r} but preset {preset.name} asks for {want!r}; use the preset it "
                             "was quantized with, or quantize it again with `fluxkit quantize`")


def check_prequantized_folder(folder: Path, preset: Preset, name: str = "checkpoint") -> tuple[str, ...]:
    """The pre-quantized components of a checkpoint, after checking every setting they record against the preset
    (before their tensors are checked against those settings)."""
    found = []
    for component in ("transformer", "text_encoder_2"):
        if not (folder / component / "config.json").is_file():
            continue  # inspect_checkpoint names what is missing
        saved = saved_quantization(component_config(folder, component, name), component, folder, name)
        if saved is not None:
            found.append(component)
            check_prequantized(saved, preset, component)
    return tuple(found)


def check_prequantized_placement(prequantized: tuple[str, ...], placement: PlacementSpec) -> None:
    if "text_encoder_2" in prequantized and placement.text_encoder_2 == "stream":
        raise InputError(f"the checkpoint's T5 is pre-quantized but placement {placement.name} streams T5 in the "
                         f"model dtype; save it with `fluxkit quantize --placement {placement.name}` (T5 kept "
                         "unquantized) or choose another placement")


def loaded_4bit_states(meta: torch.nn.Module, loaded: torch.nn.Module, moved: dict) -> list[tuple]:
    """(layer name, loaded quant state or None, the (out, in) shape its config implies) of every Linear the config
    quantizes; a layer a placement moved out of the module (modulation tables) is looked up in `moved`, by name,
    as its weight."""
    from .quantizers import converted, keep_in_fp32

    skip = keep_in_fp32(meta)
    out = []
    for n, m in meta.named_modules():
        if converted(n, m, skip):
            holder = moved[n] if n in moved else loaded.get_submodule(n).weight
            out.append((n, getattr(holder, "quant_state", None), (m.out_features, m.in_features)))
    return out


def check_prequantized_weights(components: dict[str, list[tuple]], preset: Preset, name: str) -> None:
    """Every loaded 4-bit weight of the pre-quantized components (component -> `loaded_4bit_states`) holds the
    quantization state its layer needs, before the first weight is used: damage that loads (a scale table cut
    short, another block size, a NaN scale) would otherwise fail in generate or make NaN images."""
    import bitsandbytes.functional as F

    q = preset.quantization
    codes = {}
    finite = []
    for component, layers in components.items():
        for layer, state, shape in layers:
            where = f"pre-quantized {component} weight {layer}"
            problem = None
            if state is None:
                raise VortexInitializationError(f"{name}: {where} was not loaded as a 4-bit weight.",
                                                remediation=REQUANTIZE)
            if (state.quant_type, state.blocksize, bool(state.nested)) != (q.quant_type, NF4_BLOCK, q.double_quant):
                problem = (f"is {state.quant_type} in blocks of {state.blocksize} (nested {bool(state.nested)}), not "
                           f"{q.quant_type} in blocks of {NF4_BLOCK} (nested {q.double_quant})")
            elif tuple(state.shape) != shape:
                problem = f"has quant state shape {list(state.shape)}, not its layer's {list(shape)}"
            elif state.absmax.numel() != math.ceil(math.prod(state.shape) / NF4_BLOCK):
                problem = f"has {state.absmax.numel()} block scales for {math.prod(state.shape)} weights"
            else:
                key = (state.quant_type, str(state.code.device))
                codes.setdefault(key, F.get_4bit_type(state.quant_type, device=state.code.device))
                if not torch.equal(state.code.float(), codes[key]):
                    problem = f"has a {state.quant_type} code table that is not bitsandbytes' own"
                scales = state.state2.absmax if state.nested else state.absmax
                finite.append((where, torch.isfinite(scales).all()))
                if state.nested and not math.isfinite(float(state.offset)):
                    problem = f"has a non-finite nested offset {float(state.offset)}"
            if problem:
                raise VortexInitializationError(f"{name}: {where} {problem}.", remediation=REQUANTIZE)
    if finite:
        ok = torch.stack([flag.to("cpu") for _, flag in finite])  # one device sync for every layer
        if not bool(ok.all()):
            where = finite[int((~ok).nonzero()[0])][0]
            raise VortexInitializationError(f"{name}: {where} has NaN or infinite block scales.",
                                            remediation=REQUANTIZE)
