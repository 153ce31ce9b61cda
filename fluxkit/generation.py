"""FluxModel.generate: prompt in, one (H, W, 3) float32 image in [0, 1] out.

The call runs in four timed phases (text encode, denoise, decode, copy) through diffusers'
FluxPipeline pieces, so that latency and memory can be attributed. Input is checked completely
before any device work; a CUDA OOM leaves the model loaded and usable.
"""
from __future__ import annotations

import logging
import math
import re
import secrets
import threading
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .config import Preset
from .errors import GenerationError
from .hub import ModelSource
from .memory import PhaseMemory, device_snapshot, release_device_memory, track_phase, weight_report

log = logging.getLogger("fluxkit")

CLIP_MAX_TOKENS = 77
MAX_SEED = 2**63 - 1
PHASES = ("text_encode", "denoise", "decode", "copy")


def clean_prompt(prompt: object, name: str = "prompt", allow_empty: bool = False) -> str:
    """Check a prompt's type, turn line breaks and tabs into spaces and drop other control characters."""
    if not isinstance(prompt, str):
        raise TypeError(f"{name} must be a str, got {type(prompt).__name__}")
    text = re.sub(r"[\t\n\r]+", " ", prompt)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cc").strip()
    if not text and not allow_empty:
        raise ValueError(f"{name} is empty or whitespace only; describe the image to generate")
    return text


def _check_number(name: str, value: object, low: float, high: float, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {type(value).__name__}")
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name}={value}: must be in [{low}, {high}]")


@dataclass
class CallRecord:
    """What the last generate call did: seed, phase times (s, device-synchronized) and phase memory."""

    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    memory: list[PhaseMemory] = field(default_factory=list)
    true_cfg: bool = False

    @property
    def peak_gib(self) -> float | None:
        """Highest allocated device memory during the call (each phase resets the peak counter)."""
        peaks = [m.peak_gib for m in self.memory if m.peak_gib is not None]
        return max(peaks) if peaks else None


class FluxModel:
    """A loaded FLUX.1-schnell. Calls are serialized: one image at a time per model."""

    def __init__(self, pipe, *, preset: Preset, source: ModelSource, device: torch.device, dtype: torch.dtype,
                 load_seconds: float, load_memory: PhaseMemory, preflight: dict | None) -> None:
        self.pipe = pipe
        self.preset = preset
        self.source = source
        self.device = device
        self.dtype = dtype
        self.load_seconds = load_seconds
        self.load_memory = load_memory
        self.preflight = preflight
        self.last_seed: int | None = None
        self.last_call: CallRecord | None = None
        self._lock = threading.Lock()

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self.pipe, n) for n in ("transformer", "text_encoder_2", "text_encoder", "vae")}

    def weight_report(self) -> dict:
        return weight_report(self.components)

    def memory_snapshot(self) -> dict:
        return device_snapshot(self.device)

    def info(self) -> dict:
        """What was loaded, for reports: weights, preset, device, dtype."""
        return {"model": self.source.to_dict(), "preset": self.preset.name, "device": str(self.device),
                "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                "dtype": str(self.dtype).removeprefix("torch."), "load_seconds": round(self.load_seconds, 3)}

    # ---- input checks -------------------------------------------------------------------------------

    def _check_output(self, output: object, height: int, width: int) -> None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"output must be a torch.Tensor, got {type(output).__name__}")
        if tuple(output.shape) != (height, width, 3):
            raise ValueError(f"output has shape {tuple(output.shape)}; expected ({height}, {width}, 3) (H x W x RGB)")
        if output.dtype != torch.float32:
            raise ValueError(f"output has dtype {output.dtype}; expected torch.float32")
        if not output.is_contiguous():
            raise ValueError("output is not contiguous; pass a contiguous tensor (e.g. output.contiguous())")

    def _check_prompt_length(self, prompt: str, label: str) -> None:
        clip_len = len(self.pipe.tokenizer(prompt, truncation=False)["input_ids"])
        if clip_len > CLIP_MAX_TOKENS:
            log.warning("%s truncated to %d tokens (CLIP text encoder; %d given)", label, CLIP_MAX_TOKENS, clip_len)
        limit = self.preset.generation.max_sequence_length
        t5_len = len(self.pipe.tokenizer_2(prompt, truncation=False)["input_ids"])
        if t5_len > limit:
            log.warning("%s truncated to %d T5 tokens (max_sequence_length; %d given)", label, limit, t5_len)

    # ---- generate -----------------------------------------------------------------------------------

    def generate(self, prompt: str, negative_prompt: str = "", num_inference_steps: int = 4,
                 guidance_scale: float = 0.0, output: torch.Tensor | None = None, seed: int | None = None,
                 true_cfg_scale: float = 1.0, *, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Generate one image as a (height, width, 3) float32 tensor with values in [0, 1].

        `guidance_scale` is accepted for API compatibility and ignored: schnell has no guidance
        embedding. `negative_prompt` acts only through true classifier-free guidance
        (`true_cfg_scale > 1`), which runs the transformer twice per step (about 2x denoise time).
        `output`, if given, is validated first and written in place (any device). `seed=None`
        draws one; `last_seed` holds it so that the image can be made again.
        """
        gen = self.preset.generation
        height = gen.height if height is None else height
        width = gen.width if width is None else width
        prompt = clean_prompt(prompt)
        negative_prompt = clean_prompt(negative_prompt, "negative_prompt", allow_empty=True)
        _check_number("num_inference_steps", num_inference_steps, 1, 50, integer=True)
        _check_number("guidance_scale", guidance_scale, 0.0, 100.0)
        _check_number("true_cfg_scale", true_cfg_scale, 0.0, 100.0)
        for name, value in (("height", height), ("width", width)):
            _check_number(name, value, 64, 2048, integer=True)
            if value % 16:
                raise ValueError(f"{name}={value}: must be a multiple of 16")
        if seed is not None:
            _check_number("seed", seed, 0, MAX_SEED, integer=True)
        if output is not None:
            self._check_output(output, height, width)
        use_cfg = true_cfg_scale > 1.0 and bool(negative_prompt)
        if negative_prompt and not use_cfg:
            log.warning("negative_prompt has no effect with true_cfg_scale=%s: FLUX.1-schnell is guidance-distilled; "
                        "set true_cfg_scale > 1 (doubles the transformer passes) to use it", true_cfg_scale)
        seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
        with self._lock:
            self.last_seed = seed
            return self._run(prompt, negative_prompt if use_cfg else "", num_inference_steps, true_cfg_scale,
                             output, seed, height, width)

    def _run(self, prompt, negative_prompt, steps, true_cfg_scale, output, seed, height, width) -> torch.Tensor:
        record = CallRecord(seed=seed, true_cfg=bool(negative_prompt))
        failure = None
        try:
            with torch.inference_mode():
                output = self._phases(record, prompt, negative_prompt, steps, true_cfg_scale, output, seed, height,
                                      width)
        except torch.OutOfMemoryError:
            failure = "CUDA out of memory during generate; memory was released and the model is still usable"
        except RuntimeError as err:
            if "CUDA" not in str(err) and "cuda" not in str(err):
                raise
            failure = f"CUDA error during generate: {err}"
        if failure:
            # Raised outside the except block: no traceback is left holding the call's activations.
            phase = PHASES[len(record.memory)] if len(record.memory) < len(PHASES) else PHASES[-1]
            release_device_memory(self.device)
            raise GenerationError(failure, phase=phase, memory=self._memory_figures())
        self.last_call = record
        return output

    def _phases(self, record, prompt, negative_prompt, steps, true_cfg_scale, output, seed, height, width):
        with self._phase("text_encode", record):
            self._check_prompt_length(prompt, "Prompt")
            embeds = self._encode(prompt)
            negative = None
            if negative_prompt:
                self._check_prompt_length(negative_prompt, "Negative prompt")
                negative = self._encode(negative_prompt)
        with self._phase("denoise", record):
            latents = self._denoise(embeds, negative, steps, true_cfg_scale, seed, height, width)
        with self._phase("decode", record):
            image = self._decode(latents, height, width)
        with self._phase("copy", record):
            result = image[0].permute(1, 2, 0)
            if output is None:
                return result.to(torch.float32).contiguous()
            output.copy_(result)
        return output

    @contextmanager
    def _phase(self, name: str, record: CallRecord):
        """Time one phase, device-synchronized, and record its memory."""
        with track_phase(self.device, name, record.memory):
            start = time.perf_counter()
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            record.timings[name] = time.perf_counter() - start

    def _memory_figures(self) -> dict:
        snap = device_snapshot(self.device)
        if not snap["available"]:
            return {}
        return {f"{k}_gib": snap[k]["gib"] for k in ("allocated", "reserved", "peak", "free", "total")}

    def _encode(self, prompt: str):
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompt, prompt_2=None, device=self.device,
                                                    num_images_per_prompt=1,
                                                    max_sequence_length=self.preset.generation.max_sequence_length)
        return embeds, pooled

    def _denoise(self, embeds, negative, steps, true_cfg_scale, seed, height, width) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(seed)
        kwargs = {}
        if negative is not None:
            kwargs = {"negative_prompt_embeds": negative[0], "negative_pooled_prompt_embeds": negative[1],
                      "true_cfg_scale": true_cfg_scale}
        return self.pipe(prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1], num_inference_steps=steps,
                         guidance_scale=0.0, height=height, width=width, generator=generator,
                         max_sequence_length=self.preset.generation.max_sequence_length, output_type="latent",
                         return_dict=False, **kwargs)[0]

    def _decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        vae = self.pipe.vae
        latents = self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt")
