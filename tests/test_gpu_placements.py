"""GPU: every placement's GPU-only machinery (diffusers' quantizer with host-offloaded layers, modulation layers
quantized one at a time into pinned memory, T5 group offloading on a side stream, model CPU offload) on the tiny
checkpoint: each gives the resident image."""
import pytest
from test_plan import share_streaming_some_modulation

import helpers
from fluxkit import load_flux_schnell
from helpers import PROMPT, t5_unquantized, with_budgets

pytestmark = pytest.mark.gpu
# bf16 on the GPU; the vortex placement batches the modulation projections of all steps (other summation order)
TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def resident_images(tiny_dir):
    return helpers.resident_images(tiny_dir, "cuda", seed=4)


@pytest.mark.parametrize("placement", ["vortex", "offload"])
def test_placements_on_the_gpu_give_the_resident_image(tiny_dir, resident_images, placement):
    resident_image = resident_images(placement)
    model = load_flux_schnell(device="cuda", quantization=t5_unquantized(), model=tiny_dir, placement=placement)
    image = model.generate(PROMPT, seed=4)
    print(f"\n{placement}: max |diff| to resident {(image - resident_image).abs().max().item():.2e}")
    assert (image - resident_image).abs().max() <= TOLERANCE
    if placement == "offload":  # nothing stays on the GPU between calls
        assert all(p.device.type == "cpu" for c in model.components.values() for p in c.parameters())


def test_streamed_modulation_on_the_gpu(tiny_dir, resident_images):
    resident_image = resident_images("vortex")
    preset = t5_unquantized()
    preset = with_budgets(preset, vortex_total_gb=5.8 + share_streaming_some_modulation(tiny_dir, preset, 2),
                          rest_of_vortex_gb=5.8)
    model = load_flux_schnell(device="cuda", quantization=preset, model=tiny_dir, placement="vortex")
    parked = model.modulation.parked
    assert parked and all(model.modulation.sources[n].weight.is_pinned() for n in parked)
    image = model.generate(PROMPT, seed=4)
    print(f"\nstreamed {len(parked)} modulation layers: max |diff| to resident "
          f"{(image - resident_image).abs().max().item():.2e}")
    assert (image - resident_image).abs().max() <= TOLERANCE


def test_nf4_vortex_streams_t5_from_pinned_memory(tiny_dir):
    model = load_flux_schnell(device="cuda", model=tiny_dir, placement="vortex")
    t5 = model.pipe.text_encoder_2
    assert all(p.device.type == "cpu" for p in t5.parameters())
    assert model.generate(PROMPT, seed=0).shape == (512, 512, 3)
