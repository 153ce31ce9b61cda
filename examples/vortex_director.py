"""A minimal Vortex Director: Flux loaded once at startup, one actor image per slot written into a pre-allocated
buffer, and a VRAM monitor over the slots (the peak the whole process reached, and the drift between slots).

    python examples/vortex_director.py --slots 5                 # the real FLUX.1-schnell from the local cache
    python examples/vortex_director.py --model synthetic-tiny --device cpu --slots 3

This is the call pattern fluxkit is built for: `load_flux_schnell(device, "nf4")` picks the placement that fits
Vortex's 6 GB Flux share (`vortex` on a 12 GB card) and leaves the process's memory cap and peak statistics to
the host; each `generate(...)` writes into the caller's buffer and allocates no image of its own.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import fluxkit


class VRAMMonitor:
    """What a host watches across slots: the process's peak reserved memory (one reading, never reset by Flux) and
    the allocated memory after each slot."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.after_slot: list[int] = []
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)  # the host's own reset, once, before anything loads
        self.device = device

    def slot_done(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.after_slot.append(torch.cuda.memory_allocated(self.device))

    def report(self) -> dict:
        if not self.cuda:
            return {"measured": False, "note": "device memory is not measured on a CPU"}
        return {"measured": True, "peak_reserved_gb": round(torch.cuda.max_memory_reserved(self.device) / 1e9, 3),
                "allocated_gb": round(self.after_slot[-1] / 1e9, 3),
                "drift_mb": round((self.after_slot[-1] - self.after_slot[0]) / 1e6, 2)}


class Director:
    def __init__(self, device: str = "cuda", model: str | None = None) -> None:
        self.device = torch.device(device)
        self.monitor = VRAMMonitor(self.device)
        self.flux = self._load_flux(model)
        self.actor_buffer = torch.empty((512, 512, 3), dtype=torch.float32)  # allocated once, reused every slot

    def _load_flux(self, model: str | None) -> fluxkit.FluxModel:
        try:
            if model is None:
                return fluxkit.load_flux_schnell(str(self.device), "nf4")  # the task's call, as written
            return fluxkit.load_flux_schnell(str(self.device), "nf4", model)
        except fluxkit.VortexInitializationError as err:  # already logged as one JSON record
            raise SystemExit(f"Flux could not start: {err.message} Remedy: {err.remediation}") from None

    def _generate_actor(self, prompt: str, seed: int) -> torch.Tensor:
        return self.flux.generate(prompt=prompt, negative_prompt="blurry, low quality, watermark",
                                  num_inference_steps=4, guidance_scale=0.0, output=self.actor_buffer, seed=seed)

    def run_slot(self, slot: int, prompt: str) -> dict:
        start = time.perf_counter()
        actor = self._generate_actor(prompt, seed=slot)
        seconds = time.perf_counter() - start
        self.monitor.slot_done()
        return {"slot": slot, "seconds": round(seconds, 3), "phases_s": {k: round(v, 4) for k, v in
                                                                        self.flux.last_call.timings.items()},
                "in_range": bool(actor.min() >= 0 and actor.max() <= 1), "buffer_reused": actor is self.actor_buffer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default=None, help="default: black-forest-labs/FLUX.1-schnell from the local cache")
    parser.add_argument("--slots", type=int, default=5)
    args = parser.parse_args()
    director = Director(args.device, args.model)
    print(json.dumps({"placement": director.flux.placement.name, "why": director.flux.placement_reason,
                      "quantized_layers": director.flux.quantized_layers}))
    for slot in range(args.slots):
        print(json.dumps(director.run_slot(slot, f"manic scientist, blue spiked hair, white lab coat, take {slot}")))
    print(json.dumps({"vram": director.monitor.report()}))


if __name__ == "__main__":
    main()
