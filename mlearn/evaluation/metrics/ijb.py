"""IJB-B / IJB-C template scoring (insightface protocol, docs/protocols.md section b): image features ->
template features -> 1:1 pair scores; open-set 1:N identification. Arrays in, arrays or dicts out.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from mlearn.inference import l2_normalize

FPIRS = (0.01, 0.1)
RANKS = (1, 5, 10)


# ------------------------------------------------------------------------------ template features


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      weights: Optional[np.ndarray] = None,
                      chunk_rows: int = 1 << 14) -> Tuple[np.ndarray, np.ndarray]:
    """Image features -> unit template features (docs/protocols.md b.3 steps 3-6).

    ``features`` [N, D] raw (flip-fused) image features, ``templates`` / ``medias`` [N] ids,
    ``weights`` [N] optional per-image factor (detector score). Within a template, images of one
    media are averaged, media vectors are summed, the sum is L2-normalised:
    ``t = sum_m mean_{i in m} w_i f_i``. Returns (sorted unique template ids [T], float64 [T, D]).
    One vectorised pass: rows sorted by template, weighted segment sums as sparse x dense products
    in chunks of about ``chunk_rows`` rows (whole templates per chunk).
    """
    from scipy.sparse import csr_matrix  # scipy ships with scikit-learn

    features = np.asarray(features)
    templates = np.asarray(templates).ravel()
    medias = np.asarray(medias).ravel()
    n = len(features)
    if features.ndim != 2 or len(templates) != n or len(medias) != n:
        raise ValueError(f"template_features: expected features [N, D] with templates and medias [N], got "
                         f"{features.shape}, {templates.shape}, {medias.shape}")
    if n == 0:
        raise ValueError("template_features: no images")
    unique_templates, t_index = np.unique(templates, return_inverse=True)
    _, m_index = np.unique(medias, return_inverse=True)
    group = t_index.astype(np.int64) * (int(m_index.max()) + 1) + m_index
    _, g_index, g_count = np.unique(group, return_inverse=True, return_counts=True)
    scale = 1.0 / g_count[g_index.ravel()]  # mean within a (template, media) group
    if weights is not None:
        weights = np.asarray(weights, np.float64).ravel()
        if len(weights) != n:
            raise ValueError(f"template_features: weights has {len(weights)} entries, expected {n}")
        scale = scale * weights
    order = np.argsort(t_index, kind="stable")
    sorted_t = t_index.ravel()[order]
    bounds = np.concatenate([np.flatnonzero(np.r_[True, sorted_t[1:] != sorted_t[:-1]]), [n]])
    n_templates = len(unique_templates)
    out = np.empty((n_templates, features.shape[1]), np.float64)
    first = 0
    while first < n_templates:
        last = int(np.searchsorted(bounds, bounds[first] + chunk_rows, side="right")) - 1
        last = min(max(last, first + 1), n_templates)
        r0, r1 = bounds[first], bounds[last]
        rows = order[r0:r1]
        # segment sums as a sparse [templates, rows] x dense [rows, D] product (np.add.reduceat along
        # axis 0 is ~30x slower); the rows are sorted by template, so indptr is just the bounds
        weights_csr = csr_matrix((scale[rows], np.arange(r1 - r0), bounds[first:last + 1] - r0),
                                 shape=(last - first, r1 - r0))
        out[first:last] = weights_csr @ features[rows].astype(np.float64)
        first = last
    return unique_templates, l2_normalize(out)


def quality_pooling_weights(quality: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Per-image pooling weights [N] for ``pooling: quality`` (docs/protocols.md g.5): ``max(q, 0)``
    divided by its sum over the image's template, so each template's weights sum to 1; a template
    whose qualities are all <= 0 gets equal weights. ``quality`` [N] (higher = better), ``templates`` [N].
    Equal qualities within a template give a per-template constant, i.e. the plain pooling after L2."""
    q = np.asarray(quality, np.float64).ravel()
    templates = np.asarray(templates).ravel()
    if q.shape != templates.shape:
        raise ValueError(f"quality_pooling_weights: {q.size} qualities for {templates.size} images")
    if not np.isfinite(q).all():
        raise ValueError("quality_pooling_weights: quality contains NaN or inf; expected finite values")
    _, t_index = np.unique(templates, return_inverse=True)
    t_index = t_index.ravel()
    clipped = np.maximum(q, 0.0)
    total = np.bincount(t_index, clipped)
    count = np.bincount(t_index)
    flat = total[t_index] <= 0  # no positive quality in the template: equal weights
    return np.where(flat, 1.0 / count[t_index], clipped / np.where(flat, 1.0, total[t_index]))


def template_quality(quality: np.ndarray, templates: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Template quality: the mean of its images' ``quality`` [N] (unweighted, every frame counts once).
    Returns (sorted unique template ids [T], float64 [T]) in :func:`template_features`' order."""
    q = np.asarray(quality, np.float64).ravel()
    templates = np.asarray(templates).ravel()
    if q.shape != templates.shape:
        raise ValueError(f"template_quality: {q.size} qualities for {templates.size} images")
    ids, t_index = np.unique(templates, return_inverse=True)
    t_index = t_index.ravel()
    return ids, np.bincount(t_index, q) / np.bincount(t_index)


def template_index(template_ids: np.ndarray, ids: np.ndarray, what: str = "template") -> np.ndarray:
    """Row of each id of ``ids`` in the sorted ``template_ids``; KeyError naming the first unknown id."""
    ids = np.asarray(ids)
    if len(template_ids) and template_ids[0] >= 0 and template_ids[-1] < max(4 * len(ids), 1 << 22):
        lookup = np.full(int(template_ids[-1]) + 2, -1, np.int64)  # small non-negative ids: O(1) table
        lookup[template_ids] = np.arange(len(template_ids))
        pos = lookup[np.clip(ids, -1, len(lookup) - 1)]  # out of range -> -1 (last entry)
        missing = np.flatnonzero(pos < 0)
    else:
        pos = np.minimum(np.searchsorted(template_ids, ids), len(template_ids) - 1)
        missing = np.flatnonzero(template_ids[pos] != ids)
    if len(missing):
        raise KeyError(f"{what} {ids[missing[0]]} is not among the {len(template_ids)} templates "
                       f"({len(missing)} unknown)")
    return pos


# ----------------------------------------------------------------------------------------- 1:1


def pair_scores(template_ids: np.ndarray, template_feats: np.ndarray, t1: np.ndarray, t2: np.ndarray,
                method: str = "auto", batch_size: int = 512, block_elements: int = 1 << 24) -> np.ndarray:
    """Cosine score [P] float64 of each template pair (``t1[i]``, ``t2[i]``) of unit ``template_feats``
    [T, D] (rows in ``template_ids`` order).

    ``method``: ``gather`` (row-wise dot products in batches of ``batch_size`` pairs), ``dense``
    (matrix products of the distinct left templates against the distinct right ones, in row blocks
    of ``block_elements`` scores, then picked; fast when the pairs fill much of that grid, as IJB's
    gallery x probe pairs do) or ``auto`` (dense when the grid is at most 16x the number of pairs).
    """
    i1 = template_index(template_ids, t1, "pair template")
    i2 = template_index(template_ids, t2, "pair template")
    left, row = _compact(i1, len(template_ids))
    right, col = _compact(i2, len(template_ids))
    if method == "auto":
        method = "dense" if len(left) * len(right) <= 16 * len(i1) else "gather"
    scores = np.empty(len(i1), np.float64)
    if method == "gather":
        for start in range(0, len(i1), batch_size):
            a = template_feats[i1[start:start + batch_size]]
            b = template_feats[i2[start:start + batch_size]]
            scores[start:start + batch_size] = np.einsum("ij,ij->i", a, b)
        return scores
    if method != "dense":
        raise ValueError(f"pair_scores: method={method!r}; expected 'auto', 'gather' or 'dense'")
    rows_per_block = max(1, block_elements // max(len(right), 1))
    block = row // rows_per_block
    block = block.astype(np.uint16) if block.max(initial=0) < 1 << 16 else block  # radix sort
    order = np.argsort(block, kind="stable")
    edges = np.concatenate([[0], np.cumsum(np.bincount(block, minlength=0))])
    right_t = np.ascontiguousarray(template_feats[right].T)
    for b in range(len(edges) - 1):
        picked = order[edges[b]:edges[b + 1]]
        if not len(picked):
            continue
        lo = b * rows_per_block
        sims = template_feats[left[lo:lo + rows_per_block]] @ right_t
        scores[picked] = sims[row[picked] - lo, col[picked]]
    return scores


def _compact(index: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """``np.unique(index, return_inverse=True)`` for indices in [0, n), by counting instead of sorting."""
    present = np.zeros(n, bool)
    present[index] = True
    return np.flatnonzero(present), (np.cumsum(present) - 1)[index]


# ----------------------------------------------------------------------------------------- 1:N


def open_set_identification(similarity: np.ndarray, probe_subjects: np.ndarray, gallery_subjects: np.ndarray,
                            fpirs: Sequence[float] = FPIRS, ranks: Sequence[int] = RANKS) -> Dict[str, Any]:
    """Open-set 1:N on one gallery (docs/protocols.md b.5 (i)). ``similarity`` [P, G] (probes x gallery
    templates), subject ids [P] and [G] (one gallery template per subject).

    Mated probes (subject in the gallery): rank = 1 + #non-mate gallery scores >= the mate score
    (ties count against the probe); ``hits[k]`` = #mated probes with rank <= k, ``cmc[k]`` = hits /
    #mated. Non-mated probes give their max gallery score, sorted descending: ``s``;
    ``threshold[f] = s[max(floor(len(s) * f) - 1, 0)]``; ``tpir[f]`` = fraction of mated probes whose
    mate score is > every non-mate gallery score and > ``threshold[f]``.

    >>> r = open_set_identification(np.array([[0.9, 0.1], [0.3, 0.2], [0.5, 0.4]]), np.array([1, 1, 3]),
    ...                             np.array([1, 2]), fpirs=[0.5], ranks=[1])
    >>> r["hits"], r["tpir"], r["threshold"]
    ({1: 2}, {0.5: 0.5}, {0.5: 0.5})
    """
    similarity = np.asarray(similarity, np.float64)
    probe_subjects = np.asarray(probe_subjects).ravel()
    gallery_subjects = np.asarray(gallery_subjects).ravel()
    if similarity.shape != (len(probe_subjects), len(gallery_subjects)):
        raise ValueError(f"open_set_identification: similarity {similarity.shape} does not match "
                         f"{len(probe_subjects)} probes x {len(gallery_subjects)} gallery templates")
    sorter = np.argsort(gallery_subjects, kind="stable")
    ordered = gallery_subjects[sorter]
    if len(ordered) > 1 and (ordered[1:] == ordered[:-1]).any():
        dup = ordered[1:][ordered[1:] == ordered[:-1]][0]
        raise ValueError(f"open_set_identification: subject {dup} has several gallery templates; "
                         "expected one per subject")
    pos = np.minimum(np.searchsorted(ordered, probe_subjects), len(ordered) - 1)
    mated = ordered[pos] == probe_subjects
    n_mated, n_non_mated = int(mated.sum()), int((~mated).sum())
    if n_mated == 0 or n_non_mated == 0:
        raise ValueError(f"open_set_identification: needs mated and non-mated probes, got {n_mated} mated "
                         f"and {n_non_mated} non-mated")
    mated_sims = similarity[mated]
    mate_col = sorter[pos[mated]]
    mate = mated_sims[np.arange(n_mated), mate_col]
    rank = (mated_sims >= mate[:, None]).sum(1)  # includes the mate itself
    non_mate = mated_sims.copy()
    non_mate[np.arange(n_mated), mate_col] = -np.inf
    rank_one = mate > non_mate.max(1)
    s_nm = np.sort(similarity[~mated].max(1))[::-1]
    hits = {int(k): int((rank <= k).sum()) for k in ranks}
    threshold = {float(f): float(s_nm[max(int(len(s_nm) * f) - 1, 0)]) for f in fpirs}
    tpir = {f: float((rank_one & (mate > t)).sum() / n_mated) for f, t in threshold.items()}
    return {"mated": n_mated, "non_mated": n_non_mated, "hits": hits,
            "cmc": {k: h / n_mated for k, h in hits.items()}, "tpir": tpir, "threshold": threshold}


def identification_1n(template_ids: np.ndarray, template_feats: np.ndarray,
                      galleries: Dict[str, Tuple[np.ndarray, np.ndarray]],
                      probes: Tuple[np.ndarray, np.ndarray],
                      fpirs: Sequence[float] = FPIRS, ranks: Sequence[int] = RANKS) -> Dict[str, Any]:
    """1:N over several galleries. ``galleries`` {name: (template ids [R], subject ids [R])} and
    ``probes`` (same) as read from the CSVs (a template's subject = its first row). Each gallery is
    scored by :func:`open_set_identification`; ``tpir`` = mean over galleries, ``cmc[k]`` = hits
    summed over galleries / #probes (each probe is mated in one gallery)."""
    probe_ids, probe_subjects = _first_subject(*probes)
    probe_feats = template_feats[template_index(template_ids, probe_ids, "probe template")]
    per_gallery: Dict[str, Dict[str, Any]] = {}
    for name, (tids, sids) in galleries.items():
        gallery_ids, gallery_subjects = _first_subject(tids, sids)
        gallery_feats = template_feats[template_index(template_ids, gallery_ids, f"gallery {name} template")]
        try:
            result = open_set_identification(probe_feats @ gallery_feats.T, probe_subjects, gallery_subjects,
                                             fpirs, ranks)
        except ValueError as exc:
            raise ValueError(f"gallery {name}: {exc}") from None
        per_gallery[name] = {"templates": len(gallery_ids), **result}
    n_probes = len(probe_ids)
    cmc = {int(k): sum(r["hits"][int(k)] for r in per_gallery.values()) / n_probes for k in ranks}
    tpir = {float(f): float(np.mean([r["tpir"][float(f)] for r in per_gallery.values()])) for f in fpirs}
    return {"probes": n_probes, "galleries": per_gallery, "tpir": tpir, "cmc": cmc}


def _first_subject(templates: np.ndarray, subjects: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    unique, first = np.unique(np.asarray(templates), return_index=True)
    return unique, np.asarray(subjects)[first]
