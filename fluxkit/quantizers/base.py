"""The interface every quantization backend implements, and the plain (unquantized) backend it starts from.

A backend answers what the planner, the loader, the preset checks and the lab ask of a quantization: which
modules it stores quantized and how many bytes each keeps, how it loads or converts a component, what it refuses
(on this device, under this placement, with CUDA graphs or torch.compile) and why. Modelled on diffusers'
`quantizers/` (one folder per backend behind `DiffusersQuantizer`), at the size fluxkit needs.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..checks import missing_extra

if TYPE_CHECKING:
    from ..config import PlacementSpec, QuantizationSpec
    from ..placement import Parked

QUANTIZABLE_COMPONENTS = ("transformer", "text_encoder_2")


def keep_in_fp32(module: torch.nn.Module) -> tuple[str, ...]:
    """The modules a model keeps out of quantization (T5's `wo` feed-forward outputs)."""
    return tuple(getattr(module, "_keep_in_fp32_modules", None) or ())


def converted(name: str, module: torch.nn.Module, skip: tuple[str, ...]) -> bool:
    """Whether a Linear is quantized: the rule bitsandbytes' loaders apply, which every backend follows."""
    return type(module) is torch.nn.Linear and not any(s in name.split(".") for s in skip)


def streamed_layers(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Take the streamed modulation layers out of a loaded transformer (ModulationTables runs them)."""
    for name in names:
        owner, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(owner), attr, torch.nn.Identity())


class Quantizer:
    """A quantization backend. The base class is the plain one: components loaded in the model dtype."""

    name = "none"
    label = "the model dtype"  # for messages
    quant_types: tuple[str, ...] = ()  # allowed `quantization.quant_type` values; empty: the backend has one kind
    components: tuple[str, ...] = QUANTIZABLE_COMPONENTS  # what it can quantize
    dequantize_kernels: tuple[str, ...] = ("bitsandbytes",)  # `dequantize_kernel` values it accepts
    saves_prequantized = False  # `fluxkit quantize` writes its weights
    # Bytes a forward pass writes and reads again per quantized weight when it dequantizes to the compute dtype
    # before a dense product (the estimator's memory term).
    dequantized_bytes_per_weight = 0
    compile_refused: str | None = None  # why torch.compile(fullgraph=True) cannot wrap its layers
    graphs_refused_by_type: dict[str | None, str] = {}  # quant_type (None: all) -> why a CUDA graph cannot replay it
    streams_modulation = True  # whether `modulation: fit` can park its layers in host memory one at a time
    package: str | None = None  # the package it needs beyond fluxkit's own dependencies, and the extra that has it

    # ---- what a preset may ask ---------------------------------------------------------------------------

    def check(self, spec: QuantizationSpec) -> str | None:
        """Why this quantization spec is not valid for the backend (checked when a preset is read), or None."""
        if self.quant_types and spec.quant_type not in self.quant_types:
            return f"quantization.quant_type={spec.quant_type!r}: expected one of {', '.join(self.quant_types)}"
        if self.name == "none" and spec.components:
            return "quantization.components must be empty when quantization.backend is 'none'"
        if self.name != "none" and not spec.components:
            return f"quantization.components is empty: name what {self.name} should quantize"
        extra = [c for c in spec.components if c not in self.components]
        if extra:
            return f"quantization.components has {', '.join(extra)}; {self.name} quantizes {', '.join(self.components)}"
        return None

    def graphs_refused(self, quant_type: str) -> str | None:
        """Why CUDA graphs cannot replay this quantization's kernels, or None."""
        return self.graphs_refused_by_type.get(quant_type) or self.graphs_refused_by_type.get(None)

    def unsupported(self, spec: QuantizationSpec, device: torch.device | None, placement: PlacementSpec) -> str | None:
        """Why this device (None: any device) or placement cannot run the quantization, or None; checked before
        anything is loaded."""
        if placement.modulation == "fit" and not self.streams_modulation:
            return (f"placement {placement.name} streams modulation layers one at a time, which fluxkit does for "
                    f"bitsandbytes and torchao layers only; {self.label} loads the transformer whole")
        return missing_extra(self.package, self.package) if self.package else None

    # ---- what the planner counts -------------------------------------------------------------------------

    def selected(self, module: torch.nn.Module) -> set[str]:
        """Names of the submodules this backend stores quantized."""
        if self.name == "none":
            return set()
        skip = keep_in_fp32(module)
        return {n for n, m in module.named_modules() if converted(n, m, skip)}

    def linear_bytes(self, numel: int, out_features: int, spec: QuantizationSpec) -> list[int]:
        """Bytes of each tensor the backend keeps for one quantized Linear weight."""
        raise NotImplementedError

    def tensor_bytes(self, module: torch.nn.Module, param: str, tensor: torch.Tensor, dtype_bytes: int,
                     spec: QuantizationSpec) -> list[int]:
        """Bytes of one tensor of a selected module."""
        if param == "weight":
            return self.linear_bytes(tensor.numel(), module.out_features, spec)
        return [tensor.numel() * dtype_bytes]

    # ---- what the loader calls ---------------------------------------------------------------------------

    def load_transformer(self, folder: Path, spec: QuantizationSpec, dtype: torch.dtype, device: torch.device,
                         streamed: tuple[str, ...], pin: bool) -> tuple[torch.nn.Module, dict[str, Parked]]:
        """The transformer on `device`, with the `streamed` modulation layers parked in host memory."""
        from diffusers import FluxTransformer2DModel

        transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", dtype=dtype)
        parked = {n: self.park(transformer.get_submodule(n), spec, device, dtype, pin) for n in streamed}
        streamed_layers(transformer, streamed)  # keep the parked layers' weights off the device
        return self.convert(transformer, spec, device, dtype), parked

    def load_text_encoder_2(self, path: Path, spec: QuantizationSpec, dtype: torch.dtype,
                            device: torch.device) -> torch.nn.Module:
        from transformers import T5EncoderModel

        return self.convert(T5EncoderModel.from_pretrained(path, dtype=dtype), spec, device, dtype)

    def convert(self, module: torch.nn.Module, spec: QuantizationSpec | None, device: torch.device,
                dtype: torch.dtype) -> torch.nn.Module:
        """A component loaded in `dtype` on the host, quantized and put on `device`."""
        return module.to(device)

    def park(self, linear: torch.nn.Linear, spec: QuantizationSpec, device: torch.device, dtype: torch.dtype,
             pin: bool) -> Parked:
        """A streamed modulation layer in host memory (the plain backend keeps it in the model dtype)."""
        from ..placement import Parked

        holder = torch.nn.Module()
        holder.weight = torch.nn.Parameter(linear.weight.data.to(dtype), requires_grad=False)
        holder.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.data.to(dtype),
                                                                          requires_grad=False)
        return Parked.from_linear(holder, pin)

    def layer_class(self) -> type | None:
        """The module class of its quantized layers, for `FluxModel.quantized_layers` (None: plain Linears)."""
        return None
