#!/usr/bin/env bash
# The GPU-host run behind reports/<gpu>-synthetic-full-nf4/: builds the full-size synthetic checkpoint,
# runs the GPU tests, renders its reference images, runs `fluxkit validate`, and benchmarks the other
# presets. Writes logs and tarballs under $OUT (the device tool brings them back).
# Needs the offline wheelhouse on PYTHONPATH (README, "GPU host").
# Usage: bash scripts/gpu-report.sh [tests] [references] [validate] [bench]   (default: all four)
set -uo pipefail
steps=" ${*:-tests references validate bench} "
site=$(python3 -c "import nbconvert, pathlib; print(pathlib.Path(nbconvert.__file__).parents[1])")
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 JUPYTER_PATH="$site/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
OUT=${OUT:-/tmp/fluxkit-out}; mkdir -p "$OUT"
CKPT=${CKPT:-/dev/shm/flux-synthetic-full}
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ', '').split()[0])")
NAME="$GPU-synthetic-full-nf4"
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
[ -f "$CKPT/fluxkit_synthetic.json" ] || { time python3 -m fluxkit.cli synth --preset full --out "$CKPT"; } 2>&1 | tail -3 | tee "$OUT/synth.log"
[[ $steps == *" tests "* ]] && FLUXKIT_FULL_CHECKPOINT=$CKPT timeout 300 python3 -m pytest -s -q -p no:cacheprovider -o addopts="" \
  tests/test_gpu_cap.py tests/test_gpu_model.py 2>&1 | grep -v "it/s\]" | tee "$OUT/gpu_tests.log" | tail -25
[[ $steps == *" references "* ]] && python3 -m fluxkit.cli references --model "$CKPT" --device cuda 2>&1 | tail -1
[[ $steps == *" validate "* ]] && timeout 400 python3 -m fluxkit.cli validate --model "$CKPT" --device cuda --name "$NAME" --out-root reports 2>&1 \
  | grep -v "it/s\]\|IPKernelApp" | tail -30 | tee "$OUT/validate.log"
tar czf "$OUT/report.tgz" "reports/$NAME" reference_images
left=$((570 - (SECONDS - start)))
for q in bf16 int8; do
  [[ $steps == *" bench "* ]] || break
  [ $left -gt 90 ] || break
  t0=$SECONDS
  timeout $((left - 20)) python3 -m fluxkit.cli bench --model "$CKPT" --device cuda --quantization $q --iterations 20 \
    --json "$OUT/bench_$q.json" 2>&1 | tail -3 | tee -a "$OUT/bench_other.log"
  left=$((left - (SECONDS - t0)))
done
