"""The planner: byte counts equal to what loading measures (tiny) and to hand arithmetic (full size)."""
import pytest
import torch

from fluxkit import load_flux_schnell, load_placement, load_preset
from fluxkit.checkpoint import meta_components
from fluxkit.memory import module_weight_bytes
from fluxkit.plan import is_modulation, plan_placement, recommend
from fluxkit.synthetic import meta_model
from helpers import t5_unquantized, with_budgets

D, HEAD = 3072, 128  # FLUX.1-schnell: 24 heads x 128, 19 double and 38 single blocks


def quantized_linear_tensors(numel: int, out_features: int, spec) -> list[int]:
    return spec.quantizer.linear_bytes(numel, out_features, spec)


def _linear(n_in, n_out):
    return n_in * n_out + n_out


def test_transformer_parameters_by_hand():
    double = (2 * _linear(D, 6 * D) + 8 * _linear(D, D) + 4 * HEAD + 2 * (_linear(D, 4 * D) + _linear(4 * D, D)))
    single = _linear(D, 3 * D) + _linear(D, 4 * D) + 3 * _linear(D, D) + 2 * HEAD + _linear(5 * D, D)
    top = (_linear(64, D) + _linear(4096, D) + _linear(256, D) + _linear(D, D) + _linear(768, D) + _linear(D, D)
           + _linear(D, 2 * D) + _linear(D, 64))
    params = 19 * double + 38 * single + top
    bf16 = plan_placement(meta_model("full"), load_preset("bf16"), load_placement("resident"))
    assert bf16.components["transformer"].weight_bytes == 2 * params == 23_782_357_120
    modulation = 19 * 2 * _linear(D, 6 * D) + 38 * _linear(D, 3 * D) + _linear(D, 2 * D)
    transformer = meta_model("full")["transformer"]
    counted = sum(m.weight.numel() + m.bias.numel() for n, m in transformer.named_modules() if is_modulation(n))
    assert counted == modulation == 3_247_448_064  # 27% of the transformer, applied to one vector per step


def test_nf4_double_quant_bytes_of_one_layer():
    # a 3072 x 18432 modulation weight, as bitsandbytes 0.50 stores it (measured on CPU while writing this test)
    spec = load_preset("nf4").quantization
    assert sum(quantized_linear_tensors(3072 * 18432, 18432, spec)) == 29_211_204
    assert sum(quantized_linear_tensors(3072 * 18432, 18432, load_preset("int8").quantization)) == 3072 * 18432 + 18432 * 4


def test_small_layer_bytes_match_bitsandbytes():
    import bitsandbytes as bnb

    for name in ("nf4", "fp4", "int8"):
        spec = load_preset(name).quantization
        weight = torch.randn(192, 128)
        if spec.backend == "bitsandbytes_8bit":
            param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
        else:
            param = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=spec.quant_type,
                                      compress_statistics=spec.double_quant).to("cpu")
        from fluxkit.memory import tensor_bytes

        assert tensor_bytes(param) == sum(quantized_linear_tensors(weight.numel(), 192, spec)), name


def test_torchao_layer_bytes_by_hand():
    from torchao.quantization import quantize_

    from fluxkit.memory import tensor_bytes
    from fluxkit.quantizers.torchao import torchao_config

    by_hand = {"torchao-int8wo": 192 * 128 + 192 * 4 + 192,  # int8 data, float32 row scales, int8 zero points
               "torchao-fp8wo": 192 * 128 + 192 * 4}  # float8 data, float32 row scales
    for name, expected in by_hand.items():
        spec = load_preset(name).quantization
        layer = torch.nn.Sequential(torch.nn.Linear(128, 192))
        quantize_(layer, torchao_config(spec.quant_type))
        assert tensor_bytes(layer[0].weight) == sum(quantized_linear_tensors(192 * 128, 192, spec)) == expected, name


def test_gguf_layer_bytes_by_hand():
    import gguf
    import numpy as np

    weight = np.random.default_rng(0).standard_normal((192, 128), dtype=np.float32)
    by_hand = {"gguf-q8_0": 192 * 4 * (2 + 32),  # per block of 32 weights: a float16 scale, 32 int8 values
               "gguf-q4_0": 192 * 4 * (2 + 16)}  # a float16 scale, 32 4-bit values
    for name, expected in by_hand.items():
        spec = load_preset(name).quantization
        blocks = gguf.quants.quantize(weight, getattr(gguf.GGMLQuantizationType, spec.quant_type.upper()))
        assert blocks.nbytes == sum(quantized_linear_tensors(weight.size, 192, spec)) == expected, name


@pytest.mark.parametrize("preset", ["torchao-int8wo", "torchao-fp8wo", "fp8-layerwise", "gguf-q8_0", "gguf-q4_0"])
def test_post_load_quantization_plans_equal_the_loaded_tiny_checkpoint(tiny_dir, preset):
    model = load_flux_schnell(device="cpu", quantization=preset, model=tiny_dir)
    measured = {name: module_weight_bytes(module) for name, module in model.components.items()}
    assert {name: c.weight_bytes for name, c in model.plan.components.items()} == measured
    bf16 = load_flux_schnell(device="cpu", quantization="bf16", model=tiny_dir)
    assert measured["transformer"] < module_weight_bytes(bf16.components["transformer"])


@pytest.mark.parametrize("placement", ["resident", "vortex", "offload"])
def test_plan_equals_the_loaded_tiny_checkpoint(tiny_dir, placement):
    model = load_flux_schnell(device="cpu", quantization="nf4", model=tiny_dir, placement=placement)
    measured = {name: module_weight_bytes(module) for name, module in model.components.items()}
    planned = model.plan.components
    for name in measured:
        assert planned[name].weight_bytes == measured[name], name


def share_streaming_some_modulation(tiny_dir, preset, dtype_bytes: int = 4) -> float:
    """A GPU share (GB) so small that the tiny checkpoint keeps some of its 4 modulation layers, not all
    (dtype_bytes: 4 on CPU, where fluxkit computes in float32; 2 on a GPU in bf16)."""
    meta, vortex = meta_components(tiny_dir), load_placement("vortex")
    budget = plan_placement(meta, preset, vortex, dtype_bytes, budget_bytes=0).peak_bytes
    budget += int(vortex.fill_headroom_gb * 1e9)
    while len(plan_placement(meta, preset, vortex, dtype_bytes, budget_bytes=budget).streamed_modulation) == 4:
        budget += 512
    return budget / 1e9


def test_streamed_modulation_is_counted_in_host_memory(tiny_dir):
    preset = load_preset("nf4")
    preset = with_budgets(preset, vortex_total_gb=5.8 + share_streaming_some_modulation(tiny_dir, preset),
                          rest_of_vortex_gb=5.8)
    model = load_flux_schnell(device="cpu", quantization=preset, model=tiny_dir, placement="vortex")
    plan = model.plan
    assert 0 < len(plan.streamed_modulation) < 4  # a share this small keeps some modulation layers, not all
    parked = [model.modulation.sources[n] for n in plan.streamed_modulation]
    parked_bytes = sum(p.weight.numel() * p.weight.element_size() + p.bias.numel() * p.bias.element_size()
                       + sum(t.numel() * t.element_size() for t in (p.quant_state.absmax, p.quant_state.code,
                                                                    p.quant_state.offset, p.quant_state.state2.absmax,
                                                                    p.quant_state.state2.code)) for p in parked)
    transformer = plan.components["transformer"]
    assert transformer.host_bytes == parked_bytes
    assert transformer.weight_bytes == module_weight_bytes(model.pipe.transformer) + parked_bytes


def test_fill_keeps_modulation_resident_up_to_the_share():
    meta, preset, vortex = meta_model("full"), load_preset("nf4"), load_placement("vortex")
    plans = {share: plan_placement(meta, preset, vortex, budget_bytes=int(share * 1e9)) for share in (5.0, 6.0, 6.5, 8)}
    streamed = [len(plans[s].streamed_modulation) for s in (5.0, 6.0, 6.5, 8)]
    assert streamed == sorted(streamed, reverse=True) and streamed[-1] == 0 and streamed[0] > 0
    assert plans[6.0].fits and not plans[5.0].fits
    for share, plan in plans.items():
        if plan.fits:
            assert plan.peak_bytes <= share * 1e9 - vortex.fill_headroom_gb * 1e9
        else:  # even with every modulation layer streamed the rest does not fit: nothing more to stream
            assert len(plan.streamed_modulation) == 77
        names = [n for n, _ in meta["transformer"].named_modules() if is_modulation(n)]
        assert list(plan.streamed_modulation) == names[len(names) - len(plan.streamed_modulation):]  # a tail
    assert plans[6.0].components["text_encoder_2"].gpu_bytes == 0
    assert plans[6.0].components["text_encoder_2"].host_bytes == 2 * 4_762_310_656  # T5-XXL encoder in bf16


def test_full_size_placements_and_recommendation():
    meta = meta_model("full")
    plans = [plan_placement(meta, load_preset(q), load_placement(p)) for q in ("nf4", "bf16", "int8")
             for p in ("resident", "vortex", "offload")]
    by = {(p.preset, p.placement): p for p in plans}
    assert 10.6e9 < by["nf4", "resident"].resident_bytes < 10.8e9  # measured 10.02 GiB (10.76 GB) on an H200
    assert by["nf4", "offload"].resident_bytes == 0
    assert by["nf4", "vortex"].fits and not by["nf4", "resident"].fits and not by["bf16", "vortex"].fits
    assert recommend(plans) is by["nf4", "vortex"]
    assert recommend([by["bf16", "resident"]]) is None


def test_placements_differ_only_in_where_things_run(tiny_dir):
    meta = meta_components(tiny_dir)
    preset = t5_unquantized()
    weights = {p: {c: v.weight_bytes for c, v in plan_placement(meta, preset, load_placement(p), 4).components.items()}
               for p in ("resident", "vortex", "offload")}
    assert weights["resident"] == weights["vortex"] == weights["offload"]


def test_a_combination_the_loader_refuses_never_fits_nor_is_recommended():
    meta, vortex = meta_model("full"), load_placement("vortex")
    plan = plan_placement(meta, load_preset("gguf-q4_0"), vortex)
    assert plan.peak_bytes <= plan.budget_bytes  # small enough, and still not a fit: the loader refuses it
    assert not plan.fits and "GGUF" in plan.refused and plan.to_dict()["refused"] == plan.refused
    gguf_only = [plan_placement(meta, load_preset("gguf-q4_0"), load_placement(p)) for p in ("vortex", "resident")]
    assert recommend(gguf_only) is None
