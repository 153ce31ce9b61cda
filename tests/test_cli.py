"""The command line: thin over the library, every argument, file and environment variable checked before work,
one-line user errors."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from fluxkit.cli import run as run_commands
from fluxkit.config import available_placements, available_presets
from helpers import PROMPT, copy_checkpoint, run_cli, run_main


def test_generate_writes_a_png(tiny_dir, tmp_path):
    """The installed entry point, in a process of its own."""
    out = tmp_path / "img.png"
    run = run_cli("generate", "--prompt", PROMPT, "--seed", "3", "--model", str(tiny_dir), "--device", "cpu",
                  "--placement", "vortex", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "seed 3" in run.stdout and "synthetic tiny" in run.stdout and "vortex" in run.stdout
    image = np.asarray(Image.open(out))
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if a command loads a model: a user error must be found before anything heavy."""
    import fluxkit.loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the user error was found")

    monkeypatch.setattr(fluxkit.loading, "load_flux_schnell", refuse)


def _user_errors(tmp_path, tiny_dir):
    (tmp_path / "a_dir.png").mkdir()
    (tmp_path / "x.jpg").write_text("a file, not a folder")
    damaged = copy_checkpoint(tiny_dir, tmp_path / "damaged")
    (damaged / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 4)
    gen = ["generate", "--prompt", PROMPT, "--model", str(tiny_dir), "--device", "cpu"]
    ok_png = str(tmp_path / "x.png")
    files = {"broken.json": "{not json", "list.json": "[1, 2]", "nope.json": json.dumps({"model": {"preset": "nope"}}),
             "broken.yaml": "cases: [unclosed", "bad_seed.yaml": "cases: [{name: a, prompt: a cat, seed: abc}]",
             "blank.yaml": "cases: [{name: a, prompt: '\u3164', seed: 1}]", "extra.yaml": "cases: [{name: a}]"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    sweep = ["sweep", "--device", "cpu", "--out", str(tmp_path / "sweep"), "--prompts"]
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
        "a placement twice": (["validate", "--placements", "resident", "resident"], "names resident more than once"),
        "a later placement without references": (  # refused before the first placement's notebooks run
            ["validate", "--model", str(tiny_dir), "--device", "cpu", "--placements", "resident", "vortex",
             "--out-root", str(tmp_path / "reports")], "no reference images"),
        "synth into a file": (["synth", "--out", str(tmp_path / "x.jpg")], "exists and is not a folder"),
        "plain pattern of a torchao preset": (["bench", "--baseline", "plain", "--quantization", "torchao-int8wo"],
                                              "bitsandbytes quantizer"),
        "estimate from broken JSON": (["estimate", "--from", str(tmp_path / "broken.json")], "is not valid JSON"),
        "estimate from a JSON list": (["estimate", "--from", str(tmp_path / "list.json")], "not an object"),
        "estimate from an unknown preset": (["estimate", "--from", str(tmp_path / "nope.json")],
                                            "nope.json: model.preset 'nope' is not a preset"),
        "estimate check of broken JSON": (["estimate", "--from", str(tmp_path / "nope.json"), "--check",
                                           str(tmp_path / "broken.json")], "argument --check"),
        "sweep prompts not YAML": (sweep + [str(tmp_path / "broken.yaml")], "broken.yaml: not valid YAML"),
        "sweep prompt seed not a number": (sweep + [str(tmp_path / "bad_seed.yaml")], "case 0: seed must be an int"),
        "sweep prompt invisible": (sweep + [str(tmp_path / "blank.yaml")], "invisible characters only"),
        "sweep prompt keys": (sweep + [str(tmp_path / "extra.yaml")], "expected exactly the keys name, prompt"),
    }


def test_user_errors_are_one_line_with_exit_2_before_any_load(tiny_dir, tmp_path, no_load):
    for case, (args, expected) in _user_errors(tmp_path, tiny_dir).items():
        code, _, err = run_main(*args)
        lines = err.strip().splitlines()
        assert code == 2, (case, err)
        assert len(lines) == 1 and lines[0].startswith("fluxkit: error: "), (case, err)
        assert expected in lines[0], (case, lines[0])
        assert not (tmp_path / "x.png").exists() and not (tmp_path / "reports").exists(), case


def test_missing_or_damaged_weights_are_one_line_too(tiny_dir, tmp_path):
    damaged = copy_checkpoint(tiny_dir, tmp_path / "damaged")
    (damaged / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 4)
    for model, expected in ((damaged, "is not a whole safetensors file"),
                            ("black-forest-labs/FLUX.1-schnell", "Weights for black-forest-labs/FLUX.1-schnell")):
        code, _, err = run_main("generate", "--prompt", "a cat", "--model", str(model), "--device", "cpu", "--out",
                                str(tmp_path / "x.png"))
        assert code == 2 and err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("variable,value,match", [
    ("FLUXKIT_CACHE", "file", "FLUXKIT_CACHE=.*is not a folder"),
    ("FLUXKIT_REFERENCE_DIR", "file", "FLUXKIT_REFERENCE_DIR=.*is not a folder"),
    ("FLUXKIT_VRAM_LIMIT_GB", "abc", "FLUXKIT_VRAM_LIMIT_GB='abc': not a number"),
])
def test_environment_variables_are_checked_before_work(tmp_path, monkeypatch, no_load, variable, value, match):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv(variable, str(tmp_path / "file") if value == "file" else value)
    code, _, err = run_main("references", "--device", "cpu", "--out", str(tmp_path / "refs"))
    assert code == 2 and err.count("\n") == 1
    assert __import__("re").search(match, err), err


def test_references_refuse_to_overwrite_before_loading(tiny_dir, tmp_path, monkeypatch):
    code, _, err = run_main("references", "--model", str(tiny_dir), "--device", "cpu", "--out", str(tmp_path / "refs"))
    assert code == 0, err
    manifest = json.loads((tmp_path / "refs" / "manifest.json").read_text())
    assert len(manifest["cases"]) == 4 and all((tmp_path / "refs" / c["file"]).is_file() for c in manifest["cases"])
    import fluxkit.loading

    monkeypatch.setattr(fluxkit.loading, "load_flux_schnell", lambda *a, **k: pytest.fail("loaded a model"))
    code, _, err = run_main("references", "--model", str(tiny_dir), "--device", "cpu", "--out", str(tmp_path / "refs"))
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1
    (tmp_path / "refs" / "manifest.json").write_text("{broken")
    code, _, err = run_main("references", "--model", str(tiny_dir), "--device", "cpu", "--out", str(tmp_path / "refs"),
                            "--overwrite")
    assert code == 2 and "manifest.json is not valid JSON" in err and err.count("\n") == 1


def test_library_bugs_keep_their_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(run_commands, "info", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_main("info")


def test_offline_comes_from_the_command_not_from_other_arguments(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    code, _, _ = run_main("generate", "--prompt", "download the moon", "--model", "no-such/model", "--device", "cpu",
                          "--out", str(tmp_path / "a.png"))
    assert code == 2  # not cached, and never fetched
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE is True


def test_synth_then_generate_from_it(tmp_path):
    code, _, err = run_main("synth", "--preset", "tiny", "--seed", "4", "--out", str(tmp_path / "ckpt"))
    assert code == 0, err
    assert json.loads((tmp_path / "ckpt" / "fluxkit_synthetic.json").read_text())["seed"] == 4
    code, out, err = run_main("generate", "--prompt", "a cat", "--model", str(tmp_path / "ckpt"), "--out",
                              str(tmp_path / "a.png"))
    assert code == 0 and "synthetic tiny (seed 4" in out, err


def test_info_reports_versions_and_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    code, out, err = run_main("info", "--json")
    assert code == 0, err
    info = json.loads(out)
    for key in ("torch", "diffusers", "transformers", "bitsandbytes"):
        assert info[key]
    assert info["cached_flux_models"] == [] and info["cpu_capability"] and info["hf_hub_offline"] is True


def test_plan_prints_every_preset_and_placement_and_recommends_vortex():
    code, out, _ = run_main("plan")
    assert code == 0 and "recommended: --quantization nf4 --placement vortex" in out
    code, out, _ = run_main("plan", "--json", "--budget-gb", "4")
    plans = json.loads(out)
    assert len(plans["plans"]) == len(available_presets()) * len(available_placements())
    assert plans["recommended"] is None
    code, out, _ = run_main("plan", "--budget-gb", "4")
    assert code == 1 and "nothing fits a 4.0 GB share" in out


def test_bench_levers_side_by_side(tiny_dir, tmp_path):
    code, out, err = run_main("bench", "--model", str(tiny_dir), "--device", "cpu", "--placement", "vortex", "--levers",
                              "eager", "untiled-decode", "--iterations", "2", "--rounds", "2", "--warmup", "1", "--json",
                              str(tmp_path / "levers.json"))
    assert code == 0, err
    assert "x" in out and "of configured" in out
    result = json.loads((tmp_path / "levers.json").read_text())
    assert list(result["variants"]) == ["configured", "eager", "untiled-decode"]
    assert set(result["ratios_to_configured"]) == {"eager", "untiled-decode"} and result["skipped"] == {}
    # compilation acts on CUDA only: on a CPU the eager lever runs the same arithmetic; the untiled decode does not
    # blend tiles, so its images differ from the tiled ones of the configured path (vortex tiles; resident does not)
    assert float(result["agreement_psnr_db"]["eager"]) == float("inf")  # JSON keeps it as "inf"
    assert float(result["agreement_psnr_db"]["untiled-decode"]) < float("inf")


def test_bench(tiny_dir, tmp_path):
    code, out, err = run_main("bench", "--model", str(tiny_dir), "--device", "cpu", "--iterations", "3", "--warmup",
                              "1", "--json", str(tmp_path / "bench.json"))
    assert code == 0, err
    assert "SYNTHETIC" in out and "p99.9" in out
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert len(bench["plain"]["iterations"]) == 3 and len(bench["true_cfg"]["iterations"]) == 3
