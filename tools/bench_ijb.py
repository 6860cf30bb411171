"""IJB-C-sized scoring time from features already extracted: template pooling + 1:1 pair scores + ROC.

Synthetic data with IJB-C's sizes (469k image features x 512 in 23,124 templates, heavy-tailed images
per template, several frames per video media; 15.66M gallery x probe template pairs, 19,557 genuine),
scored by ``mlearn.evaluation.metrics.ijb`` exactly as ``score_ijb`` does. Nothing is read from disk.

Columns:
  stage       pooling = template_features (detector-weighted, media mean, sum, L2);
              pairs = pair_scores (cosine of every template pair); roc = verification_rows
              (sklearn ROC, TAR@FAR both rules, EER, minDCF, AUC); total = the three;
              1:N = identification_1n over two galleries (not in total)
  seconds     wall time of the vectorised stage
  naive_s     a naive loop timed on a subsample and extrapolated linearly: pooling = insightface's
              per-template loop (np.where over all images, per media mean); pairs = one np.dot per pair
  speedup     naive_s / seconds

Examples:
  python tools/bench_ijb.py --small                 # 1/20 of IJB-C (seconds)
  OMP_NUM_THREADS=2 python tools/bench_ijb.py       # full size (needs ~4 GB RAM)
"""
from __future__ import annotations

import argparse
import resource
import time
from typing import Dict, List


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=469_375, help="image features (IJB-C: ~469k)")
    p.add_argument("--templates", type=int, default=23_124)
    p.add_argument("--gallery", type=int, default=3_531, help="gallery templates (G1 + G2); the rest: probes")
    p.add_argument("--pairs", type=int, default=15_658_489)
    p.add_argument("--genuine", type=int, default=19_557)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply images, pairs and genuine by this, templates and gallery by its square "
                        "root (keeps the pairs' share of the gallery x probe grid)")
    p.add_argument("--small", action="store_true", help="shorthand for --scale 0.05")
    p.add_argument("--naive-pairs", type=int, default=20_000, help="pairs in the naive-loop subsample")
    p.add_argument("--naive-templates", type=int, default=100, help="templates in the naive pooling sample")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def _synthetic(a: argparse.Namespace):
    import numpy as np

    rng = np.random.default_rng(a.seed)
    n, t, g = a.images, a.templates, a.gallery
    weights = rng.lognormal(0.0, 1.2, t)
    counts = 1 + rng.multinomial(n - t, weights / weights.sum())  # >= 1 image per template, heavy tail
    templates = np.repeat(np.arange(t) * 7 + 3, counts)  # sparse, non-contiguous ids
    n_media = np.maximum(1, np.round(counts * rng.uniform(0.1, 0.7, t))).astype(np.int64)
    media_offset = np.concatenate([[0], np.cumsum(n_media)[:-1]])
    medias = np.repeat(media_offset, counts) + (rng.random(n) * np.repeat(n_media, counts)).astype(np.int64)
    order = rng.permutation(n)  # file order interleaves templates
    templates, medias = templates[order], medias[order]
    subjects = np.concatenate([np.arange(g), rng.integers(0, g, t - g)])  # one gallery template per subject
    centers = rng.standard_normal((subjects.max() + 1, a.dim), dtype=np.float32)
    feats = rng.standard_normal((n, a.dim), dtype=np.float32)
    feats += 0.7 * centers[subjects[(templates - 3) // 7]]
    det = rng.uniform(0.1, 1.0, n).astype(np.float32)
    flat = rng.choice(g * (t - g), size=min(a.pairs, g * (t - g)), replace=False)
    t1 = (flat // (t - g)) * 7 + 3
    t2 = (g + flat % (t - g)) * 7 + 3
    labels = np.zeros(len(flat), np.int8)
    labels[rng.choice(len(flat), size=min(a.genuine, len(flat)), replace=False)] = 1
    galleries = {"G1": (np.arange(0, g // 2) * 7 + 3, subjects[: g // 2]),
                 "G2": (np.arange(g // 2, g) * 7 + 3, subjects[g // 2: g])}
    probe_ids = np.arange(g, t)
    return feats, templates, medias, det, t1, t2, labels, galleries, (probe_ids * 7 + 3, subjects[probe_ids])


def _naive_pooling_per_template(feats, templates, medias, det, n_templates: int) -> float:
    import numpy as np

    unique = np.unique(templates)[:n_templates]
    start = time.perf_counter()
    for tid in unique:
        (rows,) = np.where(templates == tid)
        face = feats[rows] * det[rows, None]
        media_ids, media_counts = np.unique(medias[rows], return_counts=True)
        vectors = []
        for m, c in zip(media_ids, media_counts):
            (sel,) = np.where(medias[rows] == m)
            vectors.append(face[sel][0] if c == 1 else face[sel].mean(0))
        v = np.sum(vectors, 0, dtype=np.float64)
        v / np.linalg.norm(v)
    return (time.perf_counter() - start) / len(unique)


def _naive_pairs_per_pair(ids, feats, t1, t2, n_pairs: int) -> float:
    import numpy as np

    lookup = {int(t): i for i, t in enumerate(ids)}
    a, b = t1[:n_pairs].tolist(), t2[:n_pairs].tolist()
    start = time.perf_counter()
    out = np.empty(len(a))
    for k in range(len(a)):
        out[k] = np.dot(feats[lookup[a[k]]], feats[lookup[b[k]]])
    return (time.perf_counter() - start) / len(a)


def main() -> None:
    a = _args()
    if a.small:
        a.scale = 0.05
    for key in ("images", "pairs", "genuine"):
        setattr(a, key, max(1, int(round(getattr(a, key) * a.scale))))
    for key in ("templates", "gallery"):
        setattr(a, key, max(2, int(round(getattr(a, key) * a.scale ** 0.5))))
    a.images = max(a.images, a.templates)

    import sklearn.metrics  # noqa: F401  (imported up front: its ~2 s import is not scoring time)

    from mlearn.evaluation.metrics.ijb import identification_1n, pair_scores, template_features
    from mlearn.evaluation.protocols.ijb import verification_rows

    t0 = time.perf_counter()
    feats, templates, medias, det, t1, t2, labels, galleries, probes = _synthetic(a)
    print(f"synthetic data: {a.images:,} images x {a.dim}, {a.templates:,} templates, {len(t1):,} pairs "
          f"({int(labels.sum()):,} genuine) in {time.perf_counter() - t0:.1f} s")

    times: Dict[str, float] = {}
    start = time.perf_counter()
    ids, tfeats = template_features(feats, templates, medias, det)
    times["pooling"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = pair_scores(ids, tfeats, t1, t2)
    times["pairs"] = time.perf_counter() - start
    start = time.perf_counter()
    rows = verification_rows("synthetic IJB-C 1:1", scores, labels, len(ids))
    times["roc"] = time.perf_counter() - start
    times["total"] = times["pooling"] + times["pairs"] + times["roc"]
    start = time.perf_counter()
    identification_1n(ids, tfeats, galleries, probes)
    times["1:N"] = time.perf_counter() - start

    per_template = _naive_pooling_per_template(feats, templates, medias, det, a.naive_templates)
    naive = {"pooling": per_template * len(ids),
             "pairs": _naive_pairs_per_pair(ids, tfeats, t1, t2, a.naive_pairs) * len(t1)}
    naive["total"] = naive["pooling"] + naive["pairs"]

    lines: List[str] = [f"{'stage':<10}{'seconds':>10}{'naive_s':>12}{'speedup':>10}"]
    for stage, seconds in times.items():
        slow = naive.get(stage)
        extra = f"{slow:>12.1f}{slow / seconds:>9.1f}x" if slow else ""
        lines.append(f"{stage:<10}{seconds:>10.2f}{extra}")
    print("\n".join(lines))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.1f} GiB; {rows[0]['pairs']:,} pairs scored")


if __name__ == "__main__":
    main()
