"""One function called in a fresh Python process: what a measurement needs whose memory, compile cache or stall must
be its own (each sweep variant, each placement profile, Vortex's co-tenancy check). The serial sweep, the Ray
sweep and the profiles all go through `call_in_fresh_process`.

The child reads `{"function": "module:name", "kwargs": {...}, "threads": n, "log_level": n}` on stdin and prints one
JSON line: the function's result, or `{"error": "Type: message"}` for a failure fluxkit foresaw. Its fluxkit log
records come back on stderr as they are made, one JSON line each, and are handed to this process's logging: a long
measurement (a load, 100 co-tenancy calls) shows its progress under `fluxkit -v`, and a run cut short (a machine
taken back) leaves in its log what it had done.
"""
from __future__ import annotations

import collections
import faulthandler
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO

from ..errors import FluxkitError, one_line

log = logging.getLogger(__name__)
STACKS_WAIT_S = 3.0  # for a stalled process to write its stacks, then for its pipes to close
_STACKS_SIGNAL = getattr(signal, "SIGUSR1", None)  # none on Windows


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
    request = json.dumps({"function": function, "kwargs": kwargs, "threads": threads,
                          "log_level": logging.getLogger("fluxkit").getEffectiveLevel()})
    child = subprocess.Popen([sys.executable, "-m", "fluxkit.lab.fresh"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
                             preexec_fn=_die_with_parent)
    stdout: list[str] = []
    stderr = collections.deque(maxlen=200)  # the child's last stderr lines that are not log records
    readers = [threading.Thread(target=stdout.extend, args=(child.stdout,), daemon=True),
               threading.Thread(target=_relay, args=(child.stderr, stderr), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        child.stdin.write(request)
        child.stdin.close()
    except BrokenPipeError:  # it died before reading: its exit status and stderr say why
        pass
    try:  # a call that stalls (a compile that never ends) must not take the caller with it
        child.wait(timeout_s)
    except subprocess.TimeoutExpired:
        stderr.clear()
        if _STACKS_SIGNAL is not None:  # its threads' stacks, before it goes: where a stalled run stalled
            child.send_signal(_STACKS_SIGNAL)
            time.sleep(STACKS_WAIT_S)
        child.kill()
        child.wait()
        for reader in readers:
            reader.join(STACKS_WAIT_S)  # a process it started may hold the pipes open
        log.warning("%s stopped after %g s; its threads were at:\n%s", function, timeout_s,
                    "\n".join(stderr) or "(no stacks written: it had not reached the call)")
        raise FreshProcessError(f"did not finish within {timeout_s:g} s; stopped") from None
    except BaseException:  # interrupted (Ctrl-C): the measurement must not go on holding the GPU
        child.kill()
        raise
    for reader in readers:
        reader.join()
    lines = "".join(stdout).strip().splitlines()
    if child.returncode != 0 or not lines:  # a crash the process could not report itself
        raise FreshProcessError(stderr[-1] if stderr else f"exit {child.returncode}")
    result = json.loads(lines[-1])
    if isinstance(result, dict) and "error" in result:
        raise FreshProcessError(result["error"])
    return result


def _relay(stream: IO[str], stderr: collections.deque) -> None:
    """The child's stderr: its log records to this process's loggers (and so to the handlers the caller set), every
    other line kept for the reason of a crash or the stacks of a stall."""
    for line in stream:
        if line.startswith(_RECORD_MARK):
            record = logging.makeLogRecord(json.loads(line[len(_RECORD_MARK):]))
            logger = logging.getLogger(record.name)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
        elif line.strip():
            stderr.append(line.rstrip())


_RECORD_MARK = "\x1efluxkit-record "  # starts a stderr line that is a log record, not a line of a traceback


class _RecordLine(logging.Formatter):
    """A log record as one stderr line, its message already formatted, for `_relay` to rebuild in the caller."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in vars(record).items() if k not in ("msg", "args", "exc_info")}
        fields["msg"] = record.getMessage()
        if record.exc_info and not record.exc_text:
            fields["exc_text"] = self.formatException(record.exc_info)
        return _RECORD_MARK + json.dumps(fields, default=str)


def _die_with_parent() -> None:
    """In the child, before it starts: on Linux, be killed when the process that started it dies, so that a sweep
    stopped or a Ray worker lost leaves no measurement holding the GPU."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _main() -> None:
    if _STACKS_SIGNAL is not None:  # asked for by the caller of a stalled run
        faulthandler.register(_STACKS_SIGNAL, all_threads=True)
    request = json.loads(sys.stdin.read())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RecordLine())
    logger = logging.getLogger("fluxkit")  # this process is fluxkit's own: its logging is set here, once
    logger.addHandler(handler)
    logger.setLevel(request["log_level"])
    logger.propagate = False  # a record reaches the caller once, through `_relay`
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
