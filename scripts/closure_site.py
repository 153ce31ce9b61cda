"""Build a folder that holds only fluxkit's dependency closure, as symlinks into the running Python's packages.

Why: a host with packages fluxkit does not depend on imports them anyway when diffusers or transformers find them
(peft, scikit-learn, ...), and a restart pays their import time. A Python run with this folder as its only package
path (a venv without system packages, PYTHONPATH=repo:FOLDER) imports what a clean install of fluxkit would.
Usage: python3 scripts/closure_site.py OUT_DIR [EXTRA ...]   (EXTRA: optional-dependency groups of pyproject.toml)
"""
from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def closure(requirements: list[str]) -> dict[str, md.Distribution]:
    """Every installed distribution the requirements need, transitively (markers evaluated, extras followed)."""
    found: dict[str, md.Distribution] = {}
    followed: set[tuple[str, str]] = set()  # (distribution, extra; "" for its plain requirements)
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        try:
            dist = found.get(name) or md.distribution(req.name)
        except md.PackageNotFoundError:
            print(f"not installed: {req.name} (needed as {req})", file=sys.stderr)
            continue
        found[name] = dist
        for e in {""} | set(req.extras):
            if (name, e) not in followed:
                followed.add((name, e))
                todo += [(Requirement(r), e) for r in dist.requires or []]
    return found


def top_level_entries(dist: md.Distribution) -> set[Path]:
    """The files and folders a distribution put directly into its site folder (its packages and its dist-info)."""
    base = Path(dist.locate_file(""))
    entries = set()
    for f in dist.files or []:
        first = Path(f).parts[0]
        if first not in ("..", "__pycache__") and not first.endswith(".pth"):
            entries.add(base / first)
    return entries


def main() -> None:
    out = Path(sys.argv[1])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in sys.argv[2:]:
        requirements += project["optional-dependencies"][extra]
    dists = closure(requirements)
    out.mkdir(parents=True, exist_ok=True)
    for dist in dists.values():
        for entry in top_level_entries(dist):
            link = out / entry.name
            if entry.exists() and not link.exists():  # the first on sys.path wins, as for an import
                link.symlink_to(entry)
    print(f"{out}: {len(dists)} distributions, {len(list(out.iterdir()))} entries")


if __name__ == "__main__":
    main()
