"""Probe (run 23): dequantization of one NF4 weight (double quant) to bf16, bytes moved per second, per implementation.

  copy        a bf16 copy of the same size (read 2 B + write 2 B per weight): what the card's memory moves
  bnb_cuda    torch.ops.bitsandbytes.dequantize_4bit on CUDA (what matmul_4bit runs above its M threshold)
  bnb_triton  bitsandbytes' Triton kernel (its XPU backend), run on CUDA
  torch_gather / torch_lut   the dequantization in torch ops under torch.compile: a 16-entry gather per nibble, or
              a 256-entry table of value pairs, one gather per byte
Writes $OUT/probe_nf4_dequant.jsonl.
"""
import json
import os

import bitsandbytes.functional as bnbf
import torch
from bitsandbytes.backends.triton import ops as triton_ops

torch._dynamo.config.cache_size_limit = 64
REPS = 20


def nested_absmax(qs):
    return (qs.state2.code[qs.absmax.int()].view(-1, 256) * qs.state2.absmax.view(-1, 1)).view(-1) + qs.offset


def torch_gather(packed, qs):
    idx = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0xF], -1).view(-1)
    return (qs.code[idx.int()].view(-1, 64) * nested_absmax(qs).view(-1, 1)).view(qs.shape).to(torch.bfloat16)


def torch_lut(packed, qs, pairs):
    return (pairs[packed.view(-1).int()].view(-1, 64) * nested_absmax(qs).view(-1, 1)).view(qs.shape).to(torch.bfloat16)


def graph_time(fn) -> float:
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPS):
            fn()
    ts = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / REPS / 1e3)
    return sorted(ts)[len(ts) // 2]


out = open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_nf4_dequant.jsonl"), "w")
for N, K in [(3072, 3072), (12288, 3072), (3072, 15360)]:
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ref = bnbf.dequantize_4bit(packed, qs).to(torch.bfloat16)
    absmax = nested_absmax(qs)
    pairs = torch.stack([qs.code[torch.arange(256, device="cuda") >> 4], qs.code[torch.arange(256, device="cuda") & 0xF]], -1)
    dst = torch.empty_like(ref)
    gather_fn = torch.compile(lambda: torch_gather(packed, qs), fullgraph=True)
    lut_fn = torch.compile(lambda: torch_lut(packed, qs, pairs), fullgraph=True)
    variants = {
        "copy": lambda: dst.copy_(ref),
        "bnb_cuda": lambda: torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, 64, "nf4", qs.shape, torch.bfloat16),
        "bnb_triton": lambda: triton_ops.dequantize_4bit(packed, absmax, 64, "nf4", qs.shape, torch.bfloat16),
        "torch_gather": gather_fn,
        "torch_lut": lut_fn,
    }
    row = {"N": N, "K": K}
    for name, fn in variants.items():
        if name != "copy":
            try:
                row[f"{name}_equal"] = bool(torch.equal(fn(), ref))
            except Exception as e:  # noqa: BLE001
                row[f"{name}_error"] = repr(e)[:300]
                continue
        t = graph_time(fn)
        row[f"{name}_us"] = round(t * 1e6, 2)
        # bytes the dequantization must move: 0.5 B read + 2 B written per weight (+ scales); copy: 4 B per weight
        row[f"{name}_TBps"] = round(N * K * (4 if name == "copy" else 2.5) / t / 1e12, 2)
    print(json.dumps(row), flush=True)
    out.write(json.dumps(row) + "\n")
