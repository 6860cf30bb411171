#!/usr/bin/env bash
# The chunked head engine on one GPU (issue 17), from the repository root on the lent machine:
#   device: run(command="bash tools/device/bench_head_engine.sh", timeout_s=240)
# (mlearn.heads needs numpy besides torch: without it, carry .device_wheels from tools/device/fetch_wheels.sh)
# 1. a CUDA exactness check (chunked vs dense engine, fp32 and bf16 autocast), 2. bf16 step time vs the
# cuBLAS gemm3 and peak memory at 1e6 classes (both engines) and 1e7 classes x 512 (chunked).
# Outputs go to $OUT (or ./device_out), one file per step; runs on CPU too (tiny: CLASSES=20000 CLASSES_MID=10000).
set -uo pipefail
OUT="${OUT:-device_out}"
CLASSES="${CLASSES:-10000000}"
CLASSES_MID="${CLASSES_MID:-1000000}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

# shellcheck source=tools/device/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"  # step NAME SECONDS COMMAND...

if ! "$PY" -c "import numpy" 2>/dev/null && ls .device_wheels/*.whl >/dev/null 2>&1; then
    step install 60 "$PY" -m pip install --no-index --no-deps --quiet .device_wheels/*.whl  # numpy
fi
step check 40 "$PY" - "$DEVICE" <<'PY'
import sys, torch
from mlearn.heads import PartialFC, build_margin
dev = torch.device(sys.argv[1])
print(torch.__version__, torch.cuda.get_device_name() if dev.type == "cuda" else "cpu")
for name in ("arcface", "curricularface", "adaface"):
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        dense = PartialFC(build_margin(name), 512, 20000, engine="dense").to(dev)
        chunked = PartialFC(build_margin(name), 512, 20000, chunk_size=7000).to(dev)
        chunked.load_state_dict(dense.state_dict())
        x0 = torch.randn(256, 512, device=dev)
        y = torch.randint(0, 20000, (256,), device=dev)
        out = []
        for head in (dense, chunked):
            x = x0.clone().requires_grad_()
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = head(x, y)
            loss.backward()
            out.append((loss.item(), x.grad, head.weight.grad))
        (ld, gxd, gwd), (lc, gxc, gwc) = out
        rel = lambda a, b: ((a - b).norm() / b.norm()).item()
        print(f"{name:<15} {str(dtype):<15} loss dense {ld:.5f} chunked {lc:.5f}  "
              f"grad_x rel {rel(gxc, gxd):.2e}  grad_w rel {rel(gwc, gwd):.2e}", flush=True)
PY
step bench_1e6 60 "$PY" tools/bench_heads.py --device "$DEVICE" --dtype bf16 --classes "$CLASSES_MID" \
    --sample-rates 1.0 --all-margins-at --engines chunked dense --repeats 3
step bench_1e7 110 "$PY" tools/bench_heads.py --device "$DEVICE" --dtype bf16 --classes "$CLASSES" \
    --sample-rates 1.0 --all-margins-at --engines chunked --repeats 3
