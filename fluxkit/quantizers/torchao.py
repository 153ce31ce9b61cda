"""torchao: weight-only int8 / float8 / int4 and dynamic float8 tensor subclasses, converted after loading.

A component loads in the model dtype on the host and is converted one Linear at a time on the target device, so
the bf16 component never sits whole on the GPU. torchao converts the Linears bitsandbytes would (every nn.Linear
outside the model's `_keep_in_fp32_modules`).
"""
from __future__ import annotations

import math

import torch

from ..checks import installed
from .base import Quantizer, converted, keep_in_fp32

INT4_GROUP = 128  # Int4WeightOnlyConfig's group size


class TorchAO(Quantizer):
    name = "torchao"
    label = "torchao"
    quant_types = ("int8_weight_only", "float8_weight_only", "float8_dynamic", "int4_weight_only")
    package = "torchao"

    def linear_bytes(self, numel, out_features, spec):
        if spec.quant_type == "int8_weight_only":
            return [numel, out_features * 4, out_features]  # int8 data, float32 row scales, int8 row zero points
        if spec.quant_type == "int4_weight_only":  # packed data, bf16 scales and zero points per group of 128
            groups = math.ceil(numel // out_features / INT4_GROUP) * out_features
            return [math.ceil(numel / 2), groups * 2, groups * 2]
        return [numel, out_features * 4]  # float8 data, float32 row scales

    def unsupported(self, spec, device, placement):
        reason = super().unsupported(spec, device, placement)
        if reason or device is None:
            return reason
        if spec.quant_type == "float8_dynamic" and (device.type != "cuda"
                                                    or torch.cuda.get_device_capability(device) < (8, 9)):
            return "float8 matmuls need a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper)"
        if spec.quant_type == "int4_weight_only":
            if not installed("mslk"):  # torchao's int4 kernels
                return "torchao's int4 weight-only kernels need the mslk package (mslk >= 1.0), which is not installed"
            if device.type != "cuda":
                return "torchao's int4 weight-only kernels run on CUDA only"
        return None

    def convert(self, module, spec, device, dtype):
        from torchao.quantization import quantize_

        skip = keep_in_fp32(module)
        quantize_(module, torchao_config(spec.quant_type), filter_fn=lambda m, name: converted(name, m, skip),
                  device=device)
        return module.to(device)


def torchao_config(quant_type: str):
    """The torchao config object of a preset's `quant_type`.

    `set_inductor_config=False`: by default torchao turns on Inductor's coordinate-descent tuning for the whole
    process, and a compiled FLUX then tunes every Triton kernel serially at its first call (torchao-int8wo compiled
    was still tuning after 15 minutes on an H200, full-size checkpoint), as would any model the host compiles after
    loading fluxkit."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    keep = {"set_inductor_config": False}
    return {"int8_weight_only": lambda: Int8WeightOnlyConfig(**keep),
            "float8_weight_only": lambda: Float8WeightOnlyConfig(**keep),
            "float8_dynamic": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), **keep),
            "int4_weight_only": lambda: Int4WeightOnlyConfig(group_size=INT4_GROUP, **keep)}[quant_type]()
