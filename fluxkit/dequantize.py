"""bitsandbytes' 4-bit weights dequantized at ~1.8-2x its own speed, for the products of many tokens.

Above a few hundred tokens bitsandbytes computes a 4-bit linear by dequantizing the weight to bf16 and calling
cuBLAS (its own Hopper calibration; FLUX's products are compute-bound at 1024-1280 tokens). Its dequantization moves
1.5-2.0 TB/s on an H200 where a copy moves 4-5.5, and that is most of NF4's gap to bf16. This kernel decodes
the same values bit for bit, nested scales included, in one pass: 3.1-3.6 TB/s on the same card, which took
resident NF4 from 1.29x to 1.14x bf16's call (H200, full-size synthetic checkpoint). Products of a few tokens stay
with bitsandbytes, whose kernels read the 4-bit weight directly.
"""
from __future__ import annotations

import bitsandbytes as bnb
import torch
import triton
import triton.language as tl

# Quantization blocks per program and its warps: 2048 bytes of packed weights at bitsandbytes' default block size of
# 64, 32 bytes per thread (the fastest of 512-8192 bytes and 1-16 warps on an H200).
BLOCKS_PER_PROGRAM = 64
WARPS = 2
# Products of fewer tokens than this keep bitsandbytes' kernels (FLUX's modulation layers act on one vector).
MIN_TOKENS = 16


@triton.jit
def _bf16_by_hand(x):
    """fp32 to bf16 rounded to nearest even, in integer arithmetic: Triton's interpreter, which runs the kernel in the
    CPU tests, truncates in `.to(tl.bfloat16)` where a GPU rounds as torch does."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _dequantize_4bit_kernel(packed, absmax, code, absmax_code, absmax_scale, absmax_offset, out, n_blocks,
                            NESTED: tl.constexpr, HALF_BLOCK: tl.constexpr, SCALE_BLOCKSIZE: tl.constexpr,
                            ROWS: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # one row per quantization block: one scale each
    mask = rows < n_blocks
    if NESTED:  # as bitsandbytes: the 8-bit scale decoded and scaled, then the offset added, each rounded to fp32
        scale = tl.load(absmax_code + tl.load(absmax + rows, mask=mask, other=0).to(tl.int32))
        scale = scale * tl.load(absmax_scale + rows // SCALE_BLOCKSIZE, mask=mask, other=0.0)
        scale = scale + tl.load(absmax_offset)
    else:
        scale = tl.load(absmax + rows, mask=mask, other=0.0)
    byte = tl.load(packed + rows[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :], mask=mask[:, None], other=0)
    high = tl.load(code + (byte >> 4).to(tl.int32)) * scale[:, None]  # the first weight of the byte
    low = tl.load(code + (byte & 15).to(tl.int32)) * scale[:, None]
    if ROUND_BY_HAND:
        high, low = _bf16_by_hand(high), _bf16_by_hand(low)
    else:  # the card's own conversion, 5-10% faster than by hand (H200)
        high, low = high.to(tl.bfloat16), low.to(tl.bfloat16)
    weights = tl.reshape(tl.join(high, low), (ROWS, 2 * HALF_BLOCK))  # interleaved: high, low, high, low...
    tl.store(out + rows[:, None] * (2 * HALF_BLOCK) + tl.arange(0, 2 * HALF_BLOCK)[None, :], weights,
             mask=mask[:, None])


@torch.library.custom_op("fluxkit::dequantize_4bit", mutates_args=())
def _dequantize_4bit_op(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                        absmax_code: torch.Tensor | None, absmax_scale: torch.Tensor | None,
                        absmax_offset: torch.Tensor | None, shape: list[int], blocksize: int,
                        scale_blocksize: int) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.bfloat16, device=packed.device)
    n_blocks = out.numel() // blocksize
    nested = absmax_code is not None
    _dequantize_4bit_kernel[(triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)](
        packed, absmax, code, absmax_code if nested else code, absmax_scale if nested else absmax,
        absmax_offset if nested else absmax, out, n_blocks, NESTED=nested, HALF_BLOCK=blocksize // 2,
        SCALE_BLOCKSIZE=scale_blocksize, ROWS=BLOCKS_PER_PROGRAM, ROUND_BY_HAND=not packed.is_cuda, num_warps=WARPS,
        enable_fp_fusion=False)  # a fused multiply-add would round the nested scale once where bitsandbytes rounds twice
    return out


@_dequantize_4bit_op.register_fake
def _(packed, absmax, code, absmax_code, absmax_scale, absmax_offset, shape, blocksize, scale_blocksize):
    return packed.new_empty(shape, dtype=torch.bfloat16)


def dequantize_4bit(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """The bf16 weight of a bitsandbytes 4-bit weight (NF4 or FP4): equal to `bitsandbytes.functional.dequantize_4bit`'s."""
    if not quant_state.nested:
        return _dequantize_4bit_op(packed, quant_state.absmax, quant_state.code, None, None, None,
                                   list(quant_state.shape), quant_state.blocksize, 1)
    state2 = quant_state.state2
    return _dequantize_4bit_op(packed, quant_state.absmax, quant_state.code, state2.code, state2.absmax,
                               quant_state.offset, list(quant_state.shape), quant_state.blocksize, state2.blocksize)


class Linear4bit(bnb.nn.Linear4bit):
    """A bitsandbytes 4-bit linear whose products of MIN_TOKENS or more dequantize with fluxkit's kernel, where it
    decodes the weight: bf16 on a GPU, packed in bytes, 2-D, whole quantization blocks of a power-of-two size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.weight.quant_state
        if (x.dtype != torch.bfloat16 or x.device.type != "cuda" or x.numel() < MIN_TOKENS * x.shape[-1]
                or self.compute_dtype != torch.bfloat16 or self.weight.dtype != torch.uint8 or len(state.shape) != 2
                or state.blocksize & (state.blocksize - 1) or state.shape.numel() % state.blocksize):
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)  # as bitsandbytes: in the compute dtype
        return torch.nn.functional.linear(x, dequantize_4bit(self.weight, state), bias)


def use_fluxkit_dequantize(*modules: torch.nn.Module) -> int:
    """Turns the bitsandbytes 4-bit linears of `modules` into fluxkit's `Linear4bit`; returns how many."""
    layers = [m for module in modules for m in module.modules() if type(m) is bnb.nn.Linear4bit]
    for layer in layers:
        layer.__class__ = Linear4bit
    return len(layers)
