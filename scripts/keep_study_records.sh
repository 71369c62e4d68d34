#!/bin/bash
# Copy the small provenance files of a scripts/refine_options.py study (config.yaml, summary.json,
# metrics.jsonl of every finished run) from its ignored run folder into a committed one, so that a
# later checkout can rebuild the table, and resume the study, without the checkpoints:
#   scripts/keep_study_records.sh runs/thr-c10-worse results/refine-threshold/records/cpu-cifar10-worse
# To resume: cp -r RECORDS/. RUNS/ ; finished runs (summary.json present) are not run again.
set -euo pipefail
if [ $# -ne 2 ] || [ ! -d "$1" ]; then
  echo "usage: $0 RUN_DIR RECORD_DIR (RUN_DIR must be an existing study folder)" >&2; exit 2
fi
src=$1 dst=$2
find "$src" -name summary.json | while read -r s; do
  d=$(dirname "$s"); rel=${d#"$src"/}
  mkdir -p "$dst/$rel"
  cp "$d/config.yaml" "$d/summary.json" "$d/metrics.jsonl" "$dst/$rel/"
done
[ -f "$src/table.md" ] && cp "$src/table.md" "$dst/" || true
