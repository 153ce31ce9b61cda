"""`fluxkit` command line: a thin layer over the library functions the notebooks call.

Every argument, file, folder and environment variable a command reads is checked before anything is loaded,
generated or benchmarked. A user error prints one line (`fluxkit: error: ...`) and exits 2; `-v` adds the
traceback. Errors that are not fluxkit's own (library bugs) keep their traceback. Every command but `download`
runs with HF_HUB_OFFLINE=1, decided from the parsed command, never from the text of other arguments. The CLI owns
its process, so it also points Inductor's kernel cache at fluxkit's cache folder (unless TORCHINDUCTOR_CACHE_DIR is
set), where a restart finds the kernels compiled before it.

One module per command family: `run` (generate, synth, download, quantize, plan, info), `measure` (bench,
estimate) and `lab` (sweep, references, validate).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from . import lab, measure, run


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, as every other user error
        sys.stderr.write(f"fluxkit: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fluxkit", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level; tracebacks with errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for family in (run, measure, lab):
        family.register(sub)
    return parser


def check_environment() -> None:
    """The environment variables fluxkit reads, checked before any command starts its work."""
    from pathlib import Path

    from ..checks import parse_positive_float
    from ..errors import InputError

    for name in ("FLUXKIT_CACHE", "FLUXKIT_REFERENCE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        value = os.environ.get(name)
        if value and Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
            raise InputError(f"{name}={value}: is not a folder; point it at a folder (or unset it)")
    if os.environ.get("FLUXKIT_VRAM_LIMIT_GB"):
        parse_positive_float("FLUXKIT_VRAM_LIMIT_GB", os.environ["FLUXKIT_VRAM_LIMIT_GB"])


def _force_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:  # already imported (in-process use): it read the variable at import
        hub_constants.HF_HUB_OFFLINE = True


# Notices printed when torchao is imported (by diffusers, whatever the preset, where `fluxkit[torchao]` is installed):
# torch's deprecation of torchao's pytree registrations, and diffusers' own torchao quantizer (which fluxkit does not
# use) failing to import under this torchao. Nothing a fluxkit user can act on, and they would turn every one-line
# error into several lines.
QUIET_LOGGERS = ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def main(argv: list[str] | None = None) -> int:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command != "download":
        _force_offline()  # never wait on the network: before anything imports huggingface_hub
    root = logging.getLogger()
    existing = set(root.handlers)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # the one-line error says it all; the JSON record is for services that parse logs
        for handler in set(root.handlers) - existing:
            handler.addFilter(lambda record: not getattr(record, "structured", False))
    from ..cache import cache_root
    from ..errors import FluxkitError

    try:
        check_environment()
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
        return args.func(args)
    except FluxkitError as err:
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"fluxkit: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
