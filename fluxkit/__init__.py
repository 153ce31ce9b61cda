"""fluxkit: run and validate 4-bit quantized FLUX.1-schnell."""
from .config import Preset, available_placements, available_presets, load_placement, load_preset
from .errors import FluxkitError, GenerationError, InputError, InputTypeError, VortexInitializationError
from .generation import FluxModel
from .loading import load_flux_schnell
from .version import __version__

__all__ = ["FluxModel", "FluxkitError", "GenerationError", "InputError", "InputTypeError", "Preset",
           "VortexInitializationError", "available_placements", "available_presets", "load_flux_schnell",
           "load_placement", "load_preset", "__version__"]
