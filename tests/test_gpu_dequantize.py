"""GPU: fluxkit's 4-bit dequantization kernel compiled by Triton. Its layers give what bitsandbytes' own dequantize-
then-F.linear gives, bit for bit: eager, under torch.compile and replayed from a CUDA graph; the 4-bit presets run it."""
import dataclasses

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

from fluxkit import load_flux_schnell
from fluxkit.config import load_preset
from fluxkit.dequantize import MIN_TOKENS, Linear4bit, use_fluxkit_dequantize
from fluxkit.lab.metrics import psnr
from helpers import PROMPT

pytestmark = pytest.mark.gpu


def _layers(out_features: int, in_features: int, quant_type: str, nested: bool):
    """bitsandbytes' layer and a fluxkit copy of it, the same 4-bit weight."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(in_features, out_features, dtype=torch.bfloat16)
    theirs, ours = (bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.bfloat16, quant_type=quant_type,
                                      compress_statistics=nested) for _ in range(2))
    theirs.load_state_dict(plain.state_dict())
    theirs.cuda()  # quantizes
    ours.weight, ours.bias = theirs.weight, theirs.bias
    use_fluxkit_dequantize(ours)
    return theirs, ours


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("out_features,in_features,tokens", [(3072, 3072, 1280), (12288, 3072, 256),
                                                             (3072, 15360, MIN_TOKENS), (3072, 3072, 2)])
def test_a_layer_gives_bitsandbytes_dequantize_then_linear(quant_type, nested, out_features, in_features, tokens):
    theirs, ours = _layers(out_features, in_features, quant_type, nested)
    assert type(ours) is Linear4bit
    torch.compiler.reset()  # each case compiles the same forward anew: the cases together pass dynamo's recompile limit
    x = torch.randn(1, tokens, in_features, device="cuda", dtype=torch.bfloat16)
    weight = bnbf.dequantize_4bit(theirs.weight, theirs.weight.quant_state).to(torch.bfloat16)
    bias = theirs.bias.to(torch.bfloat16)  # bitsandbytes keeps it in float32 and casts it at each call
    # fewer tokens than MIN_TOKENS: bitsandbytes' own kernel, reading the 4-bit weight
    expected = torch.nn.functional.linear(x, weight, bias) if tokens >= MIN_TOKENS else theirs(x)
    assert torch.equal(ours(x), expected)
    assert torch.equal(torch.compile(ours, fullgraph=True)(x), expected)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ours(x)  # as fluxkit's GraphedCall: a run on a side stream before the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ours(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    expected = torch.nn.functional.linear(x, weight, bias) if tokens >= MIN_TOKENS else theirs(x)
    assert torch.equal(captured, expected)


def test_the_4bit_presets_run_it(tiny_dir):
    """Every 4-bit layer of a loaded model is fluxkit's; its images stay within the fast path's 35 dB of
    bitsandbytes' kernels (the text products of few tokens move from bitsandbytes' fused kernel to cuBLAS)."""
    preset = load_preset("nf4")
    images = {}
    for kernel in ("fluxkit", "bitsandbytes"):
        model = load_flux_schnell(device="cuda", quantization=dataclasses.replace(preset, dequantize_kernel=kernel),
                                  model=tiny_dir)
        layers = [m for m in model.pipe.transformer.modules() if isinstance(m, bnb.nn.Linear4bit)]
        layers += [m for m in model.pipe.text_encoder_2.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and all((type(m) is Linear4bit) == (kernel == "fluxkit") for m in layers)
        images[kernel] = model.generate(PROMPT, seed=0)
        del model
    assert psnr(images["fluxkit"], images["bitsandbytes"]) >= 35
