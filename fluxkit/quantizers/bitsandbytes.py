"""bitsandbytes: 4-bit (NF4, FP4) and 8-bit (LLM.int8) layers, quantized while loading.

On a GPU with nothing streamed, the transformer goes through diffusers' own quantizer and T5 through
transformers' (the plain pattern). diffusers' quantizer refuses to run without a GPU, and puts a quantized model
on one device; so on a CPU, and whenever modulation layers are streamed, fluxkit reads the transformer tensor by
tensor and quantizes each Linear with the same bitsandbytes layers (same quant type, block size and kernels).
Pre-quantized folders (`fluxkit quantize`) hold bitsandbytes' serialized 4-bit weights and are rebuilt without
quantizing again.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .base import Quantizer, converted, keep_in_fp32, streamed_layers

if TYPE_CHECKING:
    from ..config import QuantizationSpec
    from ..placement import Parked

NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize: one absmax per 64 weights
NESTED_BLOCK = 256  # double quantization: the absmaxes are themselves quantized in blocks of 256


def is_prequantized(config: dict) -> bool:
    return config.get("quantization_config") is not None


class BitsAndBytes4bit(Quantizer):
    name = "bitsandbytes_4bit"
    label = "bitsandbytes 4-bit"
    quant_types = ("nf4", "fp4")
    dequantize_kernels = ("bitsandbytes", "fluxkit")
    saves_prequantized = True
    # Above a few tokens bitsandbytes dequantizes each weight to bf16 (written once, read by the product).
    dequantized_bytes_per_weight = 4

    def linear_bytes(self, numel: int, out_features: int, spec: QuantizationSpec) -> list[int]:
        blocks = math.ceil(numel / NF4_BLOCK)
        if spec.double_quant:  # uint8 absmax, float32 offset, nested float32 absmax and 256-entry code, 16-entry code
            return [math.ceil(numel / 2), blocks, 4, math.ceil(blocks / NESTED_BLOCK) * 4, 256 * 4, 16 * 4]
        return [math.ceil(numel / 2), blocks * 4, 16 * 4]  # packed data, float32 absmax, 16-entry code

    def library_config(self, spec: QuantizationSpec, library: str, dtype: torch.dtype):
        """The bitsandbytes config object of `library` ('diffusers' or 'transformers') for one component."""
        if library == "diffusers":
            from diffusers import BitsAndBytesConfig
        else:
            from transformers import BitsAndBytesConfig
        return BitsAndBytesConfig(**self.config_kwargs(spec, dtype))

    def config_kwargs(self, spec: QuantizationSpec, dtype: torch.dtype) -> dict:
        """What diffusers and transformers take to quantize as `spec` says (also the lab's plain pattern)."""
        return {"load_in_4bit": True, "bnb_4bit_quant_type": spec.quant_type, "bnb_4bit_compute_dtype": dtype,
                "bnb_4bit_use_double_quant": spec.double_quant}

    def empty_layer(self, linear: torch.nn.Linear, spec: QuantizationSpec, dtype: torch.dtype) -> torch.nn.Module:
        """An empty (meta) bitsandbytes layer of the same shape, as diffusers' quantizer makes it."""
        import bitsandbytes as bnb

        return bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype=dtype,
                                 compress_statistics=spec.double_quant, quant_type=spec.quant_type, device="meta")

    def quantized_weight(self, tensor: torch.Tensor, layer: torch.nn.Module, spec: QuantizationSpec,
                         device: torch.device):
        """bitsandbytes quantizes a weight when it is moved to its device (on that device)."""
        import bitsandbytes as bnb

        return bnb.nn.Params4bit(tensor, requires_grad=False, quant_type=spec.quant_type,
                                 compress_statistics=spec.double_quant, module=layer).to(device)

    def stored_tensors(self, double_quant: bool) -> int:
        """Tensors one serialized 4-bit weight is saved as: packed weight, absmax, quant_map, [nested absmax and
        map,] and the quant state blob."""
        return 6 if double_quant else 4

    # ---- loading -----------------------------------------------------------------------------------------

    def load_transformer(self, folder, spec, dtype, device, streamed, pin):
        from diffusers import FluxTransformer2DModel

        config = FluxTransformer2DModel.load_config(folder / "transformer")
        if device.type == "cuda" and not streamed:  # the plain pattern: diffusers' quantizer, or the saved one
            transformer = FluxTransformer2DModel.from_pretrained(
                folder / "transformer", dtype=dtype, device_map={"": device},
                quantization_config=None if is_prequantized(config) else self.library_config(spec, "diffusers", dtype))
            set_compute_dtype(transformer, dtype)
            return transformer, {}
        return self.stream_transformer(folder, spec, dtype, device, streamed, pin)

    def load_text_encoder_2(self, path, spec, dtype, device):
        import json

        from transformers import T5EncoderModel

        device_map = {"": device} if device.type == "cuda" else {"": "cpu"}
        prequantized = is_prequantized(json.loads((path / "config.json").read_text()))
        t5 = T5EncoderModel.from_pretrained(path, dtype=dtype, device_map=device_map, quantization_config=None
                                            if prequantized else self.library_config(spec, "transformers", dtype))
        set_compute_dtype(t5, dtype)  # a saved folder records the preset's dtype; this device computes in `dtype`
        return t5

    def stream_transformer(self, folder: Path, spec: QuantizationSpec, dtype: torch.dtype, device: torch.device,
                           streamed: tuple[str, ...], pin: bool):
        """The quantized transformer, read tensor by tensor from its safetensors and quantized on `device` one at a
        time; the `streamed` modulation layers are quantized the same way and parked in host memory.

        diffusers' loader puts a quantized model on one device, and its CPU offload holds skipped layers
        unquantized; here neither the whole bf16 transformer (24 GB) in host memory nor more than one layer beyond
        the resident weights on the GPU is ever needed, which is what lets the vortex placement load in its share.
        """
        from diffusers import FluxTransformer2DModel
        from safetensors import safe_open

        from ..checkpoint import weight_files

        config = FluxTransformer2DModel.load_config(folder / "transformer")
        prequantized = is_prequantized(config)
        with torch.device("meta"):
            model = FluxTransformer2DModel.from_config({k: v for k, v in config.items() if k != "quantization_config"})
        skip = keep_in_fp32(model)
        names = {n for n, m in model.named_modules() if converted(n, m, skip)}
        stats = self.stored_tensors(spec.double_quant)
        packed: dict[str, dict[str, torch.Tensor]] = {}
        for name in names - set(streamed):
            owner, attr = name.rsplit(".", 1) if "." in name else ("", name)
            setattr(model.get_submodule(owner), attr, self.empty_layer(model.get_submodule(name), spec, dtype))
        pending: dict[str, dict[str, torch.Tensor]] = {n: {} for n in streamed}
        parked = {}
        for path in weight_files(folder, "transformer"):
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if prequantized and (".weight." in key or (key.endswith(".weight") and key[:-7] in names)):
                        module_name = key.split(".weight")[0]
                        packed.setdefault(module_name, {})[key[len(module_name) + 1:]] = f.get_tensor(key)
                        if len(packed[module_name]) == stats:  # complete: rebuild the 4-bit weight, no quantizing
                            weight = self._saved_weight(packed.pop(module_name), module_name, model, streamed, device)
                            if module_name in pending:
                                pending[module_name]["weight"] = weight
                                self._park_when_complete(pending, parked, module_name, spec, device, dtype, pin)
                        continue
                    module_name, param = key.rsplit(".", 1)
                    tensor = f.get_tensor(key).to(dtype)
                    if module_name in pending:
                        pending[module_name][param] = tensor
                        self._park_when_complete(pending, parked, module_name, spec, device, dtype, pin)
                        continue
                    module = model.get_submodule(module_name)
                    if module_name in names and param == "weight":
                        module.weight = self.quantized_weight(tensor, module, spec, device)
                    elif param in module._buffers:
                        module._buffers[param] = tensor.to(device)
                    else:
                        module._parameters[param] = torch.nn.Parameter(tensor.to(device), requires_grad=False)
        streamed_layers(model, streamed)  # replaced by ModulationTables
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
        incomplete = list(pending) + list(packed)
        if left or incomplete:
            raise ValueError(f"transformer weights lack {(left or incomplete)[0]}")
        set_compute_dtype(model, dtype)
        return model.eval(), parked

    def _saved_weight(self, weights: dict[str, torch.Tensor], name: str, model, streamed, device: torch.device):
        """A saved 4-bit weight (packed data and quantization state) back as a Params4bit: on its module when
        resident, returned on the host when the layer is streamed."""
        import bitsandbytes as bnb

        stats = {k: v for k, v in weights.items() if k != "weight"}
        if name in streamed:
            return bnb.nn.Params4bit.from_prequantized(weights["weight"], stats, requires_grad=False, device="cpu")
        layer = model.get_submodule(name)
        layer.weight = bnb.nn.Params4bit.from_prequantized(weights["weight"], stats, requires_grad=False,
                                                           device=device, module=layer)
        return layer.weight

    def _park_when_complete(self, pending: dict, parked: dict, name: str, spec: QuantizationSpec,
                            device: torch.device, dtype: torch.dtype, pin: bool) -> None:
        """Once a streamed layer's weight and bias are read: quantize it on the device (or take its saved 4-bit
        weight) and park it in host memory."""
        from ..placement import Parked

        parts = pending[name]
        if set(parts) != {"weight", "bias"}:
            return
        holder = torch.nn.Module()
        holder.bias = torch.nn.Parameter(parts["bias"], requires_grad=False)
        if getattr(parts["weight"], "quant_state", None) is not None:  # saved pre-quantized
            holder.weight = parts["weight"]
            parked[name] = Parked.from_linear(holder, pin)
        else:
            holder.weight = torch.nn.Parameter(parts["weight"], requires_grad=False)
            parked[name] = self.park(holder, spec, device, dtype, pin)
        del pending[name]

    def park(self, linear: torch.nn.Linear, spec: QuantizationSpec, device: torch.device, dtype: torch.dtype,
             pin: bool) -> Parked:
        """Quantize a plain Linear on `device` (one layer at a time: a small transient) and park it in host memory.

        The weight is cast to the model dtype first, as diffusers' quantizer does for resident layers, so a
        streamed layer holds exactly the bits it would hold on the GPU.
        """
        import bitsandbytes as bnb

        from ..placement import Parked

        holder = torch.nn.Module()
        holder.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.data.to(dtype),
                                                                          requires_grad=False)
        holder.weight = bnb.nn.Params4bit(linear.weight.data.to(device=device, dtype=dtype), requires_grad=False,
                                          quant_type=spec.quant_type, compress_statistics=spec.double_quant).to(device)
        return Parked.from_linear(holder, pin)

    def layer_class(self) -> type:
        import bitsandbytes as bnb

        return bnb.nn.Linear4bit


class BitsAndBytes8bit(BitsAndBytes4bit):
    name = "bitsandbytes_8bit"
    label = "bitsandbytes 8-bit"
    quant_types = ()
    dequantize_kernels = ("bitsandbytes",)
    saves_prequantized = False
    dequantized_bytes_per_weight = 0
    graphs_refused_by_type = {
        None: "bitsandbytes 8-bit: LLM.int8 picks each call's outlier columns with torch.argwhere, a shape the host "
              "must read, which a capture refuses (cudaErrorStreamCaptureInvalidated)"}
    # Its streamed modulation layers stay in the model dtype in host memory (the plain backend's `park`).
    park = Quantizer.park

    def linear_bytes(self, numel, out_features, spec):
        return [numel, out_features * 4]  # int8 data, float32 row scales (SCB)

    def config_kwargs(self, spec, dtype):
        return {"load_in_8bit": True}

    def empty_layer(self, linear, spec, dtype):
        import bitsandbytes as bnb

        return bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                                   has_fp16_weights=False, device="meta")

    def quantized_weight(self, tensor, layer, spec, device):
        import bitsandbytes as bnb

        return bnb.nn.Int8Params(tensor, requires_grad=False, has_fp16_weights=False).to(device)

    def layer_class(self) -> type:
        import bitsandbytes as bnb

        return bnb.nn.Linear8bitLt


def set_compute_dtype(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every 4-bit layer computes in `dtype`, whatever a saved folder recorded: a pre-quantized folder holds the
    preset's dtype, and a CPU computes in float32 as quantize-on-load does there."""
    import bitsandbytes as bnb

    for m in module.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = dtype
