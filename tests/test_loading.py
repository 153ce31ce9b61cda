import json
import logging

import pytest
import torch

from fluxkit import VortexInitializationError, load_flux_schnell, load_preset
from fluxkit.hub import DOWNLOAD_PATTERNS, resolve_model
from fluxkit.loading import check_fits, estimate_weight_bytes, meta_components
from fluxkit.memory import GB, GIB, count_quantized_linears
from fluxkit.synthetic import meta_components as synthetic_meta


def test_nf4_layers_on_the_quantized_components(tiny_model):
    assert count_quantized_linears(tiny_model.pipe.transformer)["Linear"] == 0
    assert count_quantized_linears(tiny_model.pipe.transformer)["Linear4bit"] > 0
    t5 = count_quantized_linears(tiny_model.pipe.text_encoder_2)
    assert t5["Linear4bit"] > 0 and t5["Linear"] == 1  # T5 keeps its `wo` layer unquantized
    assert count_quantized_linears(tiny_model.pipe.text_encoder)["Linear4bit"] == 0
    assert tiny_model.pipe.transformer.transformer_blocks[0].attn.to_q.weight.quant_type == "nf4"


def test_weight_report_matches_the_estimate(tiny_model, tiny_dir):
    report = tiny_model.weight_report()
    estimate = estimate_weight_bytes(meta_components(tiny_dir), tiny_model.preset, dtype_bytes=4)
    for name, est in estimate.items():
        assert report[name]["bytes"] == pytest.approx(est, rel=0.02), name
    assert report["total"]["gib"] == pytest.approx(report["total"]["bytes"] / GIB, abs=1e-4)


def test_nf4_estimate_of_the_real_model_is_in_the_seed_band():
    estimate = estimate_weight_bytes(synthetic_meta("full"), load_preset("nf4"))
    assert 5.5 <= estimate["transformer"] / GIB <= 6.5
    bf16 = estimate_weight_bytes(synthetic_meta("full"), load_preset("bf16"))
    assert bf16["transformer"] / GIB == pytest.approx(22.15, abs=0.05)  # 11.9 B params x 2 bytes


def test_preflight_refuses_a_5gb_card_with_structured_fields(caplog):
    preset = load_preset("nf4")
    need = sum(estimate_weight_bytes(synthetic_meta("full"), preset).values()) + preset.working_memory_gib * GIB
    with caplog.at_level(logging.ERROR, logger="fluxkit"):
        with pytest.raises(VortexInitializationError) as info:
            check_fits(need, 5 * GB, preset, vram_limit_gb=5.0)
    err = info.value
    assert err.model_name == "flux-schnell"
    assert err.available_vram_gb == 5.0
    assert 11 < err.required_vram_gb < 13
    assert "GPU" in err.remediation
    record = json.loads(caplog.records[-1].getMessage())
    assert record == {**err.fields(), "event": "vortex_initialization_error", "message": record["message"]}


def test_missing_weights_name_the_model_and_the_remedy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(VortexInitializationError) as info:
        load_flux_schnell(device="cpu", model="black-forest-labs/FLUX.1-schnell")
    assert "black-forest-labs/FLUX.1-schnell" in str(info.value)
    assert "fluxkit download" in info.value.remediation


def test_incomplete_folder_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(VortexInitializationError, match="incomplete.*transformer"):
        resolve_model(tmp_path)


def test_not_a_model_is_refused():
    with pytest.raises(VortexInitializationError, match="neither a folder"):
        resolve_model("no-such-thing")


def test_cuda_asked_without_a_gpu_is_refused(tiny_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(VortexInitializationError, match="no usable CUDA GPU"):
        load_flux_schnell(device="cuda", model=tiny_dir)


def test_download_selects_only_the_diffusers_folders():
    from huggingface_hub.utils import filter_repo_objects

    repo_files = [
        ".gitattributes", "README.md", "LICENSE.md", "schnell_grid.jpeg", "flux1-schnell.safetensors",
        "ae.safetensors", "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "text_encoder_2/config.json", "text_encoder_2/model.safetensors.index.json",
        "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
        "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json", "tokenizer_2/special_tokens_map.json", "tokenizer_2/spiece.model",
        "tokenizer_2/tokenizer.json", "tokenizer_2/tokenizer_config.json", "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    chosen = set(filter_repo_objects(repo_files, allow_patterns=DOWNLOAD_PATTERNS))
    assert "flux1-schnell.safetensors" not in chosen and "ae.safetensors" not in chosen
    assert "schnell_grid.jpeg" not in chosen
    assert chosen == {f for f in repo_files if "/" in f or f == "model_index.json"}


@pytest.mark.parametrize("preset", ["bf16", "fp4", "int8"])
def test_other_presets_load_through_the_same_code(tiny_dir, preset):
    model = load_flux_schnell(device="cpu", quantization=preset, model=tiny_dir)
    counts = count_quantized_linears(model.pipe.transformer)
    expected = {"bf16": "Linear", "fp4": "Linear4bit", "int8": "Linear8bitLt"}[preset]
    assert counts[expected] > 0
    image = model.generate("a red cube", seed=0)
    assert image.shape == (512, 512, 3) and torch.isfinite(image).all()
