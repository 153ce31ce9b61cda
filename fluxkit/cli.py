"""`fluxkit` command line: a thin layer over the library functions the notebooks call.

Every argument (paths included) is checked before anything is loaded, generated or benchmarked. A
user error prints one line (`fluxkit: error: ...`) and exits 2; `-v` adds the traceback. Errors that
are not fluxkit's own (library bugs) keep their traceback. Every command but `download` runs with
HF_HUB_OFFLINE=1, decided from the parsed command, never from the text of other arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from .config import DEFAULT_MODEL, LEVERS, SWEEP_VARIANT_TIMEOUT_S, available_placements, available_presets

MAX_SEED = 2**63 - 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, as every other user error
        sys.stderr.write(f"fluxkit: error: {message}\n")
        sys.exit(2)


# ---- argument types: each refuses a bad value with a message that names the fix ------------------------

def _number_in(kind: type, low: float, high: float):
    """An argparse type: `kind` (int or float) within [low, high], finite."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"{text} is outside {low}..{high}")
        return value
    return parse


def _int_in(low: int, high: int):
    return _number_in(int, low, high)


def _float_in(low: float, high: float):
    return _number_in(float, low, high)


def _writable_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{what}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{what}: folder {folder} is not writable")


def _output_file(suffix: str):
    """A file to be written: its folder exists and is writable, it is not a folder, it ends in `suffix`."""
    def parse(text: str) -> Path:
        path = Path(text).expanduser()
        if path.suffix.lower() != suffix:
            raise argparse.ArgumentTypeError(f"{text}: the file name must end in {suffix}")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name ending in {suffix}")
        _writable_folder(path.parent if str(path.parent) else Path("."), text)
        if path.exists() and not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text} exists and is not writable")
        return path
    return parse


def _output_folder(text: str) -> Path:
    """A folder to be written into: it is a folder if it exists, else its parent is one (and writable)."""
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
        _writable_folder(path, text)
    else:
        _writable_folder(path.parent if str(path.parent) else Path("."), text)
    return path


def _input_file(suffix: str):
    def parse(text: str) -> Path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"{text}: no such file")
        if path.suffix.lower() != suffix:
            raise argparse.ArgumentTypeError(f"{text}: expected a {suffix} file")
        return path
    return parse


def _gpu_keys() -> list[str]:
    import yaml

    from .config import CONFIG_DIR

    return list(yaml.safe_load((CONFIG_DIR / "gpus.yaml").read_text()))


def _report_name(text: str) -> str:
    from .validate import check_report_name

    try:
        return check_report_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"name={text!r}: ")) from None


def _device(text: str) -> str:
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, cpu, cuda or cuda:N")
    return text


# ---- commands -----------------------------------------------------------------------------------------

def _load(args: argparse.Namespace):
    from .loading import load_flux_schnell

    return load_flux_schnell(device=args.device, quantization=args.quantization, model=args.model,
                             placement=args.placement)


def _cmd_generate(args: argparse.Namespace) -> int:
    from .images import save_png
    from .sampling import clean_prompt

    clean_prompt(args.prompt)  # refuse a bad prompt before loading anything
    clean_prompt(args.negative_prompt, "negative_prompt", allow_empty=True)
    model = _load(args)
    image = model.generate(args.prompt, negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg_scale,
                           seed=args.seed)
    save_png(image, args.out)
    print(f"wrote {args.out} ({model.source.describe()}, {model.preset.name}, {model.placement.name}, {model.device}, "
          f"seed {model.last_seed}, {sum(model.last_call.timings.values()):.2f} s)")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synthetic import write_synthetic

    path = write_synthetic(args.out, preset=args.preset, seed=args.seed, progress=True)
    print(f"wrote synthetic {args.preset} checkpoint (seed {args.seed}) to {path}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from .config import load_preset
    from .hub import download

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
        print(f"{key:>18}: {value}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .plan import components_for, plan_all, recommend

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


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_benchmark
    from .report import to_jsonable, weights_statement

    if args.baseline or args.levers:
        return _bench_side_by_side(args)
    model = _load(args)
    result = run_benchmark(model, iterations=args.iterations, warmup=args.warmup, seed=args.seed)
    print(weights_statement(model.info()))
    for series in ("plain", "true_cfg"):
        s = result[series]["summary"]["total"]
        print(f"{series:>9}: p50 {s['p50']:.4f} s  p90 {s['p90']:.4f}  p99 {s['p99']:.4f}  p99.9 {s['p99_9']:.4f}  "
              f"mean {s['mean']:.4f}  std {s['std']:.4f}  outliers {len(s['outliers'])}/{s['n']}  "
              f"({model.info()['device_name']}, {model.placement.name})")
    if args.json:
        args.json.write_text(json.dumps(to_jsonable(result), indent=2) + "\n")
    return 0


def _bench_side_by_side(args: argparse.Namespace) -> int:
    import torch

    from .bench import check_plain_pattern, fast_reference, load_levers, load_side_by_side, side_by_side
    from .config import load_preset
    from .errors import InputError
    from .report import to_jsonable

    if args.baseline:
        check_plain_pattern(load_preset(args.quantization))
        if args.placement not in (None, "resident"):
            raise InputError(f"--placement {args.placement}: --baseline plain compares resident models (the plain "
                             "pattern keeps everything on the GPU); drop --placement or use --levers alone")
        if args.device == "cpu" or not torch.cuda.is_available():
            raise InputError("--baseline plain needs a CUDA GPU: diffusers' bitsandbytes quantizer refuses to run "
                             "without one")
        variants, resident, skipped = load_side_by_side(args.model, "cuda", args.quantization,
                                                        levers=tuple(args.levers or ()))
    else:
        variants, resident, skipped = load_levers(args.model, args.device, args.quantization, args.placement,
                                                  tuple(args.levers))
    references = fast_reference(variants) if args.baseline else ()
    result = side_by_side(variants, iterations=args.iterations, rounds=args.rounds, warmup=args.warmup, seed=args.seed,
                          also_relative_to=references)
    result.update(resident_bytes=resident, skipped=skipped)
    names = list(variants)
    base, width = names[0], max(map(len, [*names, *skipped]))
    print(f"side by side on {result['device']}, {result['iterations']} calls each in {result['rounds']} rounds:")
    for n in names:
        s = result["variants"][n]["summary"]
        ratio = result["ratios_to_" + base].get(n)
        memory = (f"  resident {resident[n] / 1e9:.2f} GB  rise {result['variants'][n]['rise_bytes'] / 1e9:.2f} GB"
                  if resident[n] is not None else "")
        print(f"{n:>{width}}: p50 {s['p50']:.4f} s  p99 {s['p99']:.4f} s{memory}" + (
                  _ratio_text(ratio, base) + f"  PSNR vs {base} {result['agreement_psnr_db'][n]:.1f} dB"
                  if ratio else "") + "".join(
                  _ratio_text(r, ref) for ref in references if (r := result["ratios_to_" + ref].get(n))))
        if "phases" in result["variants"][n]:
            print(" " * (width + 2) + "p50 per phase: " + ", ".join(
                f"{phase} {row['p50']:.4f} s" for phase, row in result["variants"][n]["phases"].items()))
    for n, reason in skipped.items():
        print(f"{n:>{width}}: did not load: {reason}")
    if args.json:
        args.json.write_text(json.dumps(to_jsonable(result), indent=2) + "\n")
    return 0


def _ratio_text(ratio: dict, reference: str) -> str:
    return f"  x{ratio['ratio']:.3f} of {reference} [{ratio['ci95'][0]:.3f}, {ratio['ci95'][1]:.3f}]"


def _cmd_estimate(args: argparse.Namespace) -> int:
    from .config import load_placement, load_preset
    from .errors import InputError
    from .estimate import cross_check, estimate_from_bench, for_model
    from .plan import components_for, plan_placement
    from .report import to_jsonable

    if args.check and not args.source:
        raise InputError("--check compares a projection with a measurement: pass the run to project from as --from")
    if args.source:
        bench = json.loads(args.source.read_text())
        info = bench["model"]
        preset, placement = load_preset(info["preset"]), load_placement(info["placement"]["name"])
        synthetic = info["model"]["synthetic"]
        meta, _ = components_for(f"synthetic-{synthetic['preset']}" if synthetic else info["model"]["path"])
        plan = plan_placement(meta, preset, placement)
        result = {"applicable": True, **estimate_from_bench(bench, meta, preset, placement, plan, args.gpu)}
        if args.check:
            result["cross_check"] = cross_check(bench, json.loads(args.check.read_text()), meta, preset, placement,
                                                plan)
    else:
        import torch

        from .bench import run_benchmark

        if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
            raise InputError("fluxkit estimate measures on a GPU: on a CPU, pass --from a `fluxkit bench --json` "
                             "result made on a GPU")
        model = _load(args)
        result = for_model(model, run_benchmark(model, iterations=args.iterations, negative_prompt=None),
                           tuple(args.gpu))
    if not result["applicable"]:
        raise InputError(result["reason"])
    print(f"ESTIMATE from {result['device_name']} ({result['preset']}, {result['placement']}); assumptions: "
          f"{result['assumptions']}")
    def share(fraction: float | None) -> str:
        return f"{fraction:>7.1%}" if fraction is not None else f"{'-':>7}"

    print(f"{'phase':>12} {'measured':>9} {'matrix':>8} {'other':>8} {'link':>8} {'wait':>8} {'%tensor':>7} "
          f"{'%memory':>7} {'%link':>7} " + " ".join(f"{k:>9}" for k in args.gpu))
    for phase, r in result["phases"].items():
        k, f = r["kernel_s"], r["achieved_fraction"]
        print(f"{phase:>12} {r['measured_s']:>9.4f} {k['compute']:>8.4f} {k['memory']:>8.4f} {k['host link']:>8.4f} "
              f"{r['wait_s']:>8.4f} {share(f['compute'])} {share(f['memory'])} {share(f['host link'])} "
              + " ".join(f"{r['projected_s'][key]:>9.3f}" for key in args.gpu))
    print(f"{'P50':>12} {result['measured_p50_s']:>9.4f} {'':>61}"
          + " ".join(f"{result['projected_p50_s'][k]:>9.3f}" for k in args.gpu))
    print(f"{'P99':>12} {'':>71}" + " ".join(f"{result['projected_p99_s'][k]:>9.3f}" for k in args.gpu))
    if "cross_check" in result:
        c = result["cross_check"]
        print(f"cross-check: {c['source']} projected to {c['target']}, against what {c['target']} measured (P50 s)")
        for phase, error in c["error_by_phase"].items():
            print(f"{phase:>12} projected {c['projected_s'][phase]:.4f}  measured {c['measured_s'][phase]:.4f}  "
                  f"error {error:+.1%}")
        print(f"{'end to end':>12} error {c['end_to_end_error']:+.1%}: "
              + ("usable (within 15%)" if c["usable"] else "NOT usable (beyond 15%)"))
    if args.json:
        args.json.write_text(json.dumps(to_jsonable(result), indent=2) + "\n")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .metrics import check_clip_name, load_clip
    from .report import to_jsonable
    from .sweep import fits, load_prompts, sweep, variants, write_csv

    check_clip_name(args.clip_model, args.clip_pretrained)
    prompts = load_prompts(args.prompts, None if args.prompts else 2)
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "sweep.partial.jsonl"  # each row as it is measured; gone once sweep.json is written
    partial.unlink(missing_ok=True)
    t5 = {"both": (True, False), "quantized": (True,), "bf16": (False,)}[args.t5]
    compiled = {"both": (True, False), "on": (True,), "off": (False,)}[args.compile]
    result = sweep(args.model, args.device, variants(args.variants, tuple(args.placement), t5),
                   load_clip(args.clip_model, args.clip_pretrained), args.iterations, prompts, args.variant_timeout,
                   partial, compiled)
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


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import save_quantized

    path = save_quantized(args.model, args.out, args.quantization, args.placement, args.device)
    print(f"wrote {args.model} pre-quantized ({args.quantization}, for the {args.placement or 'preset'} placement) "
          f"to {path}")
    return 0


def _cmd_references(args: argparse.Namespace) -> int:
    from .references import build_references

    model = _load(args)
    cases = build_references(model, args.out, overwrite=args.overwrite)
    print(f"wrote {len(cases)} reference images for {model.source.describe()} ({model.preset.name}, "
          f"{model.placement.name})")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .metrics import check_clip_name
    from .validate import validate

    check_clip_name(args.clip_model, args.clip_pretrained)
    out_dir, code = validate(model=args.model, device=args.device, quantization=args.quantization,
                             placement=args.placement, name=args.name, out_root=args.out_root,
                             iterations=args.iterations, drift_calls=args.drift_calls, seed=args.seed,
                             clip_model=args.clip_model, clip_pretrained=args.clip_pretrained, baseline=args.baseline,
                             sweep_presets=args.sweep_presets, resume=args.resume)
    print((out_dir / "summary.md").read_text())
    print(f"report: {out_dir}")
    return code


# ---- parser -------------------------------------------------------------------------------------------

def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="auto", help=f"folder, Hub id from the local cache, synthetic-tiny, "
                                                   f"synthetic-full, or auto ({DEFAULT_MODEL} if cached, else "
                                                   "synthetic-tiny)")
    p.add_argument("--quantization", default="nf4", choices=available_presets())
    p.add_argument("--placement", default=None, choices=available_placements(),
                   help="where components live (default: the preset's); vortex fits Vortex's 6 GB share")
    p.add_argument("--device", default="auto", type=_device)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fluxkit", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level; tracebacks with errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate one 512x512 image and save it as PNG")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="", help="used only with --true-cfg-scale > 1 (doubles the cost)")
    p.add_argument("--true-cfg-scale", type=_float_in(0.0, 100.0), default=1.0)
    p.add_argument("--seed", type=_int_in(0, MAX_SEED), default=None, help="default: drawn at random and printed")
    _model_args(p)
    p.add_argument("--out", required=True, type=_output_file(".png"))
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("synth", help="write a synthetic FLUX.1-schnell checkpoint (random weights)")
    p.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    p.add_argument("--out", required=True, type=_output_folder)
    p.add_argument("--seed", type=_int_in(0, MAX_SEED), default=0)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("download", help="fetch the diffusers folders of a model into the Hugging Face cache")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--revision", default=None, help="default: the revision pinned in the nf4 preset for "
                                                   f"{DEFAULT_MODEL}, else main")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("plan", help="GPU and host bytes of every preset x placement, from configs only")
    p.add_argument("--model", default=DEFAULT_MODEL, help="folder, cached Hub id, synthetic-tiny or synthetic-full")
    p.add_argument("--budget-gb", type=_float_in(0.1, 1e4), default=6.0, help="Flux's share of the GPU (GB)")
    p.add_argument("--total-gb", type=_float_in(0.1, 1e4), default=11.8, help="the whole card's budget (GB)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("bench", help="latency P50/P90/P99/P99.9 over many synchronized calls")
    _model_args(p)
    p.add_argument("--iterations", type=_int_in(1, 100_000), default=50)
    p.add_argument("--warmup", type=_int_in(1, 1000), default=3)
    p.add_argument("--seed", type=_int_in(0, MAX_SEED), default=0)
    p.add_argument("--json", default=None, type=_output_file(".json"), help="write every timing here")
    p.add_argument("--baseline", choices=("plain",), default=None,
                   help="time the plain diffusers pattern, fluxkit and fluxkit bf16 side by side (GPU, resident)")
    p.add_argument("--levers", nargs="+", choices=tuple(LEVERS), default=None,
                   help="time fluxkit's path as configured against each lever changed (eager, compiled where the "
                        "preset runs eager, CUDA graphs, untiled decode, whole-transformer compile), side by side in "
                        "one process; with --baseline, beside the plain pattern and bf16")
    p.add_argument("--rounds", type=_int_in(1, 1000), default=10, help="with --baseline or --levers: interleaved "
                                                                         "rounds")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("estimate", help="project per-phase latency to other GPUs (RTX 3060 ...): an estimate")
    _model_args(p)
    p.add_argument("--gpu", action="append", choices=_gpu_keys(), default=None,
                   help="target GPU (repeatable); default: all")
    p.add_argument("--from", dest="source", default=None, type=_input_file(".json"),
                   help="a `fluxkit bench --json` result (or a report's latency.json) to project from, instead of "
                        "measuring here")
    p.add_argument("--check", default=None, type=_input_file(".json"),
                   help="with --from: a bench result of the same preset and placement on another GPU; projects "
                        "to that GPU and reports the error per phase (the projection is usable within 15%%)")
    p.add_argument("--iterations", type=_int_in(1, 100_000), default=20)
    p.add_argument("--json", default=None, type=_output_file(".json"))
    p.set_defaults(func=_cmd_estimate)

    p = sub.add_parser("sweep", help="every preset, T5 quantized or not, side by side: memory, latency, fidelity")
    p.add_argument("--model", default="auto")
    p.add_argument("--device", default="auto", type=_device)
    p.add_argument("--placement", nargs="+", default=["resident"], choices=available_placements(),
                   help="one or more placements (a third axis)")
    p.add_argument("--variants", nargs="+", choices=available_presets(), default=None, help="presets (default: all)")
    p.add_argument("--t5", choices=("both", "quantized", "bf16"), default="both",
                   help="T5 quantized as the preset says, left in bf16, or both (the second axis)")
    p.add_argument("--compile", choices=("both", "on", "off"), default="both",
                   help="on a GPU, each variant compiled, eager or both, each in a process of its own")
    p.add_argument("--prompts", default=None, type=_input_file(".yaml"), help="a YAML file with `cases` of "
                                                                           "{name, prompt, seed}")
    p.add_argument("--iterations", type=_int_in(1, 10_000), default=5)
    p.add_argument("--budget-gb", type=_float_in(0.1, 1e4), default=6.0)
    p.add_argument("--variant-timeout", type=_float_in(1, 86_400), default=SWEEP_VARIANT_TIMEOUT_S, metavar="SECONDS",
                   help="on a GPU, stop a variant's process after this long and keep its row with the reason")
    p.add_argument("--clip-model", default="ViT-L-14")
    p.add_argument("--clip-pretrained", default="openai")
    p.add_argument("--out", required=True, type=_output_folder)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("quantize", help="save a pre-quantized checkpoint: later loads skip quantize-on-load")
    _model_args(p)
    p.add_argument("--out", required=True, type=_output_folder)
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("references", help="render the reference images and manifest for a model")
    _model_args(p)
    p.add_argument("--out", default=None, type=_output_folder,
                   help="default: $FLUXKIT_REFERENCE_DIR, else the repository's reference_images/")
    p.add_argument("--overwrite", action="store_true", help="replace this model's existing reference images")
    p.set_defaults(func=_cmd_references)

    p = sub.add_parser("validate", help="run the notebooks into reports/<name>/ and judge the budgets")
    _model_args(p)
    p.add_argument("--name", default=None, type=_report_name, help="default: date-device-model-quantization-placement")
    p.add_argument("--out-root", default="reports", type=_output_folder)
    p.add_argument("--iterations", type=_int_in(1, 100_000), default=50)
    p.add_argument("--drift-calls", type=_int_in(2, 100_000), default=20)
    p.add_argument("--seed", type=_int_in(0, MAX_SEED), default=0)
    p.add_argument("--clip-model", default="ViT-L-14")
    p.add_argument("--clip-pretrained", default="openai")
    p.add_argument("--baseline", action="store_true", help="02_latency also times the plain diffusers pattern (GPU)")
    p.add_argument("--sweep-presets", nargs="+", choices=available_presets(), default=None,
                   help="04_quantization_tradeoffs: the presets to compare (default: all; bf16 is always the reference)")
    p.add_argument("--resume", action="store_true",
                   help="go on from an interrupted run of the same --name and options: its finished notebooks are kept")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("info", help="library versions, CUDA device and free memory, cached FLUX models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)
    return parser


def _force_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:  # already imported (in-process use): it read the variable at import
        hub_constants.HF_HUB_OFFLINE = True


# Notices printed when torchao is imported (by diffusers, whatever the preset): torch's deprecation of torchao's
# pytree registrations, and diffusers' own torchao quantizer (which fluxkit does not use) failing to import under
# this torchao. Nothing a fluxkit user can act on, and they would turn every one-line error into several lines.
QUIET_LOGGERS = ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def main(argv: list[str] | None = None) -> int:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "gpu", "absent") is None:
        args.gpu = _gpu_keys()
    if args.command != "download":
        _force_offline()  # never wait on the network: before anything imports huggingface_hub
    root = logging.getLogger()
    existing = set(root.handlers)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # the one-line error says it all; the JSON record is for services that parse logs
        for handler in set(root.handlers) - existing:
            handler.addFilter(lambda record: not getattr(record, "structured", False))
    from .errors import FluxkitError

    try:
        return args.func(args)
    except FluxkitError as err:
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"fluxkit: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
