"""Files fluxkit derives into its cache (GGUF files, synthetic checkpoints) are verified on every use: a damaged one
is rebuilt, and one that stays damaged is an error naming the file and how to clear it. A failure nobody foresaw is
still a load failure."""
import logging

import pytest
import torch

from fluxkit import VortexInitializationError, load_flux_schnell
from fluxkit.cache import derived
from fluxkit.quantizers.gguf import gguf_file


@pytest.mark.parametrize("damage", ["truncated", "emptied", "garbage"])
def test_a_damaged_gguf_cache_file_is_rebuilt(tiny_dir, caplog, damage):
    path = gguf_file(tiny_dir, "q8_0")
    before = load_flux_schnell(device="cpu", quantization="gguf-q8_0", model=tiny_dir).generate(
        "a red cube", seed=0, height=128, width=128)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "emptied": b"", "garbage": b"\0" * 4096}[damage])
    with caplog.at_level(logging.WARNING, logger="fluxkit"):
        after = load_flux_schnell(device="cpu", quantization="gguf-q8_0", model=tiny_dir).generate(
            "a red cube", seed=0, height=128, width=128)
    assert any("the cached GGUF file" in r.getMessage() and "rebuilding it" in r.getMessage() for r in caplog.records)
    assert torch.equal(before, after) and path.read_bytes() == data


def test_a_damaged_synthetic_checkpoint_in_the_cache_is_rebuilt(cache_dir, tmp_path, monkeypatch, caplog):
    from fluxkit.synthetic import ensure_synthetic

    monkeypatch.setenv("FLUXKIT_CACHE", str(tmp_path))
    folder = ensure_synthetic("tiny", seed=3)
    shard = folder / "vae" / "diffusion_pytorch_model.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-100])  # a crash while it was written, a full disk
    with caplog.at_level(logging.WARNING, logger="fluxkit"):
        assert ensure_synthetic("tiny", seed=3) == folder
    assert shard.read_bytes() == whole and any("rebuilding it" in r.getMessage() for r in caplog.records)


def test_a_cache_file_that_stays_damaged_names_itself_and_the_fix(tmp_path):
    def verify(path):
        raise ValueError("header cut short")

    with pytest.raises(VortexInitializationError, match="still damaged") as info:
        derived(tmp_path / "thing.gguf", lambda path: path.write_text("x"), verify, "the cached thing")
    assert str(tmp_path / "thing.gguf") in str(info.value) and "delete" in info.value.remediation


def test_a_failure_nobody_foresaw_is_still_a_load_failure(tiny_dir, monkeypatch):
    """The class of a raw AttributeError out of a damaged folder: whatever escapes the checked steps (here, choosing
    the placement), Vortex still sees a load failure that says what to do."""
    import fluxkit.loading

    def broken(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'get'")

    monkeypatch.setattr(fluxkit.loading, "choose_placement", broken)
    with pytest.raises(VortexInitializationError, match="failed unexpectedly: AttributeError") as info:
        load_flux_schnell(device="cpu", model=tiny_dir)
    assert "bug" in info.value.remediation
