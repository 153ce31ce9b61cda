"""The command line: thin over the library, every argument checked before work, one-line user errors."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from fluxkit import cli
from fluxkit.config import available_placements, available_presets
from helpers import PROMPT, copy_checkpoint, run_cli


def test_generate_writes_a_png(tiny_dir, tmp_path):
    out = tmp_path / "img.png"
    run = run_cli("generate", "--prompt", PROMPT, "--seed", "3", "--model", str(tiny_dir), "--device", "cpu",
                  "--placement", "vortex", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "seed 3" in run.stdout and "synthetic tiny" in run.stdout and "vortex" in run.stdout
    image = np.asarray(Image.open(out))
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8


def _user_errors(tmp_path, tiny_dir):
    (tmp_path / "a_dir.png").mkdir()
    damaged = copy_checkpoint(tiny_dir, tmp_path / "damaged")
    (damaged / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 4)
    gen = ["generate", "--prompt", PROMPT, "--model", str(tiny_dir), "--device", "cpu"]
    ok_png = str(tmp_path / "x.png")
    return {
        "empty prompt": (["generate", "--prompt", "  ", "--model", str(tiny_dir), "--out", ok_png], "prompt is empty"),
        "seed -1": (gen + ["--seed", "-1", "--out", ok_png], "argument --seed: -1 is outside"),
        "seed overflow": (gen + ["--seed", "1" + "0" * 40, "--out", ok_png], "argument --seed"),
        "cfg nan": (gen + ["--true-cfg-scale", "nan", "--out", ok_png], "argument --true-cfg-scale: nan"),
        "out in a missing folder": (gen + ["--out", str(tmp_path / "missing" / "x.png")], "does not exist"),
        "out is a folder": (gen + ["--out", str(tmp_path / "a_dir.png")], "is a folder"),
        "out not a png": (gen + ["--out", str(tmp_path / "x.jpg")], "must end in .png"),
        "bench json is a folder": (["bench", "--json", str(tmp_path)], "must end in .json"),
        "bench zero iterations": (["bench", "--iterations", "0"], "argument --iterations: 0 is outside"),
        "unknown lever": (["bench", "--levers", "turbo"], "argument --levers: invalid choice"),
        "baseline of a placement": (["bench", "--baseline", "plain", "--levers", "eager", "--placement", "vortex"],
                                    "--baseline plain compares resident models"),
        "report name escapes": (["validate", "--name", "../../x"], "argument --name"),
        "absolute report name": (["validate", "--name", "/tmp/x"], "argument --name"),
        "unknown placement": (gen + ["--placement", "gpu", "--out", ok_png], "argument --placement: invalid choice"),
        "bad device": (gen[:-2] + ["--device", "gpu", "--out", ok_png], "argument --device"),
        "unknown clip": (["validate", "--clip-pretrained", "nope"], "unknown to open_clip"),
        "missing weights": (["generate", "--prompt", "a cat", "--model", "black-forest-labs/FLUX.1-schnell",
                             "--device", "cpu", "--out", ok_png], "Weights for black-forest-labs/FLUX.1-schnell"),
        "damaged checkpoint": (["generate", "--prompt", "a cat", "--model", str(damaged), "--device", "cpu",
                                "--out", ok_png], "is not a whole safetensors file"),
        "synth into a file": (["synth", "--out", str(tmp_path / "x.jpg")], None),
        "plain pattern of a torchao preset": (["bench", "--baseline", "plain", "--quantization", "torchao-int8wo"],
                                              "bitsandbytes quantizer"),
        "preset this device cannot run": (gen + ["--quantization", "torchao-fp8dq", "--out", ok_png],
                                          "compute capability 8.9"),
    }


def test_user_errors_are_one_line_with_exit_2(tiny_dir, tmp_path):
    (tmp_path / "x.jpg").write_text("a file, not a folder")
    for case, (args, expected) in _user_errors(tmp_path, tiny_dir).items():
        run = run_cli(*args, env_extra={"HF_HUB_CACHE": str(tmp_path / "empty-cache")})
        lines = run.stderr.strip().splitlines()
        lines = [line for line in lines if "kernels-community" not in line and "Loading weights" not in line]
        assert run.returncode == 2, (case, run.stderr)
        assert len(lines) == 1 and lines[0].startswith("fluxkit: error: "), (case, run.stderr)
        assert expected is None or expected in lines[0], (case, lines[0])
        assert not (tmp_path / "x.png").exists(), case


def test_library_bugs_keep_their_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(cli, "_cmd_info", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["info"])


def test_offline_comes_from_the_command_not_from_other_arguments(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    code = cli.main(["generate", "--prompt", "download the moon", "--model", "no-such/model", "--device", "cpu",
                     "--out", str(tmp_path / "a.png")])
    assert code == 2  # not cached, and never fetched
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE is True
    run = run_cli("info", "--json")
    assert json.loads(run.stdout)["hf_hub_offline"] is True


def test_synth_then_generate_from_it(tmp_path):
    run = run_cli("synth", "--preset", "tiny", "--seed", "4", "--out", str(tmp_path / "ckpt"))
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "ckpt" / "fluxkit_synthetic.json").read_text())["seed"] == 4
    run = run_cli("generate", "--prompt", "a cat", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "a.png"))
    assert run.returncode == 0, run.stderr


def test_info_reports_versions_and_cache(tmp_path):
    run = run_cli("info", "--json", env_extra={"HF_HUB_CACHE": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    for key in ("torch", "diffusers", "transformers", "bitsandbytes"):
        assert info[key]
    assert info["cached_flux_models"] == [] and info["cpu_capability"]


def test_plan_prints_every_preset_and_placement_and_recommends_vortex():
    run = run_cli("plan")
    assert run.returncode == 0, run.stderr
    assert "recommended: --quantization nf4 --placement vortex" in run.stdout
    run = run_cli("plan", "--json", "--budget-gb", "4")
    plans = json.loads(run.stdout)
    assert len(plans["plans"]) == len(available_presets()) * len(available_placements())
    assert plans["recommended"] is None
    run = run_cli("plan", "--budget-gb", "4")
    assert run.returncode == 1 and "nothing fits a 4.0 GB share" in run.stdout


def test_bench_levers_side_by_side(tiny_dir, tmp_path):
    run = run_cli("bench", "--model", str(tiny_dir), "--device", "cpu", "--placement", "vortex", "--levers", "eager",
                  "untiled-decode", "--iterations", "2", "--rounds", "2", "--warmup", "1", "--json",
                  str(tmp_path / "levers.json"))
    assert run.returncode == 0, run.stderr
    assert "x" in run.stdout and "of configured" in run.stdout
    result = json.loads((tmp_path / "levers.json").read_text())
    assert list(result["variants"]) == ["configured", "eager", "untiled-decode"]
    assert set(result["ratios_to_configured"]) == {"eager", "untiled-decode"} and result["skipped"] == {}
    # compilation acts on CUDA only: on a CPU the eager lever runs the same arithmetic; the untiled decode does not
    # blend tiles, so its images differ from the tiled ones of the configured path (vortex tiles; resident does not)
    assert float(result["agreement_psnr_db"]["eager"]) == float("inf")  # JSON keeps it as "inf"
    assert float(result["agreement_psnr_db"]["untiled-decode"]) < float("inf")


def test_bench_and_references(tiny_dir, tmp_path):
    run = run_cli("bench", "--model", str(tiny_dir), "--device", "cpu", "--iterations", "3", "--warmup", "1",
                  "--json", str(tmp_path / "bench.json"))
    assert run.returncode == 0, run.stderr
    assert "SYNTHETIC" in run.stdout and "p99.9" in run.stdout
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert len(bench["plain"]["iterations"]) == 3 and len(bench["true_cfg"]["iterations"]) == 3
    run = run_cli("references", "--model", str(tiny_dir), "--device", "cpu", "--out", str(tmp_path / "refs"))
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "refs" / "manifest.json").read_text())
    assert len(manifest["cases"]) == 4 and all((tmp_path / "refs" / c["file"]).is_file() for c in manifest["cases"])
    run = run_cli("references", "--model", str(tiny_dir), "--device", "cpu", "--out", str(tmp_path / "refs"))
    assert run.returncode == 2 and "--overwrite" in run.stderr
