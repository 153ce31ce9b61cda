"""Argument checks shared by the library and the CLI. Each error names the argument and what is allowed.

`errors` picks the pair of classes to raise: (value error, type error). `load_flux_schnell` passes
the load-failure pair so that Vortex sees every bad load argument as a `VortexInitializationError`.
"""
from __future__ import annotations

import math

from .errors import InputError, InputTypeError

INPUT_ERRORS = (InputError, InputTypeError)
MAX_SEED = 2**63 - 1  # seeds are torch.Generator seeds: non-negative int64


def check_number(name: str, value: object, low: float, high: float, *, integer: bool = False,
                 errors: tuple[type, type] = INPUT_ERRORS) -> None:
    """`value` is an int (or, unless `integer`, a float) within [low, high]; bools, NaN and inf are refused."""
    value_error, type_error = errors
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise type_error(f"{name} must be {'an int' if integer else 'a number'}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise value_error(f"{name}={value}: must be a finite number in [{low}, {high}]")
    if not low <= value <= high:  # int comparison: no float overflow for huge ints
        shown = value if abs(value) < 10**30 else f"{str(value)[:12]}... ({len(str(abs(value)))} digits)"
        raise value_error(f"{name}={shown}: must be in [{low}, {high}]")


def check_choice(name: str, value: object, choices: tuple | list, *, errors: tuple[type, type] = INPUT_ERRORS) -> None:
    value_error, type_error = errors
    if not isinstance(value, str):
        raise type_error(f"{name} must be a str, one of {', '.join(map(str, choices))}; got {type(value).__name__}")
    if value not in choices:
        raise value_error(f"{name}={value!r}: expected one of {', '.join(map(str, choices))}")


def parse_positive_float(name: str, text: str, *, errors: tuple[type, type] = INPUT_ERRORS) -> float:
    """A positive finite number written as text (environment variables, CLI arguments)."""
    try:
        value = float(text)
    except ValueError:
        raise errors[0](f"{name}={text!r}: not a number; give a positive number such as 6.0") from None
    if not (math.isfinite(value) and value > 0):
        raise errors[0](f"{name}={text!r}: must be a positive finite number")
    return value


def installed(module: str) -> bool:
    """Whether an optional module can be imported, without importing it (torchao's import alone takes seconds)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def missing_extra(extra: str, *modules: str) -> str | None:
    """Why a feature cannot run here: the first of `modules` that cannot be imported, and the extra that installs
    it; None when all can."""
    for module in modules:
        if not installed(module):
            return f"needs the {module} package, which is not installed: pip install 'fluxkit[{extra}]'"
    return None


def require_extra(what: str, extra: str, *modules: str) -> None:
    """Refuse `what` in one line naming the extra to install, when a module it needs is missing."""
    problem = missing_extra(extra, *modules)
    if problem:
        raise InputError(f"{what} {problem}")
