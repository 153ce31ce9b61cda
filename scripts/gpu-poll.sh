#!/usr/bin/env bash
# Wait for a scripts/gpu-background.sh run to finish, at most SECONDS (default 540), then copy what it has
# written so far (its logs, and the files under reports/ and reference_images/ it wrote) into $OUT, so every
# poll brings back a snapshot.
# Usage: bash scripts/gpu-poll.sh [SECONDS]   (RUN_DIR as for gpu-background.sh)
set -uo pipefail
RUN_DIR=${RUN_DIR:-/tmp/fk}
[ -f "$RUN_DIR/.start" ] || { echo "no run in $RUN_DIR: this is a fresh machine (the last one was released)"; exit 3; }
end=$((SECONDS + ${1:-540}))
while [ ! -f "$RUN_DIR/DONE" ] && [ $SECONDS -lt $end ]; do sleep 10; done
grep -H "^== \|sweep variant" "$RUN_DIR"/*.log "$RUN_DIR"/logs/*.log 2>/dev/null; tail -n 3 "$RUN_DIR"/*.log
newest=$(ls -t "$RUN_DIR"/logs/*.log 2>/dev/null | head -1); [ -n "$newest" ] && tail -n 2 "$newest"  # the step now running
[ -f "$RUN_DIR/DONE" ] && echo "DONE" || echo "still running"
( cd /tmp/fkrepo && find reports reference_images -type f -newer "$RUN_DIR/.start" ) > "$RUN_DIR/new-files.txt"
tar czf "$OUT/snapshot.tgz" --exclude="*results.tgz" -C "$RUN_DIR" . -C /tmp/fkrepo -T "$RUN_DIR/new-files.txt"
ls -la "$OUT"
