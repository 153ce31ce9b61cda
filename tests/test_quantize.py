"""Pre-quantized checkpoints: quantize once, load without quantizing, the same images."""
import json

import pytest
import torch

from fluxkit import VortexInitializationError, load_flux_schnell
from fluxkit.quantize import save_quantized
from helpers import PROMPT, run_main


def test_the_folder_holds_serialized_4bit_weights(prequantized, tiny_dir):
    for component in ("transformer", "text_encoder_2"):
        config = json.loads((prequantized / component / "config.json").read_text())
        assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
        assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
        # quantized on a CPU (from float32), it records what it is for: the preset's compute dtype, as on a GPU
        assert config["quantization_config"]["bnb_4bit_compute_dtype"] == "bfloat16"
    size = sum(p.stat().st_size for p in (prequantized / "transformer").glob("*.safetensors"))
    original = sum(p.stat().st_size for p in (tiny_dir / "transformer").glob("*.safetensors"))
    assert size < original / 2  # 4-bit instead of bf16 (tiny: the unquantized norms weigh more than at full size)
    assert json.loads((prequantized / "fluxkit_synthetic.json").read_text())["prequantized"]["preset"] == "nf4"


@pytest.mark.parametrize("placement", ["resident", "vortex"])
def test_loading_it_gives_the_quantize_on_load_images(prequantized, tiny_dir, placement):
    fresh = load_flux_schnell(device="cpu", model=tiny_dir, placement=placement)
    if placement == "vortex":
        with pytest.raises(VortexInitializationError, match="T5 is pre-quantized but placement vortex streams"):
            load_flux_schnell(device="cpu", model=prequantized, placement=placement)
        return
    saved = load_flux_schnell(device="cpu", model=prequantized, placement=placement)
    assert torch.equal(saved.generate(PROMPT, seed=3), fresh.generate(PROMPT, seed=3))
    assert saved.weight_report()["transformer"]["bytes"] == fresh.weight_report()["transformer"]["bytes"]


def test_a_vortex_checkpoint_keeps_t5_unquantized_and_streams_modulation(tiny_dir, tmp_path):
    import dataclasses

    from test_plan import share_streaming_some_modulation

    from helpers import with_budgets

    folder = save_quantized(str(tiny_dir), tmp_path / "vortex", "nf4", "vortex", device="cpu")
    assert "quantization_config" not in json.loads((folder / "text_encoder_2" / "config.json").read_text())
    preset = load_flux_schnell.__globals__["load_preset"]("nf4")
    small = with_budgets(preset, vortex_total_gb=5.8 + share_streaming_some_modulation(tiny_dir, preset),
                         rest_of_vortex_gb=5.8)
    saved = load_flux_schnell(device="cpu", quantization=small, model=folder, placement="vortex")
    fresh = load_flux_schnell(device="cpu", quantization=small, model=tiny_dir, placement="vortex")
    assert saved.modulation.parked == fresh.modulation.parked and saved.modulation.parked
    assert torch.equal(saved.generate(PROMPT, seed=5), fresh.generate(PROMPT, seed=5))
    assert dataclasses.asdict(saved.plan) == dataclasses.asdict(fresh.plan)


def test_a_mismatched_preset_is_refused_before_loading(prequantized):
    with pytest.raises(VortexInitializationError, match="quantization_config.bnb_4bit_quant_type='nf4' but preset fp4 "
                                                        "asks for 'fp4'") as info:
        load_flux_schnell(device="cpu", model=prequantized, quantization="fp4")
    assert isinstance(info.value, ValueError)
    with pytest.raises(VortexInitializationError, match="preset bf16 keeps it unquantized"):
        load_flux_schnell(device="cpu", model=prequantized, quantization="bf16")


def test_quantize_cli(tiny_dir, tmp_path):
    code, _, err = run_main("quantize", "--model", str(tiny_dir), "--device", "cpu", "--out", str(tmp_path / "q"))
    assert code == 0, err
    assert (tmp_path / "q" / "transformer" / "config.json").is_file()
    for args, expected in (([str(tiny_dir), "--device", "cpu", "--out", str(tmp_path / "q")], "not empty"),
                           ([str(tmp_path / "q"), "--device", "cpu", "--out", str(tmp_path / "q2")],
                            "already pre-quantized"),
                           ([str(tiny_dir), "--quantization", "int8", "--out", str(tmp_path / "q3")],
                            "only bitsandbytes 4-bit")):
        code, _, err = run_main("quantize", "--model", *args)
        assert code == 2 and expected in err, err
