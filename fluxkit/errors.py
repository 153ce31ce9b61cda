"""The errors fluxkit raises on purpose, under one base class.

Vortex catches `VortexInitializationError` (any failure to load) and `GenerationError` (a device
failure during a call). Bad arguments are `InputError` / `InputTypeError`, which are also
`ValueError` / `TypeError`; a bad argument to `load_flux_schnell` is both a load failure and a
`ValueError` / `TypeError`. Anything that is not a `FluxkitError` is a bug and keeps its traceback.
"""
from __future__ import annotations

DEFAULT_LOAD_REMEDY = "pass a valid value for the argument named in the message"


def one_line(err: BaseException) -> str:
    """An error as `Type: message` on one line: a result row or a wrapping error keeps the whole reason, not the
    last line of a multi-line compiler message."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


class FluxkitError(Exception):
    """Base of every error fluxkit raises on purpose."""


class InputError(FluxkitError, ValueError):
    """An argument or setting has a bad value; the message names it and what is allowed."""


class InputTypeError(FluxkitError, TypeError):
    """An argument or setting has the wrong type; the message names it and the expected type."""


class VortexInitializationError(FluxkitError, RuntimeError):
    """The model cannot be made ready: weights missing or damaged, not enough GPU memory, an OOM while loading."""

    def __init__(self, message: str, *, remediation: str, required_vram_gb: float | None = None,
                 available_vram_gb: float | None = None, model_name: str = "flux-schnell") -> None:
        super().__init__(f"{message} Remedy: {remediation}")
        self.message = message
        self.model_name = model_name
        self.required_vram_gb = required_vram_gb
        self.available_vram_gb = available_vram_gb
        self.remediation = remediation

    def fields(self) -> dict:
        return {"model_name": self.model_name, "required_vram_gb": self.required_vram_gb,
                "available_vram_gb": self.available_vram_gb, "remediation": self.remediation}

    def record(self) -> dict:
        """The structured log record `load_flux_schnell` emits before raising."""
        return {"event": "vortex_initialization_error", **self.fields(), "message": self.message}


class LoadInputError(VortexInitializationError, ValueError):
    """A bad value passed to `load_flux_schnell`: a load failure for Vortex, a ValueError for everyone else."""

    def __init__(self, message: str, remediation: str = DEFAULT_LOAD_REMEDY) -> None:
        super().__init__(message, remediation=remediation)


class LoadInputTypeError(VortexInitializationError, TypeError):
    """An argument of the wrong type passed to `load_flux_schnell`."""

    def __init__(self, message: str, remediation: str = DEFAULT_LOAD_REMEDY) -> None:
        super().__init__(message, remediation=remediation)


class GenerationError(FluxkitError, RuntimeError):
    """A generate call failed on the device; the model stays loaded and usable."""

    def __init__(self, message: str, *, phase: str, memory: dict | None = None, out_of_memory: bool = False) -> None:
        figures = ", ".join(f"{k}={v}" for k, v in (memory or {}).items())
        super().__init__(f"{message} (phase: {phase}{'; ' + figures if figures else ''})")
        self.phase = phase
        self.memory = memory or {}
        self.out_of_memory = out_of_memory  # else another CUDA error (a failed graph capture, a bad kernel)
