import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import PROMPT


def fluxkit(*args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "fluxkit.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_generate_writes_a_png(tiny_dir, tmp_path):
    out = tmp_path / "img.png"
    run = fluxkit("generate", "--prompt", PROMPT, "--seed", "3", "--model", str(tiny_dir), "--device", "cpu",
                  "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "seed 3" in run.stdout and "synthetic tiny" in run.stdout
    image = np.asarray(Image.open(out))
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8


def test_user_errors_are_one_line_without_traceback(tiny_dir, tmp_path):
    run = fluxkit("generate", "--prompt", "   ", "--model", str(tiny_dir), "--out", str(tmp_path / "x.png"))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["fluxkit: error: prompt is empty or whitespace only; describe the image to generate"]
    run = fluxkit("generate", "--prompt", "a cat", "--model", "black-forest-labs/FLUX.1-schnell", "--device", "cpu",
                  "--out", str(tmp_path / "x.png"), env_extra={"HF_HUB_CACHE": str(tmp_path / "empty")})
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("fluxkit: error: Weights for black-forest-labs/FLUX.1-schnell") and "fluxkit download" in last
    assert "Traceback" not in run.stderr


def test_synth_then_generate_from_it(tmp_path):
    run = fluxkit("synth", "--preset", "tiny", "--seed", "4", "--out", str(tmp_path / "ckpt"))
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "ckpt" / "fluxkit_synthetic.json").read_text())["seed"] == 4
    run = fluxkit("generate", "--prompt", "a cat", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "a.png"))
    assert run.returncode == 0, run.stderr


def test_info_reports_versions_and_cache(tmp_path):
    run = fluxkit("info", "--json", env_extra={"HF_HUB_CACHE": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    for key in ("torch", "diffusers", "transformers", "bitsandbytes"):
        assert info[key]
    assert info["cached_flux_models"] == []
    assert "cuda_device" in info


def test_bench_and_references(tiny_dir, tmp_path):
    run = fluxkit("bench", "--model", str(tiny_dir), "--device", "cpu", "--iterations", "3", "--warmup", "1",
                  "--json", str(tmp_path / "bench.json"))
    assert run.returncode == 0, run.stderr
    assert "SYNTHETIC" in run.stdout and "p99.9" in run.stdout
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert len(bench["plain"]["iterations"]) == 3 and len(bench["true_cfg"]["iterations"]) == 3
    run = fluxkit("references", "--model", str(tiny_dir), "--device", "cpu", "--out", str(tmp_path / "refs"))
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "refs" / "manifest.json").read_text())
    assert len(manifest["cases"]) == 4 and all((tmp_path / "refs" / c["file"]).is_file() for c in manifest["cases"])
    run = fluxkit("bench", "--model", str(tiny_dir), "--device", "cpu", "--iterations", "0")
    assert run.returncode == 2 and "iterations=0" in run.stderr
