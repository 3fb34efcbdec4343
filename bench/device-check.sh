#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (see bench/README.md): GPU tests, then
# the benchmark; everything lands in $OUT as JSON and logs. Carry .whl (wheels of what the
# machine lacks) with it. Usage there: bash bench/device-check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/hotfolder-device-out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1

# GPU tests: fp16 against fp32, GPU against CPU, on real photos.
timeout 240 python3 -m pytest -m gpu -p no:cacheprovider -q tests/test_engine.py \
    --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"

# Benchmark: model only, end to end at 1 MP and 12 MP, rembg beside it.
timeout 300 python3 bench/throughput.py --out "$OUT/bench.json" --images 256 \
    --megapixels 1 12 2>&1 | tee "$OUT/bench.log"
