"""fluxkit: run and validate 4-bit quantized FLUX.1-schnell."""
from .config import Preset, available_presets, load_preset
from .errors import GenerationError, VortexInitializationError
from .generation import FluxModel
from .loading import load_flux_schnell

__version__ = "0.1.0"
__all__ = ["FluxModel", "GenerationError", "Preset", "VortexInitializationError", "available_presets",
           "load_flux_schnell", "load_preset", "__version__"]
