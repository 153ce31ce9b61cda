"""Quantization backends behind one interface (`base.Quantizer`), chosen by a preset's `quantization.backend`.

The planner, the loader, the preset checks and the lab ask the backend instead of branching on its name; adding a
backend is one module here and one line in `BACKENDS`.
"""
from __future__ import annotations

from .base import QUANTIZABLE_COMPONENTS, Quantizer, converted, keep_in_fp32
from .bitsandbytes import BitsAndBytes4bit, BitsAndBytes8bit
from .gguf import GGUF
from .layerwise import LayerwiseCasting
from .torchao import TorchAO

BACKENDS: dict[str, Quantizer] = {q.name: q for q in (Quantizer(), BitsAndBytes4bit(), BitsAndBytes8bit(), TorchAO(),
                                                      LayerwiseCasting(), GGUF())}
PLAIN = BACKENDS["none"]


def backend(name: str) -> Quantizer:
    return BACKENDS[name]


def for_component(spec, component: str, streamed_t5: bool = False) -> Quantizer:
    """The backend that loads `component` under a quantization spec: the plain one for what the spec leaves
    unquantized, and for T5 when a placement streams it (group offloading moves plain tensors)."""
    if component not in spec.components or (component == "text_encoder_2" and streamed_t5):
        return PLAIN
    return BACKENDS[spec.backend]


__all__ = ["BACKENDS", "PLAIN", "QUANTIZABLE_COMPONENTS", "Quantizer", "backend", "converted", "for_component",
           "keep_in_fp32"]
