#!/usr/bin/env bash
# The prepared GPU check, first thing on a fresh GPU: the bytes-per-image work measured side by side (fp32 vs bf16
# residual stream, the small decoder; pretraining and fine-tuning; micro-batch 1024 and 4096). Every variant is
# checked before the first compile, and none starts after 7 minutes, so the run ends within about 8 (not yet timed
# on a GPU). JSON lines go to $OUT (runs/gpu-check/check.jsonl); record them in docs/RESULTS.md.
#   bash benchmarks/gpu_check.sh             # on the GPU box
#   DRY_RUN=1 bash benchmarks/gpu_check.sh   # any machine: every variant parsed and built, nothing timed
set -euo pipefail
cd "$(dirname "$0")/.."
# the project, also where it is not installed (pip install -e .)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py --out "${OUT:-runs/gpu-check/check.jsonl}" ${DRY_RUN:+--dry_run}
