"""Step time and memory of the classification head: full FC vs Partial FC, per margin.

One step = forward + backward of ``PartialFC(margin, D, C, sample_rate)`` on a [B, D] batch (the
head alone: no backbone, no optimizer). Each configuration runs in a fresh process so that peak
memory is attributable to it.

Memory columns:
  logits_MB  size of ONE [B, C_used] float32 logits tensor (C_used = classes in the step: all, or
             the sampled ones); the head keeps a few such tensors alive (cosine, logits, softmax).
  peak_MB    CUDA: torch.cuda.max_memory_allocated() during the steps minus the allocation before them.
             CPU: peak resident set size (ru_maxrss) minus the RSS before the steps, with glibc told to
             serve allocations >= 64 KiB by mmap (returned to the OS when freed) so that RSS tracks
             live tensors. It includes the weight gradient (dense [C, D] also with sampling, as
             arcface_torch) and the normalised copy of the centers used in the step.

Example:
  python tools/bench_heads.py --classes 10000 100000 1000000 --sample-rates 1.0 0.1 0.3 --repeats 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from typing import Dict, List

import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _run_one(cfg: Dict, queue: "mp.Queue") -> None:
    try:
        queue.put(_measure(cfg))
    except Exception as exc:  # reported in the table instead of killing the whole run
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _measure(cfg: Dict) -> Dict:
    from mlearn.heads import PartialFC, build_margin

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    device = torch.device(cfg["device"])
    head = PartialFC(build_margin(cfg["margin"]), cfg["dim"], cfg["classes"], sample_rate=cfg["rate"]).to(
        device
    )
    emb = torch.randn(cfg["batch"], cfg["dim"], device=device, requires_grad=True)
    labels = torch.randint(0, cfg["classes"], (cfg["batch"],), device=device)

    def step() -> None:
        head.zero_grad(set_to_none=True)
        emb.grad = None
        head(emb, labels).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(cfg["warmup"]):
        step()
    head.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    times: List[float] = []
    for _ in range(cfg["repeats"]):
        tic = time.perf_counter()
        step()
        times.append(time.perf_counter() - tic)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    used = cfg["classes"] if head.last_sample_index is None else head.last_sample_index.numel()
    return {
        "ms": 1000 * statistics.median(times),
        "used": used,
        "logits_mb": cfg["batch"] * used * 4 / 2**20,
        "peak_mb": peak,
    }


def _in_subprocess(cfg: Dict) -> Dict:
    # read by glibc when the child interpreter starts: big blocks go back to the OS when freed
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_one, args=(cfg, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return {"error": f"exit code {proc.exitcode} (out of memory?)"}
    return queue.get()


def main(argv: List[str] | None = None) -> None:
    from mlearn.heads import list_margins

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--sample-rates", type=float, nargs="+", default=[1.0, 0.1, 0.3])
    p.add_argument("--margins", nargs="+", default=["arcface"], help="margins at every size")
    p.add_argument(
        "--all-margins-at",
        type=int,
        nargs="*",
        default=[10_000],
        help="class counts at which every registered margin is measured",
    )
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    all_margins = [m for m in list_margins() if m != "normface"]  # an alias of softmax
    rows = []
    print(
        f"device={args.device} threads={args.threads} D={args.dim} B={args.batch} "
        f"repeats={args.repeats} (median) warmup={args.warmup}",
        flush=True,
    )
    header = (
        f"{'classes':>9} {'margin':<16} {'rate':>5} {'C_used':>8} "
        f"{'step_ms':>9} {'logits_MB':>10} {'peak_MB':>9}"
    )
    print(header)
    print("-" * len(header), flush=True)
    for classes in args.classes:
        margins = all_margins if classes in args.all_margins_at else args.margins
        for margin in margins:
            for rate in args.sample_rates:
                cfg = dict(
                    margin=margin,
                    classes=classes,
                    rate=rate,
                    dim=args.dim,
                    batch=args.batch,
                    repeats=args.repeats,
                    warmup=args.warmup,
                    threads=args.threads,
                    device=args.device,
                )
                res = _in_subprocess(cfg)
                rows.append((cfg, res))
                if "error" in res:
                    print(f"{classes:>9} {margin:<16} {rate:>5.2f}  {res['error']}", flush=True)
                    continue
                print(
                    f"{classes:>9} {margin:<16} {rate:>5.2f} {res['used']:>8} {res['ms']:>9.1f} "
                    f"{res['logits_mb']:>10.1f} {res['peak_mb']:>9.0f}",
                    flush=True,
                )

    print("\nratios Partial FC / full FC (same run)")
    print(f"{'classes':>9} {'margin':<16} {'rate':>5} {'time':>6} {'logits':>7} {'peak':>6}")
    full = {(c["classes"], c["margin"]): r for c, r in rows if c["rate"] == 1.0 and "error" not in r}
    for cfg, res in rows:
        ref = full.get((cfg["classes"], cfg["margin"]))
        if cfg["rate"] == 1.0 or ref is None or "error" in res:
            continue
        print(
            f"{cfg['classes']:>9} {cfg['margin']:<16} {cfg['rate']:>5.2f} {res['ms'] / ref['ms']:>6.3f} "
            f"{res['logits_mb'] / ref['logits_mb']:>7.3f} {res['peak_mb'] / max(ref['peak_mb'], 1e-9):>6.3f}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
