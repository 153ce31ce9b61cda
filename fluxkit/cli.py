"""`fluxkit` command line: a thin layer over the library functions the notebooks call.

User errors print one line (`fluxkit: error: ...`) and exit 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _cmd_generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from .generation import clean_prompt
    from .loading import load_flux_schnell

    clean_prompt(args.prompt)  # refuse a bad prompt before loading anything
    model = load_flux_schnell(device=args.device, quantization=args.quantization, model=args.model)
    image = model.generate(args.prompt, negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg_scale,
                           seed=args.seed)
    array = (image.cpu().numpy() * 255).round().astype("uint8")
    Image.fromarray(array).save(args.out)
    print(f"wrote {args.out} ({model.source.describe()}, {model.preset.name}, {model.device}, seed {model.last_seed}, "
          f"{sum(model.last_call.timings.values()):.2f} s)")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synthetic import write_synthetic

    path = write_synthetic(args.out, preset=args.preset, seed=args.seed, progress=True)
    print(f"wrote synthetic {args.preset} checkpoint (seed {args.seed}) to {path}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from .hub import download

    from .config import load_preset

    preset = load_preset("nf4")
    revision = args.revision or (preset.model.revision if args.model == preset.model.id else None)
    path = download(args.model, revision=revision)
    print(f"downloaded {args.model} to {path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .environment import environment

    env = environment()
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    for key, value in env.items():
        print(f"{key:>14}: {value}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import check_counts, run_benchmark
    from .loading import load_flux_schnell
    from .report import to_jsonable, weights_statement

    check_counts(args.iterations, args.warmup)  # before loading anything
    model = load_flux_schnell(device=args.device, quantization=args.quantization, model=args.model)
    result = run_benchmark(model, iterations=args.iterations, warmup=args.warmup, seed=args.seed)
    print(weights_statement(model.info()))
    for series in ("plain", "true_cfg"):
        s = result[series]["summary"]["total"]
        print(f"{series:>9}: p50 {s['p50']:.4f} s  p90 {s['p90']:.4f}  p99 {s['p99']:.4f}  p99.9 {s['p99_9']:.4f}  "
              f"mean {s['mean']:.4f}  std {s['std']:.4f}  outliers {len(s['outliers'])}/{s['n']}  "
              f"({model.info()['device_name']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_jsonable(result), f, indent=2)
    return 0


def _cmd_references(args: argparse.Namespace) -> int:
    from .loading import load_flux_schnell
    from .references import build_references

    model = load_flux_schnell(device=args.device, quantization=args.quantization, model=args.model)
    cases = build_references(model, args.out)
    print(f"wrote {len(cases)} reference images for {model.source.describe()} ({model.preset.name})")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .validate import validate

    out_dir, code = validate(model=args.model, device=args.device, quantization=args.quantization, name=args.name,
                             out_root=args.out_root, iterations=args.iterations, drift_calls=args.drift_calls,
                             clip_model=args.clip_model, clip_pretrained=args.clip_pretrained)
    print((out_dir / "summary.md").read_text())
    print(f"report: {out_dir}")
    return code


def build_parser() -> argparse.ArgumentParser:
    from .hub import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="fluxkit", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate one 512x512 image and save it as PNG")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="", help="used only with --true-cfg-scale > 1 (doubles the cost)")
    p.add_argument("--true-cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="default: drawn at random and printed")
    _model_args(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("synth", help="write a synthetic FLUX.1-schnell checkpoint (random weights)")
    p.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("download", help="fetch the diffusers folders of a model into the Hugging Face cache")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--revision", default=None, help="default: the revision pinned in the nf4 preset for "
                                                   f"{DEFAULT_MODEL}, else main")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("bench", help="latency P50/P90/P99/P99.9 over many synchronized calls")
    _model_args(p)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every timing here")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("references", help="render the reference images and manifest for a model")
    _model_args(p)
    p.add_argument("--out", default=None, help="default: $FLUXKIT_REFERENCE_DIR, else the repository's reference_images/")
    p.set_defaults(func=_cmd_references)

    p = sub.add_parser("validate", help="run the notebooks into reports/<name>/ and judge the budgets")
    _model_args(p)
    p.add_argument("--name", default=None, help="default: date-device-model-quantization")
    p.add_argument("--out-root", default="reports")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--drift-calls", type=int, default=20)
    p.add_argument("--clip-model", default="ViT-L-14")
    p.add_argument("--clip-pretrained", default="openai")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("info", help="library versions, CUDA device and free memory, cached FLUX models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    from .config import available_presets
    from .hub import DEFAULT_MODEL

    p.add_argument("--model", default="auto", help=f"folder, Hub id from the local cache, synthetic-tiny, "
                                                   f"synthetic-full, or auto ({DEFAULT_MODEL} if cached, else synthetic-tiny)")
    p.add_argument("--quantization", default="nf4", choices=available_presets())
    p.add_argument("--device", default="auto")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "download" not in argv:
        # Never wait on the network: huggingface_hub reads this once, at import.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .errors import GenerationError, VortexInitializationError

    try:
        return args.func(args)
    except (ValueError, TypeError, VortexInitializationError, GenerationError, FileNotFoundError) as err:
        print(f"fluxkit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
