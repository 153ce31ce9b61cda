"""Probe (run 27): fluxkit.dequantize's kernel against bitsandbytes', alone and in the 4-bit linears of one step.

Part 1, per weight shape: a bf16 copy, bitsandbytes' dequantization (nested scales, as its fallback runs it), the
first version of the kernel (`flat`, below: one program per 2048 bytes, each byte's scale decoded on its own; call 1
timed it at 1024-8192 bytes, 4-16 warps, fp fusion on and off) and fluxkit.dequantize's (one scale per block row) at
several rows per program and warp counts: microseconds, TB/s (0.5 B read + 2 B written per weight), equal bit for bit
to bitsandbytes'.
Part 2, the linears of one transformer step (run 23's shapes and counts), each replayed from a CUDA graph:
bf16, bitsandbytes.matmul_4bit, fluxkit.dequantize + F.linear eager, and the same under torch.compile(fullgraph).
Writes $OUT/probe_nf4_fast_dequant.jsonl.
"""
import json
import os

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fluxkit import dequantize

REPS = 20
torch._dynamo.config.cache_size_limit = 64
SHAPES = [(1024, 3072, 3072, 4 * 19), (256, 3072, 3072, 4 * 19), (1024, 3072, 12288, 19), (1024, 12288, 3072, 19),
          (256, 3072, 12288, 19), (256, 12288, 3072, 19), (1280, 3072, 3072, 3 * 38), (1280, 3072, 12288, 38),
          (1280, 15360, 3072, 38)]
out = open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_nf4_fast_dequant.jsonl"), "w")


def emit(row):
    print(json.dumps(row), flush=True)
    out.write(json.dumps(row) + "\n")


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


@triton.jit
def flat_kernel(packed, absmax, code, absmax_code, absmax_scale, absmax_offset, out, n_bytes,
                BLOCKSIZE: tl.constexpr, SCALE_BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    byte = tl.load(packed + offs, mask=mask, other=0)
    block = offs // (BLOCKSIZE // 2)
    scale = tl.load(absmax_code + tl.load(absmax + block, mask=mask, other=0).to(tl.int32))
    scale = scale * tl.load(absmax_scale + block // SCALE_BLOCKSIZE, mask=mask, other=0.0) + tl.load(absmax_offset)
    high = dequantize._bf16_bits(tl.load(code + (byte >> 4).to(tl.int32)) * scale)
    low = dequantize._bf16_bits(tl.load(code + (byte & 15).to(tl.int32)) * scale)
    tl.store(out + offs, high | (low << 16), mask=mask)


def flat(packed, qs, dst):
    n_bytes = dst.numel() // 2
    flat_kernel[(triton.cdiv(n_bytes, 2048),)](packed, qs.absmax, qs.code, qs.state2.code, qs.state2.absmax, qs.offset,
                                              dst.view(torch.int32), n_bytes, BLOCKSIZE=qs.blocksize,
                                              SCALE_BLOCKSIZE=qs.state2.blocksize, BLOCK=2048, enable_fp_fusion=False)
    return dst


def rows(packed, qs, dst, rows, warps):
    n_blocks = dst.numel() // qs.blocksize
    dequantize._dequantize_4bit_kernel[(triton.cdiv(n_blocks, rows),)](
        packed, qs.absmax, qs.code, qs.state2.code, qs.state2.absmax, qs.offset, dst.view(torch.int32), n_blocks,
        NESTED=True, HALF_BLOCK=qs.blocksize // 2, SCALE_BLOCKSIZE=qs.state2.blocksize, ROWS=rows, num_warps=warps,
        enable_fp_fusion=False)
    return dst


emit({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "bitsandbytes": bnb.__version__,
      "triton": triton.__version__})
torch.manual_seed(0)
for N, K in [(3072, 3072), (12288, 3072), (3072, 15360)]:
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ref = bnbf.dequantize_4bit(packed, qs).to(torch.bfloat16)
    dst = torch.empty_like(ref)
    variants = {"copy": lambda: dst.copy_(ref), "bnb": lambda: bnbf.dequantize_4bit(packed, qs),
                "flat": lambda: flat(packed, qs, dst), "fluxkit": lambda: dequantize.dequantize_4bit(packed, qs)}
    for n in (16, 32, 64, 128):
        for warps in (2, 4, 8):
            variants[f"rows{n}_w{warps}"] = lambda n=n, w=warps: rows(packed, qs, dst, n, w)
    row = {"N": N, "K": K}
    for name, fn in variants.items():
        if name != "copy":
            row[f"{name}_equal"] = bool(torch.equal(fn(), ref))
        t = graph_time(fn)
        row[f"{name}_us"] = round(t * 1e6, 2)
        row[f"{name}_TBps"] = round(N * K * (4 if name == "copy" else 2.5) / t / 1e12, 2)
    emit(row)

totals = {}
for M, K, N, count in SHAPES:
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ref = bnbf.dequantize_4bit(packed, qs).to(torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(lambda x: F.linear(x, dequantize.dequantize_4bit(packed, qs)), fullgraph=True)
    variants = {"bf16": lambda: F.linear(x, ref), "bnb": lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs),
                "fluxkit": lambda: F.linear(x, dequantize.dequantize_4bit(packed, qs)), "fluxkit_compiled": lambda: compiled(x)}
    expected = F.linear(x, ref)
    row = {"M": M, "K": K, "N": N, "count": count}
    for name, fn in variants.items():
        try:
            row[f"{name}_equal"] = bool(torch.equal(fn(), expected))
        except Exception as e:  # noqa: BLE001
            row[f"{name}_error"] = repr(e)[:400]
    for _ in range(2):  # interleaved twice; the second round's times are kept
        for name, fn in variants.items():
            if f"{name}_error" not in row:
                row[f"{name}_s"] = graph_time(fn)
    for name in variants:
        if f"{name}_s" in row:
            totals[name] = totals.get(name, 0.0) + row[f"{name}_s"] * count
    emit(row)
emit({"per_step_s": totals})
