#!/usr/bin/env bash
# GPU-host runs behind reports/: builds the full-size synthetic checkpoint in /dev/shm (kept while the machine
# stays warm), then runs the named steps. Logs and results land in $OUT/results.tgz (the device tool brings it back).
# Needs the offline wheelhouse on PYTHONPATH (README, "GPU host").
# Usage: bash scripts/gpu-run.sh STEP...   (scripts/gpu-lanes.sh runs several of these side by side, one per GPU)
#   A VAR=value word among the steps sets VAR for the steps after it (e.g. SWEEP_COMPILE=off sweep-resident).
# Env: CKPT (checkpoint folder), OUT, DRIFT_CALLS, BENCH_ITERATIONS, SWEEP_ITERATIONS, SWEEP_VARIANTS (comma-separated presets of sweep-P),
#   SWEEP_TIMEOUT (seconds one sweep variant may take), SWEEP_COMPILE and SWEEP_T5 (both, or one side of the axis),
#   BASELINE_LEVERS (levers timed beside the plain pattern by the baseline step),
#   SWEEP_PRESETS (validate's 04 notebook), REPORT_SUFFIX (report name), MODEL_TESTS, MODEL_TESTS_K, RESTART_COLD, RESTART_WARM, RESTART_CLOSURE, RESTART_VARIANT, RESTART_PROFILE, QUANTIZATION, LEVERS.
#   cotenancy      tests/test_gpu_cotenancy.py
#   model-tests    tests/test_gpu_dequantize.py, test_gpu_graphs.py, test_gpu_kernels.py, test_gpu_model.py and test_gpu_placements.py (fresh
#                  process each; MODEL_TESTS names others, MODEL_TESTS_K selects tests by pytest's -k)
#   references-P   render reference_images/ for the full checkpoint (nf4) under placement P (validate-P compares to them)
#   validate-P     fluxkit validate --placement P (vortex, resident, offload); --resume goes on from a carried reports/.NAME.incomplete
#   baseline       fluxkit bench --baseline plain: plain diffusers vs fluxkit vs fluxkit bf16 (and fluxkit with each of
#                  BASELINE_LEVERS changed), interleaved
#   bench-P        fluxkit bench --placement P --json (for fluxkit estimate and the cross-card check)
#   levers-P       fluxkit bench --levers under placement P: the configured fast path against eager, no CUDA graphs,
#                  an untiled decode (where P tiles) and the whole transformer compiled, interleaved in one process
#                  (QUANTIZATION: another preset; LEVERS: other levers, space-separated)
#   FILE.py        python3 FILE.py (a probe script kept with its run's results)
#   restart-P      fresh processes to their first image under placement P: empty compile cache, then warm, from the checkpoint
#                  and from a pre-quantized folder (fluxkit quantize) in turn, so quantize-on-load and pre-quantized differ in
#                  one thing; then
#                  with RESTART_PROFILE=1 a warm one under cProfile and -X importtime (restart_P.prof, restart_P_imports.txt).
#                  RESTART_COLD=skip: no cold run; the steps before filled the compile cache. RESTART_WARM=N: N rounds of
#                  warm runs, from the checkpoint and from the pre-quantized folder.
#                  RESTART_CLOSURE=1: each warm run again with only fluxkit's dependency closure importable (=only: only there)
#                  (scripts/closure_site.py: the host's other packages, which diffusers and transformers import when present,
#                  hidden as on a clean install), after one run that primes that environment's bytecode; RESTART_VARIANT
#                  (VAR=value words): the closure's runs again, with those set. Each run reports when its image
#                  file was written and when the process exited (the difference is teardown).
#   sweep-P        fluxkit sweep under placement P (every preset or SWEEP_VARIANTS, T5 quantized or not; fidelity to bf16)
set -uo pipefail
site=$(python3 -c "import nbconvert, pathlib; print(pathlib.Path(nbconvert.__file__).parents[1])")
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 JUPYTER_PATH="$site/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
# This host sets PYTHONDONTWRITEBYTECODE=1 and its torch has no .pyc files: each process compiled ~4800 source files
# again (7-8 s of a restart, run 21). pip and conda installs keep bytecode; so do these runs, outside the read-only tree.
unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache}
OUT=${OUT:-/tmp/fluxkit-out}; LOGS=$OUT/logs; mkdir -p "$LOGS"
CKPT=${CKPT:-/dev/shm/flux-synthetic-full}
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ', '').split()[0])")
fluxkit() { python3 -m fluxkit.cli "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.txt"
nproc >> "$LOGS/gpu.txt"
if [ ! -f "$CKPT/fluxkit_synthetic.json" ]; then
  { time fluxkit synth --preset full --out "$CKPT"; } > "$LOGS/synth.log" 2>&1
fi
for step in "$@"; do
  case $step in *=*) export "$step"; echo "== $step"; continue ;; esac
  start=$SECONDS
  name=${step##*/}; n=1  # a step run twice (another SWEEP_COMPILE) keeps both logs; a script by its file name
  while [ -e "$LOGS/$name.log" ]; do n=$((n + 1)); name=${step##*/}.$n; done
  # the card's clocks, power and throttle reasons beside each step: tells a slow stretch of the GPU from fluxkit's own
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_throttle_reasons.active \
    --format=csv -lms 500 > "$LOGS/$name.clocks.csv" 2>/dev/null & clocks=$!
  case $step in
    cotenancy|model-tests)
      files=tests/test_gpu_cotenancy.py
      [ "$step" = model-tests ] && files=${MODEL_TESTS:-tests/test_gpu_dequantize.py tests/test_gpu_graphs.py tests/test_gpu_kernels.py tests/test_gpu_model.py tests/test_gpu_placements.py}
      for f in $files; do  # each in a fresh process
        FLUXKIT_FULL_CHECKPOINT=$CKPT python3 -m pytest -s -v -p no:cacheprovider -o addopts="" ${MODEL_TESTS_K:+-k "$MODEL_TESTS_K"} "$f"
      done ;;
    references-*) fluxkit references --model "$CKPT" --device cuda --placement "${step#references-}" --overwrite ;;
    validate-*) fluxkit validate --resume --model "$CKPT" --device cuda --placement "${step#validate-}" --drift-calls ${DRIFT_CALLS:-100} \
                  --name "$GPU-synthetic-full-nf4-${step#validate-}${REPORT_SUFFIX:-}" ${SWEEP_PRESETS:+--sweep-presets $SWEEP_PRESETS} ;;
    baseline) fluxkit bench --model "$CKPT" --device cuda --baseline plain --iterations 50 --rounds 10 \
                ${BASELINE_LEVERS:+--levers ${BASELINE_LEVERS//,/ }} --json "$LOGS/side_by_side_$GPU.json" ;;
    bench-*) fluxkit bench --model "$CKPT" --device cuda --placement "${step#bench-}" --iterations ${BENCH_ITERATIONS:-50} \
               --json "$LOGS/bench_${step#bench-}_$GPU.json" ;;
    levers-*) tiles=untiled-decode; [ "${step#levers-}" = resident ] && tiles=  # resident decodes untiled already
              q=${QUANTIZATION:-nf4}
              fluxkit bench --model "$CKPT" --device cuda --quantization "$q" --placement "${step#levers-}" \
                --levers ${LEVERS:-eager no-cuda-graphs $tiles whole-transformer} --iterations ${BENCH_ITERATIONS:-50} \
                --rounds 10 --json "$LOGS/levers_${step#levers-}_${q}_$GPU.json" ;;
    *.py) python3 "$step" ;;  # a probe script of the repository, run as it is
    probe-*)  # one placement in a fresh process: resident after load, peaks over 3 calls (JSON), default allocator
      python3 -m fluxkit.profiling -v --model "$CKPT" --device cuda --placement "${step#probe-}" --calls 3 ;;
    expandable-*)  # the same with expandable segments (less fragmentation between allocated and reserved)
      PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 -m fluxkit.profiling --model "$CKPT" --device cuda \
        --placement "${step#expandable-}" --calls 3 ;;
    sweep-*) fluxkit -v sweep --model "$CKPT" --device cuda --placement "${step#sweep-}" --iterations ${SWEEP_ITERATIONS:-20} \
               ${SWEEP_VARIANTS:+--variants ${SWEEP_VARIANTS//,/ }} ${SWEEP_TIMEOUT:+--variant-timeout $SWEEP_TIMEOUT} \
               --compile ${SWEEP_COMPILE:-both} --t5 ${SWEEP_T5:-both} --out "$LOGS/sweep_${step#sweep-}${SWEEP_COMPILE:+_$SWEEP_COMPILE}" ;;
    restart-*)
      placement=${step#restart-}; prequantized=/dev/shm/flux-nf4-$placement; runs=("cold $CKPT host")
      if [ "${RESTART_COLD:-}" = skip ]; then  # the compile cache of the steps before (a first process filled it)
        runs=()
      else
        export TORCHINDUCTOR_CACHE_DIR=/tmp/restart-inductor-cache; rm -rf "$TORCHINDUCTOR_CACHE_DIR"
      fi
      envs=host; closure=(env PYTHONPATH="$PWD:/tmp/closure/site" /tmp/closure/venv/bin/python)
      if [ -n "${RESTART_CLOSURE:-}" ]; then  # only fluxkit's dependency closure, as a clean install has it
        [ -d /tmp/closure/venv ] || { python3 scripts/closure_site.py /tmp/closure/site && python3 -m venv --without-pip /tmp/closure/venv; }
        envs="host closure"; [ "$RESTART_CLOSURE" = only ] && envs=closure
        [ ${#runs[@]} -gt 0 ] && runs+=("first $CKPT closure")  # its own bytecode and source paths: primes both
        [ -n "${RESTART_VARIANT:-}" ] && envs+=" variant"  # the closure with RESTART_VARIANT's assignments
      fi
      # interleaved, so drift on the host reaches every kind of run alike
      for i in $(seq ${RESTART_WARM:-1}); do for env in $envs; do runs+=("warm $CKPT $env" "warm $prequantized $env"); done; done
      [ -d $prequantized ] || fluxkit quantize --model "$CKPT" --device cuda --placement $placement --out $prequantized
      for run in "${runs[@]}"; do
        set -- $run; t0=$EPOCHREALTIME
        case $3 in
          closure) python=("${closure[@]}") ;;
          variant) python=(env $RESTART_VARIANT "${closure[@]}") ;;
          *) python=(python3) ;;
        esac
        rm -f "/tmp/$1.png"
        "${python[@]}" -m fluxkit.cli -v generate --prompt "restart $1" --model "$2" --device cuda --placement $placement --out "/tmp/$1.png"
        # The image is there when its file is written; the process exits later (interpreter and CUDA teardown).
        echo "$1 compile cache, $3 packages, $2: process start to first image $(python3 -c "import os; p = '/tmp/$1.png'; print(round(os.path.getmtime(p) - $t0, 1) if os.path.exists(p) else 'none (no image written)')") s, to exit $(python3 -c "print(round($EPOCHREALTIME - $t0, 1))") s"
      done
      # RESTART_PROFILE=1: where a warm restart goes, each import's time and a profile of the whole process
      # (in the closure where RESTART_CLOSURE is set)
      python=(python3); [ -n "${RESTART_CLOSURE:-}" ] && python=("${closure[@]}")
      [ -n "${RESTART_PROFILE:-}" ] && "${python[@]}" -X importtime -m cProfile -o "$LOGS/restart_$placement.prof" -m fluxkit.cli -v generate --prompt "restart" \
        --model "$CKPT" --device cuda --placement $placement --out /tmp/profiled.png 2> "$LOGS/restart_${placement}_imports.txt"
      unset TORCHINDUCTOR_CACHE_DIR ;;
    *) echo "unknown step $step"; continue ;;
  esac 2>&1 | grep --line-buffered -v "it/s\]\|IPKernelApp\|kernels-community\|Loading weights" > "$LOGS/$name.log"
  kill $clocks 2>/dev/null
  echo "== $step: $((SECONDS - start)) s"; tail -25 "$LOGS/$name.log"
done
tar czf "$OUT/results.tgz" -C "$OUT" logs -C "$PWD" reference_images $(ls -d reports/*-nf4-* 2>/dev/null)
ls -la "$OUT"
