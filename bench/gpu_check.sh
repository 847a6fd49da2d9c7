#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): one CUDA GPU, no network, results in one JSON file (85 s on one H200:
# bench/results/gpu_check.json, docs/guide.md).
#   bench/gpu_check.sh [OUT.json]        default: bench/results/gpu_check.json
# It needs only torch and transformers, which a CUDA image has: the part of hpd it runs imports nothing else, so
# nothing is installed. hpd is imported from this checkout (a temporary `hpd` link to it on PYTHONPATH) unless an
# installed hpd is found.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/gpu_check.json}"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import hpd.stages.scoring" 2>/dev/null; then
  link="$(mktemp -d)"
  ln -s "$PWD" "$link/hpd"
  export PYTHONPATH="$link${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" -m bench.gpu_check --out "$out" "${@:2}"
