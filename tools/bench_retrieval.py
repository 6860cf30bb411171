"""Time and peak memory of ``retrieval_metrics`` (exact FAISS search) against a naive numpy top-k baseline.

Data (float32, seeded): ``--classes`` random unit centres (default gallery/100); every gallery item and query
is normalise(centre + noise·N(0, I/D)) of a random class, query classes drawn from the gallery's labels (so no
query is dropped). With the default ``--noise 2.5`` same-class cosines are ~0.14 against ~N(0, 1/D) for other
classes: recall and mAP sit well inside (0, 1).

Each method runs in a fresh process (data generated there, chunk by chunk, excluded from the time):
  faiss_topk   retrieval_metrics(..., full_map=False, depth=max(ks)): exact sharded IndexFlatIP k-NN,
               recall@k (plus MAP@R / R-precision truncated at depth = max(ks)).
  faiss_full   retrieval_metrics(...) as the suite calls it: the same k-NN plus the exact full-ranking mAP,
               MAP@R and R-precision (chunked scoring of the whole gallery). faiss_full - faiss_topk is the
               time of the full-ranking pass alone.
  numpy_topk   baseline: query batches (score block <= 2^25 floats) of q @ gallery.T (BLAS float32),
               argpartition for the top k, sort those, recall@k. Assumes unit-norm input (no normalisation).
Columns:
  seconds      wall time of the call.
  peak_MB      peak resident set size of the process (ru_maxrss): includes the gallery itself (N·D·4 bytes)
               and the queries; the 4 GB budget at 1M x 512 refers to this column.
  extra_MB     peak_MB minus the RSS just before the call: what the method itself allocated at its peak
               (faiss, torch and numpy are imported before; importing torch alone adds ~0.7 GB of RSS).
  recall@k, map: the metrics (map: full-ranking mAP, faiss_full only); the baseline's recall must equal
               faiss_topk's (up to exact score ties).

Full size (1M x 512 gallery, 10k queries):
  python tools/bench_retrieval.py --gallery 1000000 --queries 10000 --dim 512
Small:
  python tools/bench_retrieval.py --small        # 100k x 128, 1k queries
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
import warnings
from typing import Any, Dict, List, Tuple

import numpy as np

METHODS = ("faiss_topk", "faiss_full", "numpy_topk")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_data(cfg: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(query [Q, D], query labels, gallery [N, D], gallery labels), unit rows, built in small chunks."""
    rng = np.random.default_rng(cfg["seed"])
    dim, noise = cfg["dim"], cfg["noise"] / np.sqrt(cfg["dim"])
    classes = cfg["classes"] or max(2, cfg["gallery"] // 100)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    gallery_labels = rng.integers(0, classes, cfg["gallery"])
    query_labels = gallery_labels[rng.integers(0, cfg["gallery"], cfg["queries"])]

    def draw(labels: np.ndarray) -> np.ndarray:
        out = np.empty((len(labels), dim), np.float32)
        for a in range(0, len(labels), 8192):
            block = centres[labels[a:a + 8192]] + noise * rng.standard_normal((len(labels[a:a + 8192]), dim),
                                                                            dtype=np.float32)
            out[a:a + 8192] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return out

    gallery = draw(gallery_labels)
    return draw(query_labels), query_labels, gallery, gallery_labels


def numpy_topk(query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray,
               ks: List[int]) -> Dict[str, float]:
    """Naive baseline: batched q @ gallery.T + argpartition; recall@k of unit-norm inputs."""
    kmax = max(ks)
    rows = max(1, (1 << 25) // len(gallery))
    hits = {k: 0 for k in ks}
    for a in range(0, len(query), rows):
        scores = query[a:a + rows] @ gallery.T
        top = np.argpartition(scores, len(gallery) - kmax, axis=1)[:, -kmax:]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), 1), 1)
        match = gallery_labels[top] == query_labels[a:a + rows, None]
        for k in ks:
            hits[k] += int(match[:, :k].any(1).sum())
    return {f"recall@{k}": hits[k] / len(query) for k in ks}


def _measure(cfg: Dict[str, Any]) -> Dict[str, Any]:
    import faiss  # noqa: F401  (imported before the measurement: torch alone is ~0.7 GB of RSS)
    import torch  # noqa: F401

    from mlearn.evaluation.metrics.retrieval import retrieval_metrics

    query, query_labels, gallery, gallery_labels = make_data(cfg)
    ks = cfg["ks"]
    before = _rss_mb()
    tic = time.perf_counter()
    if cfg["method"] == "numpy_topk":
        metrics = numpy_topk(query, query_labels, gallery, gallery_labels, ks)
    elif cfg["method"] == "faiss_topk":
        with warnings.catch_warnings():  # "depth below the largest R": expected, only recall@k is wanted
            warnings.simplefilter("ignore", UserWarning)
            metrics = retrieval_metrics(query, query_labels, gallery, gallery_labels, ks, full_map=False,
                                        depth=max(ks), batch_size=cfg["batch_size"], use_gpu=cfg["gpu"])
    else:
        metrics = retrieval_metrics(query, query_labels, gallery, gallery_labels, ks,
                                    batch_size=cfg["batch_size"], use_gpu=cfg["gpu"])
    seconds = time.perf_counter() - tic
    peak = _peak_mb()
    return {"seconds": seconds, "peak_MB": peak, "extra_MB": max(0.0, peak - before), **metrics}


def _run_one(cfg: Dict[str, Any], queue: "mp.Queue") -> None:
    try:
        queue.put(_measure(cfg))
    except Exception as exc:  # reported in the table instead of killing the whole run
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _threads() -> str:
    import faiss
    import torch

    return f"faiss_omp={faiss.omp_get_max_threads()} torch={torch.get_num_threads()}"


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=0, help="default: gallery // 100")
    parser.add_argument("--noise", type=float, default=2.5)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--batch-size", type=int, default=1024, help="queries per search batch")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--gpu", action="store_true",
                        help="FAISS GPU index (default: CPU, to compare with numpy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="100k x 128 gallery, 1k queries")
    args = parser.parse_args(argv)
    if args.small:
        args.gallery, args.queries, args.dim = 100_000, 1_000, 128
    base = {k: getattr(args, k) for k in ("gallery", "queries", "dim", "classes", "noise", "ks", "batch_size",
                                           "seed")}
    base["gpu"] = bool(args.gpu)
    ctx = mp.get_context("spawn")
    results: Dict[str, Dict[str, Any]] = {}
    for method in args.methods:
        queue = ctx.Queue()
        proc = ctx.Process(target=_run_one, args=({**base, "method": method}, queue))
        proc.start()
        results[method] = queue.get()
        proc.join()
    classes = args.classes or max(2, args.gallery // 100)
    print(f"gallery={args.gallery} queries={args.queries} D={args.dim} classes={classes} noise={args.noise} "
          f"ks={args.ks} batch={args.batch_size} device={'gpu' if args.gpu else 'cpu'} {_threads()} "
          f"cpus={os.cpu_count()}")
    metric_cols = [f"recall@{k}" for k in args.ks] + ["map"]
    header = (f"{'method':<12}{'seconds':>10}{'peak_MB':>10}{'extra_MB':>10}"
              + "".join(f"{c:>11}" for c in metric_cols))
    print(header)
    print("-" * len(header))
    for method, r in results.items():
        if "error" in r:
            print(f"{method:<12}  {r['error']}")
            continue
        cells = "".join(f"{r[c]:>11.4f}" if c in r else f"{'-':>11}" for c in metric_cols)
        print(f"{method:<12}{r['seconds']:>10.2f}{r['peak_MB']:>10.0f}{r['extra_MB']:>10.0f}{cells}")
    ok = {m: r for m, r in results.items() if "error" not in r}
    if "faiss_topk" in ok and "numpy_topk" in ok:
        ratio = ok["numpy_topk"]["seconds"] / ok["faiss_topk"]["seconds"]
        agree = all(abs(ok["numpy_topk"][f"recall@{k}"] - ok["faiss_topk"][f"recall@{k}"]) < 1e-9
                    for k in args.ks)
        print(f"numpy_topk / faiss_topk time: {ratio:.2f}x; recall@k agree: {'yes' if agree else 'NO'}")
    if "faiss_topk" in ok and "faiss_full" in ok:
        print(f"full-ranking mAP pass alone (faiss_full - faiss_topk): "
              f"{ok['faiss_full']['seconds'] - ok['faiss_topk']['seconds']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
