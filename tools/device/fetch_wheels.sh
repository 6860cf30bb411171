#!/usr/bin/env bash
# Download the wheels of tools/device/wheels.txt for the GPU machine (CPython 3.12, x86-64 Linux) into
# .device_wheels/ (git-ignored, ~30 MB): carry that folder with the device run (see checks.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .device_wheels
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest .device_wheels -r tools/device/wheels.txt
ls .device_wheels | wc -l
du -sh .device_wheels
