"""Probe (run 27, call 3): variants of fluxkit.dequantize's kernel, for the speed left to a copy's.

  rowsR_wW         fluxkit's kernel at R blocks per program and W warps
  cvt_rowsR_wW     the same with the card's own fp32->bf16 conversion (cvt.rn) in place of the written-out rounding
  join_rowsR_wW    cvt, and the two weights of a byte interleaved by tl.join into a bf16 store
  stream_rowsR_wW  rowsR_wW with the packed weights loaded evict_first (read once)
Microseconds, TB/s (0.5 B read + 2 B written per weight), equal bit for bit to bitsandbytes'. Prints JSON lines.
"""
import json

import bitsandbytes.functional as bnbf
import torch
import triton
import triton.language as tl

from fluxkit import dequantize

REPS = 20


@triton.jit
def variant_kernel(packed, absmax, code, absmax_code, absmax_scale, absmax_offset, out, n_blocks,
                   HALF_BLOCK: tl.constexpr, SCALE_BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, MODE: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask = rows < n_blocks
    scale = tl.load(absmax_code + tl.load(absmax + rows, mask=mask, other=0).to(tl.int32))
    scale = scale * tl.load(absmax_scale + rows // SCALE_BLOCKSIZE, mask=mask, other=0.0)
    scale = scale + tl.load(absmax_offset)
    offs = rows[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]
    if MODE == 3:
        byte = tl.load(packed + offs, mask=mask[:, None], other=0, eviction_policy="evict_first")
    else:
        byte = tl.load(packed + offs, mask=mask[:, None], other=0)
    high = tl.load(code + (byte >> 4).to(tl.int32)) * scale[:, None]
    low = tl.load(code + (byte & 15).to(tl.int32)) * scale[:, None]
    if MODE == 0 or MODE == 3:
        tl.store(out + offs, dequantize._bf16_bits(high) | (dequantize._bf16_bits(low) << 16), mask=mask[:, None])
    elif MODE == 1:
        h = high.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
        lo = low.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
        tl.store(out + offs, h | (lo << 16), mask=mask[:, None])
    else:
        pair = tl.reshape(tl.join(high.to(tl.bfloat16), low.to(tl.bfloat16)), (ROWS, 2 * HALF_BLOCK))
        offs2 = rows[:, None] * (2 * HALF_BLOCK) + tl.arange(0, 2 * HALF_BLOCK)[None, :]
        tl.store(out.to(tl.pointer_type(tl.bfloat16)) + offs2, pair, mask=mask[:, None])


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


def launch(packed, qs, dst, rows, warps, mode):
    n_blocks = dst.numel() // qs.blocksize
    variant_kernel[(triton.cdiv(n_blocks, rows),)](
        packed, qs.absmax, qs.code, qs.state2.code, qs.state2.absmax, qs.offset, dst.view(torch.int32), n_blocks,
        HALF_BLOCK=qs.blocksize // 2, SCALE_BLOCKSIZE=qs.state2.blocksize, ROWS=rows, MODE=mode, num_warps=warps,
        enable_fp_fusion=False)
    return dst


torch.manual_seed(0)
for N, K in [(3072, 3072), (12288, 3072), (3072, 15360)]:
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ref = bnbf.dequantize_4bit(packed, qs).to(torch.bfloat16)
    dst = torch.empty_like(ref)
    variants = {"copy": lambda: dst.copy_(ref), "fluxkit": lambda: dequantize.dequantize_4bit(packed, qs)}
    for mode, prefix in enumerate(("", "cvt_", "join_", "stream_")):
        for rows, warps in ((32, 1), (64, 1), (64, 2), (128, 2), (128, 4), (256, 4), (256, 8)):
            variants[f"{prefix}rows{rows}_w{warps}"] = lambda r=rows, wp=warps, m=mode: launch(packed, qs, dst, r, wp, m)
    row = {"N": N, "K": K}
    for name, fn in variants.items():
        if name != "copy":
            try:
                row[f"{name}_equal"] = bool(torch.equal(fn(), ref))
            except Exception as e:  # noqa: BLE001
                row[f"{name}_error"] = repr(e)[:300]
                continue
        for _ in range(2):  # the second time is kept
            t = graph_time(fn)
        row[f"{name}_us"] = round(t * 1e6, 2)
        row[f"{name}_TBps"] = round(N * K * (4 if name == "copy" else 2.5) / t / 1e12, 2)
    print(json.dumps(row), flush=True)
