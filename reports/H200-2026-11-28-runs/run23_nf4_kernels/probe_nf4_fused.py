"""Probe (run 23): fluxkit.nf4_matmul (dequantization inside a Triton GEMM) against bitsandbytes and bf16, per shape of
one FLUX transformer step (scripts/probe_nf4_matmul.py's shapes), each replayed from CUDA graphs. $OUT/probe_nf4_fused.jsonl
"""
import json
import os
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from nf4_matmul import nf4_matmul  # noqa: E402
from probe_nf4_matmul import SHAPES, graph_time  # noqa: E402

out = open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_nf4_fused.jsonl"), "w")
torch.manual_seed(0)
totals = {}
for M, K, N, count in SHAPES:
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ref = bnbf.dequantize_4bit(packed, qs).to(torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    expected = F.linear(x, ref, bias).float()
    variants = {"bf16": lambda x: F.linear(x, ref, bias),
                "bnb": lambda x: bnb.matmul_4bit(x, packed.t(), bias=bias, quant_state=qs),
                "fused": lambda x: nf4_matmul(x, packed, qs, bias)}
    row = {"M": M, "K": K, "N": N, "count": count}
    for name, fn in variants.items():
        y = fn(x).float()
        row[f"{name}_rel_err"] = float((y - expected).norm() / expected.norm())
        row[f"{name}_max_abs"] = float((y - expected).abs().max())
    for _ in range(2):
        for name, fn in variants.items():
            row[f"{name}_s"] = graph_time(fn, x)
    for name in variants:
        totals[name] = totals.get(name, 0.0) + row[f"{name}_s"] * count
    print(json.dumps(row), flush=True)
    out.write(json.dumps(row) + "\n")
summary = {"per_step_s": totals, "per_call_4_steps_s": {k: 4 * v for k, v in totals.items()},
           "device": torch.cuda.get_device_name(), "torch": torch.__version__}
print(json.dumps(summary), flush=True)
out.write(json.dumps(summary) + "\n")
