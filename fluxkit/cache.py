"""fluxkit's cache folder, and the files it derives there from checkpoints (GGUF files, synthetic checkpoints).

A derived file is verified every time it is used, not only when it is written: a file cut short by a full disk or
a crash would otherwise fail every later load with a message about the checkpoint it came from. One that fails
its check is rebuilt once; if it fails again the error names the file and how to clear it.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from .errors import VortexInitializationError, one_line

log = logging.getLogger("fluxkit")


def cache_root() -> Path:
    """FLUXKIT_CACHE, else ~/.cache/fluxkit."""
    return Path(os.environ.get("FLUXKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fluxkit"))


def derived(path: Path, build: Callable[[Path], None], verify: Callable[[Path], None], what: str) -> Path:
    """`path` built by `build` on first use, checked by `verify` (which raises when it is damaged) on every use."""
    if path.exists():
        try:
            verify(path)
            return path
        except Exception as err:  # any damage: a short file, a bad header, a half-written folder
            log.warning("%s %s is damaged (%s); rebuilding it", what, path, one_line(err))
            remove(path)
    build(path)
    try:
        verify(path)
    except Exception as err:
        raise VortexInitializationError(
            f"{what} {path} was rebuilt but is still damaged ({one_line(err)}).",
            remediation=f"delete {path} (or the whole cache, {cache_root()}) and check the disk it is on has room; "
                        "FLUXKIT_CACHE moves the cache") from err
    return path


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
