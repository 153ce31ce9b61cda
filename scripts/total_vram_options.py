"""GPU host: how far each option takes the peak reserved memory of one NF4 call (the 11.8 GB budget).

Run once per allocator setting (PYTORCH_CUDA_ALLOC_CONF must be set before CUDA starts):
  python3 scripts/total_vram_options.py CKPT [double_quant]
Prints one JSON line: weights, peak allocated, peak reserved, whole-card use (GB = 10**9 bytes).
"""
import dataclasses
import json
import os
import sys

import torch

import fluxkit
from fluxkit.memory import GB, GIB

ckpt = sys.argv[1]
preset = fluxkit.load_preset("nf4")
if "double_quant" in sys.argv[2:]:
    preset = dataclasses.replace(preset, quantization=dataclasses.replace(preset.quantization, double_quant=True))
model = fluxkit.load_flux_schnell(device="cuda", quantization=preset, model=ckpt)
for seed in range(5):
    model.generate("manic scientist, blue spiked hair, white lab coat", seed=seed)
free, total = torch.cuda.mem_get_info()
print(json.dumps({
    "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "double_quant": preset.quantization.double_quant,
    "weights_gib": model.weight_report()["total"]["gib"],
    "transformer_gib": model.weight_report()["transformer"]["gib"],
    "peak_allocated_gb": round(model.last_call.peak_gib * GIB / GB, 3),
    "peak_reserved_gb": round(max(m.peak_reserved_gib for m in model.last_call.memory) * GIB / GB, 3),
    "whole_card_gb": round((total - free) / GB, 3), "device": torch.cuda.get_device_name()}))
