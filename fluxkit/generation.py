"""FluxModel.generate: prompt in, one (H, W, 3) float32 image in [0, 1] out.

FluxModel holds what a call needs between calls (components, placement, lock, prompt cache) and
does what no pure function can: draws seeds, serializes calls, times the four phases (text encode,
denoise, decode, copy) with device synchronization, and turns a CUDA OOM into GenerationError with
the model left usable. The work itself is `fluxkit.sampling`.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .checks import MAX_SEED
from .config import PlacementSpec, Preset
from .errors import GenerationError
from .fastpath import FastPath
from .hub import ModelSource
from .memory import PhaseMemory, device_snapshot, release_device_memory, track_phase, weight_report
from .plan import Plan
from .sampling import (
    PHASE_RANGE,
    PHASES,
    GenerationRequest,
    PromptEmbeddings,
    Schedule,
    check_inputs,
    decode,
    denoise,
    embed,
    make_schedule,
    prepare_latents,
    tokenize,
)

log = logging.getLogger("fluxkit")


@dataclass
class CallRecord:
    """What one generate call did: its request, phase times (s) and phase memory.

    On a GPU each phase is timed by CUDA events recorded on the current stream, read when `timings` is first asked
    for: the call itself never waits on the device between phases.
    """

    request: GenerationRequest
    memory: list[PhaseMemory] = field(default_factory=list)
    prompt_cache_hits: int = 0
    marks: dict[str, tuple] = field(default_factory=dict)  # phase -> (start, end): CUDA events or perf_counter s
    _timings: dict[str, float] | None = None

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per phase, in order."""
        if self._timings is None:
            self._timings = {phase: (end - start if isinstance(start, float) else _elapsed(start, end))
                             for phase, (start, end) in self.marks.items()}
        return self._timings

    @property
    def seed(self) -> int:
        return self.request.seed

    @property
    def true_cfg(self) -> bool:
        return self.request.true_cfg

    @property
    def peak(self) -> int | None:
        """Highest allocated device memory during the call, bytes (when the model is profiling)."""
        peaks = [m.peak for m in self.memory if m.peak is not None]
        return max(peaks) if peaks else None

    @property
    def peak_reserved(self) -> int | None:
        peaks = [m.peak_reserved for m in self.memory if m.peak_reserved is not None]
        return max(peaks) if peaks else None


def _elapsed(start: torch.cuda.Event, end: torch.cuda.Event) -> float:
    end.synchronize()
    return start.elapsed_time(end) / 1000


class PromptCache:
    """Prompt embeddings of recent prompts in host memory, least recently used dropped first.

    Keyed by everything that determines them (text, max_sequence_length); one cache per model, so a
    model with other weights or settings never sees another's entries. Host memory keeps a full
    cache out of the GPU budget: a hit costs one 2 MB copy.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[tuple, PromptEmbeddings] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> PromptEmbeddings | None:
        found = self.entries.get(key)
        if found is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return found

    def put(self, key: tuple, embeddings: PromptEmbeddings) -> None:
        if self.capacity == 0:
            return
        self.entries[key] = embeddings.to(torch.device("cpu"))
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


class FluxModel:
    """A loaded FLUX.1-schnell, built by `load_flux_schnell`. Calls are serialized: one image at a time per model."""

    def __init__(self, pipe, *, preset: Preset, placement: PlacementSpec, plan: Plan, source: ModelSource,
                 device: torch.device, dtype: torch.dtype, modulation, fast: FastPath, stages,
                 placement_reason: str) -> None:
        self.pipe = pipe
        self.preset = preset
        self.placement = placement
        self.placement_reason = placement_reason  # why this placement: asked for, or what `auto` weighed
        self.plan = plan
        self.source = source
        self.device = device
        self.dtype = dtype  # the compute dtype; `quantized_layers` says how the weights are stored
        self.modulation = modulation
        self.fast = fast
        self.stages = stages  # loading.LoadStages: seconds and memory of each load stage
        # Lab only (profiling, bench, sweep, in a process of their own): each phase synchronizes the device and resets
        # the process's peak-memory counters, so that its peak and its kernels are its own. Never in a host's process.
        self.profiling = False
        self.prompt_cache = PromptCache(preset.prompt_cache_size)
        self._schedules: dict[tuple[int, int], Schedule] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    # ---- what the calling thread's last call did --------------------------------------------------------

    @property
    def last_call(self) -> CallRecord | None:
        """The last call made by this thread (each thread sees its own)."""
        return getattr(self._local, "last_call", None)

    @property
    def last_seed(self) -> int | None:
        call = self.last_call
        return None if call is None else call.seed

    # ---- reports --------------------------------------------------------------------------------------

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self.pipe, n) for n in ("transformer", "text_encoder_2", "text_encoder", "vae")}

    @property
    def load_seconds(self) -> float:
        return self.stages.total

    @property
    def load_memory(self) -> PhaseMemory:
        """Device memory allocated and reserved once loaded (warm-up included): what Vortex reads after loading."""
        allocated, reserved = self.stages.memory.get(list(self.stages.seconds)[-1], (None, None))
        return PhaseMemory("load", allocated, reserved)

    @property
    def quantized_layers(self) -> dict[str, dict[str, int]]:
        """Per component, how many layers of each quantized class it holds (e.g. {"transformer":
        {"bitsandbytes.nn.Linear4bit": 502}}), named by the backend's public class (fluxkit's dequantizing layer is
        one); modulation layers parked in host memory are counted with their component."""
        quantizer = self.preset.quantization.quantizer
        layer_class = quantizer.layer_class()
        if layer_class is None:
            return {}
        name = f"{layer_class.__module__.split('.')[0]}.nn.{layer_class.__name__}"
        counts = {}
        for component, module in self.components.items():
            n = sum(isinstance(m, layer_class) for m in module.modules())
            if component == "transformer" and self.modulation is not None:
                n += sum(getattr(p, "quant_state", None) is not None for p in map(self.modulation.sources.get,
                                                                                  self.modulation.parked))
            if n:
                counts[component] = {name: n}
        return counts

    def weight_report(self) -> dict:
        return weight_report(self.components)

    def info(self) -> dict:
        """What was loaded, for reports: weights, preset, placement, device, dtype, fast path, load stages."""
        from .placement import describe

        return {"model": self.source.to_dict(), "preset": self.preset.name,
                "placement": {**describe(self.placement, self.modulation), "reason": self.placement_reason},
                "device": str(self.device),
                "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                "dtype": str(self.dtype).removeprefix("torch."), "quantized_layers": self.quantized_layers,
                "load_seconds": round(self.load_seconds, 3),
                "load_stages_s": {stage: round(s, 3) for stage, s in self.stages.seconds.items()},
                "compiled": self.fast.compiled, "cuda_graphs": bool(self.fast.graphed),
                "fluxkit_dequantize_layers": self.fast.dequantize_layers}

    # ---- generate -------------------------------------------------------------------------------------

    def generate(self, prompt: str, negative_prompt: str = "", num_inference_steps: int | None = None,
                 guidance_scale: float = 0.0, output=None, seed: int | None = None, true_cfg_scale: float = 1.0, *,
                 height: int | None = None, width: int | None = None):
        """Generate one image as a (height, width, 3) float32 tensor with values in [0, 1].

        Settings left None come from the preset. `guidance_scale` is accepted for API compatibility
        and ignored: schnell has no guidance embedding. `negative_prompt` acts only through true
        classifier-free guidance (`true_cfg_scale > 1`), which runs the transformer twice per step.
        `output` (a torch tensor on any device, or a NumPy array) is checked first and written in
        place; it is returned. `seed=None` draws one; `last_seed` gives it to the calling thread.
        """
        drawn = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
        request, buffer = check_inputs(prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                                       guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale, height=height,
                                       width=width, seed=drawn, output=output, spec=self.preset.generation)
        with self._lock:
            record = CallRecord(request)
            image = self._run(request, buffer, record)
            self._local.last_call = record
        return output if output is not None else image

    def _run(self, request: GenerationRequest, buffer: torch.Tensor | None, record: CallRecord) -> torch.Tensor:
        failure, out_of_memory = None, False
        try:
            with torch.inference_mode():
                image = self._phases(request, buffer, record)
        except torch.OutOfMemoryError:
            out_of_memory = True
            failure = "CUDA out of memory during generate; memory was released and the model is still usable"
        except RuntimeError as err:
            if "CUDA" not in str(err) and "cuda" not in str(err):
                raise
            failure = f"CUDA error during generate: {err}"
        finally:
            if self.placement.offload_between_calls and self.device.type == "cuda":
                self.pipe.maybe_free_model_hooks()
        if failure:
            # Raised outside the except block: no traceback is left holding the call's activations.
            phase = PHASES[min(len(record.memory), len(PHASES) - 1)]
            release_device_memory(self.device)
            raise GenerationError(failure, phase=phase, memory=self._memory_figures(), out_of_memory=out_of_memory)
        return image

    def _phases(self, request: GenerationRequest, buffer: torch.Tensor | None, record: CallRecord) -> torch.Tensor:
        pipe = self.pipe
        with self._phase("text_encode", record):
            cond = self._encode(request.prompt, "Prompt", record)
            uncond = self._encode(request.negative_prompt, "Negative prompt", record) if request.true_cfg else None
        with self._phase("denoise", record):
            latents, image_ids = prepare_latents(request, pipe.transformer.config.in_channels // 4,
                                                 pipe.vae_scale_factor, self.device, self.dtype)
            latents = denoise(self.fast.graphed.get("transformer", pipe.transformer), latents, image_ids, cond, uncond,
                              self._schedule(request.num_inference_steps, latents.shape[1]), request.true_cfg_scale,
                              self.modulation)
        with self._phase("decode", record):
            image = self.fast.graphed.get("decode", decode)(pipe.vae, latents, request.height, request.width,
                                                       pipe.vae_scale_factor)
        with self._phase("copy", record):
            if buffer is None:
                return image.to(torch.float32).contiguous()
            buffer.copy_(image)
        return buffer

    def _encode(self, text: str, label: str, record: CallRecord) -> PromptEmbeddings:
        key = (text, self.preset.generation.max_sequence_length)
        cached = self.prompt_cache.get(key)
        if cached is not None:
            record.prompt_cache_hits += 1
            return cached.to(self.device)
        clip_ids, t5_ids = tokenize(self.pipe, text, key[1], label)
        embeddings = PromptEmbeddings(*self.fast.graphed.get("embed", embed)(
            self.pipe.text_encoder, self.pipe.text_encoder_2, clip_ids.to(self.device), t5_ids.to(self.device),
            self.device, self.dtype))
        self.prompt_cache.put(key, embeddings)
        return embeddings

    def _schedule(self, steps: int, image_seq_len: int) -> Schedule:
        key = (steps, image_seq_len)
        if key not in self._schedules:
            self._schedules[key] = make_schedule(self.pipe.scheduler, steps, image_seq_len, self.device)
        return self._schedules[key]

    @contextmanager
    def _phase(self, name: str, record: CallRecord):
        """Time one phase (CUDA events on a GPU, unless profiling) and record its memory."""
        with track_phase(self.device, name, record.memory, peaks=self.profiling), \
                torch.profiler.record_function(PHASE_RANGE + name):
            events = self.device.type == "cuda" and not self.profiling
            start = _mark(self.device) if events else time.perf_counter()
            yield
            if self.device.type == "cuda" and self.profiling:
                torch.cuda.synchronize(self.device)
            record.marks[name] = (start, _mark(self.device) if events else time.perf_counter())

    def _memory_figures(self) -> dict:
        snap = device_snapshot(self.device)
        if not snap["available"]:
            return {}
        return {f"{k}_gib": snap[k]["gib"] for k in ("allocated", "reserved", "peak", "free", "total")}


def _mark(device: torch.device) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event
