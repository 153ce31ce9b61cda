"""Run 23's probe kernel, kept with its results; not part of fluxkit: it lost. A matrix product that reads
bitsandbytes' NF4 weights (double quantization) and dequantizes them inside the GEMM.

bitsandbytes multiplies many tokens by a 4-bit weight in two steps on Hopper cards: it writes the whole weight out in
bf16, then runs cuBLAS on it (its fused `gemm_4bit` loses there above 512 tokens, by its own calibration). On an H200
that costs 36.3 ms of linears per transformer step against bf16's 22.3 (probe_nf4_matmul.jsonl). This kernel unpacks
each weight tile in registers, computing each value as bitsandbytes does (the NF4 code times the block's scale, in
float32, rounded to bf16), and feeds it to the tensor cores, so the bf16 weight never reaches memory. Measured
(probe_nf4_fused.jsonl): exact, but 121 ms per step, 3.4x bitsandbytes. Most likely (not profiled): the decode of each
4-bit value, a tree of 15 selects on the CUDA cores, runs again for every 64-256-token tile of the product and costs
more than the tensor cores' share of the work; no tuning of the tile sizes was tried.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

QUANT_BLOCK = 64  # weights per NF4 scale (bitsandbytes' default blocksize, fluxkit's presets)
NESTED_BLOCK = 256  # scales per 8-bit scale block under double quantization (the only size bitsandbytes' kernels take)


@triton.jit
def _nf4_value(q):
    # Copied from bitsandbytes.backends.triton.kernels_4bit.dequantize_nf4_tree: the NF4 code, as float32 literals
    cond0 = (q & 0b1000) == 0b1000
    cond1 = (q & 0b0100) == 0b0100
    cond2 = (q & 0b0010) == 0b0010
    cond3 = (q & 0b0001) == 0b0001
    branch_pos = tl.where(
        cond1,
        tl.where(cond2, tl.where(cond3, 1.0, 0.7229568362236023), tl.where(cond3, 0.5626170039176941, 0.44070982933044434)),
        tl.where(cond2, tl.where(cond3, 0.33791524171829224, 0.24611230194568634),
                 tl.where(cond3, 0.16093020141124725, 0.07958029955625534)),
    )
    branch_neg = tl.where(
        cond1,
        tl.where(cond2, tl.where(cond3, 0.0, -0.09105003625154495), tl.where(cond3, -0.18477343022823334, -0.28444138169288635)),
        tl.where(cond2, tl.where(cond3, -0.39491748809814453, -0.5250730514526367),
                 tl.where(cond3, -0.6961928009986877, -1.0)),
    )
    return tl.where(cond0, branch_pos, branch_neg)


def _configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in [(128, 128, 64, 3, 8), (128, 128, 128, 3, 8), (128, 256, 64, 3, 8),
                                     (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 256, 64, 3, 8),
                                     (128, 128, 64, 4, 4), (256, 128, 64, 3, 8)]]


@triton.autotune(configs=_configs(), key=["M", "N", "K"])
@triton.jit
def _nf4_matmul_kernel(x_ptr, packed_ptr, scale8_ptr, code2_ptr, scale2_ptr, offset_ptr, bias_ptr, out_ptr,
                       M, N, K, stride_xm, stride_om, HAS_BIAS: tl.constexpr, QUANT_BLOCK: tl.constexpr,
                       NESTED_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped ordering of the output tiles, as Triton's matmul tutorial: neighbouring programs share weight tiles in L2
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
    pid_n = (pid % (GROUP_M * tiles_n)) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk_half = tl.arange(0, BLOCK_K // 2)
    rk = tl.arange(0, BLOCK_K)
    offset = tl.load(offset_ptr)
    scales_per_row = K // QUANT_BLOCK
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(x_ptr + rm[:, None] * stride_xm + (k + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        packed = tl.load(packed_ptr + rn[:, None] * (K // 2) + (k // 2 + rk_half)[None, :], mask=rn[:, None] < N,
                         other=0)
        codes = tl.interleave(_nf4_value(packed >> 4), _nf4_value(packed & 0xF))  # (BLOCK_N, BLOCK_K) float32
        # the blocks' scales, dequantized from 8 bits as bitsandbytes does: code2[scale8] * scale2 + offset
        block = rn[:, None] * scales_per_row + (k // QUANT_BLOCK + tl.arange(0, BLOCK_K // QUANT_BLOCK))[None, :]
        scale8 = tl.load(scale8_ptr + block, mask=rn[:, None] < N, other=0)
        scale = tl.load(code2_ptr + scale8.to(tl.int32)) * tl.load(scale2_ptr + block // NESTED_BLOCK) + offset
        w = tl.reshape(codes, (BLOCK_N, BLOCK_K // QUANT_BLOCK, QUANT_BLOCK)) * scale[:, :, None]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(tl.bfloat16)
        acc = tl.dot(a, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(tl.bfloat16),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, quant_state, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) for a bitsandbytes NF4 weight W with double quantization; x in bf16, any leading shape."""
    N, K = quant_state.shape
    x2 = x.reshape(-1, K).contiguous()
    out = torch.empty((x2.shape[0], N), dtype=torch.bfloat16, device=x.device)
    state2 = quant_state.state2

    def grid(meta):
        return (triton.cdiv(x2.shape[0], meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _nf4_matmul_kernel[grid](x2, packed, quant_state.absmax, state2.code, state2.absmax, quant_state.offset,
                             bias if bias is not None else out, out, x2.shape[0], N, K, x2.stride(0), out.stride(0),
                             HAS_BIAS=bias is not None, QUANT_BLOCK=QUANT_BLOCK, NESTED_BLOCK=NESTED_BLOCK)
    return out.reshape(*x.shape[:-1], N)
