"""GPU: the seed's test case 6 (a 5 GB card) reproduced with vram_limit_gb. Runs before the model tests
(file order) so that the real OOM during load starts from an empty GPU."""
import pytest
import torch

from fluxkit import VortexInitializationError, load_flux_schnell

pytestmark = pytest.mark.gpu


def test_5gb_cap_refused_by_preflight(full_dir):
    with pytest.raises(VortexInitializationError) as info:
        load_flux_schnell(device="cuda", model=full_dir, vram_limit_gb=5.0)
    err = info.value
    assert err.model_name == "flux-schnell"
    assert err.available_vram_gb <= 5.0
    assert err.required_vram_gb > 10.0
    assert err.remediation
    assert torch.cuda.memory_allocated() == 0  # refused before any weight was loaded


def test_real_oom_during_load_is_converted_and_released(full_dir):
    with pytest.raises(VortexInitializationError, match="ran out of memory while loading") as info:
        load_flux_schnell(device="cuda", model=full_dir, vram_limit_gb=5.0, preflight_check=False)
    assert info.value.available_vram_gb is not None and info.value.available_vram_gb <= 5.0
    assert torch.cuda.memory_allocated() < 64 * 2**20  # partial weights released
