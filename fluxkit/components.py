"""The pipeline's components loaded from a checked folder, each by the backend that quantizes it, then placed.

The transformer and T5 go through their quantization backend (fluxkit/quantizers/); CLIP, the VAE, the tokenizers
and the scheduler load as they are. The placement then decides what stays on the GPU: T5 streamed from pinned host
memory, modulation layers parked in host memory, or everything offloaded between calls.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from .config import PlacementSpec, Preset
from .placement import ModulationTables, stream_text_encoder
from .plan import Plan
from .quantizers import for_component


def load_transformer(folder: Path, preset: Preset, placement: PlacementSpec, plan: Plan, device: torch.device,
                     dtype: torch.dtype):
    """The transformer, quantized per preset; the modulation layers the plan streams end up parked in host memory
    and run through ModulationTables."""
    spec = preset.quantization
    quantizer = for_component(spec, "transformer")
    transformer, parked = quantizer.load_transformer(folder, spec, dtype, device, plan.streamed_modulation,
                                                     pin=device.type == "cuda")
    tables = ModulationTables(transformer, parked, device, dtype) if placement.modulation == "fit" else None
    return transformer, tables


def load_text_encoder_2(folder: Path, preset: Preset, placement: PlacementSpec, device: torch.device,
                        dtype: torch.dtype):
    path = folder / "text_encoder_2"
    spec = preset.quantization
    streamed = placement.text_encoder_2 == "stream"
    if streamed:
        from transformers import T5EncoderModel

        t5 = T5EncoderModel.from_pretrained(path, dtype=dtype)
        if device.type == "cuda":
            stream_text_encoder(t5, device)
        return t5
    return for_component(spec, "text_encoder_2").load_text_encoder_2(path, spec, dtype, device)


def load_pipeline(folder: Path, preset: Preset, placement: PlacementSpec, plan: Plan, device: torch.device,
                  dtype: torch.dtype, done: Callable[[str], None]):
    """A FluxPipeline of the folder's components, placed; `done(stage)` is called after each loading stage."""
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel

    index = json.loads((folder / "model_index.json").read_text())  # its classes were checked by inspect_checkpoint
    offload = placement.offload_between_calls and device.type == "cuda"
    transformer, tables = load_transformer(folder, preset, placement, plan, device, dtype)
    done("transformer")
    if offload:
        transformer.to("cpu")  # before T5 arrives: at most one quantized component on the GPU while loading
    t5 = load_text_encoder_2(folder, preset, placement, device, dtype)
    done("text_encoder_2")
    if offload:
        t5.to("cpu")
    here = "cpu" if offload else device
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=AutoencoderKL.from_pretrained(folder / "vae", dtype=dtype).to(here),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype).to(here),
        tokenizer=getattr(transformers, index["tokenizer"][1]).from_pretrained(folder / "tokenizer"),
        text_encoder_2=t5,
        tokenizer_2=getattr(transformers, index["tokenizer_2"][1]).from_pretrained(folder / "tokenizer_2"),
        transformer=transformer)
    if placement.vae_tile_size:
        pipe.vae.enable_tiling()
        pipe.vae.tile_sample_min_size = placement.vae_tile_size
        pipe.vae.tile_latent_min_size = placement.vae_tile_size // pipe.vae_scale_factor
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    pipe.set_progress_bar_config(disable=True)
    done("text_encoder, vae")
    return pipe, tables
