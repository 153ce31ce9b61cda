"""`load_flux_schnell`: checks, plan and placement, components, fast path, warm-up; every failure one error.

Every failure to load, whatever its cause, leaves as VortexInitializationError (logged as one JSON record first):
bad arguments, missing or damaged weights, not enough memory, an OOM while loading, a compiler that fails, and any
error fluxkit did not foresee (then the message says to report it). The load leaves its host's process as it found
it: no memory cap is raised, no peak statistic reset, no environment variable, logger or global RNG touched.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import torch

from .checkpoint import (
    check_model_index,
    check_prequantized_folder,
    check_prequantized_placement,
    check_prequantized_weights,
    inspect_checkpoint,
    loaded_4bit_states,
)
from .checks import check_number, parse_positive_float
from .components import load_pipeline
from .config import AUTO_PLACEMENT, PlacementSpec, Preset, load_placement, load_preset
from .errors import (
    FluxkitError,
    GenerationError,
    InputError,
    InputTypeError,
    LoadInputError,
    LoadInputTypeError,
    VortexInitializationError,
    one_line,
)
from .fastpath import apply_fast_path, warm_up
from .generation import FluxModel
from .hub import DEFAULT_MODEL, ModelSource, resolve_model
from .memory import GB, release_device_memory
from .plan import Plan
from .preflight import available_bytes, check_fits, choose_placement, compute_dtype, lower_cap, resolve_device

log = logging.getLogger("fluxkit")

LOAD_ERRORS = (LoadInputError, LoadInputTypeError)
CHECKS_STAGE, WARM_UP_STAGE = "checks and plan", "fast-path warm-up call"


class LoadStages:
    """Seconds of each load stage, and on a GPU the memory allocated and reserved after it (`fluxkit -v` logs both):
    where a start goes. No device synchronization and no peak reset: the host's statistics stay its own."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.memory: dict[str, tuple[int, int]] = {}  # stage -> (allocated, reserved) bytes after it, on a GPU
        self.start = self._last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self._last = now
        memory = ""
        if self.device.type == "cuda":
            self.memory[stage] = (torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device))
            memory = f", allocated {self.memory[stage][0] / GB:.3f} GB, reserved {self.memory[stage][1] / GB:.3f} GB"
        log.info("load stage %-22s %7.1f s%s", stage, self.seconds[stage], memory)

    @property
    def total(self) -> float:
        return self._last - self.start

    def weights_seconds(self) -> float:
        """What the load spent reading (and quantizing) weights: every stage but the checks and the warm-up."""
        return sum(s for stage, s in self.seconds.items() if stage not in (CHECKS_STAGE, WARM_UP_STAGE))


def load_failure(source: str, preset: Preset, stage: str, err: Exception) -> VortexInitializationError:
    """The error for a load that failed other than by running out of memory, with the remedy for where it failed:
    a compiler that cannot build this preset's kernels, or a call a CUDA graph cannot capture, is no sign of a
    damaged checkpoint."""
    cause = one_line(err)
    if stage == WARM_UP_STAGE:
        levers = [(name, switch) for name, switch, on in (
            ("torch.compile", "compile: false", preset.compile),
            ("CUDA graph capture", "cuda_graphs: false", preset.cuda_graphs),
            ("fluxkit's dequantization kernel", "dequantize_kernel: bitsandbytes", preset.dequantize_kernel == "fluxkit"),
        ) if on]
        switches = " or ".join(f"`{switch}`" for _, switch in levers)
        return VortexInitializationError(
            f"{' and '.join(name for name, _ in levers)} of {source} ({preset.name}) failed during the {stage}: {cause}",
            remediation=f"run {preset.name} without it ({switches} in its preset file; "
                        "`fluxkit sweep --compile off`), which loads the same weights; if that runs, report this "
                        "message to fluxkit; if compiled kernels in TORCHINDUCTOR_CACHE_DIR are damaged, delete them")
    return VortexInitializationError(
        f"Loading {source} failed: {cause}",
        remediation="rebuild or re-download the checkpoint (`fluxkit synth`, `fluxkit download`); if it is "
                    "intact, report this message as a fluxkit bug")


def _check_arguments(quantization, placement, model, revision, vram_limit_gb, preflight_check):
    try:
        preset = load_preset(quantization)
        placement = placement if placement is not None else preset.placement
        if placement != AUTO_PLACEMENT:
            placement = load_placement(placement)
    except InputTypeError as err:
        raise LoadInputTypeError(str(err)) from None
    except InputError as err:
        raise LoadInputError(str(err)) from None
    if not isinstance(model, (str, os.PathLike)):
        raise LoadInputTypeError(f"model must be a str or a path, got {type(model).__name__}")
    if revision is not None and not isinstance(revision, str):
        raise LoadInputTypeError(f"revision must be a str or None, got {type(revision).__name__}")
    if not isinstance(preflight_check, bool):
        raise LoadInputTypeError(f"preflight_check must be True or False, got {type(preflight_check).__name__}")
    if vram_limit_gb is None and os.environ.get("FLUXKIT_VRAM_LIMIT_GB"):
        vram_limit_gb = parse_positive_float("FLUXKIT_VRAM_LIMIT_GB", os.environ["FLUXKIT_VRAM_LIMIT_GB"],
                                             errors=LOAD_ERRORS)
    if vram_limit_gb is not None:
        check_number("vram_limit_gb", vram_limit_gb, 0.001, 1e6, errors=LOAD_ERRORS)
    return preset, placement, vram_limit_gb


def load_flux_schnell(device: str | torch.device = "cuda", quantization: str | Preset = "nf4",
                      model: str | os.PathLike = DEFAULT_MODEL, *, placement: str | PlacementSpec | None = None,
                      revision: str | None = None, vram_limit_gb: float | None = None,
                      preflight_check: bool = True) -> FluxModel:
    """Load FLUX.1-schnell, quantized per preset and placed per placement, ready for `FluxModel.generate`.

    `model` is a Hub id resolved from the local cache only, a checkpoint folder, `synthetic-tiny` /
    `synthetic-full`, or `auto`. `placement` (default: the preset's, `auto`) is `resident`, `vortex` (the whole
    model within Vortex's GPU share), `offload`, or `auto`: the fastest whose planned peak fits the preset's Flux
    share and the memory free to this process (on a CPU, `resident`). `vram_limit_gb` (or env
    FLUXKIT_VRAM_LIMIT_GB) caps this process's GPU memory, as on a smaller card, never above a cap the host set.
    `preflight_check=False` skips the memory check and lets the allocator decide (a real OOM is still converted).
    Every failure raises VortexInitializationError.
    """
    try:
        return _load(device, quantization, model, placement, revision, vram_limit_gb, preflight_check)
    except VortexInitializationError as err:
        log.error(json.dumps(err.record()), extra={"structured": True})
        raise
    except Exception as err:  # a failure fluxkit did not foresee is still a failure to load, for Vortex
        failure = VortexInitializationError(
            f"Loading FLUX.1-schnell failed unexpectedly: {one_line(err)}",
            remediation="report this message and its traceback (`fluxkit -v`) as a fluxkit bug")
        log.error(json.dumps(failure.record()), extra={"structured": True})
        raise failure from err


@dataclass(frozen=True)
class LoadPlan:
    """Everything decided before a weight is read: the checked checkpoint, preset, placement and its plan."""

    source: ModelSource
    meta: dict  # the components on the meta device
    preset: Preset
    placement: PlacementSpec
    plan: Plan
    reason: str  # why this placement
    device: torch.device
    dtype: torch.dtype
    prequantized: tuple[str, ...]  # components the folder holds pre-quantized
    available: int | None  # GPU bytes this process may take (None: not checked)


def plan_load(device: str | torch.device = "cuda", quantization: str | Preset = "nf4",
              model: str | os.PathLike = DEFAULT_MODEL, *, placement: str | PlacementSpec | None = None,
              revision: str | None = None, vram_limit_gb: float | None = None,
              preflight_check: bool = True) -> LoadPlan:
    """What `load_flux_schnell` with these arguments would load, and where, from the configs alone (the lab names
    its reports and checks its references by it before loading anything). Lowers the process's memory cap when
    `vram_limit_gb` asks for it."""
    preset, placement, vram_limit_gb = _check_arguments(quantization, placement, model, revision, vram_limit_gb,
                                                        preflight_check)
    dev = resolve_device(device)
    if revision is None and str(model) in (preset.model.id, "auto"):
        revision = preset.model.revision
    try:
        source = resolve_model(model, revision)
        check_model_index(source.path, source.describe())
        try:
            prequantized = check_prequantized_folder(source.path, preset, source.describe())
        except (InputError, InputTypeError) as err:
            raise LoadInputError(str(err), remediation="load the checkpoint with the preset it was quantized with, "
                                                       "or the original checkpoint") from None
        meta = inspect_checkpoint(source.path, source.describe())
    except FluxkitError:
        raise
    except Exception as err:  # an unreadable folder, a full disk while building a synthetic checkpoint
        raise VortexInitializationError(f"{model}: the checkpoint could not be read ({one_line(err)}).",
                                        remediation="check the path and its permissions, or rebuild it") from err
    dtype = compute_dtype(preset, dev)
    lower_cap(dev, vram_limit_gb)
    available = available_bytes(dev) if dev.type == "cuda" and preflight_check else None
    try:
        spec, plan, why = choose_placement(meta, preset, placement, dev, dtype.itemsize, available)
        check_prequantized_placement(prequantized, spec)
    except (InputError, InputTypeError) as err:
        raise LoadInputError(str(err), remediation="load the checkpoint with the preset and placement it was "
                                                   "quantized for, or the original checkpoint") from None
    reason = preset.quantization.quantizer.unsupported(preset.quantization, dev, spec)
    if reason:
        raise VortexInitializationError(f"preset {preset.name} cannot run on {dev} under placement {spec.name}: "
                                        f"{reason}.", remediation="choose another preset (`fluxkit plan` lists "
                                        "them), placement or device")
    if available is not None:
        check_fits(plan, available)
    return LoadPlan(source, meta, preset, spec, plan, why, dev, dtype, prequantized, available)


def _load(device, quantization, model, placement, revision, vram_limit_gb, preflight_check) -> FluxModel:
    stages = LoadStages(torch.device("cpu"))
    p = plan_load(device, quantization, model, placement=placement, revision=revision, vram_limit_gb=vram_limit_gb,
                  preflight_check=preflight_check)
    source, meta, preset, spec, plan, dev, dtype = p.source, p.meta, p.preset, p.placement, p.plan, p.device, p.dtype
    stages.device = dev
    log.info("placement %s (%s)", spec.name, p.reason)
    stages.done(CHECKS_STAGE)  # includes building a synthetic checkpoint the first time it is asked for
    out_of_memory, failure, stage = False, None, "weight loading"
    try:
        pipe, tables = load_pipeline(source.path, preset, spec, plan, dev, dtype, stages.done)
        moved = tables.weights() if tables is not None else {}  # modulation layers live in the tables
        check_prequantized_weights({c: loaded_4bit_states(meta[c], getattr(pipe, c), moved if c == "transformer" else {})
                                    for c in p.prequantized}, preset, source.describe())
        fast = apply_fast_path(pipe, preset, spec, tables, dev)
        model = FluxModel(pipe, preset=preset, placement=spec, plan=plan, source=source, device=dev, dtype=dtype,
                          modulation=tables, fast=fast, stages=stages, placement_reason=p.reason)
        if fast.compiled or fast.graphed:
            stage = WARM_UP_STAGE
            warm_up(model)
            stages.done(WARM_UP_STAGE)
    except torch.OutOfMemoryError:
        out_of_memory = True  # handled below, once the traceback (and the partial weights it holds) is gone
    except VortexInitializationError:
        raise
    except Exception as err:  # damage that only shows while reading (a corrupt tensor), a compile that fails
        out_of_memory = isinstance(err, GenerationError) and err.out_of_memory  # the warm-up call's own OOM
        failure = None if out_of_memory else err
    if failure is not None:
        release_device_memory(dev)
        raise load_failure(source.describe(), preset, stage, failure) from failure
    if out_of_memory:
        release_device_memory(dev)
        cuda = dev.type == "cuda"
        peak = f", with {torch.cuda.max_memory_reserved(dev) / GB:.3f} GB reserved at the process's peak" if cuda else ""
        raise VortexInitializationError(
            f"CUDA ran out of memory while loading FLUX.1-schnell ({preset.name}, {spec.name}) during the {stage}{peak}; "
            "partial weights were released.", required_vram_gb=round(plan.peak_bytes / GB, 3),
            available_vram_gb=round(available_bytes(dev) / GB, 3) if cuda else None,
            remediation="free GPU memory held by other processes, raise vram_limit_gb, choose the vortex placement, "
                        "or use a GPU with more memory")
    log.info("loaded %s (%s, %s) on %s in %.1f s", source.describe(), preset.name, spec.name, dev, stages.total)
    return model
