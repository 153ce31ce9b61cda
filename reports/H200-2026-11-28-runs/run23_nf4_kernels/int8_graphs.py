"""Run 23 (before the preset check it led to): can int8 (bitsandbytes LLM.int8, outlier threshold 6.0) replay from
fluxkit's CUDA graphs? Tiny checkpoint: the graphed image against the uncaptured one, or the error the capture gives."""
import dataclasses
import sys
import traceback

import torch

sys.path.insert(0, "tests")
from fluxkit import load_flux_schnell  # noqa: E402
from fluxkit.config import load_preset  # noqa: E402
from fluxkit.synthetic import ensure_synthetic  # noqa: E402
from helpers import PROMPT, uncaptured  # noqa: E402

preset = dataclasses.replace(load_preset("int8"), cuda_graphs=True)
try:
    model = load_flux_schnell("cuda", preset, ensure_synthetic("tiny", seed=0))
    graphed = model.generate(PROMPT, seed=3)
    with uncaptured(model):
        eager = model.generate(PROMPT, seed=3)
    print("int8 graphs:", model.info()["cuda_graphs"], "equal:", torch.equal(graphed, eager),
          "max diff:", float((graphed - eager).abs().max()))
except Exception:  # noqa: BLE001 - the error is the finding
    traceback.print_exc()
