"""Probe (run 23): the 4-bit linears of one FLUX transformer step, timed per shape on the GPU at hand.

Variants, each replayed from a CUDA graph of REPS calls (as fluxkit's resident path runs them):
  bf16        F.linear with the dequantized weight in bf16 (the bf16 preset's kernel)
  bnb         bitsandbytes.matmul_4bit (its dispatch: fused gemm_4bit below its M threshold, else dequantize + F.linear)
  torch       a dequantization written in torch ops + F.linear, under torch.compile (Inductor fuses the dequantization)
  autotune    the same under mode="max-autotune-no-cudagraphs": Triton matmul templates, with the dequantization fused
              into the template's loads where Inductor measures that faster (prologue fusion)
Writes JSON lines to $OUT/probe_nf4_matmul.jsonl and prints a table weighted by each shape's count per step.
"""
import json
import os
import sys
import time

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F

REPS = 20
torch._dynamo.config.cache_size_limit = 64  # 9 shapes per compiled lambda
# (tokens M, in K, out N, linears of this shape per transformer step): 19 double-stream blocks (1024 image and 256 text
# tokens, q/k/v/out and the feed-forward of each stream), 38 single-stream blocks (1280 tokens, q/k/v, mlp in, out)
SHAPES = [(1024, 3072, 3072, 4 * 19), (256, 3072, 3072, 4 * 19), (1024, 3072, 12288, 19), (1024, 12288, 3072, 19),
          (256, 3072, 12288, 19), (256, 12288, 3072, 19), (1280, 3072, 3072, 3 * 38), (1280, 3072, 12288, 38),
          (1280, 15360, 3072, 38)]


def dequantize_nf4(packed, absmax8, code2, absmax2, offset, code, shape, blocksize):
    absmax = (code2[absmax8.int()].view(-1, 256) * absmax2.view(-1, 1)).view(-1) + offset
    idx = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0xF], -1).view(-1)
    return (code[idx.int()].view(-1, blocksize) * absmax.view(-1, 1)).view(shape).to(torch.bfloat16)


def graph_time(fn, x) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPS):
            fn(x)
    times = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / REPS / 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    out = open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_nf4_matmul.jsonl"), "w")
    torch.manual_seed(0)
    totals = {}
    print(torch.__version__, bnb.__version__, torch.cuda.get_device_name(), flush=True)
    for M, K, N, count in SHAPES:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        ref = bnbf.dequantize_4bit(packed, qs).to(torch.bfloat16)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        args = (packed, qs.absmax, qs.state2.code, qs.state2.absmax, qs.offset, qs.code, qs.shape, qs.blocksize)
        mine = dequantize_nf4(*args)
        row = {"M": M, "K": K, "N": N, "count": count,
               "dequant_equal": bool(torch.equal(mine, ref)),
               "dequant_max_diff": float((mine.float() - ref.float()).abs().max())}
        torch_fn = torch.compile(lambda x: F.linear(x, dequantize_nf4(*args)), fullgraph=True)
        tuned_fn = torch.compile(lambda x: F.linear(x, dequantize_nf4(*args)), fullgraph=True,
                                 mode="max-autotune-no-cudagraphs")
        variants = {"bf16": lambda x: F.linear(x, ref), "bnb": lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=qs),
                    "torch": torch_fn, "autotune": tuned_fn}
        expected = F.linear(x, ref).float()
        for name, fn in variants.items():
            start = time.perf_counter()
            y = fn(x)
            torch.cuda.synchronize()
            row[f"{name}_first_call_s"] = round(time.perf_counter() - start, 2)
            row[f"{name}_rel_err"] = float((y.float() - expected).norm() / expected.norm())
        for rnd in range(2):  # interleaved twice; the second round's times are kept
            for name, fn in variants.items():
                row[f"{name}_s"] = graph_time(fn, x)
        for name in variants:
            totals[name] = totals.get(name, 0.0) + row[f"{name}_s"] * count
        print(json.dumps(row), flush=True)
        out.write(json.dumps(row) + "\n")
    summary = {"per_step_s": totals, "per_call_4_steps_s": {k: 4 * v for k, v in totals.items()},
               "device": torch.cuda.get_device_name(), "torch": torch.__version__, "bitsandbytes": bnb.__version__}
    print(json.dumps(summary), flush=True)
    out.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    sys.exit(main())
