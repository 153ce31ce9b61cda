import pytest

from fluxkit.config import available_presets, load_preset


def test_every_preset_validates():
    assert set(available_presets()) == {"bf16", "fp4", "int8", "nf4"}
    for name in available_presets():
        preset = load_preset(name)
        assert preset.name == name
        assert preset.generation.num_inference_steps == 4
        assert preset.generation.guidance_scale == 0.0
        assert preset.generation.max_sequence_length == 256


def test_nf4_preset_is_the_seed_setting():
    q = load_preset("nf4").quantization
    assert (q.backend, q.quant_type, q.compute_dtype, q.double_quant) == ("bitsandbytes_4bit", "nf4", "bfloat16", False)
    assert q.components == ("transformer", "text_encoder_2")


def test_unknown_key_is_an_error(tmp_path):
    text = (load_preset.__globals__["CONFIG_DIR"] / "flux_schnell_nf4.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("double_quant: false", "double_quant: false\n  double_quantt: true"))
    with pytest.raises(ValueError, match="unknown key.*double_quantt"):
        load_preset(bad)


@pytest.mark.parametrize("old,new,match", [
    ("quant_type: nf4", "quant_type: nf5", "quant_type"),
    ("height: 512", "height: 500", "multiple of 16"),
    ("num_inference_steps: 4", "num_inference_steps: 0", "1..50"),
    ("components: [transformer, text_encoder_2]", "components: [unet]", "components"),
])
def test_bad_values_name_the_field(tmp_path, old, new, match):
    text = (load_preset.__globals__["CONFIG_DIR"] / "flux_schnell_nf4.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(old, new))
    with pytest.raises(ValueError, match=match):
        load_preset(bad)


def test_unknown_preset_name_lists_choices():
    with pytest.raises(ValueError, match="nf4"):
        load_preset("nf3")
