import dataclasses

import pytest
import yaml

from fluxkit.config import (
    CONFIG_DIR,
    DEFAULTS_FILE,
    ConfigError,
    available_placements,
    available_presets,
    load_placement,
    load_preset,
)
from fluxkit.errors import InputError, InputTypeError
from fluxkit.lab.bench import lever_settings

NF4 = yaml.safe_load((CONFIG_DIR / "flux_schnell_nf4.yaml").read_text())


def test_every_preset_and_placement_validates():
    assert set(available_presets()) == {"bf16", "fp4", "int8", "nf4", "nf4-nodq", "torchao-int8wo", "torchao-fp8wo",
                                        "torchao-fp8dq", "torchao-int4wo", "fp8-layerwise", "gguf-q8_0",
                                        "gguf-q4_0"}
    for name in available_presets():
        preset = load_preset(name)
        assert preset.name == name and preset.placement == "auto"
        assert (preset.generation.num_inference_steps, preset.generation.max_sequence_length) == (4, 256)
    assert available_placements() == ["resident", "vortex", "offload"]
    assert load_placement("vortex").text_encoder_2 == "stream" and load_placement("vortex").modulation == "fit"
    assert load_placement("offload").offload_between_calls


def test_nf4_preset_is_the_vortex_setting():
    q = load_preset("nf4").quantization
    assert (q.backend, q.quant_type, q.double_quant) == ("bitsandbytes_4bit", "nf4", True)
    assert q.components == ("transformer", "text_encoder_2")
    assert load_preset("nf4").budgets.flux_share_gb == pytest.approx(6.0)


def test_generation_and_budgets_are_written_once():
    """A preset file holds what differs from defaults.yaml; the dataclasses have no defaults to drift from it."""
    defaults = yaml.safe_load(DEFAULTS_FILE.read_text())
    for name in available_presets():
        text = yaml.safe_load((CONFIG_DIR / f"flux_schnell_{name}.yaml").read_text())
        assert "budgets" not in text and "generation" not in text and "model" not in text, name
        assert dataclasses.asdict(load_preset(name).budgets) == {**defaults["budgets"], "flux_resident_gb": (5.5, 6.5)}


def _preset(tmp_path, **changes):
    """nf4 with `changes` merged in (a key of a mapping as "budgets.drift_mb")."""
    data = yaml.safe_load(yaml.safe_dump(NF4))
    for key, value in changes.items():
        *owners, last = key.split("__")
        target = data
        for owner in owners:
            target = target.setdefault(owner, {})
        target[last] = value
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("changes,match", [
    ({"quantization__double_quantt": True}, r"unknown key.*double_quantt"),
    ({"quantization__quant_type": "nf5"}, "quant_type"),
    ({"generation__height": 500}, "multiple of 16"),
    ({"generation__num_inference_steps": 0}, r"num_inference_steps=0: must be a finite number in \[1, 50\]"),
    ({"quantization__components": ["unet"]}, "components"),
    ({"generation__height": "512"}, r"generation\.height: expected an integer, got '512'"),
    ({"generation__num_inference_steps": 2.5}, r"num_inference_steps: expected an integer, got 2.5"),
    ({"budgets__drift_mb": "fifty"}, r"budgets\.drift_mb: expected a number, got 'fifty'"),
    ({"quantization__double_quant": 1}, r"double_quant: expected true or false"),
    ({"budgets__flux_resident_gb": 6}, r"flux_resident_gb: expected a list"),
    ({"budgets__flux_resident_gb": [6.5, 5.5]}, "low <= high"),
    ({"placement": "everywhere"}, r"placement='everywhere'.*auto, resident, vortex, offload"),
    ({"compile_scope": "model"}, r"compile_scope='model'.*blocks, transformer"),
    ({"budgets": 3}, r"budgets: expected a mapping"),
    ({"quantization__backend": "gguf"}, r"quant_type='nf4'.*q8_0, q4_0"),
])
def test_bad_values_name_the_file_and_key(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_preset(_preset(tmp_path, **changes))
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("key,value", [
    ("clip_cosine_min", float("nan")), ("clip_cosine_min", 1.5), ("clip_cosine_min", -2.0),
    ("p99_latency_s", float("inf")), ("p99_latency_s", 0.0), ("p99_latency_s", -12.0),
    ("flux_peak_gb", float("nan")), ("drift_mb", -50.0), ("generate_rise_mb", float("inf")),
    ("vortex_total_gb", float("nan")), ("rest_of_vortex_gb", 20.0), ("flux_resident_gb", [float("nan"), 6.5]),
    ("flux_resident_gb", [5.5, float("inf")]), ("flux_resident_gb", [-1.0, 6.5]),
])
def test_every_budget_is_a_finite_number_in_its_range(tmp_path, key, value):
    """A NaN threshold would make its check unfailable (every comparison with NaN is false); an infinite or reversed
    one passes anything. Each is refused naming the key."""
    with pytest.raises(ConfigError, match=rf"budgets\.{key}"):
        load_preset(_preset(tmp_path, **{f"budgets__{key}": value}))


def test_a_missing_setting_is_named(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("name: partial\n")
    with pytest.raises(ConfigError, match="missing key.*quantization"):
        load_preset(path)


def test_layerwise_casting_cannot_be_compiled():
    """fullgraph torch.compile refuses the casting hooks: say so when the preset is read, not after the weights load
    (the sweep's compiled variant of fp8-layerwise becomes a row with this reason)."""
    layerwise = load_preset("fp8-layerwise")
    assert layerwise.compile is False
    with pytest.raises(ConfigError, match="compile=true with layerwise casting.*set compile: false"):
        dataclasses.replace(layerwise, compile=True)


def test_cuda_graphs_need_the_whole_transformer_compiled():
    """Regional compilation replays one block's CUDA graph for every block, overwriting the output the next block
    reads: refused when the preset is read."""
    nf4 = load_preset("nf4")
    with pytest.raises(ConfigError, match="reduce-overhead with compile_scope blocks.*set compile_scope: transformer"):
        dataclasses.replace(nf4, compile_mode="reduce-overhead")
    assert dataclasses.replace(nf4, compile_mode="reduce-overhead", compile_scope="transformer",
                               cuda_graphs=False).compile_scope == "transformer"


def test_fluxkit_s_cuda_graphs_and_torch_compile_s_are_one_or_the_other():
    nf4 = load_preset("nf4")
    assert nf4.cuda_graphs and load_preset("bf16").cuda_graphs
    with pytest.raises(ConfigError, match="cuda_graphs with compile_mode reduce-overhead.*choose one"):
        dataclasses.replace(nf4, compile_mode="reduce-overhead", compile_scope="transformer")
    assert dataclasses.replace(nf4, compile=False).cuda_graphs  # graphs of the eager path are allowed


def test_cuda_graphs_are_on_where_they_were_measured_to_pay():
    """Every preset with graphs replays its images bit for bit (tests/test_gpu_graphs.py) and ran faster with them
    on the H200 (torchao-fp8dq 5.4x, gguf-q8_0 1.4x, torchao-int8wo 1.14x, torchao-fp8wo 1.12x)."""
    assert {name for name in available_presets() if load_preset(name).cuda_graphs} == {
        "bf16", "nf4", "nf4-nodq", "fp4", "torchao-int8wo", "torchao-fp8wo", "torchao-fp8dq", "gguf-q8_0"}


@pytest.mark.parametrize("name, reason", [("int8", "LLM.int8.*torch.argwhere"),
                                          ("fp8-layerwise", "replace each layer's weights.*NaN"),
                                          ("gguf-q4_0", "GGUF q4_0.*pageable memory")])
def test_cuda_graphs_are_refused_where_a_capture_cannot_replay_the_kernels(name, reason):
    """What each capture did on the H200: int8 and q4_0 break it, layerwise casting replays NaN images."""
    preset = load_preset(name)
    assert not preset.cuda_graphs and preset.quantization.quantizer.graphs_refused(preset.quantization.quant_type)
    with pytest.raises(ConfigError, match=f"preset {name}: cuda_graphs with .*{reason}.*set cuda_graphs: false"):
        dataclasses.replace(preset, cuda_graphs=True)


def test_a_preset_that_is_not_yaml_is_refused(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_preset(path)


def test_unknown_names_list_the_choices():
    with pytest.raises(InputError, match="nf4"):
        load_preset("nf3")
    with pytest.raises(InputError, match="resident, vortex, offload"):
        load_placement("gpu")
    with pytest.raises(InputTypeError, match="quantization must be a preset name"):
        load_preset(None)
    with pytest.raises(InputTypeError, match="placement must be a str"):
        load_placement(3)


def test_4bit_presets_use_the_kernel_and_the_lever_turns_it_off():
    fluxkit_kernel = {name for name in available_presets() if load_preset(name).dequantize_kernel == "fluxkit"}
    assert fluxkit_kernel == {"nf4", "nf4-nodq", "fp4"}
    preset, _ = lever_settings("nf4", "resident", ("bitsandbytes-dequantize",))["bitsandbytes-dequantize"]
    assert preset.dequantize_kernel == "bitsandbytes"
    assert dataclasses.replace(preset, dequantize_kernel="fluxkit") == load_preset("nf4")
    with pytest.raises(InputError, match="already runs that way"):
        lever_settings("bf16", "resident", ("bitsandbytes-dequantize",))


@pytest.mark.parametrize("preset,value,match", [
    ("torchao-int8wo", "fluxkit", "decodes bitsandbytes 4-bit weights.*set dequantize_kernel: bitsandbytes"),
    ("nf4", "triton", r"dequantize_kernel='triton'.*bitsandbytes, fluxkit"),
])
def test_a_wrong_dequantize_kernel_is_refused(preset, value, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(load_preset(preset), dequantize_kernel=value)
