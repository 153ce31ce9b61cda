"""What `pip install fluxkit` gives a host: the runtime's dependencies and no more, each missing extra named in one
line; and an installed wheel with `[lab]` that validates (the end-to-end run of `fluxkit validate`)."""
import json
import subprocess

import pytest

from helpers import bare_env, build_wheel, fresh_environment

# Never needed to load and generate: what `pip install fluxkit` must not pull in.
LAB_MODULES = ("matplotlib", "papermill", "nbconvert", "nbformat", "ipykernel", "jupyterlab", "jsonschema",
               "open_clip", "torchvision", "timm", "torchmetrics", "torchao", "gguf", "ray", "sentencepiece")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    return build_wheel(tmp_path_factory.mktemp("wheel"))


CORE_SCRIPT = """
import importlib.util, json, sys
import fluxkit
model = fluxkit.load_flux_schnell("cpu", "nf4", sys.argv[1])
image = model.generate("a red lighthouse on a cliff", seed=7)
refusals = {}
for preset, model_id in (("torchao-int8wo", sys.argv[1]), ("gguf-q8_0", sys.argv[1]), ("nf4", "synthetic-tiny")):
    try:
        fluxkit.load_flux_schnell("cpu", preset, model_id)
    except fluxkit.VortexInitializationError as err:
        refusals[preset if model_id != "synthetic-tiny" else "synthetic"] = str(err)
print(json.dumps({"fluxkit": fluxkit.__file__, "shape": list(image.shape), "finite": bool(image.isfinite().all()),
                  "importable": [m for m in sys.argv[2:] if importlib.util.find_spec(m)],
                  "imported": [m for m in sys.argv[2:] if m in sys.modules], "refusals": refusals,
                  "layers": model.quantized_layers}))
"""


def test_the_core_install_pulls_no_lab_package_and_generates(wheel, tiny_dir, tmp_path, cache_dir):
    python = fresh_environment(tmp_path / "env", wheel)
    env = bare_env(HF_HUB_OFFLINE="1", FLUXKIT_CACHE=str(tmp_path / "cache"), PATH="/usr/bin:/bin")
    run = subprocess.run([str(python), "-c", CORE_SCRIPT, str(tiny_dir), *LAB_MODULES], capture_output=True,
                         text=True, cwd=tmp_path, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["fluxkit"].startswith(str(tmp_path / "env"))  # the installed wheel, not this checkout
    assert out["shape"] == [512, 512, 3] and out["finite"]
    assert out["importable"] == [] and out["imported"] == []
    assert out["layers"]["transformer"] == {"bitsandbytes.nn.Linear4bit": 28}
    for preset, extra in (("torchao-int8wo", "torchao"), ("gguf-q8_0", "gguf"), ("synthetic", "synthetic")):
        assert f"pip install 'fluxkit[{extra}]'" in out["refusals"][preset], out["refusals"]
    for args, extra in ((["validate"], "lab"), (["sweep", "--out", str(tmp_path)], "metrics"),
                        (["synth", "--out", str(tmp_path / "s")], "synthetic")):
        run = subprocess.run([str(python), "-m", "fluxkit.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                             timeout=300, env=bare_env(PATH="/usr/bin:/bin"))
        assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr[-2000:]
        assert f"pip install 'fluxkit[{extra}]'" in run.stderr
