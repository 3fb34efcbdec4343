#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (see bench/README.md): the GPU tests, then
# the benchmark, then the CPU paths on that machine's processor; everything lands in $OUT as JSON
# and logs. Carry .whl (bench/fetch-wheels.sh fills it) with it.
# Usage there: bash bench/device-check.sh   (steps cut off after 440 s in all)
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
export CACHE_DIRECTORY=/tmp/hotfolder-cache
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    grep -m1 "model name" /proc/cpuinfo
    nproc
    python3 -c "import torch, onnxruntime; print('torch', torch.__version__, 'onnxruntime', onnxruntime.__version__)"
    python3 -c "from hotfolder import cpuinfo; print(cpuinfo.describe(), cpuinfo.vector_isa())"
} > "$OUT/machine.txt" 2>&1

# GPU tests: fp16 against fp32, GPU against CPU, CUDA graphs against eager, on real photos.
timeout 100 python3 -m pytest -m gpu -p no:cacheprovider -q tests/test_engine.py \
    --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"

# Model alone (graphs and eager, fp16 and fp32); 1 MP end to end over 6 000 photos (memory over
# time, time by stage), rembg on 128 of them; an idle daemon's start and single-file latency.
timeout 200 python3 bench/throughput.py --out "$OUT/bench-1mp.json" --images 6000 \
    --rembg-images 128 --megapixels 1 --model-seconds 1.5 2>&1 | tee "$OUT/bench-1mp.log"

# 12 MP end to end, where encoding dominates.
timeout 70 python3 bench/throughput.py --out "$OUT/bench-12mp.json" --images 48 \
    --rembg-images 4 --megapixels 12 --model-seconds 0 2>&1 | tee "$OUT/bench-12mp.log"

# The CPU forms on this machine's processor (what model.precision auto picks without a GPU):
# speed of the model alone on one thread, and int8-mixed's mattes against fp32 on real photos.
timeout 70 python3 bench/cpu_paths.py --skip-quality --held-out --rounds 5 --out "$OUT/cpu-paths.json" \
    --forms onnxruntime onnxruntime-int8-mixed bf16-mixed 2>&1 | tee "$OUT/cpu-paths.log"
