"""The task's six test cases (and its performance lines), written only with its literal API:
`load_flux_schnell(device, quantization)` and `generate(prompt, negative_prompt, num_inference_steps=4,
guidance_scale=0.0, output=actor_buffer, seed)`.

The weights are found where the task's call looks for them, the local Hugging Face cache, under
black-forest-labs/FLUX.1-schnell: the tiny synthetic checkpoint on the CPU (CI), the full-size one on the GPU host,
where Flux runs beside a ballast holding the rest of Vortex (11.8 GB cap, 5.8 GB ballast), as in Vortex. What the task
times on an RTX 3060 (8-12 s a call, P99 under 12 s) is measured by `fluxkit bench` and the stand-in (docs/latency.md),
not here; what it asks of image quality cannot be judged on random weights.
"""
import json
import logging
import subprocess
import sys

import pytest
import torch

from fluxkit import VortexInitializationError, load_flux_schnell
from helpers import task_cache

GB = 10**9  # the task's "GB", as fluxkit's budgets read it
PROMPT = "manic scientist, blue spiked hair, white lab coat"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory, request):
    checkpoint = request.getfixturevalue("full_dir" if CUDA else "tiny_dir")
    return task_cache(checkpoint, tmp_path_factory.mktemp("hf-cache"))


@pytest.fixture(scope="module")
def vortex(hf_cache):
    """VortexPipeline._load_flux(): on the GPU, beside the rest of Vortex (the process capped at 11.8 GB, a 5.8 GB
    ballast, the host's one peak reading from here on)."""
    import huggingface_hub.constants

    cache, huggingface_hub.constants.HF_HUB_CACHE = huggingface_hub.constants.HF_HUB_CACHE, str(hf_cache)
    ballast = None
    if CUDA:
        torch.cuda.set_per_process_memory_fraction(11.8 * GB / torch.cuda.get_device_properties(0).total_memory)
        torch.cuda.reset_peak_memory_stats()
        ballast = torch.empty(int(5.8 * GB), dtype=torch.uint8, device="cuda")
    try:
        yield load_flux_schnell(DEVICE, "nf4")
    finally:
        huggingface_hub.constants.HF_HUB_CACHE = cache
        del ballast


@pytest.fixture
def actor_buffer():
    return torch.empty((512, 512, 3), dtype=torch.float32)  # Vortex's pre-allocated buffer, on the host


def test_case_1_standard_actor_generation(vortex, actor_buffer):
    before = torch.cuda.memory_allocated() if CUDA else 0
    if CUDA:
        torch.cuda.synchronize()
        peak_before = torch.cuda.max_memory_allocated()
    out = vortex.generate(prompt=PROMPT, num_inference_steps=4, guidance_scale=0.0, output=actor_buffer)
    assert out is actor_buffer and tuple(out.shape) == (512, 512, 3) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    if CUDA:  # "VRAM usage increases by <500MB during generation", from the host's own peak reading
        rise = torch.cuda.max_memory_allocated() - max(before, peak_before)
        assert rise < 500 * 10**6, rise


def test_case_2_negative_prompt(vortex, actor_buffer):
    """Accepted, and not slower: schnell is guidance-distilled, so at guidance 0 the negative prompt runs no second
    transformer pass (it would through true CFG, `true_cfg_scale > 1`). Whether it makes images "visually higher"
    in quality cannot be judged on random weights."""
    passes = []
    hook = vortex.pipe.transformer.register_forward_hook(lambda *args: passes.append(1))
    try:
        vortex.generate(prompt="scientist", num_inference_steps=4, guidance_scale=0.0, output=actor_buffer, seed=1)
        without = len(passes)
        passes.clear()
        vortex.generate(prompt="scientist", negative_prompt="blurry, low quality, watermark", num_inference_steps=4,
                        guidance_scale=0.0, output=actor_buffer, seed=1)
    finally:
        hook.remove()
    assert len(passes) == without == 4  # the same work: not "significantly impacted"
    assert torch.isfinite(actor_buffer).all()


CASE_3 = """
import json, torch, fluxkit
model = fluxkit.load_flux_schnell("{device}", "nf4")
allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
import bitsandbytes
layers = [m for c in model.components.values() for m in c.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
print(json.dumps({{"allocated": allocated, "quantized_layers": model.quantized_layers, "count": len(layers),
                  "placement": model.placement.name, "synthetic": model.info()["model"]["synthetic"] is not None}}))
"""


def test_case_3_vram_budget_compliance(hf_cache):
    """A fresh Python process; the task's call with its defaults: 5.5-6.5 GB allocated after loading (GB = 10**9
    bytes), and the quantized layers shown to be bitsandbytes' Linear4bit through a public attribute."""
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", CASE_3.format(device=DEVICE)], capture_output=True, text=True,
                         env=env, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["synthetic"]  # found through the cache, and still reported as what it is
    layers = out["quantized_layers"]
    # under vortex T5 streams from host memory unquantized; resident (the tiny checkpoint on a CPU) quantizes it too
    assert set(layers) == ({"transformer"} if out["placement"] == "vortex" else {"transformer", "text_encoder_2"})
    assert all(set(c) == {"bitsandbytes.nn.Linear4bit"} for c in layers.values())
    assert 0 < out["count"] <= sum(n for c in layers.values() for n in c.values())  # parked ones are no module
    print(f"\ncase 3: {out['placement']}, allocated after loading {out['allocated']} bytes, layers {layers}")
    if CUDA:
        assert out["placement"] == "vortex"  # the default picks what fits Vortex's 6 GB share
        assert 5.5 * GB <= out["allocated"] <= 6.5 * GB, out["allocated"] / GB


def test_case_4_deterministic_output(vortex, actor_buffer):
    torch.manual_seed(42)
    first = vortex.generate(prompt="scientist", num_inference_steps=4, seed=42, output=actor_buffer).clone()
    second = vortex.generate(prompt="scientist", num_inference_steps=4, seed=42, output=actor_buffer)
    assert torch.equal(first, second)


def test_case_5_long_prompt_handling(vortex, actor_buffer, caplog):
    with caplog.at_level(logging.WARNING, logger="fluxkit"):
        out = vortex.generate(prompt="very long prompt... " * 100, num_inference_steps=4, guidance_scale=0.0,
                              output=actor_buffer)
    assert any("Prompt truncated to 77 tokens" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(out).all()


def test_case_6_cuda_oom_recovery(hf_cache, tmp_path, monkeypatch, caplog):
    """The card limited to 5 GB, below the 6 GB Flux needs: the load is refused with VortexInitializationError and
    a structured log record with the task's fields. On the GPU the limit is the host's own cap; on the CPU, where
    there is no device memory to limit, an out-of-memory error is raised where the GPU would raise it, while T5
    loads."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))
    if CUDA:
        script = ("import torch, fluxkit, json\n"
                  "torch.cuda.set_per_process_memory_fraction(5e9 / torch.cuda.get_device_properties(0).total_memory)\n"
                  "try:\n    fluxkit.load_flux_schnell('cuda', 'nf4')\n"
                  "except fluxkit.VortexInitializationError as err:\n    print(json.dumps(err.fields()))\n")
        env = {**__import__("os").environ, "HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
        fields = json.loads(run.stdout.strip().splitlines()[-1])
        assert fields["model_name"] == "flux-schnell" and fields["available_vram_gb"] == pytest.approx(5.0, abs=0.05)
        assert 5.5 <= fields["required_vram_gb"] <= 6.5 and fields["remediation"]
        return
    import fluxkit.components

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    t5_loader = fluxkit.components.load_text_encoder_2
    monkeypatch.setattr(fluxkit.components, "load_text_encoder_2", out_of_memory)
    with caplog.at_level(logging.ERROR, logger="fluxkit"):
        with pytest.raises(VortexInitializationError) as info:
            load_flux_schnell(DEVICE, "nf4")
    err = info.value
    assert err.model_name == "flux-schnell" and err.required_vram_gb > 0 and err.remediation
    record = json.loads(caplog.records[-1].getMessage())
    assert record["event"] == "vortex_initialization_error" and record["model_name"] == "flux-schnell"
    assert {"required_vram_gb", "available_vram_gb", "remediation"} <= set(record)
    monkeypatch.setattr(fluxkit.components, "load_text_encoder_2", t5_loader)  # the next load works
    assert load_flux_schnell(DEVICE, "nf4").generate(prompt="a cat", seed=0).shape == (512, 512, 3)


@pytest.mark.gpu
def test_vram_is_stable_across_100_generations_beside_the_rest_of_vortex(vortex, actor_buffer):
    """"VRAM usage stable at ~6GB across 100 generations", "No memory leaks (VRAM delta <50MB after 100 calls)", and
    the whole card (the host's one peak reading since before the load, ballast included) within 11.8 GB."""
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    for i in range(100):
        vortex.generate(prompt=f"{PROMPT}, take {i}", num_inference_steps=4, guidance_scale=0.0, output=actor_buffer,
                        seed=i)
    torch.cuda.synchronize()
    print(f"\n100 calls: drift {(torch.cuda.memory_allocated() - start) / 1e6:.2f} MB, the host's peak reserved "
          f"{torch.cuda.max_memory_reserved() / GB:.3f} GB, allocated {torch.cuda.max_memory_allocated() / GB:.3f} GB")
    assert abs(torch.cuda.memory_allocated() - start) < 50 * 10**6
    assert torch.cuda.max_memory_reserved() <= 11.8 * GB
