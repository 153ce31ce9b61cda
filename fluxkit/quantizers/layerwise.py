"""diffusers' layerwise casting: weights stored in float8, cast to the compute dtype inside each forward."""
from __future__ import annotations

import re

import torch

from .base import Quantizer, keep_in_fp32


class LayerwiseCasting(Quantizer):
    name = "layerwise_casting"
    label = "layerwise casting"
    quant_types = ("float8_e4m3fn", "float8_e5m2")  # the storage dtype
    compile_refused = ("layerwise casting: diffusers casts each layer's weights inside its forward (module.to), which "
                       "torch.compile(fullgraph=True) refuses (nn.Parameter() constructor)")
    graphs_refused_by_type = {
        None: "layerwise casting: diffusers' hooks replace each layer's weights inside every forward (module.to), so "
              "a replay reads float8 weights freed after the capture (NaN images)"}

    def selected(self, module):
        return set(cast_modules(module, patterns(module)))

    def tensor_bytes(self, module, param, tensor, dtype_bytes, spec):
        # floating tensors of a cast module are stored in the 1-byte float8 storage dtype
        return [tensor.numel() * (1 if tensor.is_floating_point() else tensor.element_size())]

    def convert(self, module, spec, device, dtype):
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(module, storage_dtype=getattr(torch, spec.quant_type), compute_dtype=dtype,
                                skip_modules_pattern=patterns(module))
        return module.to(device)


def patterns(module: torch.nn.Module) -> tuple[str, ...]:
    """The skip patterns `ModelMixin.enable_layerwise_casting` builds: diffusers' defaults, the modules kept in
    float32 (T5's `wo`, whose caller casts its input to the weight's dtype) and the model's own patterns."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    return tuple(DEFAULT_SKIP_MODULES_PATTERN) + keep_in_fp32(module) + tuple(
        getattr(module, "_skip_layerwise_casting_patterns", None) or ())


# Adapted from diffusers.hooks.layerwise_casting._apply_layerwise_casting: which modules it casts, without casting.
def cast_modules(module: torch.nn.Module, skip: tuple[str, ...], prefix: str = "") -> list[str]:
    """Names of the modules diffusers' layerwise casting stores in the storage dtype."""
    from diffusers.hooks.layerwise_casting import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    if prefix and any(re.search(p, prefix) for p in skip):
        return []
    if isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
        return [prefix]
    return [n for child, sub in module.named_children()
            for n in cast_modules(sub, skip, f"{prefix}.{child}" if prefix else child)]
