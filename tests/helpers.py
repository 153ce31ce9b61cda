"""Helpers shared by the tests: the CLI in a subprocess, folder digests, damaged checkpoints, fast validate settings."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fluxkit.config import load_placement, load_preset

PROMPT = "manic scientist, blue spiked hair, white lab coat"
# validate on the tiny checkpoint in seconds: few calls, the small CLIP backbone
FAST_VALIDATE = dict(model="auto", device="cpu", iterations=3, drift_calls=2, clip_model="ViT-B-32",
                     clip_pretrained="openai", sweep_presets=["nf4"], progress=False)


def bare_env(**values: str) -> dict:
    """An environment of only `values` (what a fresh install sees) and the test run's thread count: a process that
    ran with OpenMP's default beside the other pytest-xdist worker took 3x as long (2 cores)."""
    return {**{k: os.environ[k] for k in ("OMP_NUM_THREADS",) if k in os.environ}, **values}


def run_cli(*args: str, env_extra: dict | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    env.pop("HF_HUB_OFFLINE", None)  # the CLI must set it itself
    return subprocess.run([sys.executable, "-m", "fluxkit.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900, cwd=cwd)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def t5_unquantized(name: str = "nf4"):
    """A preset that quantizes the transformer only: placements then differ only in where things run."""
    preset = load_preset(name)
    return dataclasses.replace(preset, quantization=dataclasses.replace(preset.quantization, components=("transformer",)))


def with_budgets(preset, **changes):
    return dataclasses.replace(preset, budgets=dataclasses.replace(preset.budgets, **changes))


def resident_like(model_dir, placement: str, device: str):
    """Everything resident, with the T5-unquantized preset, decoding in `placement`'s tiles: the tiles change pixels,
    where the weights live must not."""
    from fluxkit import load_flux_schnell

    spec = dataclasses.replace(load_placement("resident"), vae_tile_size=load_placement(placement).vae_tile_size)
    return load_flux_schnell(device=device, quantization=t5_unquantized(), model=model_dir, placement=spec)


def resident_images(model_dir, device: str, seed: int):
    """`seed`'s image from `resident_like` a placement, rendered once per tile size."""
    images = {}

    def image(placement: str):
        tile = load_placement(placement).vae_tile_size
        if tile not in images:
            images[tile] = resident_like(model_dir, placement, device).generate(PROMPT, seed=seed)
        return images[tile]
    return image


@contextlib.contextmanager
def uncaptured(model):
    """The model's calls without its CUDA graphs, through the same compiled modules: what the graphs must equal."""
    graphed, model.fast.graphed = model.fast.graphed, {}
    try:
        yield model
    finally:
        model.fast.graphed = graphed


def process_settings() -> dict:
    """torch's process-wide settings, flat: what a library loaded into Vortex's process must leave as it found them."""
    import torch

    flat = {f"inductor.{k}": v for k, v in torch._inductor.config.get_config_copy().items()}
    flat |= {f"dynamo.{k}": v for k, v in torch._dynamo.config.get_config_copy().items()}
    return flat | {"float32_matmul_precision": torch.get_float32_matmul_precision(),
                   "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
                   "cudnn_benchmark": torch.backends.cudnn.benchmark, "default_dtype": torch.get_default_dtype(),
                   "deterministic": torch.are_deterministic_algorithms_enabled(), "grad": torch.is_grad_enabled()}


def run_main(*args: str) -> tuple[int, str, str]:
    """The CLI's main in this process, as a user's command line runs it, without the seconds an interpreter and its
    imports take to start: (exit code, stdout, stderr). `run_cli` runs the real entry point."""
    import contextlib
    import io

    from fluxkit import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as exit:  # argparse's own errors
            code = exit.code
    return code, out.getvalue(), err.getvalue()


ROOT = Path(__file__).resolve().parents[1]


def closure_site():
    """scripts/closure_site.py: a package's dependency closure as a folder of links into this Python's packages."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("closure_site", ROOT / "scripts" / "closure_site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_wheel(out: Path) -> Path:
    """The fluxkit wheel, built as `pip wheel` builds it for an install, from a copy of what it packs (two builds in
    one source tree would share its build folder)."""
    source = out / "source"
    for name in ("fluxkit", "notebooks", "reference_images"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(source)], check=True, capture_output=True, text=True, timeout=600)
    [wheel] = out.glob("fluxkit-*.whl")
    return wheel


def fresh_environment(folder: Path, wheel: Path, extras: tuple[str, ...] = ()) -> Path:
    """A new virtual environment outside the checkout holding the wheel and, for its dependencies (with `extras`),
    only their closure: links into this Python's installed packages, so that nothing is downloaded and nothing
    else can be imported. Returns its interpreter."""
    import zipfile

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    with zipfile.ZipFile(wheel) as zf:
        metadata = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1].strip() for line in zf.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    site_tools = closure_site()
    links = folder / "closure"
    links.mkdir()
    for dist in site_tools.closure(wheel_requirements(requires, extras)).values():
        for entry in site_tools.top_level_entries(dist):
            if entry.exists() and not (links / entry.name).exists():
                (links / entry.name).symlink_to(entry)
    (site / "closure.pth").write_text(str(links) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    return python


def wheel_requirements(requires: list[str], extras: tuple[str, ...]) -> list[str]:
    """A wheel's Requires-Dist lines with `extras` (its own extras, `fluxkit[synthetic,metrics]`, expanded), as
    requirements without markers."""
    from packaging.requirements import Requirement

    out, todo, seen = [], {"", *extras}, set()
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for text in requires:
            req = Requirement(text)
            if not ((req.marker is None and extra == "") or (req.marker is not None
                                                              and req.marker.evaluate({"extra": extra}))):
                continue
            if req.name == "fluxkit":
                todo |= set(req.extras) - seen
                continue
            out.append(f"{req.name}{'[' + ','.join(sorted(req.extras)) + ']' if req.extras else ''}{req.specifier}")
    return out


def task_cache(checkpoint: Path, folder: Path) -> Path:
    """A Hugging Face cache in `folder` holding `checkpoint` as black-forest-labs/FLUX.1-schnell at the revision the
    presets pin: the task's literal `load_flux_schnell(device, quantization)` then finds it as it would find the
    real weights, through the cache lookup (and reports it as synthetic: its marker travels with it)."""
    preset = load_preset("nf4")
    repo = folder / f"models--{preset.model.id.replace('/', '--')}"
    snapshot = repo / "snapshots" / preset.model.revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(preset.model.revision)
    for entry in Path(checkpoint).iterdir():
        (snapshot / entry.name).symlink_to(entry.resolve())
    return folder
