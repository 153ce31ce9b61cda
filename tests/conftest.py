"""Shared fixtures: the tiny synthetic checkpoint (CPU) and the full one (GPU host only)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py


# `make test` runs the files on every core (pytest-xdist, a file to one worker at a time). The longest go first, so
# that no worker is left alone with one of them at the end: on 2 cores the Ray file took 160 s (its validate 100 s),
# the installed wheel's validate 116 s, notebook 04 50 s, the sweep's fixture 26 s.
LONGEST_FIRST = ("tests/test_cluster.py", "tests/test_validate.py", "notebooks/04_quantization_tradeoffs.ipynb",
                 "tests/test_sweep.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the GPU host")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """fluxkit's synthetic cache for this test session (FLUXKIT_CACHE), shared by CLI subprocesses."""
    path = os.environ.get("FLUXKIT_TEST_CACHE") or str(tmp_path_factory.mktemp("fluxkit-cache"))
    os.environ["FLUXKIT_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def tiny_dir(cache_dir):
    from fluxkit.synthetic import ensure_synthetic

    return ensure_synthetic("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from fluxkit import load_flux_schnell

    return load_flux_schnell(device="cpu", quantization="nf4", model=tiny_dir)


@pytest.fixture(scope="session")
def prequantized(tiny_dir, tmp_path_factory):
    """The tiny checkpoint saved pre-quantized by `fluxkit quantize` (nf4, for the resident placement, on CPU)."""
    from fluxkit.quantize import save_quantized

    return save_quantized(str(tiny_dir), tmp_path_factory.mktemp("prequantized") / "nf4", "nf4", "resident", "cpu")


@pytest.fixture(scope="session")
def full_dir(cache_dir):
    """The full-size synthetic checkpoint: FLUXKIT_FULL_CHECKPOINT if set (built once on the host), else built here."""
    from fluxkit.synthetic import ensure_synthetic

    given = os.environ.get("FLUXKIT_FULL_CHECKPOINT")
    return Path(given) if given else ensure_synthetic("full", seed=0)
