#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): DDPO, DRaFT-K and Flow-GRPO it/s and peak memory on
# SD1.5-, SDXL- and SD3.5-M-size models with random weights, one Markdown table, <= 8 minutes.
#   bash benchmarks/gpu_check.sh            # on a GPU
#   bash benchmarks/gpu_check.sh --tiny     # tiny models on CPU, what CI runs
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
# hard stop at 8 minutes; the script's own --budget (420 s) stops starting new settings before that
exec timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@"
