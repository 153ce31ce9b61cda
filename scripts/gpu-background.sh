#!/usr/bin/env bash
# Start scripts/gpu-run.sh STEP... in the background on the GPU host, from a private copy of the repository
# (a later device call re-syncs the checkout and must not touch a running job), then return at once.
# Poll it with scripts/gpu-poll.sh in back-to-back calls: the machine is released after 30 s without a call.
# Usage: bash scripts/gpu-background.sh STEP...   (env as for gpu-run.sh; RUN_DIR, default /tmp/fk)
# Several GPUs: the sweep's `--ray` step spreads its variants over all of them.
set -euo pipefail
RUN_DIR=${RUN_DIR:-/tmp/fk}
if [ -f "$RUN_DIR/.start" ] && [ ! -f "$RUN_DIR/DONE" ]; then
  echo "a run is still going in $RUN_DIR: poll it (scripts/gpu-poll.sh) instead of starting another"; exit 3
fi
rm -rf "$RUN_DIR" /tmp/fkrepo && mkdir -p "$RUN_DIR" && cp -r . /tmp/fkrepo && touch "$RUN_DIR/.start"
cd /tmp/fkrepo
setsid nohup bash -c "OUT=$RUN_DIR PYTHONPATH=/tmp/fkrepo:\${PYTHONPATH:-} bash scripts/gpu-run.sh $(printf '%q ' "$@"); touch $RUN_DIR/DONE" \
  > "$RUN_DIR/run.log" 2>&1 < /dev/null &
echo "started: $* (log $RUN_DIR/run.log)"
