"""Errors Vortex catches by type. Each carries the figures a person needs to act on it."""
from __future__ import annotations

import json
import logging

log = logging.getLogger("fluxkit")


class VortexInitializationError(RuntimeError):
    """The model cannot be made ready: weights missing, not enough GPU memory, or an OOM while loading."""

    def __init__(
        self,
        message: str,
        *,
        remediation: str,
        required_vram_gb: float | None = None,
        available_vram_gb: float | None = None,
        model_name: str = "flux-schnell",
    ) -> None:
        super().__init__(f"{message} Remedy: {remediation}")
        self.model_name = model_name
        self.required_vram_gb = required_vram_gb
        self.available_vram_gb = available_vram_gb
        self.remediation = remediation
        log.error(json.dumps({"event": "vortex_initialization_error", **self.fields(), "message": message}))

    def fields(self) -> dict:
        return {
            "model_name": self.model_name,
            "required_vram_gb": self.required_vram_gb,
            "available_vram_gb": self.available_vram_gb,
            "remediation": self.remediation,
        }


class GenerationError(RuntimeError):
    """A generate call failed on the device; the model stays loaded and usable."""

    def __init__(self, message: str, *, phase: str, memory: dict | None = None) -> None:
        figures = ", ".join(f"{k}={v}" for k, v in (memory or {}).items())
        super().__init__(f"{message} (phase: {phase}{'; ' + figures if figures else ''})")
        self.phase = phase
        self.memory = memory or {}
