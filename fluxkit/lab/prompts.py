"""Prompt cases ({name, prompt, seed}): the reference prompts, and the files a user gives a sweep. Every case is
checked when the file is read, so a bad seed or an empty prompt is refused before any model loads."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from ..checks import MAX_SEED, check_number
from ..config import CONFIG_DIR
from ..errors import InputError
from ..sampling import clean_prompt

REFERENCE_PROMPTS = CONFIG_DIR / "reference_prompts.yaml"
CASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # names become image file names


def read_prompts(path: str | Path) -> list[dict]:
    """The `cases` of a YAML or JSON file (or the file's top-level list), each {name, prompt, seed}, checked."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot be read ({err})") from None
    cases = data["cases"] if isinstance(data, dict) and "cases" in data else data
    if not isinstance(cases, list) or not cases:
        raise InputError(f"{path}: expected a non-empty list `cases` of {{name, prompt, seed}} entries")
    names = set()
    for i, case in enumerate(cases):
        where = f"{path}: case {i}"
        if not isinstance(case, dict) or set(case) != {"name", "prompt", "seed"}:
            raise InputError(f"{where}: expected exactly the keys name, prompt and seed, got "
                             f"{sorted(case) if isinstance(case, dict) else type(case).__name__}")
        if not isinstance(case["name"], str) or not CASE_NAME.fullmatch(case["name"]):
            raise InputError(f"{where}: name={case['name']!r} must be letters, digits, '.', '_' or '-' (it names a "
                             "file)")
        if case["name"] in names:
            raise InputError(f"{where}: name {case['name']!r} is used twice")
        names.add(case["name"])
        clean_prompt(case["prompt"], f"{where}: prompt")
        check_number(f"{where}: seed", case["seed"], 0, MAX_SEED, integer=True)
    return cases


def reference_prompts() -> list[dict]:
    """The prompts `fluxkit references` renders and the quality regression compares against."""
    return read_prompts(REFERENCE_PROMPTS)
