"""Probe (run 25): where a compiled torchao preset spends its load (full-size synthetic checkpoint, resident).

Runs 16 and 17 saw torchao-int8wo and torchao-fp8dq, compiled, sit in their warm-up call for 15 minutes with one CPU
core busy and the GPU idle. Here the main thread's Python stack is dumped every 20 s (faulthandler, which needs no
GIL), and the process leaves after STALL_LIMIT_S. If the load finishes, 10 calls are timed."""
import dataclasses
import faulthandler
import json
import os
import statistics
import sys
import threading
import time

import torch

from fluxkit import load_flux_schnell
from fluxkit.config import load_preset

OUT = os.environ.get("OUT", "/tmp")
PRESET = os.environ.get("STALL_PRESET", "torchao-int8wo")
LIMIT = float(os.environ.get("STALL_LIMIT_S", "240"))
CKPT = os.environ.get("CKPT", "/dev/shm/flux-synthetic-full")


def main() -> None:
    stacks = open(os.path.join(OUT, f"stall_stacks_{PRESET}.txt"), "w")
    faulthandler.dump_traceback_later(20, repeat=True, file=stacks)
    row = {"preset": PRESET, "device": torch.cuda.get_device_name(), "limit_s": LIMIT}

    def give_up() -> None:
        row["outcome"] = f"still loading after {LIMIT:.0f} s"
        print(json.dumps(row), flush=True)
        with open(os.path.join(OUT, f"stall_{PRESET}.json"), "w") as f:
            json.dump(row, f)
        stacks.flush()
        os._exit(3)

    threading.Timer(LIMIT, give_up).start()
    preset = dataclasses.replace(load_preset(PRESET), compile=True)
    start = time.perf_counter()
    model = load_flux_schnell(device="cuda", quantization=preset, model=CKPT)
    row["load_s"] = round(time.perf_counter() - start, 1)
    row["load_stages_s"] = {k: round(v, 1) for k, v in model.load_stages.items()}
    times = []
    for i in range(10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate("a red fox in the snow", seed=i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    row["p50_s"] = round(statistics.median(times), 4)
    row["outcome"] = "loaded"
    print(json.dumps(row), flush=True)
    with open(os.path.join(OUT, f"stall_{PRESET}.json"), "w") as f:
        json.dump(row, f)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
