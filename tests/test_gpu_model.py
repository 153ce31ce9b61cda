"""GPU: the full-size synthetic checkpoint on the resident placement (speed beyond the share, one argument away):
memory accounting, drift, CUDA graphs and OOM recovery. Figures are printed (pytest -s) for the closing note and
reports. The task's own call (the vortex placement) is tests/test_vortex_contract.py's."""
import pytest
import torch

from fluxkit import GenerationError, VortexInitializationError, load_flux_schnell
from fluxkit.memory import count_quantized_linears
from helpers import PROMPT, uncaptured

pytestmark = pytest.mark.gpu
MB = 10**6


@pytest.fixture(autouse=True)
def uncapped():
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)


def test_5gb_cap_refused_by_preflight(full_dir):
    with pytest.raises(VortexInitializationError) as info:
        load_flux_schnell(device="cuda", model=full_dir, vram_limit_gb=5.0)
    err = info.value
    assert err.available_vram_gb <= 5.0 < err.required_vram_gb and err.remediation
    assert torch.cuda.memory_allocated() == 0  # refused before any weight was loaded


def test_real_oom_during_load_is_converted_and_released(full_dir):
    with pytest.raises(VortexInitializationError, match="ran out of memory while loading") as info:
        load_flux_schnell(device="cuda", model=full_dir, vram_limit_gb=5.0, preflight_check=False)
    assert info.value.available_vram_gb is not None and info.value.available_vram_gb <= 5.0
    assert torch.cuda.memory_allocated() < 64 * 2**20  # partial weights released


@pytest.fixture(scope="module")
def full_model(full_dir):
    model = load_flux_schnell(device="cuda", quantization="nf4", model=full_dir, placement="resident")
    model.generate(PROMPT, seed=0)  # warm-up
    return model


def test_weights_are_4bit_and_as_planned(full_model):
    report = full_model.weight_report()
    print(f"\nweights: { {k: v['gib'] for k, v in report.items()} } GiB")
    for name, placed in full_model.plan.components.items():
        assert report[name]["bytes"] == placed.weight_bytes, name
    assert count_quantized_linears(full_model.pipe.transformer)["Linear4bit"] > 400
    assert count_quantized_linears(full_model.pipe.text_encoder_2)["Linear4bit"] > 100


def test_rise_during_generate_under_500mb(full_model):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    full_model.profiling = True  # this test's process is the lab's: each phase's own peak
    try:
        full_model.generate(PROMPT, seed=1)
    finally:
        full_model.profiling = False
    rise = full_model.last_call.peak - before
    print(f"\nrise during generate: {rise / MB:.1f} MB; phases: {[m.to_dict() for m in full_model.last_call.memory]}")
    assert rise < 500 * MB


def test_side_by_side_reports_the_whole_call_s_rise(full_model):
    """The side by side reads the process's peak over its calls; fluxkit's calls no longer reset it, so the rise
    covers whole calls (the decode's working memory at least)."""
    from fluxkit.lab.bench import side_by_side

    with uncaptured(full_model):  # a replay allocates nothing: its working memory is the graphs' pool, held
        result = side_by_side({"fluxkit": full_model}, iterations=2, rounds=1, warmup=1)
    rise = result["variants"]["fluxkit"]["rise_bytes"]
    print(f"\nside-by-side rise {rise / MB:.1f} MB")
    assert rise > 50 * MB


def test_cuda_graphs_give_the_uncaptured_image(full_model):
    """The NF4 path's replays equal the same compiled modules run without graphs; what the graphs hold is printed."""
    graphed = full_model.generate(PROMPT, seed=11)
    with uncaptured(full_model):
        eager = full_model.generate(PROMPT, seed=11)
    print(f"\ngraphs: {full_model.info()['cuda_graphs']}, reserved {torch.cuda.memory_reserved() / 1e9:.2f} GB, "
          f"allocated {torch.cuda.memory_allocated() / 1e9:.2f} GB")
    assert full_model.info()["cuda_graphs"] and torch.equal(graphed, eager)


def test_bit_identical_repeats_into_a_host_buffer(full_model):
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
    assert "allocated_gib" in info.value.memory and info.value.out_of_memory  # not another CUDA error
    image = full_model.generate(PROMPT, seed=0)
    assert image.shape == (512, 512, 3) and torch.isfinite(image).all()
