"""One function called in a fresh Python process: what a measurement needs whose memory, compile cache or stall must
be its own (each sweep variant, each placement profile, Vortex's co-tenancy check). The serial sweep, the Ray
sweep and the profiles all go through `call_in_fresh_process`.

The child reads `{"function": "module:name", "kwargs": {...}, "threads": n}` on stdin and prints one JSON line: the
function's result, or `{"error": "Type: message"}` for a failure fluxkit foresaw.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

from ..errors import FluxkitError, one_line


class FreshProcessError(RuntimeError):
    """The call failed in its fresh process: the message is the child's own one-line reason (`Type: message`), or
    why the process ended (a timeout, a crash)."""


def reason(err: Exception) -> str:
    """A failure as a result row keeps it: the fresh process's own reason, or this process's `Type: message`."""
    return str(err) if isinstance(err, FreshProcessError) else one_line(err)


def call_in_fresh_process(function: str, kwargs: dict, timeout_s: float | None = None,
                          threads: int | None = None) -> dict:
    """`function` ("package.module:name") called with `kwargs` in a new interpreter; returns its JSON result.
    `threads` sets torch's CPU threads there (a CPU result is bit for bit the same only at the same thread count).
    Raises FreshProcessError with the one-line reason when the call fails, the process dies or `timeout_s` passes."""
    request = json.dumps({"function": function, "kwargs": kwargs, "threads": threads})
    try:  # a call that stalls (a compile that never ends) must not take the caller with it
        run = subprocess.run([sys.executable, "-m", "fluxkit.lab.fresh"], input=request, capture_output=True,
                             text=True, env=os.environ.copy(), timeout=timeout_s, preexec_fn=_die_with_parent)
    except subprocess.TimeoutExpired:
        raise FreshProcessError(f"did not finish within {timeout_s:g} s; stopped") from None
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:  # a crash the process could not report itself
        errors = run.stderr.strip().splitlines()
        raise FreshProcessError(errors[-1] if errors else f"exit {run.returncode}")
    result = json.loads(lines[-1])
    if isinstance(result, dict) and "error" in result:
        raise FreshProcessError(result["error"])
    return result


def _die_with_parent() -> None:
    """In the child, before it starts: on Linux, be killed when the process that started it dies, so that a sweep
    stopped or a Ray worker lost leaves no measurement holding the GPU."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _main() -> None:
    request = json.loads(sys.stdin.read())
    if request.get("threads"):
        import torch

        torch.set_num_threads(request["threads"])
    module, name = request["function"].split(":")
    try:
        result = getattr(importlib.import_module(module), name)(**request["kwargs"])
    except (FluxkitError, RuntimeError) as err:  # the whole reason, on one line, for the caller's row
        result = {"error": one_line(err)}
    from .report import to_jsonable

    print(json.dumps(to_jsonable(result)), flush=True)
    sys.stderr.flush()
    # The result is out: skip the interpreter's teardown, which takes seconds with CUDA and, with an SM slice's green
    # context, aborted the process after its output was written (H200 host).
    os._exit(0)


if __name__ == "__main__":
    _main()
