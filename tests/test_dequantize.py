"""fluxkit's 4-bit dequantization kernel decodes what bitsandbytes decodes, bit for bit (run here by Triton's
interpreter; tests/test_gpu_dequantize.py runs it compiled on a GPU)."""
import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

InterpretedFunction = pytest.importorskip("triton.runtime.interpreter").InterpretedFunction  # torch without Triton

from fluxkit import dequantize  # noqa: E402 (Triton's kernels)


@pytest.fixture
def interpreted(monkeypatch):
    """The kernel's own source, run on the CPU by Triton's interpreter (rounding to bf16 by hand, as the interpreter
    cannot round; tests/test_gpu_dequantize.py holds the GPU's own conversion to bitsandbytes' values)."""
    for name in ("_dequantize_4bit_kernel", "_bf16_by_hand"):
        monkeypatch.setattr(dequantize, name, InterpretedFunction(getattr(dequantize, name).fn))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape,blocksize", [
    ((96, 704), 64),  # 1056 blocks: the last program and the last nested-scale block are partial
    ((3, 64), 64),  # fewer blocks than one program, and than one nested-scale block
    ((40, 512), 256),  # another block size
])
def test_kernel_decodes_as_bitsandbytes(interpreted, quant_type, nested, shape, blocksize):
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=torch.bfloat16) * 0.02
    weight[0, :7] = torch.tensor([0.0, 1e-8, -3.0, 0.5, -0.5, 2.0**-130, 7.0])  # zeros, extremes, a subnormal
    packed, state = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    expected = bnbf.dequantize_4bit(packed, state).to(torch.bfloat16)
    decoded = dequantize.dequantize_4bit(packed, state)
    assert decoded.dtype == torch.bfloat16 and decoded.shape == shape
    assert torch.equal(decoded, expected)


def test_rounding_is_to_nearest_even(interpreted):
    """Scales picked so that products land between two bf16 values: truncating would differ from torch's cast."""
    torch.manual_seed(1)
    weight = torch.randn(64, 256, dtype=torch.float32) * (1 + 2.0**-9)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    state.absmax.add_(2.0**-20)  # fp32 scales with bits below bf16's mantissa
    expected = bnbf.dequantize_4bit(packed, state).float()
    assert torch.equal(dequantize.dequantize_4bit(packed, state), expected.to(torch.bfloat16))
    truncated = (expected.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    assert not torch.equal(truncated, expected.to(torch.bfloat16))  # the case above does test the rounding


def test_a_layer_off_the_gpu_keeps_bitsandbytes():
    torch.manual_seed(0)
    plain = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
    plain.weight = bnb.nn.Params4bit(torch.randn(64, 128, dtype=torch.bfloat16), requires_grad=False,
                                     quant_type="nf4", module=plain).to("cpu")  # quantizes, as fluxkit's CPU loads do
    x = torch.randn(2, 20, 128, dtype=torch.bfloat16)
    expected = plain(x)
    assert dequantize.use_fluxkit_dequantize(torch.nn.Sequential(plain)) == 1
    assert type(plain) is dequantize.Linear4bit and isinstance(plain, bnb.nn.Linear4bit)
    assert torch.equal(plain(x), expected)  # on the CPU: bitsandbytes' kernels, the Triton kernel never launched
    assert dequantize.use_fluxkit_dequantize(torch.nn.Sequential(plain)) == 0  # converted once
