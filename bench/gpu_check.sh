#!/usr/bin/env bash
# One short run on a CUDA machine (< 9 minutes): the correctness checks of the GPU path, then the
# benchmarks with GPU timings. Usage, from the repo root, with a venv holding a CUDA torch build:
#   bash bench/gpu_check.sh            # results in reports/gpu_check.json and reports/*.md
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONUNBUFFERED=1
timeout 330 "$PY" -m bench.gpu_check --device cuda --out reports; status=$?
timeout 200 "$PY" -m service bench --only attention --only moe_dispatch --out reports || status=1
exit $status
