"""GGUF (llama.cpp's block formats q8_0 and q4_0): the transformer written once as a GGUF file into fluxkit's
cache, with the `gguf` package's reference quantizer and diffusers' tensor names, then loaded through diffusers'
`GGUFQuantizationConfig`. diffusers loads GGUF files for its own models only, and whole: no T5, no streaming."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..cache import cache_root, derived
from .base import Quantizer, converted, keep_in_fp32

GGUF_BLOCK = 32  # weights per Q8_0 / Q4_0 block: a float16 scale and 32 8-bit or 4-bit values
GGUF_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}


class GGUF(Quantizer):
    name = "gguf"
    label = "GGUF"
    quant_types = ("q8_0", "q4_0")
    components = ("transformer",)
    streams_modulation = False
    package = "gguf"
    graphs_refused_by_type = {
        "q4_0": "GGUF q4_0: diffusers builds its shift table on the host at every dequantization (torch.tensor), a "
                "copy from pageable memory that a capture refuses"}

    def selected(self, module):
        return {n for n in super().selected(module) if quantized_in_blocks(module.get_submodule(n))}

    def linear_bytes(self, numel, out_features, spec):
        return [numel // GGUF_BLOCK * GGUF_BLOCK_BYTES[spec.quant_type]]  # blocks of scale and values, one tensor

    def load_transformer(self, folder, spec, dtype, device, streamed, pin):
        from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

        transformer = FluxTransformer2DModel.from_single_file(
            str(gguf_file(folder, spec.quant_type)), config=str(folder), subfolder="transformer", torch_dtype=dtype,
            quantization_config=GGUFQuantizationConfig(compute_dtype=dtype)).to(device)
        return transformer, {}


def quantized_in_blocks(module: torch.nn.Module) -> bool:
    """Whether a Linear's weight is written in GGUF blocks (rows of whole blocks); others stay unquantized."""
    return module.in_features % GGUF_BLOCK == 0


def gguf_file(folder: Path, quant_type: str) -> Path:
    """The transformer of a checkpoint folder as a GGUF file in fluxkit's cache, keyed by the folder, its shards
    (name, size, modification time) and the quantization type; written on first use, verified on every use."""
    shards = sorted((folder / "transformer").glob("*.safetensors"))
    stamp = json.dumps([str(folder.resolve()), quant_type] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                                              for p in shards])
    path = cache_root() / "gguf" / f"{hashlib.sha256(stamp.encode()).hexdigest()[:16]}-{quant_type}.gguf"
    return derived(path, lambda out: write_gguf(folder, out, quant_type), verify_gguf, "the cached GGUF file")


def verify_gguf(path: Path) -> None:
    """Raises unless the file is a whole GGUF file: its header parses and every tensor's data lies inside it."""
    import gguf

    size = path.stat().st_size
    reader = gguf.GGUFReader(str(path))
    if not reader.tensors:
        raise ValueError("it holds no tensors")
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, past the file's {size}")


def write_gguf(folder: Path, out: Path, quant_type: str) -> None:
    """Write the transformer's quantized Linear weights in GGUF blocks and every other tensor in float32, under
    diffusers' names (diffusers then loads it without converting names); moved into place when complete."""
    import gguf
    from safetensors import safe_open

    from ..checkpoint import meta_components

    meta = meta_components(folder)["transformer"]
    skip = keep_in_fp32(meta)
    quantized = {f"{n}.weight" for n, m in meta.named_modules() if converted(n, m, skip) and quantized_in_blocks(m)}
    qtype = getattr(gguf.GGMLQuantizationType, quant_type.upper())
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(str(partial), "flux")
    for shard in sorted((folder / "transformer").glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                array = f.get_tensor(key).float().numpy()
                if key in quantized:
                    data = gguf.quants.quantize(array, qtype)
                    writer.add_tensor(key, data, raw_shape=data.shape, raw_dtype=qtype)
                else:
                    writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(out)
