"""Where a `vortex` restart's warm-up goes, and what each compile choice costs per call (GPU host).

Each variant runs in a fresh process (`python3 scripts/restart_probe.py VARIANT`), compile cache warm: load with
the task's call, one image, then CALLS more, printing one JSON line: load stages, Dynamo's frames and seconds, and
the phase medians. VARIANT: `current` (the preset as it is: under `vortex` the transformer's blocks compiled, the
tiled VAE decoder not), `decoder-compiled` (the decoder compiled too, one graph per tile shape),
`decoder-dynamic` (the decoder compiled once with dynamic shapes), `eager` (nothing compiled). `PROFILE=FILE` writes
cProfile's statistics of the load to FILE.
Without a VARIANT it runs every variant (each first once to fill the compile cache, then RUNS times) and prints
their lines. Needs CKPT (a full-size synthetic checkpoint) and the GPU host's environment (scripts/gpu-run.sh).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("current", "decoder-compiled", "decoder-dynamic", "eager")


def run(variant: str) -> dict:
    t0 = time.perf_counter()
    import torch

    import fluxkit.fastpath as fastpath
    from fluxkit import load_flux_schnell

    if variant in ("decoder-compiled", "decoder-dynamic"):  # what `decoder_stays_eager` turns off under `vortex`
        dynamic = {"dynamic": True} if variant == "decoder-dynamic" else {}
        fastpath.decoder_stays_eager = lambda spec: None
        compile_options = fastpath.compile_options
        fastpath.compile_options = lambda mode: (compile_options(mode)[0], {**compile_options(mode)[1], **dynamic})
    imported = time.perf_counter() - t0
    preset = "nf4"
    if variant == "eager":
        import dataclasses

        from fluxkit.config import load_preset
        preset = dataclasses.replace(load_preset("nf4"), compile=False)
    profile = None
    if os.environ.get("PROFILE"):
        import cProfile
        profile = cProfile.Profile()
        profile.enable()
    model = load_flux_schnell(os.environ.get("DEVICE", "cuda"), preset, os.environ["CKPT"])
    model.generate("the first image after a restart", seed=1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    if profile:
        profile.disable()
        profile.dump_stats(os.environ["PROFILE"])
    from torch._dynamo.utils import compile_times, counters

    from fluxkit.lab.bench import timed_calls

    rows = timed_calls(model, int(os.environ.get("CALLS", 8)), "a lighthouse on a cliff")
    return {"variant": variant, "import_s": round(imported, 2), "to_first_image_s": round(first, 2),
            "stages": {k: round(v, 2) for k, v in model.stages.seconds.items()},
            "frames": dict(counters["stats"]), "compile_times": compile_times(repr="str"),
            "phase_p50_s": {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0] if k != "started"},
            "allocated_gb": round(torch.cuda.memory_allocated() / 1e9, 3)}


def main() -> None:
    if len(sys.argv) > 1:
        print(json.dumps(run(sys.argv[1])), flush=True)
        return
    for variant in VARIANTS:
        for i in range(1 + int(os.environ.get("RUNS", 2))):
            env = dict(os.environ, PROFILE=f"{os.environ.get('OUT', '/tmp')}/restart_{variant}.prof") if i == 1 else None
            out = subprocess.run([sys.executable, __file__, variant], capture_output=True, text=True, env=env)
            line = [x for x in out.stdout.splitlines() if x.startswith("{")]
            print(("prime " if i == 0 else "") + (line[-1] if line else f"{variant} failed: {out.stderr[-3000:]}"),
                  flush=True)


if __name__ == "__main__":
    main()
