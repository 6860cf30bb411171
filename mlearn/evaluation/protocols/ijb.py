"""IJB-B / IJB-C template evaluation, insightface protocol (PROTOCOLS.md b): 1:1 TAR@FAR, 1:N TPIR@FPIR + CMC.

Layers, each usable on its own:
  meta readers      ``read_face_tid_mid``, ``read_name_5pts_score``, ``read_template_pairs``,
                    ``read_1n_csv``, ``load_ijb_meta`` (vectorised parsing; errors name file and line)
  features          ``extract_features`` (align 5 points -> 112x112, embed raw, flip sum)
  pure scoring      ``template_features`` -> ``pair_scores`` -> ``verification_rows``;
                    ``open_set_identification`` / ``identification_1n`` -> ``identification_row``;
                    ``score_ijb`` (features already extracted -> report rows)
  suite adapter     ``run_protocol(model, protocol, root, batch_size)``
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from mlearn.evaluation.roc import DEFAULT_FARS, roc_metrics

PathLike = Union[str, Path]
FPIRS = (0.01, 0.1)
RANKS = (1, 5, 10)
PROTOCOL_KEYS = ("type", "name", "path", "flip", "detector_score", "one_to_n", "workers")
REQUIRED_KEYS = ("name",)

# benchmark name -> file prefix, dataset card, 1:N gallery names (meta/<prefix>_1N_gallery_<name>.csv)
SUBSETS: Dict[str, Dict[str, Any]] = {
    "IJBB": {"prefix": "ijbb", "card": "datasets/ijbb.md", "galleries": ("S1", "S2")},
    "IJBC": {"prefix": "ijbc", "card": "datasets/ijbc.md", "galleries": ("G1", "G2")},
}
POOLING = "detector-score-weighted images, mean per media, sum of medias, L2"


# ------------------------------------------------------------------------------------ meta readers


def read_face_tid_mid(path: PathLike) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``<image> <template id> <media id>`` lines -> (image names [N] str, template ids [N] int64,
    media ids [N] int64)."""
    names, values = _read_table(path, 2, np.int64, "<image> <template id> <media id>", named=True)
    return names, values[:, 0].copy(), values[:, 1].copy()


def read_name_5pts_score(path: PathLike) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``<image> x1 y1 ... x5 y5 <detector score>`` lines -> (image names [N] str, landmarks
    [N, 5, 2] float32 pixels of the loose crop, detector scores [N] float32)."""
    names, values = _read_table(path, 11, np.float32, "<image> x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 <score>",
                                named=True)
    return names, values[:, :10].reshape(-1, 5, 2).copy(), values[:, 10].copy()


def read_template_pairs(path: PathLike) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``<template 1> <template 2> <label 1|0>`` lines -> (t1 [P] int64, t2 [P] int64, labels [P] int8)."""
    _, values = _read_table(path, 3, np.int64, "<template 1> <template 2> <label 1|0>", named=False)
    labels = values[:, 2]
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if len(bad):
        raise ValueError(f"{path}:{bad[0] + 1}: label must be 1 (genuine) or 0 (impostor), "
                         f"got {labels[bad[0]]}")
    return values[:, 0].copy(), values[:, 1].copy(), labels.astype(np.int8)


def read_1n_csv(path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """A 1:N gallery / probe CSV (header row, then ``TEMPLATE_ID,SUBJECT_ID,...``) -> (template ids
    [R] int64, subject ids [R] int64), one entry per data row (templates repeat over their images)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    lines = path.read_text(errors="replace").splitlines()
    layout = "TEMPLATE_ID,SUBJECT_ID,..."
    header = lines[0].split(",") if lines else []
    if len(header) < 2 or _is_int(header[0]):
        raise ValueError(f"{path}:1: expected a header row '{layout}', got {lines[0] if lines else ''!r}")
    templates: List[int] = []
    subjects: List[int] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split(",", 2)
        try:
            templates.append(int(fields[0]))
            subjects.append(int(fields[1]))
        except (ValueError, IndexError):
            raise ValueError(f"{path}:{number}: expected '{layout}' with integer ids, got {line!r}") from None
    if not templates:
        raise ValueError(f"{path}: no data rows after the header")
    return np.asarray(templates, np.int64), np.asarray(subjects, np.int64)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _read_table(path: PathLike, n_values: int, dtype: Any, layout: str,
                named: bool) -> Tuple[Optional[np.ndarray], np.ndarray]:
    """Whitespace-separated lines of (optionally) a name then ``n_values`` numbers -> (names [N] str
    or None, values [N, n_values]). Vectorised: token counts per line from byte masks, the numbers
    in one ``np.fromstring`` call with the name columns blanked out."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    data = path.read_bytes().rstrip()
    if not data:
        raise ValueError(f"{path}: empty file; expected lines '{layout}'")
    raw = np.frombuffer(data, np.uint8)
    starts = np.concatenate([[0], np.flatnonzero(raw == 10) + 1])
    ends = np.concatenate([starts[1:] - 1, [len(raw)]])
    space = raw <= 32  # space, tab, CR, LF
    token_start = ~space
    token_start[1:] &= space[:-1]
    n_fields = n_values + int(named)
    # uint8 counts are exact here: each line's count is n_fields mod 256 and the total matches
    counts = np.add.reduceat(token_start.view(np.uint8), starts, dtype=np.uint8).astype(np.int64)
    if np.count_nonzero(token_start) != len(starts) * n_fields:
        counts = np.add.reduceat(token_start, starts, dtype=np.int64)
    bad = np.flatnonzero(counts != n_fields)
    if len(bad):
        line = int(bad[0])
        raise ValueError(f"{path}:{line + 1}: expected {n_fields} whitespace-separated fields '{layout}', "
                         f"got {counts[line]}: {_line(data, starts, ends, line)!r}")
    names = None
    buffer = data
    if named:
        first = np.flatnonzero(token_start)[::n_fields]  # every line has exactly n_fields tokens
        name_end = _token_ends(space, first)
        names = _token_strings(path, data, raw, first, name_end, starts, ends)
        blank = np.zeros(len(raw) + 1, np.int8)
        blank[first] += 1
        blank[name_end] -= 1
        masked = raw.copy()
        masked[np.cumsum(blank[:-1], dtype=np.int8) > 0] = 32
        buffer = masked.tobytes()
    try:
        values = np.fromstring(buffer, dtype=dtype, sep=" ")
    except ValueError:
        line = _first_unparsable_line(buffer, starts, ends, dtype)
        raise ValueError(f"{path}:{line + 1}: cannot parse the numbers of '{layout}' "
                         f"({np.dtype(dtype).name}): {_line(data, starts, ends, line)!r}") from None
    if values.size != len(starts) * n_values:  # defensive: token counts were checked above
        raise ValueError(f"{path}: parsed {values.size} numbers, expected {len(starts)} lines x {n_values}")
    return names, values.reshape(len(starts), n_values)


def _token_strings(path: Path, data: bytes, raw: np.ndarray, first: np.ndarray, end: np.ndarray,
                   starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The tokens ``data[first[i]:end[i]]`` as a numpy str array (one gather when ASCII)."""
    if not (raw >= 128).any():
        width = int((end - first).max())
        index = first[:, None] + np.arange(width)
        chars = np.where(index < end[:, None], raw[np.minimum(index, len(raw) - 1)], 0).astype(np.uint8)
        return chars.view(f"S{width}").ravel().astype(str)
    try:
        data.decode()
    except UnicodeDecodeError as exc:
        line = int(np.searchsorted(starts, exc.start, side="right"))
        raise ValueError(f"{path}:{line}: not UTF-8 text: {_line(data, starts, ends, line - 1)!r}") from None
    return np.array([data[a:b].decode() for a, b in zip(first.tolist(), end.tolist())])


def _token_ends(space: np.ndarray, token_starts: np.ndarray) -> np.ndarray:
    """End offset (exclusive) of each token beginning at ``token_starts``."""
    space_at = np.flatnonzero(space)
    index = np.searchsorted(space_at, token_starts)
    return np.where(index < len(space_at), space_at[np.minimum(index, len(space_at) - 1)], len(space))


def _line(data: bytes, starts: np.ndarray, ends: np.ndarray, line: int) -> str:
    return data[starts[line]:ends[line]].decode(errors="replace").strip()[:200]


def _first_unparsable_line(buffer: bytes, starts: np.ndarray, ends: np.ndarray, dtype: Any) -> int:
    """Bisect over line ranges for the first line ``np.fromstring`` rejects (error path only)."""

    def parses(lo: int, hi: int) -> bool:
        try:
            np.fromstring(buffer[starts[lo]:ends[hi - 1]], dtype=dtype, sep=" ")
        except ValueError:
            return False
        return True

    lo, hi = 0, len(starts)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if parses(lo, mid):
            lo = mid
        else:
            hi = mid
    return lo


# ----------------------------------------------------------------------------------- dataset meta


@dataclass
class IJBMeta:
    """Everything of one IJB set except the pixels.

    ``images`` [N] names under ``root/loose_crop``; ``landmarks`` [N, 5, 2] float32 px;
    ``detector_scores`` [N]; ``templates`` / ``medias`` [N] int64; ``pairs`` [P, 2] template ids;
    ``labels`` [P] int8 (1 genuine); ``galleries``: {name: (template ids [R], subject ids [R])} and
    ``probes`` (same) for 1:N, empty when not loaded.
    """

    name: str
    root: Path
    images: np.ndarray
    landmarks: np.ndarray
    detector_scores: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pairs: np.ndarray
    labels: np.ndarray
    files: Dict[str, str] = field(default_factory=dict)
    galleries: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    probes: Optional[Tuple[np.ndarray, np.ndarray]] = None


def meta_files(name: str, one_to_n: bool = False) -> Dict[str, str]:
    """Meta file names (relative to ``<root>/meta``) of ``name`` (IJBB / IJBC), keyed by role."""
    subset = _subset(name)
    prefix = subset["prefix"]
    files = {"tid_mid": f"{prefix}_face_tid_mid.txt", "pairs": f"{prefix}_template_pair_label.txt",
             "5pts": f"{prefix}_name_5pts_score.txt"}
    if one_to_n:
        files.update({f"gallery:{g}": f"{prefix}_1N_gallery_{g}.csv" for g in subset["galleries"]})
        files["probe"] = f"{prefix}_1N_probe_mixed.csv"
    return files


def load_ijb_meta(root: PathLike, name: str, one_to_n: bool = False) -> IJBMeta:
    """Read and cross-check the meta files of ``root`` (the IJBB / IJBC folder holding ``meta/`` and
    ``loose_crop/``). Missing files -> FileNotFoundError naming them and the dataset card."""
    root = Path(root)
    subset = _subset(name)
    files = meta_files(name, one_to_n)
    paths = {role: root / "meta" / f for role, f in files.items()}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"{name}: {path} not found (see {subset['card']} for the layout and "
                                    "where to obtain it)")
    names, templates, medias = read_face_tid_mid(paths["tid_mid"])
    names_5pts, landmarks, scores = read_name_5pts_score(paths["5pts"])
    if len(names) != len(names_5pts):
        raise ValueError(f"{paths['tid_mid']} has {len(names)} lines but {paths['5pts']} has "
                         f"{len(names_5pts)}; they must list the same images in the same order")
    differ = np.flatnonzero(names != names_5pts)
    if len(differ):
        i = int(differ[0])
        raise ValueError(f"line {i + 1}: {paths['tid_mid']} names {names[i]!r} but {paths['5pts']} names "
                         f"{names_5pts[i]!r}; the two files must list the same images in the same order")
    t1, t2, labels = read_template_pairs(paths["pairs"])
    genuine = int(labels.sum())
    if genuine in (0, len(labels)):
        kind = "impostor (label 0)" if genuine == 0 else "genuine (label 1)"
        raise ValueError(f"{paths['pairs']}: all {len(labels)} pairs are {kind}; 1:1 verification needs both "
                         "genuine and impostor pairs")
    known = np.unique(templates)
    for column in (t1, t2):
        _check_known(known, column, paths["pairs"], first_line=1)
    meta = IJBMeta(name=name.upper(), root=root, images=names, landmarks=landmarks, detector_scores=scores,
                   templates=templates, medias=medias, pairs=np.stack([t1, t2], 1), labels=labels,
                   files=files)
    if one_to_n:
        for gallery in subset["galleries"]:
            path = paths[f"gallery:{gallery}"]
            meta.galleries[gallery] = read_1n_csv(path)
            _check_known(known, meta.galleries[gallery][0], path, first_line=2)
        meta.probes = read_1n_csv(paths["probe"])
        _check_known(known, meta.probes[0], paths["probe"], first_line=2)
    return meta


def _subset(name: str) -> Dict[str, Any]:
    try:
        return SUBSETS[str(name).upper()]
    except KeyError:
        raise ValueError(f"IJB benchmark name={name!r}; expected one of {sorted(SUBSETS)}") from None


def _check_known(known: np.ndarray, ids: np.ndarray, path: Path, first_line: int) -> None:
    pos = np.minimum(np.searchsorted(known, ids), len(known) - 1)
    missing = np.flatnonzero(known[pos] != ids)
    if len(missing):
        i = int(missing[0])
        raise ValueError(f"{path}:{i + first_line}: template {ids[i]} has no image in the face_tid_mid file "
                         f"({len(missing)} rows reference unknown templates)")


# ------------------------------------------------------------------------------ template features


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      weights: Optional[np.ndarray] = None,
                      chunk_rows: int = 1 << 14) -> Tuple[np.ndarray, np.ndarray]:
    """Image features -> unit template features (PROTOCOLS.md b.3 steps 3-6).

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
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    out /= np.maximum(norms, 1e-12)
    return unique_templates, out


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


def verification_rows(benchmark: str, scores: np.ndarray, labels: np.ndarray, n_templates: int,
                      info: Optional[Dict[str, Any]] = None,
                      fars: Sequence[float] = DEFAULT_FARS) -> List[Dict[str, Any]]:
    """Two report rows for 1:1 scores: TAR@FAR by the insightface rule (nearest FPR on sklearn's
    default ROC, ties to the larger TPR) and the strict rule (max TPR with FPR <= FAR). TAR is a
    fraction; ``_table`` shows it in %. ``info``: descriptive fields copied into both rows."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).astype(np.int8)
    metrics = roc_metrics(scores, labels, fars)
    n_genuine = int(labels.sum())
    common = {"benchmark": benchmark, "method": "model", "templates": int(n_templates),
              "pairs": int(len(labels)), "genuine": n_genuine, "impostor": int(len(labels) - n_genuine),
              **(info or {}), "distance": "cosine", "eer": metrics["eer"], "auc": metrics["auc"],
              "min_dcf": metrics["min_dcf"], "eer_variant": "NIST linear interpolation", "p_target": 0.01}
    rows = []
    for rule, key, short in (("nearest FPR on sklearn ROC, ties to larger TPR (insightface)", "tar_at_far",
                              "nearest"),
                             ("max TPR with FPR <= FAR (strict)", "tar_at_far_strict", "strict")):
        tar = {float(f): float(metrics[key][f]) for f in fars}
        table = {"benchmark": benchmark, "method": "model", "TAR rule": short,
                 "templates": f"{n_templates:,}", "pairs": f"{len(labels):,}"}
        table.update({f"TAR@{f:.0e}".replace("e-0", "e-"): f"{100 * v:.2f}" for f, v in tar.items()})
        rows.append({**common, "tar_rule": rule, "tar_at_far": tar, "_table": table})
    rows[0].update({"_scores": scores, "_labels": labels})
    return rows


# ----------------------------------------------------------------------------------------- 1:N


def open_set_identification(similarity: np.ndarray, probe_subjects: np.ndarray, gallery_subjects: np.ndarray,
                            fpirs: Sequence[float] = FPIRS, ranks: Sequence[int] = RANKS) -> Dict[str, Any]:
    """Open-set 1:N on one gallery (PROTOCOLS.md b.5 (i)). ``similarity`` [P, G] (probes x gallery
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


def identification_row(benchmark: str, result: Dict[str, Any],
                       info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The report row of :func:`identification_1n`'s result (rates as fractions; % in ``_table``)."""
    galleries = result["galleries"]
    table = {"benchmark": benchmark, "method": "model", "galleries": "+".join(galleries),
             "gallery templates": "+".join(f"{g['templates']:,}" for g in galleries.values()),
             "probes": f"{result['probes']:,}"}
    table.update({f"TPIR@FPIR={f:g}": f"{100 * v:.2f}" for f, v in result["tpir"].items()})
    table.update({f"rank-{k}": f"{100 * v:.2f}" for k, v in result["cmc"].items()})
    return {"benchmark": benchmark, "method": "model", **(info or {}), "distance": "cosine",
            "protocol": "open-set (NIST): TPIR needs rank 1 and score > threshold; floor-rule FPIR threshold",
            "probes": result["probes"],
            "gallery_templates": {n: g["templates"] for n, g in galleries.items()},
            "tpir_at_fpir": result["tpir"], "cmc": result["cmc"],
            "per_gallery": {n: {k: g[k] for k in ("mated", "non_mated", "tpir", "threshold", "cmc")}
                            for n, g in galleries.items()},
            "_table": table}


# ---------------------------------------------------------------------------------- pure scoring


def score_ijb(meta: IJBMeta, features: np.ndarray, detector_score: bool = True, one_to_n: bool = True,
              fusion: str = "flip-sum") -> List[Dict[str, Any]]:
    """Rows (1:1 nearest, 1:1 strict, [1:N]) from image features [N, D] already extracted (raw,
    flip-fused as ``fusion`` says) in the order of ``meta.images``."""
    if len(features) != len(meta.images):
        raise ValueError(f"{meta.name}: {len(features)} features for {len(meta.images)} images")
    weights = meta.detector_scores if detector_score else None
    template_ids, feats = template_features(features, meta.templates, meta.medias, weights)
    info = {"fusion": fusion, "detector_score": bool(detector_score), "pooling": POOLING,
            "normalisation": "image norm kept; template L2", "pair_list": meta.files.get("pairs", "")}
    scores = pair_scores(template_ids, feats, meta.pairs[:, 0], meta.pairs[:, 1])
    rows = verification_rows(f"{meta.name} 1:1", scores, meta.labels, len(template_ids), info)
    if one_to_n:
        if meta.probes is None or not meta.galleries:
            raise ValueError(f"{meta.name}: 1:N needs the gallery / probe CSVs "
                             "(load_ijb_meta(..., one_to_n=True))")
        result = identification_1n(template_ids, feats, meta.galleries, meta.probes)
        rows.append(identification_row(f"{meta.name} 1:N", result, {k: v for k, v in info.items()
                                                                     if k != "pair_list"}))
    return rows


# ------------------------------------------------------------------------------------ extraction


def extract_features(model: Any, image_paths: Sequence[PathLike], landmarks: np.ndarray,
                     batch_size: int = 128, flip: bool = True, workers: int = 4,
                     progress: bool = True) -> np.ndarray:
    """Raw image features float32 [N, D]: each loose crop read (OpenCV), aligned from its 5
    ``landmarks`` [N, 5, 2] to 112x112 RGB, embedded by ``model.embed(batch, normalize=False)``;
    with ``flip`` the embedding of the mirrored crop is added. ``workers`` threads decode ahead."""
    from tqdm import tqdm

    n = len(image_paths)
    if len(landmarks) != n:
        raise ValueError(f"extract_features: {len(landmarks)} landmark sets for {n} images")
    chunks = []
    batches = _aligned_batches(image_paths, landmarks, batch_size, workers)
    for batch in tqdm(batches, total=-(-n // batch_size), desc="IJB features", unit="batch",
                      disable=not progress):
        emb = np.asarray(model.embed(batch, normalize=False), np.float32)
        if flip:
            mirrored = np.ascontiguousarray(batch[:, :, ::-1])
            emb = emb + np.asarray(model.embed(mirrored, normalize=False), np.float32)
        chunks.append(emb)
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def load_aligned(path: PathLike, landmarks: np.ndarray) -> np.ndarray:
    """One loose crop -> aligned uint8 RGB [112, 112, 3]."""
    import cv2

    from mlearn.data.align import align_face

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: cannot read the image (missing or not an image file)")
    try:
        return align_face(image, landmarks)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _aligned_batches(paths: Sequence[PathLike], landmarks: np.ndarray, batch_size: int,
                     workers: int) -> Iterator[np.ndarray]:
    starts = range(0, len(paths), batch_size)

    def indices(s: int) -> range:
        return range(s, min(s + batch_size, len(paths)))

    if workers <= 0:
        for s in starts:
            yield np.stack([load_aligned(paths[i], landmarks[i]) for i in indices(s)])
        return
    with ThreadPoolExecutor(workers) as pool:
        def submit(s: int) -> List[Future]:
            return [pool.submit(load_aligned, paths[i], landmarks[i]) for i in indices(s)]

        pending = deque(submit(s) for s in starts[:2])  # decode one batch ahead of the model
        for s in starts[2:]:
            ready = pending.popleft()
            pending.append(submit(s))
            yield np.stack([f.result() for f in ready])
        while pending:
            yield np.stack([f.result() for f in pending.popleft()])


# --------------------------------------------------------------------------------- suite adapter


def run_protocol(model: Any, protocol: Dict[str, Any], root: Path, batch_size: int) -> List[Dict[str, Any]]:
    """Suite adapter. ``protocol`` keys: ``name`` (IJBB / IJBC; picks the meta file names),
    ``path`` (the folder with ``loose_crop/`` and ``meta/``, relative to ``root``; default: name),
    ``flip`` (default true), ``detector_score`` (default true), ``one_to_n`` (default false),
    ``workers`` (decoding threads, default min(8, CPUs)). Rows: 1:1 nearest rule, 1:1 strict rule,
    and with ``one_to_n`` the 1:N row."""
    unknown = sorted(set(protocol) - set(PROTOCOL_KEYS))
    if unknown:
        raise ValueError(f"ijb protocol: unknown key(s) {unknown}; accepted: {list(PROTOCOL_KEYS)}")
    if "name" not in protocol:
        raise ValueError(f"ijb protocol: 'name' is required (one of {sorted(SUBSETS)})")
    name = str(protocol["name"]).upper()
    subset = _subset(name)
    if getattr(model, "modality", "image") != "image":
        raise ValueError(f"{name}: needs an image model, got modality={model.modality!r}")
    path = Path(protocol.get("path", name))
    path = path if path.is_absolute() else Path(root) / path
    if not path.is_dir():
        raise FileNotFoundError(f"{name}: {path} not found (see {subset['card']} for the layout and where to "
                                "obtain it)")
    flip = bool(protocol.get("flip", True))
    detector_score = bool(protocol.get("detector_score", True))
    one_to_n = bool(protocol.get("one_to_n", False))
    workers = int(protocol.get("workers", min(8, os.cpu_count() or 1)))
    meta = load_ijb_meta(path, name, one_to_n)
    image_paths = _image_paths(meta, subset["card"])
    features = extract_features(model, image_paths, meta.landmarks, batch_size, flip, workers)
    return score_ijb(meta, features, detector_score, one_to_n, "flip-sum" if flip else "none")


def _image_paths(meta: IJBMeta, card: str) -> List[str]:
    crops = meta.root / "loose_crop"
    if not crops.is_dir():
        raise FileNotFoundError(f"{meta.name}: {crops} not found (see {card})")
    present = set(os.listdir(crops))
    paths = [f"{crops}/{n}" for n in meta.images.tolist()]
    missing = [p for n, p in zip(meta.images.tolist(), paths) if n not in present and not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{meta.name}: {len(missing)} image(s) listed in {meta.files['5pts']} are "
                                f"missing under {crops}, e.g. {missing[0]}")
    return paths
