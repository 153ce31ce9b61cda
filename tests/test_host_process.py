"""fluxkit is a guest in its host's process (Vortex runs its other models beside it): importing it, loading every
preset this machine can run and generating leave the host's process as they found them: environment variables,
loggers and their handlers and levels, warning filters, thread counts, the default dtype, every global random state,
torch's process-wide settings (Inductor, Dynamo, matmul precision), signal handlers and the working folder.

What fluxkit's dependencies do when they are imported (transformers and diffusers give their own loggers a handler,
torch and urllib3 add warning filters, diffusers' import asks Inductor for its cache folder, which writes torch's
default into TORCHINDUCTOR_CACHE_DIR) happens in any process that imports them; the snapshot is taken after those
imports, and `import fluxkit` itself imports none of them. Memory caps and peak statistics are device state: the
GPU contract suite checks them (tests/test_vortex_contract.py, tests/test_gpu_cotenancy.py).
"""
import json
import subprocess
import sys
from pathlib import Path

SNAPSHOT = """
import json, logging, os, random, signal, sys, warnings
import numpy as np
import torch
from helpers import process_settings

def snapshot():
    loggers = {name: [l.level, [type(h).__name__ for h in l.handlers], l.propagate, l.disabled]
               for name, l in logging.Logger.manager.loggerDict.items() if isinstance(l, logging.Logger)}
    root = logging.getLogger()
    return {"env": dict(os.environ), "root": [root.level, [repr(h) for h in root.handlers]], "loggers": loggers,
            "warnings": [repr(f) for f in warnings.filters], "showwarning": repr(warnings.showwarning),
            "threads": [torch.get_num_threads(), torch.get_num_interop_threads()], "cwd": os.getcwd(),
            "torch_rng": torch.random.get_rng_state().tolist(), "numpy_rng": repr(np.random.get_state()),
            "python_rng": repr(random.getstate()), "excepthook": repr(sys.excepthook),
            "signals": {s: repr(signal.getsignal(getattr(signal, s))) for s in ("SIGINT", "SIGTERM", "SIGHUP")},
            "settings": {k: repr(v) for k, v in process_settings().items()}}

INERT = [0, [], True, False]  # a logger getLogger creates: no level, no handler, propagating (a module's own)


def changed(a, b):
    out = {}
    for key in a:
        if isinstance(a[key], dict):
            diff = sorted(k for k in a[key].keys() | b[key].keys() if a[key].get(k) != b[key].get(k)
                          and not (key == "loggers" and k not in a[key] and b[key][k] == INERT))
            if diff:
                out[key] = diff
        elif a[key] != b[key]:
            out[key] = [str(a[key])[:200], str(b[key])[:200]]
    return out
"""

IMPORT_ONLY = SNAPSHOT + """
snapshot()  # the first imports torch's compiler settings (process_settings), with what their import does
before = snapshot()
import fluxkit
print(json.dumps({"changed": changed(before, snapshot()),
                  "imported": [m for m in ("diffusers", "transformers", "bitsandbytes", "torchao") if m in sys.modules]}))
"""

LOAD_AND_GENERATE = SNAPSHOT + """
import bitsandbytes, diffusers, safetensors, transformers
from diffusers import FluxPipeline
snapshot()
before = snapshot()
import fluxkit
checkpoint, presets = sys.argv[1], sys.argv[2:]
for preset in presets:
    fluxkit.load_flux_schnell("cpu", preset, checkpoint).generate("a red lighthouse", seed=1, height=256, width=256)
print(json.dumps({"changed": changed(before, snapshot())}))
"""


def _run(script: str, *args: str) -> dict:
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=900,
                         cwd=Path(__file__).parent)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_import_fluxkit_changes_nothing_and_imports_no_model_library():
    out = _run(IMPORT_ONLY)
    assert out == {"changed": {}, "imported": []}


def test_loads_and_calls_of_every_preset_leave_the_process_as_they_found_it(tiny_dir):
    """Every preset: torchao, for one, turns on Inductor's kernel tuning for the whole process unless told not to."""
    import torch

    from fluxkit import load_placement, load_preset
    from fluxkit.config import available_presets

    presets = [p for p in available_presets() if not load_preset(p).quantization.quantizer.unsupported(
        load_preset(p).quantization, torch.device("cpu"), load_placement("resident"))]
    assert {"nf4", "int8", "torchao-int8wo", "gguf-q8_0", "fp8-layerwise", "bf16"} <= set(presets)
    assert _run(LOAD_AND_GENERATE, str(tiny_dir), *presets) == {"changed": {}}
