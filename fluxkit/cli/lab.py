"""Commands of the lab: sweep, references, validate."""
from __future__ import annotations

import argparse
import json

from .args import SEED, device, float_in, int_in, model_args, output_folder, prompts_file, report_name

# What the sweep imports beyond the runtime: it scores images and runs no notebook (the `metrics` extra), so a GPU
# host or Ray worker without the notebook tools can run it.
METRICS_MODULES = ("torchmetrics", "open_clip")
# What `fluxkit validate` imports beyond the runtime: the `lab` extra.
LAB_MODULES = ("papermill", "nbconvert", "nbformat", "ipykernel", "matplotlib", "jsonschema", *METRICS_MODULES)


def sweep(args: argparse.Namespace) -> int:
    from ..checks import require_extra
    from ..lab.metrics import check_clip_name, load_clip

    require_extra("fluxkit sweep", "metrics", *METRICS_MODULES)
    if args.ray:
        require_extra("fluxkit sweep --ray", "ray", "ray")
    from ..lab.prompts import reference_prompts
    from ..lab.report import to_jsonable
    from ..lab.sweep import fits, sweep, variants, write_csv

    check_clip_name(args.clip_model, args.clip_pretrained)
    prompts = args.prompts or reference_prompts()[:2]
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "sweep.partial.jsonl"  # each row as it is measured; gone once sweep.json is written
    partial.unlink(missing_ok=True)
    t5 = {"both": (True, False), "quantized": (True,), "bf16": (False,)}[args.t5]
    compiled = {"both": (True, False), "on": (True,), "off": (False,)}[args.compile]
    result = sweep(args.model, args.device, variants(args.variants, tuple(args.placement), t5),
                   load_clip(args.clip_model, args.clip_pretrained), args.iterations, prompts, args.variant_timeout,
                   partial, compiled, ray=args.ray)
    result["fits"] = fits(result, args.budget_gb)
    (args.out / "sweep.json").write_text(json.dumps(to_jsonable(result), indent=2) + "\n")
    write_csv(result, args.out / "sweep.csv")
    partial.unlink()
    print(f"{'variant':>24} {'weights GB':>10} {'P50 s':>8} {'PSNR dB':>8} {'fits':>5}")
    fit = {m["variant"]: m["fits"] for m in result["fits"]["variants"]}
    for r in result["rows"]:
        if "skipped" in r:
            print(f"{r['variant']:>24} skipped: {r['skipped']}")
            continue
        print(f"{r['variant']:>24} {r['weights']['total'] / 1e9:>10.3f} {r['latency']['p50']:>8.3f} "
              f"{r.get('fidelity', {}).get('psnr_db', float('nan')):>8.1f} {'yes' if fit[r['variant']] else 'no':>5}")
    print(f"fastest within {args.budget_gb} GB: {result['fits']['fastest_within']}; {result['fidelity_note']}")
    print(f"wrote {args.out / 'sweep.json'} and sweep.csv")
    return 0


def references(args: argparse.Namespace) -> int:
    from ..lab.references import build_references, check_can_write
    from ..loading import load_flux_schnell, plan_load

    planned = plan_load(args.device, args.quantization, args.model, placement=args.placement)
    check_can_write(planned, args.out, overwrite=args.overwrite)  # before the model loads
    model = load_flux_schnell(device=args.device, quantization=args.quantization, model=args.model,
                              placement=planned.placement)
    cases = build_references(model, args.out, overwrite=args.overwrite)
    print(f"wrote {len(cases)} reference images for {model.source.describe()} ({model.preset.name}, "
          f"{model.placement.name})")
    return 0


def validate(args: argparse.Namespace) -> int:
    from ..checks import require_extra
    from ..errors import InputError

    require_extra("fluxkit validate", "lab", *LAB_MODULES)
    if args.ray:
        require_extra("fluxkit validate --ray", "ray", "ray")
    from ..lab.metrics import check_clip_name
    from ..lab.validate import execute, prepare

    check_clip_name(args.clip_model, args.clip_pretrained)
    if args.placements and args.placement:
        raise InputError("--placement and --placements: give one (--placements runs one report per placement)")
    if args.ray and not args.placements:
        raise InputError("--ray runs one report per placement: name them with --placements")
    twice = sorted({p for p in args.placements or () if args.placements.count(p) > 1})
    if twice:
        raise InputError(f"--placements names {', '.join(twice)} more than once: each is one report")
    runs = [dict(model=args.model, device=args.device, quantization=args.quantization, placement=placement,
                 name=f"{args.name}-{placement}" if args.name and args.placements else args.name,
                 iterations=args.iterations, drift_calls=args.drift_calls, seed=args.seed,
                 clip_model=args.clip_model, clip_pretrained=args.clip_pretrained, baseline=args.baseline,
                 sweep_presets=args.sweep_presets, resume=args.resume, sms=args.sms)
            for placement in (args.placements or [args.placement])]
    if args.ray:  # each run's inputs are checked on its worker, where its device is
        from ..lab.cluster import validate_on_ray

        reports = validate_on_ray(args.ray, runs, args.out_root)
    else:  # every run's inputs checked before the first notebook of any
        reports = [execute(run) for run in [prepare(**run, out_root=args.out_root) for run in runs]]
    for out_dir, _ in reports:
        if out_dir is not None:  # None: a run on Ray that did not start, its reason logged
            print((out_dir / "summary.md").read_text())
            print(f"report: {out_dir}")
    return max(code for _, code in reports)


def register(sub) -> None:
    from ..config import available_placements, available_presets
    from ..lab.sweep import SWEEP_VARIANT_TIMEOUT_S

    p = sub.add_parser("sweep", help="every preset, T5 quantized or not, side by side: memory, latency, fidelity")
    p.add_argument("--model", default="auto")
    p.add_argument("--device", default="auto", type=device)
    p.add_argument("--placement", nargs="+", default=["resident"], choices=available_placements(),
                   help="one or more placements (a third axis)")
    p.add_argument("--variants", nargs="+", choices=available_presets(), default=None, help="presets (default: all)")
    p.add_argument("--t5", choices=("both", "quantized", "bf16"), default="both",
                   help="T5 quantized as the preset says, left in bf16, or both (the second axis)")
    p.add_argument("--compile", choices=("both", "on", "off"), default="both",
                   help="on a GPU, each variant compiled, eager or both, each in a process of its own")
    p.add_argument("--prompts", default=None, type=prompts_file,
                   help="a YAML file with `cases` of {name, prompt, seed} (default: two reference prompts)")
    p.add_argument("--iterations", type=int_in(1, 10_000), default=5)
    p.add_argument("--budget-gb", type=float_in(0.1, 1e4), default=6.0)
    p.add_argument("--variant-timeout", type=float_in(1, 86_400), default=SWEEP_VARIANT_TIMEOUT_S, metavar="SECONDS",
                   help="on a GPU, stop a variant's process after this long and keep its row with the reason")
    p.add_argument("--clip-model", default="ViT-L-14")
    p.add_argument("--clip-pretrained", default="openai")
    p.add_argument("--out", required=True, type=output_folder)
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="each variant a Ray task on a GPU (or CPU) of a cluster: no ADDRESS starts one on this "
                        "machine, `auto` joins the one running here, HOST:PORT joins that one (needs fluxkit[ray])")
    p.set_defaults(func=sweep)

    p = sub.add_parser("references", help="render the reference images and manifest for a model")
    model_args(p)
    p.add_argument("--out", default=None, type=output_folder,
                   help="default: $FLUXKIT_REFERENCE_DIR, else the reference set fluxkit ships")
    p.add_argument("--overwrite", action="store_true", help="replace this model's existing reference images")
    p.set_defaults(func=references)

    p = sub.add_parser("validate", help="run the notebooks into reports/<name>/ and judge the budgets")
    model_args(p)
    p.add_argument("--name", default=None, type=report_name, help="default: date-device-model-quantization-placement")
    p.add_argument("--out-root", default="reports", type=output_folder)
    p.add_argument("--iterations", type=int_in(1, 100_000), default=50)
    p.add_argument("--drift-calls", type=int_in(2, 100_000), default=20)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--clip-model", default="ViT-L-14")
    p.add_argument("--clip-pretrained", default="openai")
    p.add_argument("--baseline", action="store_true", help="02_latency also times the plain diffusers pattern (GPU)")
    p.add_argument("--sweep-presets", nargs="+", choices=available_presets(), default=None,
                   help="04_quantization_tradeoffs: the presets to compare (default: all; bf16 is always the reference)")
    p.add_argument("--sms", type=int_in(1, 100_000), default=None, metavar="N",
                   help="02_latency runs on N SMs of the GPU: a smaller card's stand-in (its P99 budget line says so)")
    p.add_argument("--placements", nargs="+", default=None, choices=available_placements(),
                   help="one report per placement (instead of --placement)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="with --placements: each report a Ray task on a GPU of a cluster (as for sweep --ray)")
    p.add_argument("--resume", action="store_true",
                   help="go on from an interrupted run of the same --name and options: a finished notebook is kept "
                        "only if its files prove it ran to the end with this code, weights and settings")
    p.set_defaults(func=validate)
