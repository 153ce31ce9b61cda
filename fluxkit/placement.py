"""Placements applied to loaded components: streamed T5, modulation tables, model CPU offload.

The transformer's AdaLN modulation projections (27% of its weights, 3.2 B parameters) are applied
to one conditioning vector per step, never to the 1280 tokens. Under `modulation: fit` they are
replaced by `ModulationOutput` modules that return a row of a table computed once per call for all
steps, so the layers that do not fit the GPU share can live in pinned host memory: each is copied to
the GPU once per call (4-bit packed), dequantized, applied to the stacked conditioning vectors and
freed, instead of being resident for every step.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .config import PlacementSpec
from .plan import is_modulation


class ModulationOutput(torch.nn.Module):
    """Stands in for one modulation Linear: returns its output for the current step and condition.

    A resident layer stays registered here as `source` (so it is counted, moved and saved with the
    transformer); a parked one lives in ModulationTables only.
    """

    def __init__(self, current: torch.Tensor, source: torch.nn.Module | None) -> None:
        super().__init__()
        self.current = current  # a view of ModulationTables.current, written before each transformer call
        self.source = source

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.current


@dataclass
class Parked:
    """A 4-bit (or plain) Linear kept in host memory; `on(device)` gives its dequantized weight for one use."""

    weight: torch.Tensor
    quant_state: object | None
    bias: torch.Tensor | None

    @classmethod
    def from_linear(cls, linear: torch.nn.Module, pin: bool) -> "Parked":
        state = getattr(linear.weight, "quant_state", None)
        if state is not None:
            state = copy.deepcopy(state)
            state.to("cpu")
            if pin:
                _pin_quant_state(state)
        move = (lambda t: t.detach().to("cpu").pin_memory()) if pin else (lambda t: t.detach().to("cpu"))
        return cls(move(linear.weight.data), state, None if linear.bias is None else move(linear.bias.data))

    def apply(self, x: torch.Tensor, device: torch.device, dtype: torch.dtype,
              layer_4bit: type | None = None) -> torch.Tensor:
        """The layer applied to `x` on `device`: its weights copied there for this one use, then dropped.

        A 4-bit weight runs through a `layer_4bit` (bitsandbytes' Linear4bit or fluxkit's, as the resident layers),
        so a parked layer computes exactly what the same layer computes resident (the layer picks its kernel by
        device and batch).
        """
        import bitsandbytes as bnb

        weight = self.weight.to(device, non_blocking=True)
        bias = None if self.bias is None else self.bias.to(device, non_blocking=True).to(dtype)
        if self.quant_state is None:
            return torch.nn.functional.linear(x, weight.to(dtype), bias)
        state = copy.deepcopy(self.quant_state)
        state.to(device)
        out_features, in_features = state.shape
        layer = (layer_4bit or bnb.nn.Linear4bit)(in_features, out_features, bias is not None, compute_dtype=dtype,
                                                  quant_type=state.quant_type, device="meta")
        # No `module=layer`: that reference cycle (layer -> weight -> layer) left every parked weight of a call on
        # the GPU until Python's garbage collector happened to run (0.3-0.5 GB more working memory, measured).
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_state=state, blocksize=state.blocksize,
                                         compress_statistics=state.nested, quant_type=state.quant_type,
                                         bnb_quantized=True)
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias, requires_grad=False)
        return layer(x)


def _pin_quant_state(state) -> None:
    for owner in (state, getattr(state, "state2", None)):
        if owner is None:
            continue
        for name in ("absmax", "code", "offset"):
            t = getattr(owner, name, None)
            if isinstance(t, torch.Tensor):
                setattr(owner, name, t.pin_memory())


class ModulationTables:
    """Every modulation layer of a transformer, run once per call for all steps (and both CFG conditions)."""

    def __init__(self, transformer: torch.nn.Module, parked: dict[str, Parked], device: torch.device,
                 dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.time_text_embed = transformer.time_text_embed
        self.names = [n for n, _ in transformer.named_modules() if is_modulation(n)]
        widths = [(parked[n].weight.shape[0] if parked[n].quant_state is None else parked[n].quant_state.shape[0])
                  if n in parked else transformer.get_submodule(n).out_features for n in self.names]
        self.offsets = [0]
        for w in widths:
            self.offsets.append(self.offsets[-1] + w)
        self.current = torch.empty(1, self.offsets[-1], device=device, dtype=dtype)
        self.sources: dict[str, torch.nn.Module | Parked] = {}
        for i, name in enumerate(self.names):
            owner_name, attr = name.rsplit(".", 1)
            owner = transformer.get_submodule(owner_name)
            self.sources[name] = parked.get(name) or getattr(owner, attr)
            resident = None if name in parked else self.sources[name]
            setattr(owner, attr, ModulationOutput(self.current[:, self.offsets[i]:self.offsets[i + 1]], resident))
        self.table: torch.Tensor | None = None
        self.layer_4bit: type | None = None  # the class parked 4-bit layers run as; None: bitsandbytes' Linear4bit

    def weights(self) -> dict:
        """Layer name -> its weight (a Parked layer holds its own): what a check of the loaded weights reads."""
        return {n: s if isinstance(s, Parked) else s.weight for n, s in self.sources.items()}

    @property
    def parked(self) -> list[str]:
        return [n for n, s in self.sources.items() if isinstance(s, Parked)]

    @torch.inference_mode()
    def prepare(self, timesteps: torch.Tensor, pooled: list[torch.Tensor]) -> None:
        """Compute every layer's output for each (condition, step): one pass over the weights per call."""
        steps = timesteps.shape[0]
        # the transformer's own arithmetic: the caller passes t / 1000 and the model multiplies by 1000
        scaled = (timesteps.to(self.dtype) / 1000).to(self.dtype) * 1000
        emb = torch.cat([self.time_text_embed(scaled, p.expand(steps, -1)) for p in pooled])
        emb = torch.nn.functional.silu(emb)
        table = torch.empty(len(pooled) * steps, self.offsets[-1], device=self.device, dtype=self.dtype)
        for i, name in enumerate(self.names):
            source = self.sources[name]
            parked = isinstance(source, Parked)
            out = source.apply(emb, self.device, self.dtype, self.layer_4bit) if parked else source(emb)
            table[:, self.offsets[i]:self.offsets[i + 1]] = out
        self.table = table.view(len(pooled), steps, -1)

    def select(self, condition: int, step: int) -> None:
        self.current.copy_(self.table[condition, step].unsqueeze(0))


def stream_text_encoder(text_encoder: torch.nn.Module, device: torch.device) -> None:
    """T5 stays in pinned host memory; each leaf layer is copied to the GPU just before it runs, the next one
    prefetched on a side stream (diffusers group offloading)."""
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(text_encoder, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="leaf_level", use_stream=True)


def describe(placement: PlacementSpec, tables: ModulationTables | None) -> dict:
    """What the placement did, for reports."""
    return {"name": placement.name, "text_encoder_2": placement.text_encoder_2, "modulation": placement.modulation,
            "offload_between_calls": placement.offload_between_calls, "vae_tile_size": placement.vae_tile_size,
            "modulation_layers": len(tables.names) if tables else None,
            "modulation_streamed": len(tables.parked) if tables else 0}
