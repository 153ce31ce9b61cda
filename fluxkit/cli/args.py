"""argparse types: each reads and checks one argument completely (a file is parsed, not only found) and refuses a
bad value with a message that names the fix, before any command loads or measures anything."""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from ..checks import MAX_SEED, check_number
from ..errors import InputError, InputTypeError

ARG_ERRORS = (argparse.ArgumentTypeError, argparse.ArgumentTypeError)


def number_in(kind: type, low: float, high: float):
    """An argparse type: `kind` (int or float) within [low, high], finite."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        try:
            check_number("value", value, low, high, integer=kind is int, errors=ARG_ERRORS)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{text} is outside {low}..{high}") from None
        return value
    return parse


def int_in(low: int, high: int):
    return number_in(int, low, high)


def float_in(low: float, high: float):
    return number_in(float, low, high)


SEED = int_in(0, MAX_SEED)


def writable_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{what}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{what}: folder {folder} is not writable")


def output_file(suffix: str):
    """A file to be written: its folder exists and is writable, it is not a folder, it ends in `suffix`."""
    def parse(text: str) -> Path:
        path = Path(text).expanduser()
        if path.suffix.lower() != suffix:
            raise argparse.ArgumentTypeError(f"{text}: the file name must end in {suffix}")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name ending in {suffix}")
        writable_folder(path.parent if str(path.parent) else Path("."), text)
        if path.exists() and not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text} exists and is not writable")
        return path
    return parse


def output_folder(text: str) -> Path:
    """A folder to be written into: it is a folder if it exists, else its parent is one (and writable)."""
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
        writable_folder(path, text)
    else:
        writable_folder(path.parent if str(path.parent) else Path("."), text)
    return path


def input_file(suffix: str):
    def parse(text: str) -> Path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"{text}: no such file")
        if path.suffix.lower() != suffix:
            raise argparse.ArgumentTypeError(f"{text}: expected a {suffix} file")
        return path
    return parse


def json_file(text: str) -> dict:
    """A JSON file holding an object, read and parsed now."""
    path = input_file(".json")(text)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise argparse.ArgumentTypeError(f"{text} is not valid JSON ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(f"{text} holds a JSON {type(data).__name__}, not an object")
    return {"path": path, "data": data}


def prompts_file(text: str) -> list[dict]:
    """A YAML (or JSON) file of prompt cases, every case checked now: a sweep must not load a model for a file it
    cannot use."""
    from ..lab.prompts import read_prompts

    path = input_file(Path(text).suffix.lower() if Path(text).suffix.lower() in (".yaml", ".yml", ".json")
                      else ".yaml")(text)
    try:
        return read_prompts(path)
    except (InputError, InputTypeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def report_name(text: str) -> str:
    from ..lab.validate import check_report_name

    try:
        return check_report_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"name={text!r}: ")) from None


def device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, cpu, cuda or cuda:N")
    return text


def model_args(p: argparse.ArgumentParser) -> None:
    """The arguments that pick what to load: weights, preset, placement, device."""
    from ..config import AUTO_PLACEMENT, DEFAULT_MODEL, available_placements, available_presets

    p.add_argument("--model", default="auto", help=f"folder, Hub id from the local cache, synthetic-tiny, "
                                                   f"synthetic-full, or auto ({DEFAULT_MODEL} if cached, else "
                                                   "synthetic-tiny)")
    p.add_argument("--quantization", default="nf4", choices=available_presets())
    p.add_argument("--placement", default=None, choices=[AUTO_PLACEMENT, *available_placements()],
                   help="where components live (default: the preset's, auto: the fastest that fits the Flux share and "
                        "the free GPU memory); vortex fits Vortex's 6 GB share")
    p.add_argument("--device", default="auto", type=device)


def load(args: argparse.Namespace):
    from ..loading import load_flux_schnell

    return load_flux_schnell(device=args.device, quantization=args.quantization, model=args.model,
                             placement=args.placement)
