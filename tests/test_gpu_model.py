"""GPU: the seed's test cases 1, 3, 4 on the full-size synthetic checkpoint, plus drift and OOM recovery.
Figures are printed (pytest -s) for the closing note and reports."""
import pytest
import torch

from conftest import PROMPT
from fluxkit import GenerationError, load_flux_schnell
from fluxkit.memory import count_quantized_linears

pytestmark = pytest.mark.gpu
MB = 10**6


@pytest.fixture(scope="module")
def full_model(full_dir):
    model = load_flux_schnell(device="cuda", quantization="nf4", model=full_dir)
    model.generate(PROMPT, seed=0)  # warm-up
    return model


def test_case1_nf4_transformer_in_band_with_linear4bit(full_model):
    report = full_model.weight_report()
    print(f"\nweights: { {k: v['gib'] for k, v in report.items()} } GiB")
    assert 5.5 <= report["transformer"]["gib"] <= 6.5
    assert count_quantized_linears(full_model.pipe.transformer)["Linear4bit"] > 400
    assert count_quantized_linears(full_model.pipe.text_encoder_2)["Linear4bit"] > 100


def test_case3_rise_during_generate_under_500mb(full_model):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    full_model.generate(PROMPT, seed=1)
    rise = full_model.last_call.peak_gib * 2**30 - before
    print(f"\nrise during generate: {rise / MB:.1f} MB; phases: {[m.to_dict() for m in full_model.last_call.memory]}")
    assert rise < 500 * MB


def test_case4_bit_identical_repeats(full_model):
    a = full_model.generate(PROMPT, seed=42)
    b = full_model.generate(PROMPT, seed=42)
    assert a.device.type == "cuda" and a.shape == (512, 512, 3) and a.dtype == torch.float32
    assert torch.equal(a, b)
    buffer = torch.empty((512, 512, 3), dtype=torch.float32)  # Vortex's pre-allocated host buffer
    assert full_model.generate(PROMPT, seed=42, output=buffer) is buffer
    assert torch.equal(buffer, a.cpu())


def test_drift_over_100_calls_under_50mb(full_model):
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    for i in range(100):
        full_model.generate(PROMPT, seed=i)
    torch.cuda.synchronize()
    drift = torch.cuda.memory_allocated() - start
    print(f"\ndrift over 100 calls: {drift / MB:.2f} MB")
    assert abs(drift) < 50 * MB


def test_oom_during_generate_leaves_the_model_usable(full_model):
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    # allow only 16 MiB above what is already allocated: the denoise/decode activations cannot fit
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 16 * 2**20) / total)
    try:
        with pytest.raises(GenerationError) as info:
            full_model.generate(PROMPT, seed=0)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    print(f"\nOOM in phase {info.value.phase}: {info.value.memory}")
    assert info.value.phase in ("text_encode", "denoise", "decode", "copy")
    assert "allocated_gib" in info.value.memory
    image = full_model.generate(PROMPT, seed=0)
    assert image.shape == (512, 512, 3) and torch.isfinite(image).all()
