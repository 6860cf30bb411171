#!/usr/bin/env bash
# The GPU checks of one device run, from the repository root on the lent machine (its python3 has torch):
#   here:   tools/device/fetch_wheels.sh
#   device: run(command="bash tools/device/checks.sh", carry=[".device_wheels"], timeout_s=560)
# Each step has its own time limit (560 s in all) and the next runs even if one fails; outputs go to
# $OUT (or ./device_out), one file per step.
set -uo pipefail
OUT="${OUT:-device_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg

# shellcheck source=tools/device/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # step NAME SECONDS COMMAND...

step install 60 python3 -m pip install --no-index --no-deps --quiet .device_wheels/*.whl
step env 30 python3 -c "import torch, mlearn; print(torch.__version__, torch.cuda.get_device_name(), \
    torch.cuda.is_available(), __import__('os').cpu_count(), 'CPUs')"
step tests 200 python3 -m pytest -q -p no:cacheprovider -n 8 --dist loadfile tests
step loader 120 python3 tools/bench_train.py --parts loader --images 5000 --workers 0 1 2 4 8 --repeats 3
step train 90 python3 tools/bench_train.py --parts train --device cuda --precision bf16-mixed \
    --train-steps 30 --train-warmup 5
step heads 60 python3 tools/bench_heads.py --device cuda --classes 1000000 --sample-rates 1.0 0.1 --repeats 3
