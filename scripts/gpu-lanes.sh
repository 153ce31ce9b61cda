#!/usr/bin/env bash
# Several scripts/gpu-run.sh lanes side by side on one multi-GPU host, one GPU each, so one lease runs them all.
# Usage: bash scripts/gpu-lanes.sh "STEPS of lane 0" "STEPS of lane 1" ...
# Lane i runs on GPU i, from $LANE<i>_DIR when set (a modified copy of the repository), with $LANE<i>_ENV
# (VAR=value ...) added, logging to $OUT/lane<i>. Runs that share a host share its CPUs: compare timings only
# inside one lane (the side-by-side benchmark interleaves its variants for that reason).
set -uo pipefail
OUT=${OUT:-/tmp/fluxkit-out}; mkdir -p "$OUT"
OUT=$OUT/synth bash scripts/gpu-run.sh  # the checkpoint, once, before the lanes read it
pids=()
for i in $(seq 0 $(($# - 1))); do
  lane=$((i + 1)); steps=${!lane}
  dir_var=LANE${i}_DIR; env_var=LANE${i}_ENV
  ( cd "${!dir_var:-$PWD}" && env CUDA_VISIBLE_DEVICES=$i OUT="$OUT/lane$i" ${!env_var:-} \
      PYTHONPATH="${!dir_var:-$PWD}:${PYTHONPATH:-}" bash scripts/gpu-run.sh $steps > "$OUT/lane$i.log" 2>&1 ) &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
echo "all lanes done"
