#!/usr/bin/env bash
# GPU-host runs behind reports/: runs the named steps, building the full-size synthetic checkpoint in /dev/shm for
# those that read it. Logs and JSON land in $OUT/logs (the device tool brings back $OUT).
# Needs the offline wheelhouse on PYTHONPATH (README, "GPU host"). Usage: bash scripts/gpu-run.sh STEP...
# A VAR=value word among the steps sets VAR for the steps after it.
#   contract         tests/test_vortex_contract.py: the task's six cases, beside the rest of Vortex
#   cotenancy        tests/test_gpu_cotenancy.py: the host's cap and peak reading; resident refused
#   model-tests      the other GPU tests (MODEL_TESTS names them, MODEL_TESTS_K selects by pytest's -k)
#   restart          RESTART_RUNS (8) fresh processes to their first image under the default placement, with only
#                    fluxkit's dependency closure importable, from the checkpoint and (RESTART_PREQUANTIZED=1) from a
#                    pre-quantized folder in turn; per-stage seconds from `fluxkit -v`
#   standin          `fluxkit bench` under vortex on each of STANDIN_SMS ("8 all 16 33 66"; all: the whole card)
#                    SMs (BENCH_ITERATIONS calls each, plain series)
#   standin-cotenancy  Vortex's co-tenancy check on STANDIN_COTENANCY_SMS (8) SMs: 100 calls beside the ballast
#                    (a call took 2.4 s there in a 50-call run; stopped after 10 min, its threads' stacks logged)
#   standin-report   the stand-in report (logs/standin/: JSON, tables, plot) from the JSON of the two steps above
#   sweep-ray        `fluxkit sweep --ray` of SWEEP_VARIANTS on this host's GPUs, then (SWEEP_SERIAL=1) the same
#                    sweep serially, and where their rows differ beyond timing
#   validate         `fluxkit validate` of VALIDATE_MODEL (default: the full-size checkpoint) with VALIDATE_ARGS into
#                    logs/reports/
#   FILE.py          python3 FILE.py
set -uo pipefail
site=$(python3 -c "import nbconvert, pathlib; print(pathlib.Path(nbconvert.__file__).parents[1])" 2>/dev/null)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 JUPYTER_PATH="$site/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
# This host sets PYTHONDONTWRITEBYTECODE=1 and its torch has no .pyc files: each process would compile ~4800 source
# files again (7-8 s of a restart). pip installs keep bytecode; so do these runs, outside the read-only tree.
unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache}
# One compile cache for every process of the run (the library's and the CLI's): only the first load compiles cold.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/fluxkit-inductor}
OUT=${OUT:-/tmp/fluxkit-out}; LOGS=$OUT/logs; mkdir -p "$LOGS"
CKPT=${CKPT:-/dev/shm/flux-synthetic-full}
fluxkit() { python3 -m fluxkit.cli "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.txt"
full_checkpoint() {  # built on the first step that reads it (75 s), kept in /dev/shm while the machine stays warm
  [ -f "$CKPT/fluxkit_synthetic.json" ] || { time fluxkit synth --preset full --out "$CKPT"; } > "$LOGS/synth.log" 2>&1
}
closure=(env PYTHONPATH="$PWD:/tmp/closure/site" /tmp/closure/venv/bin/python)
for step in "$@"; do
  case $step in *=*) export "$step"; echo "== $step"; continue ;; esac
  start=$SECONDS; name=${step##*/}
  case $step in *.py|standin-report) ;; validate) [ -n "${VALIDATE_MODEL:-}" ] || full_checkpoint ;; *) full_checkpoint ;; esac
  case $step in
    contract|cotenancy|model-tests)
      files=tests/test_vortex_contract.py
      [ "$step" = cotenancy ] && files=tests/test_gpu_cotenancy.py
      [ "$step" = model-tests ] && files=${MODEL_TESTS:-tests/test_gpu_graphs.py tests/test_gpu_placements.py}
      for f in $files; do  # each in a fresh process
        FLUXKIT_FULL_CHECKPOINT=$CKPT python3 -m pytest -s -v -p no:cacheprovider -o addopts="" \
          ${MODEL_TESTS_K:+-k "$MODEL_TESTS_K"} "$f"
      done ;;
    restart)
      [ -d /tmp/closure/venv ] || { python3 scripts/closure_site.py /tmp/closure/site && python3 -m venv --without-pip /tmp/closure/venv; }
      pre=/dev/shm/flux-nf4-vortex
      [ -n "${RESTART_PREQUANTIZED:-}" ] && [ ! -d $pre ] && fluxkit quantize --model "$CKPT" --device cuda --placement vortex --out $pre
      "${closure[@]}" -m fluxkit.cli generate --prompt "prime the closure's bytecode and kernel cache" --model "$CKPT" --device cuda --out /tmp/prime.png
      for i in $(seq ${RESTART_RUNS:-8}); do
        for model in "$CKPT" ${RESTART_PREQUANTIZED:+$pre}; do
          rm -f /tmp/restart.png; t0=$EPOCHREALTIME
          "${closure[@]}" -m fluxkit.cli -v generate --prompt "restart $i" --model "$model" --device cuda --out /tmp/restart.png 2>&1 | grep "load stage\|placement\|wrote"
          echo "restart $i from $model: to image $(python3 -c "import os; print(round(os.path.getmtime('/tmp/restart.png') - $t0, 2))") s, to exit $(python3 -c "print(round($EPOCHREALTIME - $t0, 2))") s"
        done
      done ;;
    standin)
      for n in ${STANDIN_SMS:-8 all 16 33 66}; do  # the whole card without a green context
        fluxkit bench --model "$CKPT" --device cuda --placement vortex --iterations ${BENCH_ITERATIONS:-15} --no-true-cfg \
          $([ $n = all ] || echo --sms $n) --json "$LOGS/bench_sms_$n.json"
      done ;;
    standin-cotenancy)
      python3 -c "import json, logging, sys; from fluxkit.lab.profiling import cotenancy
logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')  # each call's line, as it ends
print(json.dumps(cotenancy(sys.argv[1], 'cuda', 'nf4', ['auto'], calls=100, sms=int(sys.argv[2]), timeout_s=600)))" \
        "$CKPT" ${STANDIN_COTENANCY_SMS:-8} > "$LOGS/cotenancy_sms_${STANDIN_COTENANCY_SMS:-8}.json" ;;
    standin-report)
      mkdir -p "$LOGS/standin"
      python3 -c "import json, sys; from pathlib import Path; from fluxkit.lab import standin
logs = Path(sys.argv[1]); read = lambda f: json.loads(f.read_text())
data = standin.collect([read(f) for f in sorted(logs.glob('bench_sms_*.json'))],
                       [row for f in sorted(logs.glob('cotenancy_sms_*.json')) for row in read(f)])
print(standin.write_report(data, logs / 'standin'))" "$LOGS" ;;
    sweep-ray)
      # Ray arrives in the device calls after the one that started the run (scripts/ray-parts.sh): wait for it
      for _ in $(seq 60); do python3 -c "import ray" 2>/dev/null && break; sleep 5; done
      args=(--model "$CKPT" --device cuda --variants ${SWEEP_VARIANTS:-nf4 int8} --t5 quantized --compile ${SWEEP_COMPILE:-off} --iterations ${SWEEP_ITERATIONS:-10})
      fluxkit -v sweep "${args[@]}" --ray --out "$LOGS/sweep_ray"
      # what the variants' processes logged on Ray's workers (a stopped one's stacks among it): the workers' own logs
      mkdir -p "$LOGS/sweep_ray/workers"; grep -l fluxkit /tmp/ray/session_latest/logs/worker-*.err 2>/dev/null \
        | xargs -r cp -t "$LOGS/sweep_ray/workers"
      if [ -n "${SWEEP_SERIAL:-}" ]; then
        fluxkit -v sweep "${args[@]}" --out "$LOGS/sweep_serial"
        python3 -c "import sys; from fluxkit.lab.sweep import content_differences, load_result
ray, serial = (load_result(f'{sys.argv[1]}/sweep_{way}/sweep.json')['rows'] for way in ('ray', 'serial'))
print('ray against serial, beyond timing:', content_differences(ray, serial) or 'the same rows')" "$LOGS"
      fi ;;
    validate)
      fluxkit -v validate --model "${VALIDATE_MODEL:-$CKPT}" --device cuda --out-root "$LOGS/reports" ${VALIDATE_ARGS:-} ;;
    *.py) python3 "$step" ;;
    *) echo "unknown step $step"; continue ;;
  esac 2>&1 | grep --line-buffered -v "it/s\]\|IPKernelApp\|Loading weights" > "$LOGS/$name.log"
  echo "== $step: $((SECONDS - start)) s"; tail -25 "$LOGS/$name.log"
done
ls -la "$LOGS"
