"""Probe (run 24): can the NF4 dequantization hide behind the GEMMs? The 4-bit linears of one FLUX transformer step
(19 double-stream and 38 single-stream blocks, each linear its own weight, in block order), each variant replayed
from one CUDA graph per step, as fluxkit's resident path runs them:
  bf16      F.linear with bf16 weights (the bf16 preset's kernels)
  bnb       bitsandbytes.matmul_4bit, as Linear4bit calls it (fluxkit's NF4 path today)
  serial    bitsandbytes.functional.dequantize_4bit into a preallocated bf16 slot, then F.linear, one stream
  prefetch  the same, but the next block's weights are dequantized on a side stream while this block's GEMMs run:
            two slot sets per block kind, events order the streams (all of it captured in the graph)
The AdaLN modulation linears (one row each, bitsandbytes' fused gemv) are left out: they stay as they are.
Writes JSON lines to $OUT/probe_nf4_prefetch.jsonl.
"""
import json
import os
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F

DOUBLE = [(1024, 3072, 3072)] * 4 + [(1024, 3072, 12288), (1024, 12288, 3072)] + \
         [(256, 3072, 3072)] * 4 + [(256, 3072, 12288), (256, 12288, 3072)]
SINGLE = [(1280, 3072, 3072)] * 3 + [(1280, 3072, 12288), (1280, 15360, 3072)]
KINDS = ["double"] * 19 + ["single"] * 38
LAYOUT = {"double": DOUBLE, "single": SINGLE}
REPLAYS, ROUNDS = 10, 4


class Step:
    def __init__(self) -> None:
        torch.manual_seed(0)
        self.blocks = []  # per block: list of (bf16 weight, packed, quant_state)
        for kind in KINDS:
            layers = []
            for M, K, N in LAYOUT[kind]:
                w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
                packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                layers.append((w, packed, qs))
            self.blocks.append(layers)
        self.x = {(M, K): torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                  for kind in LAYOUT for M, K, N in LAYOUT[kind]}
        # slot sets: (kind, parity) -> one bf16 tensor per linear of that kind
        self.slots = {(kind, p): [torch.empty(N, K, device="cuda", dtype=torch.bfloat16) for M, K, N in LAYOUT[kind]]
                      for kind in LAYOUT for p in (0, 1)}
        self.slot_of = []
        seen = {"double": 0, "single": 0}
        for kind in KINDS:
            self.slot_of.append((kind, seen[kind] % 2))
            seen[kind] += 1
        self.side = torch.cuda.Stream()
        self.deq_done = [torch.cuda.Event() for _ in KINDS]
        self.block_start = [torch.cuda.Event() for _ in KINDS]

    def bf16(self):
        return [[F.linear(self.x[M, K], w) for (M, K, N), (w, _, _) in zip(LAYOUT[kind], layers)]
                for kind, layers in zip(KINDS, self.blocks)][-1]

    def bnb(self):
        return [[bnb.matmul_4bit(self.x[M, K], p.t(), quant_state=qs) for (M, K, N), (_, p, qs) in zip(LAYOUT[kind], layers)]
                for kind, layers in zip(KINDS, self.blocks)][-1]

    def _dequantize(self, k):
        for slot, (_, p, qs) in zip(self.slots[self.slot_of[k]], self.blocks[k]):
            bnbf.dequantize_4bit(p, qs, out=slot)

    def _block(self, k):
        kind = KINDS[k]
        return [F.linear(self.x[M, K], slot) for (M, K, N), slot in zip(LAYOUT[kind], self.slots[self.slot_of[k]])]

    def serial(self):
        out = None
        for k in range(len(KINDS)):
            self._dequantize(k)
            out = self._block(k)
        return out

    def prefetch(self):
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            self._dequantize(0)
            self.deq_done[0].record()
        out = None
        for k in range(len(KINDS)):
            main.wait_event(self.deq_done[k])
            if k + 1 < len(KINDS):
                self.block_start[k].record(main)  # blocks before k are done: their slot set may be overwritten
                self.side.wait_event(self.block_start[k])
                with torch.cuda.stream(self.side):
                    self._dequantize(k + 1)
                    self.deq_done[k + 1].record()
            out = self._block(k)
        return out


def capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def replay_time(g) -> float:
    times = []
    for _ in range(REPLAYS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    out = open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_nf4_prefetch.jsonl"), "w")
    print(torch.__version__, bnb.__version__, torch.cuda.get_device_name(), flush=True)
    step = Step()
    slot_bytes = sum(t.numel() * 2 for ts in step.slots.values() for t in ts)
    names = ["bf16", "bnb", "serial", "prefetch"]
    graphs, outs = {}, {}
    for name in names:
        graphs[name], outs[name] = capture(getattr(step, name))
    for g in graphs.values():
        g.replay()
    torch.cuda.synchronize()
    ref = [o.float() for o in outs["bf16"]]
    agree = {name: {"equal_to_serial": all(torch.equal(a, b) for a, b in zip(outs[name], outs["serial"])),
                    "rel_err_to_bf16": max(float((o.float() - r).norm() / r.norm()) for o, r in zip(outs[name], ref))}
             for name in names}
    times = {name: [] for name in names}
    for _ in range(ROUNDS):  # interleaved: drift hits every variant alike
        for name in names:
            times[name].append(replay_time(graphs[name]))
    row = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "bitsandbytes": bnb.__version__,
           "per_step_s": {n: sorted(t)[len(t) // 2] for n, t in times.items()}, "rounds_s": times,
           "agreement": agree, "slot_gb": slot_bytes / 1e9,
           "max_allocated_gb": torch.cuda.max_memory_allocated() / 1e9}
    row["to_bf16"] = {n: row["per_step_s"][n] / row["per_step_s"]["bf16"] for n in names}
    print(json.dumps(row, indent=1), flush=True)
    out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
