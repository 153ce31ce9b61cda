#!/usr/bin/env bash
# GPU-host runs behind reports/: builds the full-size synthetic checkpoint in /dev/shm (kept while the machine
# stays warm), then runs the named steps. Logs and results land in $OUT/results.tgz (the device tool brings it back).
# Needs the offline wheelhouse on PYTHONPATH (README, "GPU host").
# Usage: bash scripts/gpu-run.sh STEP...   steps: tests references validate-vortex validate-resident
set -uo pipefail
site=$(python3 -c "import nbconvert, pathlib; print(pathlib.Path(nbconvert.__file__).parents[1])")
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 JUPYTER_PATH="$site/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
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
  start=$SECONDS
  case $step in
    tests)
      for f in tests/test_gpu_cotenancy.py tests/test_gpu_model.py; do  # each in a fresh process
        FLUXKIT_FULL_CHECKPOINT=$CKPT python3 -m pytest -s -q -p no:cacheprovider -o addopts="" "$f"
      done ;;
    references) fluxkit references --model "$CKPT" --device cuda --overwrite ;;
    validate-vortex) fluxkit validate --model "$CKPT" --device cuda --placement vortex --drift-calls 100 \
                       --name "$GPU-synthetic-full-nf4-vortex" ;;
    validate-resident) fluxkit validate --model "$CKPT" --device cuda --placement resident --drift-calls 100 \
                         --name "$GPU-synthetic-full-nf4-resident" ;;
    *) echo "unknown step $step"; continue ;;
  esac 2>&1 | grep -v "it/s\]\|IPKernelApp\|kernels-community\|Loading weights" > "$LOGS/$step.log"
  echo "== $step: $((SECONDS - start)) s"; tail -25 "$LOGS/$step.log"
done
tar czf "$OUT/results.tgz" -C "$OUT" logs -C "$PWD" reference_images $(ls -d reports/*-nf4-* 2>/dev/null)
ls -la "$OUT"
