"""Step time and memory of the classification head next to the three bare GEMMs of the same shapes.

One step = forward + backward of ``PartialFC(margin, D, C, sample_rate, engine=...)`` on a [B, D] batch
(the head alone: no backbone, no optimizer). The ``gemm3`` row is the three GEMMs every exact head
step needs at least, in the same dtype: logits X·Wᵀ [B, C], dX = G·W [B, D], dW = Gᵀ·X [C, D], in its
own process (its time and memory). A head row's ``x_gemm3`` is the median over the repeats of (head step
time / gemm3 time), the gemm3 run in the head's process on its centers right after each step, so that
load changes of a shared machine cancel out. Every configuration runs in a fresh process.

Memory columns:
  peak_MB    the largest extra memory of one measured step. CUDA: torch.cuda.max_memory_allocated()
             during the step minus the allocation before it. CPU: the peak resident set size (VmHWM,
             reset before the step through /proc/self/clear_refs) minus the RSS before the step, with
             glibc told to serve allocations >= 32 MiB by mmap (returned to the OS when freed) so that
             RSS tracks the big tensors; smaller freed blocks stay in the heap (a few block budgets of
             the chunked engine). It includes the weight gradient.
  x_grad     peak_MB over the size of the float32 weight gradient (4·C·K·D bytes).

Criteria (``--criteria``, at the ``--criteria-at`` class counts): each :mod:`mlearn.heads.criteria`
loss on the same head (ArcFace logits, or the criterion's own margin), full FC and the first engine;
the closing table prints its x_gemm3 over the ArcFace softmax CE row's of the same run (target <= 1.2).

``--dtype bf16``/``fp16``: the head runs under autocast (float32 master weight and gradient); gemm3 runs
on bf16/fp16 operands.

``--target-cosine c``: every embedding sits at cosine c to its class center instead of at random (as
mid-training: what a margin does to the negatives depends on the target cosine; at random init every
target cosine is ~0).

Examples:
  python tools/bench_heads.py --classes 200000 1000000 --sample-rates 1.0 0.1 --repeats 2
  python tools/bench_heads.py --device cuda --dtype bf16 --classes 10000000 --sample-rates 1.0 \\
      --all-margins-at --repeats 3     # one H200: 1e7 classes x 512
  python tools/bench_heads.py --classes 100000 --sample-rates 1.0 --all-margins-at --criteria-at 100000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _run_one(cfg: Dict, queue: "mp.Queue") -> None:
    try:
        queue.put(_measure_gemm3(cfg) if cfg["kind"] == "gemm3" else _measure_head(cfg))
    except Exception as exc:  # reported in the table instead of killing the whole run
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: torch.device) -> float:
    """Start a new peak-memory window; returns the current allocation in MB (the window's base)."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM), Linux >= 4.0
        f.write("5")
    return _rss_mb()


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        line = next(row for row in f if row.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _timed(cfg: Dict, device: torch.device, step: Any, before_measure: Any,
           reference: Optional[Any] = None) -> Dict:
    """warmup + repeats of ``step``: median time, peak extra memory over the measured steps and, with
    ``reference`` (the gemm3 step), the median of the per-repeat ratios step / reference, each
    reference run right after its step (so that load changes on a shared machine cancel out)."""
    for _ in range(cfg["warmup"]):
        step()
    before_measure()
    times: List[float] = []
    ratios: List[float] = []
    peak = 0.0
    for _ in range(cfg["repeats"]):
        base = _reset_peak(device)
        tic = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - tic)
        peak = max(peak, _peak_mb(device) - base)
        before_measure()
        if reference is not None:
            tic = time.perf_counter()
            reference()
            _sync(device)
            ratios.append(times[-1] / (time.perf_counter() - tic))
    res = {"ms": 1000 * statistics.median(times), "peak_mb": peak}
    if ratios:
        res["x_gemm3"] = statistics.median(ratios)
    return res


def _gemm3_step(weight: torch.Tensor, x: torch.Tensor) -> None:
    """The three GEMMs of a head step: logits [B, C], dX [B, D], dW [C, D]."""
    logits = x @ weight.t()
    grad_x = logits @ weight
    grad_w = logits.t() @ x
    del logits, grad_x, grad_w


def _measure_gemm3(cfg: Dict) -> Dict:
    torch.set_num_threads(cfg["threads"])
    device, dtype = torch.device(cfg["device"]), DTYPES[cfg["dtype"]]
    gen = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(cfg["classes"], cfg["dim"], device=device, dtype=dtype, generator=gen)
    x = torch.randn(cfg["batch"], cfg["dim"], device=device, dtype=dtype, generator=gen)
    return _timed(cfg, device, lambda: _gemm3_step(weight, x), lambda: None)


def _measure_head(cfg: Dict) -> Dict:
    from mlearn.heads import PartialFC, build_criterion, build_margin

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    device = torch.device(cfg["device"])

    class Head(PartialFC):
        def _initial_weight(self, seed: int) -> torch.Tensor:
            if device.type != "cuda":
                return super()._initial_weight(seed)
            # drawn on the GPU: the CPU draw of 1e7 x 512 centers would take longer than the steps
            rows = self.num_local * self.num_subcenters
            return torch.randn(rows, self.embedding_size, device=device).mul_(self.init_std)

    criterion = build_criterion(cfg["criterion"]) if cfg.get("criterion") else None
    margin = None if criterion is not None and criterion.own_margin else build_margin(cfg["margin"])
    head = Head(
        margin, cfg["dim"], cfg["classes"], sample_rate=cfg["rate"],
        engine=cfg["engine"], chunk_size=cfg["chunk_size"], chunk_memory_mb=cfg["chunk_memory_mb"],
        criterion=criterion,
    ).to(device)
    labels = torch.randint(0, cfg["classes"], (cfg["batch"],), device=device)
    emb = torch.randn(cfg["batch"], cfg["dim"], device=device)
    if cfg.get("target_cosine") is not None:
        emb = _at_target_cosine(emb, head.weight.detach()[labels * head.num_subcenters], cfg["target_cosine"])
    emb.requires_grad_()
    dtype = DTYPES[cfg["dtype"]]

    def step() -> None:
        head.zero_grad(set_to_none=True)
        emb.grad = None
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = head(emb, labels)
        loss.backward()

    # the gemm3 reference on the head's own centers (a bf16/fp16 copy for those dtypes)
    ref_weight = head.weight.detach().to(dtype)
    ref_x = emb.detach().to(dtype)
    res = _timed(cfg, device, step, lambda: head.zero_grad(set_to_none=True),
                 reference=lambda: _gemm3_step(ref_weight, ref_x))
    res["used"] = cfg["classes"] if head.last_sample_index is None else head.last_sample_index.numel()
    return res


def _at_target_cosine(noise: torch.Tensor, centers: torch.Tensor, cosine: float) -> torch.Tensor:
    """Unit embeddings [B, D] at ``cosine`` to their class centers [B, D], the rest of each along the
    part of ``noise`` orthogonal to the center (as mid-training rather than at random init)."""
    c = torch.nn.functional.normalize(centers.float(), dim=1)
    orth = noise - (noise * c).sum(dim=1, keepdim=True) * c
    return cosine * c + (1.0 - cosine**2) ** 0.5 * torch.nn.functional.normalize(orth, dim=1)


def _in_subprocess(cfg: Dict) -> Dict:
    # read by glibc when the child interpreter starts: blocks >= 32 MiB (glibc's largest threshold) are
    # mmapped and go back to the OS when freed, so RSS tracks the big tensors; smaller ones (the chunked
    # engine's per-block temporaries) are reused from the heap instead of being mapped and page-faulted
    # in again on every operation, which would dominate the step time
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(32 << 20))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_one, args=(cfg, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return {"error": f"exit code {proc.exitcode} (out of memory?)"}
    return queue.get()


def _row(label: str, cfg: Dict, res: Dict) -> str:
    head = f"{cfg['classes']:>9} {label:<16} {cfg['rate']:>5.2f} {cfg.get('engine', ''):<8}"
    if "error" in res:
        return f"{head} {res['error']}"
    grad_mb = 4 * cfg["classes"] * cfg["dim"] / 2**20
    ratio = f"{res['x_gemm3']:>7.2f}" if "x_gemm3" in res else f"{'-':>7}"
    return f"{head} {res['ms']:>9.1f} {ratio} {res['peak_mb']:>9.0f} {res['peak_mb'] / grad_mb:>6.2f}"


def main(argv: Optional[List[str]] = None) -> None:
    from mlearn.heads import list_criteria, list_margins

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[10_000, 200_000, 1_000_000])
    p.add_argument("--sample-rates", type=float, nargs="+", default=[1.0, 0.1])
    p.add_argument("--margins", nargs="+", default=["arcface"], help="margins at every size")
    p.add_argument("--all-margins-at", type=int, nargs="*", default=[10_000],
                   help="class counts at which every registered margin is measured")
    p.add_argument("--criteria", nargs="*", default=None, help="criteria measured (default: all registered)")
    p.add_argument("--criteria-at", type=int, nargs="*", default=[10_000],
                   help="class counts at which every criterion is measured next to the ArcFace softmax CE")
    p.add_argument("--engines", nargs="+", default=["chunked"], choices=["chunked", "dense"])
    p.add_argument("--chunk-size", type=int, default=None, help="classes per block (chunked engine)")
    p.add_argument("--chunk-memory-mb", type=float, default=None, help="block budget (chunked engine)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--target-cosine", type=float, default=None,
                   help="each embedding at this cosine to its class center (default: random embeddings, "
                        "as at init); e.g. 0.48 puts half of CurricularFace's negatives in its hard set")
    args = p.parse_args(argv)
    if args.target_cosine is not None and not -1.0 <= args.target_cosine <= 1.0:
        p.error(f"--target-cosine {args.target_cosine}: expected a cosine in [-1, 1]")

    all_margins = [m for m in list_margins() if m != "normface"]  # an alias of softmax
    common = dict(dim=args.dim, batch=args.batch, repeats=args.repeats, warmup=args.warmup,
                  threads=args.threads, device=args.device, dtype=args.dtype,
                  target_cosine=args.target_cosine)
    at = "" if args.target_cosine is None else f" target_cosine={args.target_cosine}"
    print(f"device={args.device} dtype={args.dtype} threads={args.threads} D={args.dim} B={args.batch} "
          f"repeats={args.repeats} (median) warmup={args.warmup}{at} torch={torch.__version__}", flush=True)
    header = (f"{'classes':>9} {'margin':<16} {'rate':>5} {'engine':<8} {'step_ms':>9} {'x_gemm3':>7} "
              f"{'peak_MB':>9} {'x_grad':>6}")
    print(header)
    print("-" * len(header), flush=True)
    rows = []
    for classes in args.classes:
        gcfg: Dict[str, Any] = dict(common, kind="gemm3", classes=classes, rate=1.0, engine="")
        print(_row("gemm3", gcfg, _in_subprocess(gcfg)), flush=True)
        margins = all_margins if classes in args.all_margins_at else args.margins
        for margin in margins:
            for rate in args.sample_rates:
                for engine in args.engines:
                    cfg = dict(common, kind="head", margin=margin, classes=classes, rate=rate, engine=engine,
                               chunk_size=args.chunk_size, chunk_memory_mb=args.chunk_memory_mb)
                    res = _in_subprocess(cfg)
                    rows.append((cfg, res))
                    print(_row(margin, cfg, res), flush=True)
        if classes in args.criteria_at:
            for criterion in list_criteria() if args.criteria is None else args.criteria:
                cfg = dict(common, kind="head", margin="arcface", criterion=criterion, classes=classes,
                           rate=1.0, engine=args.engines[0], chunk_size=args.chunk_size,
                           chunk_memory_mb=args.chunk_memory_mb)
                res = _in_subprocess(cfg)
                rows.append((cfg, res))
                print(_row(f"crit:{criterion}", cfg, res), flush=True)

    full = {
        (c["classes"], c["margin"], c["engine"]): r for c, r in rows
        if c["rate"] == 1.0 and "error" not in r and not c.get("criterion")
    }
    partial = [(c, r) for c, r in rows if c["rate"] < 1.0 and "error" not in r]
    criteria = [(c, r) for c, r in rows if c.get("criterion") and "error" not in r]
    if criteria:
        print("\nratios criterion / ArcFace softmax CE on the same head (target <= 1.2)")
        print(f"{'classes':>9} {'criterion':<16} {'engine':<8} {'time':>6} {'peak':>6}")
        for cfg, res in criteria:
            ref = full.get((cfg["classes"], "arcface", cfg["engine"]))
            if ref is None:
                continue
            # each step over its own in-process gemm3 reference: load changes of a shared machine cancel
            time_ratio = res["x_gemm3"] / ref["x_gemm3"]
            print(f"{cfg['classes']:>9} {cfg['criterion']:<16} {cfg['engine']:<8} "
                  f"{time_ratio:>6.3f} {res['peak_mb'] / max(ref['peak_mb'], 1e-9):>6.3f}")
    if partial:
        print("\nratios Partial FC / full FC (same run)")
        print(f"{'classes':>9} {'margin':<16} {'rate':>5} {'engine':<8} {'time':>6} {'peak':>6}")
        for cfg, res in partial:
            ref = full.get((cfg["classes"], cfg["margin"], cfg["engine"]))
            if ref is None:
                continue
            print(f"{cfg['classes']:>9} {cfg['margin']:<16} {cfg['rate']:>5.2f} {cfg['engine']:<8} "
                  f"{res['ms'] / ref['ms']:>6.3f} {res['peak_mb'] / max(ref['peak_mb'], 1e-9):>6.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
