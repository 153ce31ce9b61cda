"""Commands of the runtime: generate, synth, download, quantize, plan, info."""
from __future__ import annotations

import argparse
import json

from .args import SEED, float_in, load, model_args, output_file, output_folder


def generate(args: argparse.Namespace) -> int:
    from ..images import save_png
    from ..sampling import clean_prompt

    clean_prompt(args.prompt)  # refuse a bad prompt before loading anything
    clean_prompt(args.negative_prompt, "negative_prompt", allow_empty=True)
    model = load(args)
    image = model.generate(args.prompt, negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg_scale,
                           seed=args.seed)
    save_png(image, args.out)
    print(f"wrote {args.out} ({model.source.describe()}, {model.preset.name}, {model.placement.name}, {model.device}, "
          f"seed {model.last_seed}, {sum(model.last_call.timings.values()):.2f} s)")
    return 0


def synth(args: argparse.Namespace) -> int:
    from ..synthetic import write_synthetic

    path = write_synthetic(args.out, preset=args.preset, seed=args.seed, progress=True)
    print(f"wrote synthetic {args.preset} checkpoint (seed {args.seed}) to {path}")
    return 0


def download(args: argparse.Namespace) -> int:
    from ..config import load_preset
    from ..hub import download

    preset = load_preset("nf4")
    revision = args.revision or (preset.model.revision if args.model == preset.model.id else None)
    path = download(args.model, revision=revision)
    print(f"downloaded {args.model} to {path}")
    return 0


def quantize(args: argparse.Namespace) -> int:
    from ..quantize import save_quantized

    path = save_quantized(args.model, args.out, args.quantization, args.placement, args.device)
    print(f"wrote {args.model} pre-quantized ({args.quantization}, for the {args.placement or 'preset'} placement) "
          f"to {path}")
    return 0


def info(args: argparse.Namespace) -> int:
    from ..environment import environment

    env = environment()
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    for key, value in env.items():
        print(f"{key:>18}: {value}")
    return 0


def plan(args: argparse.Namespace) -> int:
    from ..plan import components_for, plan_all, recommend

    meta, described = components_for(args.model)
    plans = plan_all(meta, budget_bytes=int(args.budget_gb * 1e9))
    best = recommend(plans)
    if args.json:
        print(json.dumps({"model": described, "budget_gb": args.budget_gb, "total_gb": args.total_gb,
                          "plans": [p.to_dict() for p in plans], "recommended": best and best.to_dict()}, indent=2))
        return 0
    print(f"{described}; GB = 10^9 bytes; share {args.budget_gb} GB of a {args.total_gb} GB card")
    print(f"{'preset':>14} {'placement':>9} {'resident':>9} {'peak':>7} {'host RAM':>9} {'moved/call':>11} "
          f"{'fits share':>10} {'fits card':>9}")
    for p in plans:
        card = "refused" if p.refused else "yes" if p.peak_bytes <= args.total_gb * 1e9 else "no"
        print(f"{p.preset:>14} {p.placement:>9} {p.resident_bytes / 1e9:>9.2f} {p.peak_bytes / 1e9:>7.2f} "
              f"{p.host_bytes / 1e9:>9.2f} {p.moved_per_call / 1e9:>11.2f} {'yes' if p.fits else 'no':>10} "
              f"{card:>9}")
    for p in plans:
        if p.refused:
            print(f"refused: {p.preset} under {p.placement}: {p.refused}")
    if best is None:
        print(f"nothing fits a {args.budget_gb} GB share")
        return 1
    print(f"recommended: --quantization {best.preset} --placement {best.placement} (fits the share, moves the fewest "
          "bytes per call)")
    return 0


def register(sub) -> None:
    from ..config import DEFAULT_MODEL

    p = sub.add_parser("generate", help="generate one 512x512 image and save it as PNG")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="", help="used only with --true-cfg-scale > 1 (doubles the cost)")
    p.add_argument("--true-cfg-scale", type=float_in(0.0, 100.0), default=1.0)
    p.add_argument("--seed", type=SEED, default=None, help="default: drawn at random and printed")
    model_args(p)
    p.add_argument("--out", required=True, type=output_file(".png"))
    p.set_defaults(func=generate)

    p = sub.add_parser("synth", help="write a synthetic FLUX.1-schnell checkpoint (random weights)")
    p.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    p.add_argument("--out", required=True, type=output_folder)
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=synth)

    p = sub.add_parser("download", help="fetch the diffusers folders of a model into the Hugging Face cache")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--revision", default=None, help="default: the revision pinned in the nf4 preset for "
                                                   f"{DEFAULT_MODEL}, else main")
    p.set_defaults(func=download)

    p = sub.add_parser("plan", help="GPU and host bytes of every preset x placement, from configs only")
    p.add_argument("--model", default=DEFAULT_MODEL, help="folder, cached Hub id, synthetic-tiny or synthetic-full")
    p.add_argument("--budget-gb", type=float_in(0.1, 1e4), default=6.0, help="Flux's share of the GPU (GB)")
    p.add_argument("--total-gb", type=float_in(0.1, 1e4), default=11.8, help="the whole card's budget (GB)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=plan)

    p = sub.add_parser("quantize", help="save a pre-quantized checkpoint: later loads skip quantize-on-load")
    model_args(p)
    p.add_argument("--out", required=True, type=output_folder)
    p.set_defaults(func=quantize)

    p = sub.add_parser("info", help="library versions, CUDA device and free memory, cached FLUX models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=info)
