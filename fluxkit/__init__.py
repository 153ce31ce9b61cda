"""fluxkit: run and validate 4-bit quantized FLUX.1-schnell.

The runtime a host application imports is this package; the lab (benchmarks, sweeps, reports, notebooks) is
`fluxkit.lab`, which the runtime never imports.
"""
from .config import Preset, available_placements, available_presets, load_placement, load_preset
from .errors import FluxkitError, GenerationError, InputError, InputTypeError, VortexInitializationError
from .generation import FluxModel
from .loading import load_flux_schnell
from .version import __version__

__all__ = ["FluxModel", "FluxkitError", "GenerationError", "InputError", "InputTypeError", "Preset",
           "VortexInitializationError", "available_placements", "available_presets", "load_flux_schnell",
           "load_placement", "load_preset", "__version__"]

# The lab's modules lived at the top level before 0.3; `fluxkit.bench` and the like still resolve, with a warning.
_MOVED_TO_LAB = ("bench", "estimate", "metrics", "plots", "profiling", "references", "report", "sweep", "validate")


def __getattr__(name: str):
    if name in _MOVED_TO_LAB:
        import importlib
        import warnings

        warnings.warn(f"fluxkit.{name} moved to fluxkit.lab.{name} in fluxkit 0.3", DeprecationWarning, stacklevel=2)
        return importlib.import_module(f"fluxkit.lab.{name}")
    raise AttributeError(f"module 'fluxkit' has no attribute {name!r}")
