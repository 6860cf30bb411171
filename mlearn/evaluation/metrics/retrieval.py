"""Identity retrieval metrics with FAISS: recall@k, mAP, MAP@R, R-precision.

Semantics are pytorch-metric-learning's ``AccuracyCalculator`` (docs/protocols.md section d): cosine
similarity (inner product of L2-normalised vectors), self excluded by index when the query set is the
gallery, lone queries dropped, R = number of relevant gallery items (self excluded).

Memory stays bounded for galleries of millions: the gallery is normalised block by block (never as a
whole copy), exact CPU search runs over gallery shards of at most ``SHARD_ELEMENTS`` floats merged in a
FAISS result heap, queries are searched in batches, and the full-ranking mAP is computed from chunked
scores without ever holding a [queries, gallery] matrix.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from mlearn.evaluation.metrics import search
from mlearn.evaluation.metrics.search import (
    INDEXES,
    IndexOptions,
    Searcher,
    gpu_available,
    row_blocks,
    unit_rows,
)

log = logging.getLogger(__name__)

KNN_ENTRIES = 1 << 23  # (query, neighbour) results held at once (12 bytes each)
RELEVANT_ENTRIES = 1 << 22  # (query, relevant item) pairs of one full-ranking block


def drop_self(ids: np.ndarray, self_index: np.ndarray) -> np.ndarray:
    """pytorch-metric-learning's self exclusion: from each row of ``ids`` [B, k+1] remove the column equal
    to that row's ``self_index`` [B]; where it is absent (ties, duplicates), remove the last column.
    Returns [B, k]. Exclusion is by index, so exact duplicates of the query stay."""
    is_self = ids == self_index[:, None]
    is_self[~is_self.any(1), -1] = True
    return ids[~is_self].reshape(len(ids), ids.shape[1] - 1)


# --------------------------------------------------------------------------------- full ranking


ROW_OFFSET = 4.0  # > the spread of cosine scores (|s| <= 1 + rounding): row-major float64 sort keys
DENSE_FRACTION = 4  # full-ranking chunks where over 1/4 of the scores are candidates take the dense path


def _full_ranking_sums(query_unit: np.ndarray, query_codes: np.ndarray, self_index: Optional[np.ndarray],
                       gallery: np.ndarray, gallery_codes: Any, groups: Tuple[np.ndarray, np.ndarray],
                       device: Any) -> Tuple[float, float, float]:
    """Sums over the block's queries of AP (full ranking), MAP@R and R-precision, exactly.

    For every relevant item j of query q (score t_j) its rank among all gallery items is
    ``rank_j = #{relevant ranked above j} + #{irrelevant g: s_g >= t_j} + 1`` (self excluded): irrelevant
    items are counted against the gallery in chunks, each candidate score (one >= the row's lowest t) located
    among its row's sorted relevant scores by one ``searchsorted`` over float64 keys ``row * 4 + score``.
    Those keys order float32 scores exactly, except that two scores closer than ~1e-12 (for batch sizes up to
    1e4) may tie, and ties count against the relevant item anyway.
    """
    import torch

    order, starts = groups
    b, dim = query_unit.shape
    lengths = starts[query_codes + 1] - starts[query_codes]
    rel_row = np.repeat(np.arange(b), lengths)
    before = np.cumsum(lengths) - lengths
    rel_item = order[np.arange(len(rel_row)) + np.repeat(starts[query_codes] - before, lengths)]
    if self_index is not None:
        keep = rel_item != self_index[rel_row]
        rel_row, rel_item = rel_row[keep], rel_item[keep]
    relevant = np.bincount(rel_row, minlength=b)  # R per query, >= 1 (lone queries were dropped)
    total = len(rel_row)
    thresholds = np.empty(total, np.float32)
    for a, c in row_blocks(0, total, dim):
        vectors = unit_rows(gallery[rel_item[a:c]])
        thresholds[a:c] = np.einsum("ij,ij->i", vectors, query_unit[rel_row[a:c]])
    row_start = np.cumsum(relevant) - relevant
    lowest = np.minimum.reduceat(thresholds, row_start)  # rel_row is grouped by row

    rows_t = torch.from_numpy(rel_row).to(device)
    keys, perm = torch.sort(torch.from_numpy(thresholds).to(device).double().add_(rows_t, alpha=ROW_OFFSET))
    row = rows_t[perm]
    hist = torch.zeros(total + 1, dtype=torch.int64, device=device)
    q = torch.from_numpy(query_unit).to(device)
    codes = torch.from_numpy(query_codes).to(device)[:, None]
    lowest_t = torch.from_numpy(lowest).to(device)[:, None]
    start_t = torch.from_numpy(row_start).to(device)
    dense_ok = b * int(relevant.max()) <= 2 * search.BLOCK_ELEMENTS
    if dense_ok:  # the same sorted thresholds per row, padded with +inf: [b, max R]
        padded = torch.full((b, int(relevant.max())), float("inf"), device=device)
        local_index = torch.arange(total, device=device) - start_t[row]
        padded[row, local_index] = torch.from_numpy(thresholds).to(device)[perm]
    chunk = max(1, min(search.BLOCK_ELEMENTS // b, search.BLOCK_ELEMENTS // dim))
    for lo in range(0, len(gallery), chunk):
        hi = min(len(gallery), lo + chunk)
        scores = q @ torch.from_numpy(unit_rows(gallery[lo:hi])).to(device).T
        scores.masked_fill_(codes == gallery_codes[lo:hi][None, :], float("-inf"))  # relevant items and self
        # p = (keys of earlier rows) + #{own row's thresholds <= score}: the item outranks (ties included)
        # the relevant items at sorted positions < p of its row. Candidates (score >= the row's lowest
        # threshold) have p in (row start, row end]; the rest outrank nothing and are skipped.
        candidates = scores >= lowest_t
        count = int(candidates.sum())
        if dense_ok and count > scores.numel() // DENSE_FRACTION:  # most pass: one searchsorted over all
            local = torch.searchsorted(padded, scores, right=True)
            p = torch.where(local > 0, local + start_t[:, None], total + 1)
            hist += torch.bincount(p.view(-1), minlength=total + 2)[:total + 1]
        elif count:
            qi, gj = torch.nonzero(candidates, as_tuple=True)
            p = torch.searchsorted(keys, scores[qi, gj].double().add_(qi, alpha=ROW_OFFSET), right=True)
            hist += torch.bincount(p, minlength=total + 1)
    above = torch.zeros(total + 2, dtype=torch.int64, device=device)
    above[:-1] = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # above[u] = #candidates with p >= u
    start_t = start_t[row]
    r = torch.from_numpy(relevant).to(device)[row]
    pos = torch.arange(total, device=device)
    irrelevant_ahead = above[pos + 1] - above[start_t + r + 1]
    order_desc = r - (pos - start_t)  # 1 for the best-scored relevant item
    rank = order_desc + irrelevant_ahead
    precision = order_desc.double() / rank.double()
    within = (rank <= r).double()
    r64 = torch.from_numpy(relevant).to(device).double()

    def per_query(values: Any) -> float:
        summed = torch.zeros(b, dtype=torch.float64, device=device).index_add_(0, row, values)
        return float((summed / r64).sum())

    return per_query(precision), per_query(precision * within), per_query(within)


# ------------------------------------------------------------------------------------------ metrics


def _matrix(x: Any, name: str) -> np.ndarray:
    array = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if array.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [N, D], got shape {tuple(array.shape)}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name}: expected a real-valued array, got dtype {array.dtype}")
    if len(array) == 0 or array.shape[1] == 0:
        raise ValueError(f"{name}: empty array of shape {tuple(array.shape)}")
    return array


def _labels(labels: Any, count: int, name: str) -> np.ndarray:
    array = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of labels, got shape {tuple(array.shape)}")
    if len(array) != count:
        raise ValueError(f"{name}: {len(array)} labels for {count} embeddings")
    return array


def _check_finite(x: np.ndarray, name: str) -> None:
    for lo, hi in row_blocks(0, len(x), x.shape[1]):
        bad = ~np.isfinite(np.asarray(x[lo:hi], np.float32)).all(1)
        if bad.any():
            raise ValueError(f"{name}: row {lo + int(np.flatnonzero(bad)[0])} is not finite as float32 "
                             f"(NaN or inf)")


def _check_same_set(query: np.ndarray, gallery: np.ndarray, query_labels: np.ndarray,
                    gallery_labels: np.ndarray) -> None:
    if query.shape != gallery.shape or len(query_labels) != len(gallery_labels):
        raise ValueError(f"exclude_self=True needs the query set to be the gallery (query i = gallery i); "
                         f"got query {tuple(query.shape)} and gallery {tuple(gallery.shape)}")
    if not np.array_equal(query_labels, gallery_labels):
        raise ValueError("exclude_self=True needs query_labels == gallery_labels (query i = gallery i)")
    if query is gallery:
        return
    for lo, hi in row_blocks(0, len(query), query.shape[1]):
        if not np.allclose(np.asarray(query[lo:hi], np.float64), np.asarray(gallery[lo:hi], np.float64),
                           rtol=1e-5, atol=1e-6):
            raise ValueError(f"exclude_self=True needs query == gallery row by row; "
                             f"rows {lo}..{hi - 1} differ")


def _check_ks(ks: Sequence[int], gallery_size: int, exclude_self: bool) -> Tuple[int, ...]:
    try:
        values = tuple(dict.fromkeys(int(k) for k in ks))
    except (TypeError, ValueError):
        raise ValueError(f"ks={ks!r}: expected a sequence of positive integers") from None
    if not values or min(values) < 1 or any(float(k) != int(k) for k in ks):
        raise ValueError(f"ks={ks!r}: expected a non-empty sequence of positive integers")
    available = gallery_size - int(exclude_self)
    if max(values) > available:
        raise ValueError(f"k={max(values)} is larger than the gallery ({gallery_size} items"
                         f"{', minus the query itself' if exclude_self else ''} = {available})")
    return values


def _query_blocks(rows: int, weights: np.ndarray, max_rows: int,
                  max_weight: int) -> Iterator[Tuple[int, int]]:
    """Consecutive [a, b) with b - a <= max_rows and weight sum <= max_weight (always >= 1 row)."""
    cumulative = np.concatenate([[0], np.cumsum(weights, dtype=np.int64)])
    a = 0
    while a < rows:
        b = min(rows, a + max_rows, int(np.searchsorted(cumulative, cumulative[a] + max_weight, "right")) - 1)
        b = max(b, a + 1)
        yield a, b
        a = b


def retrieval_metrics(query: Any, query_labels: Any, gallery: Any, gallery_labels: Any,
                      ks: Sequence[int] = (1, 5, 10), exclude_self: bool = False, *, index: str = "flat",
                      nlist: Optional[int] = None, nprobe: int = 32, hnsw_m: int = 32,
                      ef_search: Optional[int] = None, full_map: Optional[bool] = None,
                      depth: Optional[int] = None, batch_size: int = 1024,
                      use_gpu: Optional[bool] = None) -> Dict[str, float]:
    """Cosine retrieval metrics of ``query`` [Nq, D] against ``gallery`` [Ng, D] (pytorch-metric-learning's
    AccuracyCalculator semantics; embeddings need not be normalised, they are L2-normalised here).

    For query q with R relevant gallery items (same label; with ``exclude_self`` query i is gallery i and
    never counts, so R excludes it) ranked at positions rank_1 < ... < rank_R (1-based):

    - ``recall@k`` = mean over queries of [rank_1 <= k] (PML's precision_at_1 for k = 1), from the FAISS
      top-k, ties in FAISS's order;
    - ``map`` = mean of AP = (1/R) Σ_i i / rank_i over the full ranking of the gallery (PML's
      mean_average_precision with k = the whole gallery);
    - ``map@r`` = mean of (1/R) Σ_{i: rank_i <= R} i / rank_i (PML's mean_average_precision_at_r);
    - ``r_precision`` = mean of #{i: rank_i <= R} / R;
    - ``num_queries`` (evaluated) and ``num_dropped``: lone queries (no relevant item) are dropped.

    ``index``: ``flat`` (exact IndexFlatIP), ``ivf`` (IndexIVFFlat: ``nlist``, ``nprobe``) or ``hnsw``
    (IndexHNSWFlat: ``hnsw_m``, ``ef_search``); on GPU when faiss has GPU support and CUDA is available
    (``use_gpu=None``), forced with ``use_gpu=True/False``. Queries are searched ``batch_size`` at a time.

    ``full_map`` (default: True for ``flat``, False for the approximate indexes) computes ``map``,
    ``map@r`` and ``r_precision`` exactly from every relevant item's rank, with chunked scoring (exact
    whatever ``index`` is, at the cost of exact search). Ties between a relevant and an irrelevant item
    count against the relevant one (so constant embeddings get the worst AP, not a lucky one); ties among
    relevant items change no metric. Scores are float32, so items within rounding (~1e-7) of each other may
    be ordered either way. With ``full_map=False`` those three come from the top ``depth`` neighbours
    (default max(max(ks), max R)): ``map@r`` and ``r_precision`` are exact when depth >= R (else relevant
    items beyond ``depth`` count as missed, still dividing by R), and instead of ``map`` the key
    ``map@<depth>`` holds PML's mean_average_precision with k = depth: Σ_{rank_i <= depth} (i / rank_i)
    divided by the number of relevant items retrieved within ``depth`` (0 when none).

    Metrics are NaN when every query is dropped. Example (query 0's relevant items rank 1 and 3):

    >>> g = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8]], np.float32)
    >>> m = retrieval_metrics(np.array([[1, 0.1]], np.float32), [0], g, [0, 1, 0], ks=(1, 2))
    >>> m["recall@1"], round(m["map"], 4), m["map@r"], m["r_precision"]
    (1.0, 0.8333, 0.5, 0.5)
    """
    query, gallery = _matrix(query, "query"), _matrix(gallery, "gallery")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query has dimension {query.shape[1]} but gallery has {gallery.shape[1]}")
    query_labels = _labels(query_labels, len(query), "query_labels")
    gallery_labels = _labels(gallery_labels, len(gallery), "gallery_labels")
    kind = INDEXES.build(index)
    if exclude_self:
        _check_same_set(query, gallery, query_labels, gallery_labels)
    ks = _check_ks(ks, len(gallery), exclude_self)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    _check_finite(query, "query")
    if query is not gallery:
        _check_finite(gallery, "gallery")
    full_map = kind.exact if full_map is None else bool(full_map)
    if depth is not None and full_map:
        raise ValueError("depth applies only with full_map=False (the full ranking needs no depth)")
    gpu = gpu_available() if use_gpu is None else bool(use_gpu)
    if use_gpu and not gpu_available():
        raise ValueError("use_gpu=True but faiss has no GPU support or no CUDA device is visible "
                         "(pip install faiss-gpu in place of faiss-cpu, see setup.cfg)")

    _, codes = np.unique(np.concatenate([query_labels, gallery_labels]), return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    query_codes, gallery_codes = codes[:len(query)], codes[len(query):]
    counts = np.bincount(gallery_codes, minlength=int(codes.max()) + 1)
    relevant_all = counts[query_codes] - int(exclude_self)
    evaluated = np.flatnonzero(relevant_all > 0)
    relevant = relevant_all[evaluated]
    result: Dict[str, float] = {}
    num_dropped = len(query) - len(evaluated)
    gallery_size = len(gallery) - int(exclude_self)
    top = max(ks)  # neighbours searched (besides the query itself)
    if not full_map:
        wanted = int(depth or max(max(ks), int(relevant.max(initial=0))))
        depth = top = min(gallery_size, max(wanted, max(ks)))
        if len(relevant) and depth < relevant.max():
            warnings.warn(f"depth={depth} is below the largest R ({relevant.max()}): map@r and r_precision "
                          f"count relevant items beyond rank {depth} as missed", stacklevel=2)
    if not len(evaluated):
        warnings.warn("every query is lone (no relevant gallery item): metrics are NaN", stacklevel=2)
        names = [f"recall@{k}" for k in ks] + ["map" if full_map else f"map@{depth}", "map@r", "r_precision"]
        return {**{n: float("nan") for n in names}, "num_queries": 0, "num_dropped": int(num_dropped)}

    k_search = top + int(exclude_self)
    options = IndexOptions(nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search)
    searcher = Searcher(gallery, kind, options, k_search, gpu)
    log.info("retrieval: %d queries (%d dropped), gallery %d, index %s", len(evaluated), num_dropped,
             len(gallery), searcher.description)
    hits = {k: 0 for k in ks}
    sums = np.zeros(3)  # map (full or @depth), map@r, r_precision
    if full_map:
        import torch

        device = torch.device("cuda" if gpu else "cpu")
        order = np.argsort(gallery_codes, kind="stable")
        starts = np.searchsorted(gallery_codes[order], np.arange(len(counts) + 1))
        gallery_codes_t = torch.from_numpy(gallery_codes).to(device)
    super_rows = max(1, KNN_ENTRIES // k_search)
    for sa, sb in _query_blocks(len(evaluated), np.ones(len(evaluated), np.int64), super_rows, super_rows):
        rows = evaluated[sa:sb]
        _, ids = searcher.search(query, rows, batch_size)
        if exclude_self:
            ids = drop_self(ids, rows)
        match = (ids >= 0) & (gallery_codes[np.maximum(ids, 0)] == query_codes[rows][:, None])
        for k in ks:
            hits[k] += int(match[:, :k].any(1).sum())
        if full_map:
            for a, b in _query_blocks(len(rows), relevant[sa:sb], batch_size, RELEVANT_ENTRIES):
                block = rows[a:b]
                sums += _full_ranking_sums(unit_rows(query[block]), query_codes[block],
                                           block if exclude_self else None, gallery, gallery_codes_t,
                                           (order, starts), device)
        else:
            for a, b in row_blocks(0, len(rows), match.shape[1]):
                sums += _truncated_sums(match[a:b], relevant[sa:sb][a:b])
    n = len(evaluated)
    for k in ks:
        result[f"recall@{k}"] = hits[k] / n
    result["map" if full_map else f"map@{depth}"] = float(sums[0] / n)
    result["map@r"] = float(sums[1] / n)
    result["r_precision"] = float(sums[2] / n)
    result["num_queries"] = int(n)
    result["num_dropped"] = int(num_dropped)
    return result


def _truncated_sums(match: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Sums of PML's mean_average_precision@depth, MAP@R and R-precision from the top-depth matches
    [B, depth] (bool) of queries with ``relevant`` [B] relevant items."""
    hits = match.astype(np.float64)
    precision = np.cumsum(hits, 1) / np.arange(1, hits.shape[1] + 1)
    weighted = hits * precision
    within = np.arange(hits.shape[1])[None, :] < relevant[:, None]
    found = np.maximum(hits.sum(1), 1)
    return np.array([(weighted.sum(1) / found).sum(), ((weighted * within).sum(1) / relevant).sum(),
                     ((hits * within).sum(1) / relevant).sum()])


