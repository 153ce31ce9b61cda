import dataclasses
import json
import logging

import pytest
import torch

from fluxkit import VortexInitializationError, load_flux_schnell, load_placement, load_preset
from fluxkit.config import available_placements
from fluxkit.fastpath import compile_components, compile_options, decoder_stays_eager, graphs_unsupported
from fluxkit.hub import DOWNLOAD_PATTERNS, resolve_model
from fluxkit.loading import WARM_UP_STAGE, load_failure
from fluxkit.memory import GB, GIB, count_quantized_linears
from fluxkit.plan import plan_placement
from fluxkit.preflight import check_fits, choose_placement
from fluxkit.synthetic import meta_model
from helpers import with_budgets


def test_nf4_layers_on_the_quantized_components(tiny_model):
    assert count_quantized_linears(tiny_model.pipe.transformer)["Linear"] == 0
    assert count_quantized_linears(tiny_model.pipe.transformer)["Linear4bit"] > 0
    t5 = count_quantized_linears(tiny_model.pipe.text_encoder_2)
    assert t5["Linear4bit"] > 0 and t5["Linear"] == 1  # T5 keeps its `wo` layer unquantized
    assert count_quantized_linears(tiny_model.pipe.text_encoder)["Linear4bit"] == 0
    assert tiny_model.pipe.transformer.transformer_blocks[0].attn.to_q.weight.quant_type == "nf4"


def test_weight_report_matches_the_plan(tiny_dir):
    # measured before the first call: on AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights at their first use
    model = load_flux_schnell(device="cpu", model=tiny_dir)
    report = model.weight_report()
    for name, placed in model.plan.components.items():
        assert report[name]["bytes"] == placed.weight_bytes, name
    assert report["total"]["gib"] == pytest.approx(report["total"]["bytes"] / GIB, abs=1e-4)


def test_a_load_says_where_its_seconds_went(tiny_dir, caplog):
    # a restart that misses its time budget must show which stage to work on (reading, quantizing, compiling)
    with caplog.at_level(logging.INFO, logger="fluxkit"):
        model = load_flux_schnell(device="cpu", model=tiny_dir)
    stages = model.stages.seconds
    assert list(model.info()["load_stages_s"]) == ["checks and plan", "transformer", "text_encoder_2",
                                                   "text_encoder, vae"] == list(stages)
    assert all(seconds >= 0 for seconds in stages.values())
    assert sum(stages.values()) == pytest.approx(model.load_seconds)  # the stages cover the whole load
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("load stage")]
    assert [m.split("  ")[0].removeprefix("load stage ") for m in logged] == list(stages)


@pytest.mark.parametrize("scope, placement", [("blocks", "vortex"), ("transformer", "resident")])
def test_the_compile_scope_and_placement_pick_what_torch_compile_wraps(tiny_dir, scope, placement, caplog):
    """Compiling only wraps the modules (nothing runs here); the CUDA warm-up is the GPU host's to measure. A tiled
    decoder stays eager: its three tile shapes cost a restart three traces."""
    pipe = load_flux_schnell(device="cpu", model=tiny_dir).pipe
    with caplog.at_level(logging.INFO, logger="fluxkit"):
        compile_components(pipe, "default", scope, load_placement(placement))
    blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)
    wrapped = [b._compiled_call_impl is not None for b in blocks]
    assert (pipe.transformer._compiled_call_impl is not None) == (scope == "transformer")
    assert wrapped == [scope == "blocks"] * len(blocks)
    assert (pipe.vae.decoder._compiled_call_impl is not None) == (placement == "resident")
    assert ("VAE decoder not compiled under placement vortex" in caplog.text) == (placement == "vortex")
    assert [p for p in available_placements() if decoder_stays_eager(load_placement(p))] == ["vortex", "offload"]


def test_cuda_graphs_for_the_transformer_never_for_the_tiled_decoder():
    """The decoder runs once per tile: a CUDA-graph replay per tile would overwrite the tile before it (H200, run
    18: "accessing tensor output of CUDAGraphs that has been overwritten" in the decoder)."""
    transformer, decoder = compile_options("reduce-overhead")
    assert transformer == {"fullgraph": True, "mode": "reduce-overhead"} and decoder == {"fullgraph": True, "mode": None}
    assert compile_options("max-autotune-no-cudagraphs")[1]["mode"] == "max-autotune-no-cudagraphs"
    assert compile_options("default") == ({"fullgraph": True, "mode": None},) * 2


def test_cuda_graphs_only_where_a_call_is_fixed_device_work(tiny_model):
    """A graph replays the device work it captured: placements that move weights from the host during a call
    cannot be replayed, and on a CPU there is nothing to capture."""
    assert graphs_unsupported(load_placement("resident")) is None
    assert "T5 streams" in graphs_unsupported(load_placement("vortex"))
    assert "move between host and GPU" in graphs_unsupported(load_placement("offload"))
    assert tiny_model.preset.cuda_graphs and not tiny_model.info()["cuda_graphs"] and tiny_model.fast.graphed == {}


def test_nf4_transformer_of_the_real_model_by_plan():
    plan = plan_placement(meta_model("full"), load_preset("nf4"), load_placement("resident"))
    # double quantization: 5.72 GiB measured on an H200 (reports/H200-synthetic-full-nf4/extra)
    assert plan.components["transformer"].weight_bytes / GIB == pytest.approx(5.72, abs=0.01)


def test_preflight_refuses_with_structured_fields():
    plan = plan_placement(meta_model("full"), load_preset("nf4"), load_placement("resident"))
    with pytest.raises(VortexInitializationError) as info:
        check_fits(plan, 6 * GB)
    err = info.value
    assert err.model_name == "flux-schnell" and err.available_vram_gb == 6.0
    assert 11 < err.required_vram_gb < 12.5 and err.required_vram_gb == round(plan.peak_bytes / GB, 3)
    assert "vortex placement" in err.remediation
    check_fits(plan_placement(meta_model("full"), load_preset("nf4"), load_placement("vortex")), 6 * GB)


CUDA = torch.device("cuda", 0)  # choose_placement reads only the device's type: the rule runs on any machine


def test_auto_takes_the_fastest_placement_within_the_share_and_the_free_memory():
    """The task's own call, load_flux_schnell("cuda", "nf4"), must fit Vortex's 6 GB share: resident (11.5 GB at
    its peak) does not, vortex does. Speed beyond the share is one argument away (placement="resident")."""
    meta, nf4 = meta_model("full"), load_preset("nf4")
    spec, plan, why = choose_placement(meta, nf4, "auto", CUDA, 2, available=139 * GB)
    assert spec.name == "vortex" and plan.peak_bytes <= 6 * GB
    assert "fastest placement within the 6.00 GB Flux share" in why and "resident needs 11.50 GB" in why
    wide = with_budgets(nf4, vortex_total_gb=24.0, rest_of_vortex_gb=5.8)  # a share resident fits in
    assert choose_placement(meta, wide, "auto", CUDA, 2, available=139 * GB)[0].name == "resident"
    assert choose_placement(meta, wide, "auto", CUDA, 2, available=8 * GB)[0].name == "vortex"  # free memory too
    assert choose_placement(meta, nf4, "resident", CUDA, 2, available=1 * GB)[0].name == "resident"  # asked for
    assert choose_placement(meta, nf4, "auto", torch.device("cpu"), 4, available=None)[0].name == "resident"


@pytest.mark.parametrize("preset,available,match", [
    ("nf4", 5 * GB, "fits the GPU memory this process may take: the smallest, vortex, needs 5.89 GB"),
    ("bf16", 139 * GB, "fits the Flux share: the smallest"),
])
def test_auto_refuses_when_nothing_fits_with_the_task_s_fields(preset, available, match):
    """The task's case 6: the card limited to 5 GB, below what Flux needs: VortexInitializationError with
    model_name, required_vram and available_vram, and a remedy."""
    with pytest.raises(VortexInitializationError, match=match) as info:
        choose_placement(meta_model("full"), load_preset(preset), "auto", CUDA, 2, available=available)
    err = info.value
    assert err.required_vram_gb > 5.5 and err.remediation and "placement='resident'" in err.remediation
    if preset == "nf4":
        assert err.available_vram_gb == 5.0 and err.required_vram_gb == pytest.approx(5.89, abs=0.01)


def test_load_failures_are_logged_as_one_json_record(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="fluxkit"):
        with pytest.raises(VortexInitializationError) as info:
            load_flux_schnell(device="cpu", model=tmp_path)
    record = json.loads(caplog.records[-1].getMessage())
    assert record == {**info.value.fields(), "event": "vortex_initialization_error", "message": info.value.message}


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(quantization=None), TypeError, "quantization must be a preset name"),
    (dict(quantization="nf3"), ValueError, "quantization='nf3': no such preset"),
    (dict(vram_limit_gb="5"), TypeError, "vram_limit_gb must be a number"),
    (dict(vram_limit_gb=-1.0), ValueError, "vram_limit_gb=-1.0"),
    (dict(vram_limit_gb=float("nan")), ValueError, "vram_limit_gb=nan"),
    (dict(device="tpu"), ValueError, "device='tpu'"),
    (dict(device=3.5), TypeError, "device must be a str or torch.device"),
    (dict(model=42), TypeError, "model must be a str or a path"),
    (dict(revision=7), TypeError, "revision must be a str or None"),
    (dict(preflight_check="yes"), TypeError, "preflight_check must be True or False"),
    (dict(model="synthetic-huge"), None, "neither a folder nor a Hugging Face repository id"),
])
def test_bad_arguments_are_load_failures_that_name_the_argument(tiny_dir, kwargs, error, match):
    args = {"device": "cpu", "model": tiny_dir, **kwargs}
    with pytest.raises(VortexInitializationError, match=match) as info:
        load_flux_schnell(**args)
    if error is not None:
        assert isinstance(info.value, error)


def test_a_failed_fast_path_is_not_blamed_on_the_checkpoint():
    """Run 17 (H200): a compile warm-up failed and the error told the user to rebuild the checkpoint. The error names
    what the warm-up does (torch.compile, CUDA graph capture, fluxkit's dequantization kernel) and how to turn each
    off."""
    err = RuntimeError("backend='inductor' raised:\nLoweringException: no float8 cast here\n\nSet TORCH_LOGS")
    nf4 = dataclasses.replace(load_preset("nf4"), dequantize_kernel="bitsandbytes")
    compiled = load_failure("synthetic-full", dataclasses.replace(nf4, cuda_graphs=False), WARM_UP_STAGE, err)
    assert "torch.compile of synthetic-full (nf4) failed during the fast-path warm-up call" in str(compiled)
    assert "\n" not in str(compiled) and "LoweringException: no float8 cast here" in str(compiled)
    assert "`compile: false` in" in compiled.remediation and "rebuild" not in compiled.remediation
    both = load_failure("synthetic-full", nf4, WARM_UP_STAGE, err)
    assert "torch.compile and CUDA graph capture of synthetic-full (nf4)" in str(both)
    assert "`compile: false` or `cuda_graphs: false`" in both.remediation
    every = load_failure("synthetic-full", load_preset("nf4"), WARM_UP_STAGE, err)
    assert "CUDA graph capture and fluxkit's dequantization kernel of synthetic-full" in str(every)
    assert "`cuda_graphs: false` or `dequantize_kernel: bitsandbytes` in" in every.remediation
    damaged = load_failure("synthetic-full", nf4, "weight loading", ValueError("header too large"))
    assert "Loading synthetic-full failed: ValueError: header too large" in str(damaged)
    assert "rebuild or re-download" in damaged.remediation


def test_bad_vram_limit_in_the_environment_names_the_variable(tiny_dir, monkeypatch):
    monkeypatch.setenv("FLUXKIT_VRAM_LIMIT_GB", "abc")
    with pytest.raises(VortexInitializationError, match="FLUXKIT_VRAM_LIMIT_GB='abc': not a number"):
        load_flux_schnell(device="cpu", model=tiny_dir)


def test_missing_weights_name_the_model_and_the_remedy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(VortexInitializationError) as info:
        load_flux_schnell(device="cpu", model="black-forest-labs/FLUX.1-schnell")
    assert "black-forest-labs/FLUX.1-schnell" in str(info.value)
    assert "fluxkit download" in info.value.remediation


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(VortexInitializationError, match="model_index.json is missing"):
        load_flux_schnell(device="cpu", model=tmp_path)


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


def test_gguf_writes_its_file_once_and_loads_gguf_layers(tiny_dir, cache_dir):
    from diffusers.quantizers.gguf.utils import GGUFLinear

    from fluxkit.quantizers.gguf import gguf_file

    model = load_flux_schnell(device="cpu", quantization="gguf-q8_0", model=tiny_dir)
    path = gguf_file(tiny_dir, "q8_0")
    assert path.is_file() and str(path).startswith(cache_dir)
    stamp = path.stat().st_mtime_ns
    layers = [m for m in model.pipe.transformer.modules() if isinstance(m, GGUFLinear)]
    assert layers and all(m.weight.quant_type.name == "Q8_0" for m in layers)
    first = model.generate("a red cube", seed=0)
    again = load_flux_schnell(device="cpu", quantization="gguf-q8_0", model=tiny_dir)  # from the cached file
    assert path.stat().st_mtime_ns == stamp and torch.equal(again.generate("a red cube", seed=0), first)
    assert gguf_file(tiny_dir, "q4_0") != path  # one file per quantization type


def test_gguf_under_the_vortex_placement_is_refused_with_the_reason(tiny_dir):
    with pytest.raises(VortexInitializationError, match="placement vortex.*streams modulation layers"):
        load_flux_schnell(device="cpu", quantization="gguf-q4_0", model=tiny_dir, placement="vortex")
