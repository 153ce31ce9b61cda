"""Probe (run 24): fluxkit's CUDA graphs over diffusers' layerwise casting (fp8-layerwise, tiny checkpoint).
The casting hooks replace each layer's weights (module.to) inside every forward: a capture records reads of the
float8 weights as they were, while the module afterwards holds new ones allocated in the graph's pool. Does a replay
still give the uncaptured image, before and after other allocations reuse the freed memory?"""
import dataclasses
import json
import os
import sys

import torch

from fluxkit import load_flux_schnell
from fluxkit.config import load_preset

PROMPT = "manic scientist, blue spiked hair, white lab coat"


def main() -> None:
    preset = dataclasses.replace(load_preset("fp8-layerwise"), cuda_graphs=True)
    row = {"device": torch.cuda.get_device_name()}
    try:
        model = load_flux_schnell(device="cuda", quantization=preset, model="synthetic-tiny")
        row["graphed"] = sorted(model.graphed)
        graphed = model.generate(PROMPT, seed=3)
        saved, model.graphed = model.graphed, {}
        eager = model.generate(PROMPT, seed=3)
        model.graphed = saved
        row["equal_before_churn"] = bool(torch.equal(graphed, eager))
        churn = [torch.randn(1 << 22, device="cuda") for _ in range(64)]  # reuse what the capture freed
        del churn
        again = model.generate(PROMPT, seed=3)
        row["equal_after_churn"] = bool(torch.equal(again, eager))
        row["max_abs_diff_after_churn"] = float((again - eager).abs().max())
    except Exception as err:  # the outcome is the finding
        row["error"] = f"{type(err).__name__}: {str(err)[:2000]}"
    print(json.dumps(row, indent=1))
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_layerwise_graphs.json"), "w") as f:
        json.dump(row, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
