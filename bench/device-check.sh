#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (see bench/README.md): the GPU tests, then
# the benchmark; everything lands in $OUT as JSON and logs. Carry .whl (bench/fetch-wheels.sh
# fills it) with it. Usage there: bash bench/device-check.sh   (steps cut off after 580 s in all)
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

# GPU tests: fp16 against fp32, GPU against CPU, CUDA graphs against eager, on real photos.
timeout 120 python3 -m pytest -m gpu -p no:cacheprovider -q tests/test_engine.py \
    --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"

# Model alone (graphs and eager, fp16 and fp32); 1 MP end to end over 20 000 photos (memory
# over time), rembg on 256 of them; an idle daemon's start and single-file latency.
timeout 360 python3 bench/throughput.py --out "$OUT/bench-1mp.json" --images 20000 \
    --rembg-images 256 --megapixels 1 2>&1 | tee "$OUT/bench-1mp.log"

# 12 MP end to end, where encoding dominates.
timeout 100 python3 bench/throughput.py --out "$OUT/bench-12mp.json" --images 64 \
    --rembg-images 8 --megapixels 12 --model-seconds 0 2>&1 | tee "$OUT/bench-12mp.log"
