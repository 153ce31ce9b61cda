"""One image from a prompt as plain functions: check_inputs, tokenize, embed, prepare, denoise, decode.

`check_inputs` refuses bad input before any device work and returns a frozen `GenerationRequest`;
the other functions take components and tensors and return tensors, chained by `FluxModel`, so a
placement or the fast path can swap one piece without touching the others. The arithmetic follows
diffusers' `FluxPipeline.__call__` (diffusers 0.42.1) step for step: the same seed gives the same
image as the pipeline (tests/test_sampling.py holds them equal).
"""
from __future__ import annotations

import logging
import re
import sys
import unicodedata
from dataclasses import dataclass

import numpy as np
import torch

from .checks import MAX_SEED, check_number
from .config import GenerationSpec
from .errors import InputError, InputTypeError

log = logging.getLogger("fluxkit")

CLIP_MAX_TOKENS = 77
MAX_TOKENIZED_CHARS = 8192  # far beyond 512 T5 tokens: longer prompts are cut before tokenizing
PHASES = ("text_encode", "denoise", "decode", "copy")
PHASE_RANGE = "fluxkit."  # profiler ranges of the phases are named fluxkit.<phase>
# What renders as nothing: control and format characters (zero-width), separators, combining marks with nothing to
# combine with, and the letters and symbols that are blank by design (Hangul fillers, the Braille blank, Khmer's
# invisible vowels, the Mongolian vowel separator).
_BLANK_CATEGORIES = ("Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me")
_BLANK_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u17b4\u17b5\u180e")


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that determines the image; what a reference manifest records."""

    prompt: str
    negative_prompt: str  # "" unless true CFG is on
    seed: int
    num_inference_steps: int
    true_cfg_scale: float
    height: int
    width: int
    max_sequence_length: int

    @property
    def true_cfg(self) -> bool:
        return bool(self.negative_prompt)


@dataclass(frozen=True)
class PromptEmbeddings:
    embeds: torch.Tensor  # T5 hidden states (1, max_sequence_length, 4096)
    pooled: torch.Tensor  # CLIP pooled output (1, 768)

    def to(self, device: torch.device) -> "PromptEmbeddings":
        return PromptEmbeddings(self.embeds.to(device, non_blocking=True), self.pooled.to(device, non_blocking=True))


@dataclass(frozen=True)
class Schedule:
    timesteps: torch.Tensor  # (steps,)
    sigmas: torch.Tensor  # (steps + 1,), last 0


# ---- input checks -----------------------------------------------------------------------------------

def clean_prompt(prompt: object, name: str = "prompt", allow_empty: bool = False) -> str:
    """Check a prompt's type and text; line breaks and tabs become spaces, other control characters go."""
    if not isinstance(prompt, str):
        raise InputTypeError(f"{name} must be a str, got {type(prompt).__name__}")
    for i, ch in enumerate(prompt):
        if 0xD800 <= ord(ch) <= 0xDFFF:
            raise InputError(f"{name} holds an unpaired surrogate (U+{ord(ch):04X} at index {i}): not valid Unicode "
                             "text; decode the source with errors='replace' or remove it")
    text = re.sub(r"[\t\n\r]+", " ", prompt)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cc").strip()
    if not allow_empty and all(ch in _BLANK_CHARACTERS or unicodedata.category(ch) in _BLANK_CATEGORIES for ch in text):
        raise InputError(f"{name} is empty, whitespace or invisible characters only; describe the image to generate")
    return text


def _host_writable(ptr: int, nbytes: int) -> bool:
    """Whether [ptr, ptr + nbytes) is mapped writable in this process (Linux; elsewhere assumed writable)."""
    if not sys.platform.startswith("linux"):
        return True
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return True
    end, covered = ptr + nbytes, ptr
    for line in maps.splitlines():
        span, perms = line.split(maxsplit=2)[:2]
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= covered < hi:
            if "w" not in perms:
                return False
            covered = hi
            if covered >= end:
                return True
    return covered >= end


def check_output(output: object, height: int, width: int) -> torch.Tensor:
    """The caller's buffer as a tensor that can be written in place (a NumPy array shares its memory)."""
    if isinstance(output, np.ndarray):
        if not output.flags.writeable:
            raise InputError("output is a read-only NumPy array (e.g. a memmap opened with mode='r'); pass a "
                             "writable array")
        if output.dtype != np.float32:
            raise InputError(f"output has dtype {output.dtype}; expected float32")
        if not output.flags.c_contiguous:
            raise InputError("output is not C-contiguous; pass np.ascontiguousarray(output)")
        if tuple(output.shape) != (height, width, 3):
            raise InputError(f"output has shape {tuple(output.shape)}; expected ({height}, {width}, 3) (H x W x RGB)")
        return torch.from_numpy(output)
    if not isinstance(output, torch.Tensor):
        raise InputTypeError(f"output must be a torch.Tensor or a NumPy array, got {type(output).__name__}")
    if output.device.type not in ("cpu", "cuda"):
        raise InputError(f"output is on the {output.device.type} device; pass a CPU or CUDA tensor")
    if tuple(output.shape) != (height, width, 3):
        raise InputError(f"output has shape {tuple(output.shape)}; expected ({height}, {width}, 3) (H x W x RGB)")
    if output.dtype != torch.float32:
        raise InputError(f"output has dtype {output.dtype}; expected torch.float32")
    if not output.is_contiguous():
        raise InputError("output is not contiguous; pass a contiguous tensor (e.g. output.contiguous())")
    if output.requires_grad:
        raise InputError("output requires grad; pass a tensor with requires_grad=False (e.g. output.detach())")
    if output.device.type == "cpu" and not _host_writable(output.data_ptr(), output.numel() * 4):
        raise InputError("output's memory is read-only (e.g. a tensor over a memmap opened with mode='r'); pass a "
                         "writable buffer")
    return output


def check_inputs(prompt: object, *, negative_prompt: object, num_inference_steps: object, guidance_scale: object,
                 true_cfg_scale: object, height: object, width: object, seed: object, output: object,
                 spec: GenerationSpec) -> tuple[GenerationRequest, torch.Tensor | None]:
    """Validate a generate call completely (before any device work); settings left None come from `spec`."""
    steps = spec.num_inference_steps if num_inference_steps is None else num_inference_steps
    height = spec.height if height is None else height
    width = spec.width if width is None else width
    prompt = clean_prompt(prompt)
    negative_prompt = clean_prompt(negative_prompt, "negative_prompt", allow_empty=True)
    check_number("num_inference_steps", steps, 1, 50, integer=True)
    check_number("guidance_scale", guidance_scale, 0.0, 100.0)
    check_number("true_cfg_scale", true_cfg_scale, 0.0, 100.0)
    for name, value in (("height", height), ("width", width)):
        check_number(name, value, 64, 2048, integer=True)
        if value % 16:
            raise InputError(f"{name}={value}: must be a multiple of 16")
    check_number("seed", seed, 0, MAX_SEED, integer=True)
    buffer = None if output is None else check_output(output, height, width)
    use_cfg = true_cfg_scale > 1.0 and bool(negative_prompt)
    if negative_prompt and not use_cfg:
        log.warning("negative_prompt has no effect with true_cfg_scale=%s: FLUX.1-schnell is guidance-distilled; "
                    "set true_cfg_scale > 1 (doubles the transformer passes) to use it", true_cfg_scale)
    request = GenerationRequest(prompt, negative_prompt if use_cfg else "", seed, steps, float(true_cfg_scale), height,
                                width, spec.max_sequence_length)
    return request, buffer


# ---- encode -----------------------------------------------------------------------------------------

def _token_count(tokenizer, text: str) -> int:
    # verbose=False: transformers' own "Token indices sequence length is longer than..." warning would add a line
    return len(tokenizer(text, truncation=False, verbose=False)["input_ids"])


def tokenize(pipe, text: str, max_sequence_length: int, label: str = "Prompt") -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP and T5 token ids of one prompt, padded to their fixed lengths (so every prompt has one shape); a prompt
    longer than either encoder takes is truncated with one warning line, which never echoes the removed text.

    Adapted from diffusers.pipelines.flux.pipeline_flux.FluxPipeline._get_clip_prompt_embeds and
    _get_t5_prompt_embeds, without their untruncated re-tokenization, which writes the removed text
    (up to the whole prompt) into the log on every call.
    """
    text = text[:MAX_TOKENIZED_CHARS]
    clip_count = _token_count(pipe.tokenizer, text)
    t5_count = _token_count(pipe.tokenizer_2, text)
    if clip_count > CLIP_MAX_TOKENS or t5_count > max_sequence_length:
        cut = "" if len(text) < MAX_TOKENIZED_CHARS else f", from its first {MAX_TOKENIZED_CHARS} characters"
        log.warning("%s truncated to %d tokens (CLIP: %d given; T5 keeps %d of %d%s)", label, CLIP_MAX_TOKENS,
                    clip_count, min(t5_count, max_sequence_length), t5_count, cut)
    clip_ids = pipe.tokenizer(text, padding="max_length", max_length=CLIP_MAX_TOKENS, truncation=True,
                              return_tensors="pt").input_ids
    t5_ids = pipe.tokenizer_2(text, padding="max_length", max_length=max_sequence_length, truncation=True,
                              return_tensors="pt").input_ids
    return clip_ids, t5_ids


def embed(text_encoder, text_encoder_2, clip_ids: torch.Tensor, t5_ids: torch.Tensor, device: torch.device,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 hidden states and CLIP pooled output of token ids already on `device` (PromptEmbeddings' fields).

    Adapted from the same two diffusers functions as `tokenize`.
    """
    pooled = text_encoder(clip_ids, output_hidden_states=False).pooler_output
    embeds = text_encoder_2(t5_ids, output_hidden_states=False)[0]
    return embeds.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)


# ---- denoise ----------------------------------------------------------------------------------------

def make_schedule(scheduler, steps: int, image_seq_len: int, device: torch.device) -> Schedule:
    """Timesteps and sigmas of `steps` Euler steps.

    Adapted from diffusers.pipelines.flux.pipeline_flux.FluxPipeline.__call__ (step 5, "Prepare timesteps").
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(image_seq_len, scheduler.config.get("base_image_seq_len", 256),
                         scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                         scheduler.config.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    return Schedule(scheduler.timesteps.clone(), scheduler.sigmas.clone())


def prepare_latents(request: GenerationRequest, channels: int, vae_scale_factor: int, device: torch.device,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed initial noise from the request's seed, and the image position ids.

    Adapted from diffusers.pipelines.flux.pipeline_flux.FluxPipeline.prepare_latents.
    """
    from diffusers import FluxPipeline
    from diffusers.utils.torch_utils import randn_tensor

    height = 2 * (request.height // (vae_scale_factor * 2))
    width = 2 * (request.width // (vae_scale_factor * 2))
    generator = torch.Generator(device).manual_seed(request.seed)
    latents = randn_tensor((1, channels, height, width), generator=generator, device=device, dtype=dtype)
    latents = FluxPipeline._pack_latents(latents, 1, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)
    return latents, image_ids


def euler_step(sample: torch.Tensor, model_output: torch.Tensor, sigma: torch.Tensor,
               sigma_next: torch.Tensor) -> torch.Tensor:
    # Copied from diffusers.schedulers.scheduling_flow_match_euler_discrete.FlowMatchEulerDiscreteScheduler.step
    # (deterministic branch): upcast, one Euler step, cast back.
    prev_sample = sample.to(torch.float32) + (sigma_next - sigma) * model_output
    return prev_sample.to(model_output.dtype)


def denoise(transformer, latents: torch.Tensor, image_ids: torch.Tensor, cond: PromptEmbeddings,
            uncond: PromptEmbeddings | None, schedule: Schedule, true_cfg_scale: float, modulation=None) -> torch.Tensor:
    """The Euler loop over the schedule; `uncond` adds true CFG (two transformer passes per step).

    Adapted from diffusers.pipelines.flux.pipeline_flux.FluxPipeline.__call__ (step 6, "Denoising loop"),
    with schnell's settings (no guidance embedding, no IP-adapter, no callbacks). `modulation` (a
    placement's ModulationTables) computes the conditioning projections for all steps up front.
    """
    conditions = [cond] if uncond is None else [cond, uncond]
    text_ids = torch.zeros(cond.embeds.shape[1], 3, device=latents.device, dtype=cond.embeds.dtype)
    if modulation is not None:
        modulation.prepare(schedule.timesteps, [c.pooled for c in conditions])
    for i in range(schedule.timesteps.shape[0]):
        timestep = schedule.timesteps[i].expand(latents.shape[0]).to(latents.dtype)
        predictions = []
        for c, embeddings in enumerate(conditions):
            if modulation is not None:
                modulation.select(c, i)
            predictions.append(transformer(hidden_states=latents, timestep=timestep / 1000, guidance=None,
                                           pooled_projections=embeddings.pooled, encoder_hidden_states=embeddings.embeds,
                                           txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0])
        noise_pred = predictions[0]
        if uncond is not None:
            noise_pred = predictions[1] + true_cfg_scale * (predictions[0] - predictions[1])
        latents = euler_step(latents, noise_pred, schedule.sigmas[i], schedule.sigmas[i + 1])
    return latents


# ---- decode -----------------------------------------------------------------------------------------

def decode(vae, latents: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """Packed latents to one (height, width, 3) image in [0, 1], in the VAE's dtype on its device.

    Adapted from diffusers.pipelines.flux.pipeline_flux.FluxPipeline.__call__ (the decode after the loop)
    and diffusers.image_processor.VaeImageProcessor.postprocess (denormalize).
    """
    from diffusers import FluxPipeline

    latents = FluxPipeline._unpack_latents(latents, height, width, vae_scale_factor)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0)
