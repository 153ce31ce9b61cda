"""Commands that measure and project: bench, estimate."""
from __future__ import annotations

import argparse
import json

from .args import SEED, int_in, json_file, load, model_args, output_file


def bench(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..lab import standin
    from ..lab.bench import run_benchmark
    from ..lab.report import to_jsonable, weights_statement

    if args.baseline or args.levers:
        if args.sms:
            raise InputError("--sms times one configuration: drop --baseline and --levers")
        return _side_by_side(args)
    piece = standin.open_slice(args.sms, args.device) if args.sms else None
    with standin.on(piece):  # the load too: the caching allocator keeps its blocks per stream
        model = load(args)
        result = run_benchmark(model, iterations=args.iterations, warmup=args.warmup, seed=args.seed,
                               negative_prompt=None if args.no_true_cfg else "blurry, low quality")
    print(weights_statement(model.info()))
    for series in ("plain",) if args.no_true_cfg else ("plain", "true_cfg"):
        s = result[series]["summary"]["total"]
        print(f"{series:>9}: p50 {s['p50']:.4f} s  p90 {s['p90']:.4f}  p99 {s['p99']:.4f}  p99.9 {s['p99_9']:.4f}  "
              f"mean {s['mean']:.4f}  std {s['std']:.4f}  outliers {len(s['outliers'])}/{s['n']}  "
              f"({model.info()['device_name']}, {model.placement.name})")
    if piece is not None:
        stand_in = standin.record(piece, result, model)
        print(f"on {piece.sms} of {piece.total_sms} SMs ({piece.peaks['bf16_tflops']} TFLOP/s bf16, "
              f"{piece.peaks['copy_gbps']} GB/s copy): {stand_in['rtx3060']['label']}")
        if stand_in["rtx3060"]["applicable"]:
            for link, p99 in stand_in["rtx3060"]["p99_s"].items():
                print(f"  RTX 3060 on {link}: P50 {stand_in['rtx3060']['p50_s'][link]:.3f} s, P99 {p99:.3f} s")
    if args.json:
        args.json.write_text(json.dumps(to_jsonable(result), indent=2) + "\n")
    return 0


def _side_by_side(args: argparse.Namespace) -> int:
    import torch

    from ..config import load_preset
    from ..errors import InputError
    from ..lab.bench import check_plain_pattern, fast_reference, load_levers, load_side_by_side, side_by_side
    from ..lab.report import to_jsonable

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


def estimate(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..lab.estimate import check_bench, cross_check, estimate_from_bench, for_model, setup_from_bench
    from ..lab.report import to_jsonable

    targets = args.gpu or args.gpu_default
    if args.check and not args.source:
        raise InputError("--check compares a projection with a measurement: pass the run to project from as --from")
    if args.source:
        bench = check_bench(args.source["data"], f"--from {args.source['path']}")  # both files before projecting
        target = check_bench(args.check["data"], f"--check {args.check['path']}") if args.check else None
        meta, preset, placement, plan = setup_from_bench(bench, f"--from {args.source['path']}")
        result = {"applicable": True, **estimate_from_bench(bench, meta, preset, placement, plan, targets)}
        if target:
            result["cross_check"] = cross_check(bench, target, meta, preset, placement, plan)
    else:
        import torch

        from ..lab.bench import run_benchmark

        if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
            raise InputError("fluxkit estimate measures on a GPU: on a CPU, pass --from a `fluxkit bench --json` "
                             "result made on a GPU")
        model = load(args)
        result = for_model(model, run_benchmark(model, iterations=args.iterations, negative_prompt=None),
                           tuple(targets))
    if not result["applicable"]:
        raise InputError(result["reason"])
    _print_estimate(result, targets)
    if args.json:
        args.json.write_text(json.dumps(to_jsonable(result), indent=2) + "\n")
    return 0


def _print_estimate(result: dict, gpus: list[str]) -> None:
    print(f"ESTIMATE from {result['device_name']} ({result['preset']}, {result['placement']}); assumptions: "
          f"{result['assumptions']}")

    def share(fraction: float | None) -> str:
        return f"{fraction:>7.1%}" if fraction is not None else f"{'-':>7}"

    print(f"{'phase':>12} {'measured':>9} {'matrix':>8} {'other':>8} {'link':>8} {'wait':>8} {'%tensor':>7} "
          f"{'%memory':>7} {'%link':>7} " + " ".join(f"{k:>9}" for k in gpus))
    for phase, r in result["phases"].items():
        k, f = r["kernel_s"], r["achieved_fraction"]
        print(f"{phase:>12} {r['measured_s']:>9.4f} {k['compute']:>8.4f} {k['memory']:>8.4f} {k['host link']:>8.4f} "
              f"{r['wait_s']:>8.4f} {share(f['compute'])} {share(f['memory'])} {share(f['host link'])} "
              + " ".join(f"{r['projected_s'][key]:>9.3f}" for key in gpus))
    print(f"{'P50':>12} {result['measured_p50_s']:>9.4f} {'':>61}"
          + " ".join(f"{result['projected_p50_s'][k]:>9.3f}" for k in gpus))
    print(f"{'P99':>12} {'':>71}" + " ".join(f"{result['projected_p99_s'][k]:>9.3f}" for k in gpus))
    if "cross_check" in result:
        c = result["cross_check"]
        print(f"cross-check: {c['source']} projected to {c['target']}, against what {c['target']} measured (P50 s)")
        for phase, error in c["error_by_phase"].items():
            print(f"{phase:>12} projected {c['projected_s'][phase]:.4f}  measured {c['measured_s'][phase]:.4f}  "
                  f"error {error:+.1%}")
        print(f"{'end to end':>12} error {c['end_to_end_error']:+.1%}: "
              + ("usable (within 15%)" if c["usable"] else "NOT usable (beyond 15%)"))


def register(sub) -> None:
    from ..lab.bench import LEVERS
    from ..lab.estimate import gpus

    p = sub.add_parser("bench", help="latency P50/P90/P99/P99.9 over many synchronized calls")
    model_args(p)
    p.add_argument("--iterations", type=int_in(1, 100_000), default=50)
    p.add_argument("--warmup", type=int_in(1, 1000), default=3)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--json", default=None, type=output_file(".json"), help="write every timing here")
    p.add_argument("--baseline", choices=("plain",), default=None,
                   help="time the plain diffusers pattern, fluxkit and fluxkit bf16 side by side (GPU, resident)")
    p.add_argument("--levers", nargs="+", choices=tuple(LEVERS), default=None,
                   help="time fluxkit's path as configured against each lever changed (eager, compiled where the "
                        "preset runs eager, CUDA graphs, untiled decode, whole-transformer compile), side by side in "
                        "one process; with --baseline, beside the plain pattern and bf16")
    p.add_argument("--rounds", type=int_in(1, 1000), default=10, help="with --baseline or --levers: interleaved "
                                                                        "rounds")
    p.add_argument("--no-true-cfg", action="store_true", help="time only the plain series (no negative prompt through "
                                                              "true CFG, which runs the transformer twice a step)")
    p.add_argument("--sms", type=int_in(1, 100_000), default=None, metavar="N",
                   help="run every GPU phase on N SMs of the GPU (a CUDA green context): a smaller card's stand-in; "
                        "records the peaks the slice reached and what they say of an RTX 3060")
    p.set_defaults(func=bench)

    p = sub.add_parser("estimate", help="project per-phase latency to other GPUs (RTX 3060 ...): an estimate")
    model_args(p)
    keys = list(gpus())
    p.add_argument("--gpu", action="append", choices=keys, default=None, help="target GPU (repeatable); default: all")
    p.add_argument("--from", dest="source", default=None, type=json_file,
                   help="a `fluxkit bench --json` result (or a report's latency.json) to project from, instead of "
                        "measuring here")
    p.add_argument("--check", default=None, type=json_file,
                   help="with --from: a bench result of the same preset and placement on another GPU; projects "
                        "to that GPU and reports the error per phase (the projection is usable within 15%%)")
    p.add_argument("--iterations", type=int_in(1, 100_000), default=20)
    p.add_argument("--json", default=None, type=output_file(".json"))
    p.set_defaults(func=estimate, gpu_default=keys)
