"""Pairs of the ``own_data`` protocol (docs/protocols.md f.1): inputs listed from a folder or a pair /
trial list, every genuine pair and a seeded uniform sample of impostor pairs from identity labels, and
chunked cosine scores of index pairs. No embedding here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, Path]
Pairs = Tuple[np.ndarray, np.ndarray]  # (first, second) int64 indices [P]
SCORE_CHUNK = 1 << 15  # pairs scored per block: bounds the gathered [chunk, D] rows
PAIR_LIST_FORMAT = "'<path1> <path2> <label>' with label 1 (same identity) or 0 (different)"
_LABELS = {"1": 1, "0": 0}


@dataclass
class PairList:
    """Pairs of files (paths as written in the list) with 0/1 labels (``None`` when the list has none)."""

    first: List[str]
    second: List[str]
    labels: Optional[np.ndarray]

    def __len__(self) -> int:
        return len(self.first)


def read_pair_list(path: PathLike, labels_required: bool = True) -> PairList:
    """Read ``path1 path2 label`` lines (whitespace separated; blank lines and ``#`` comments skipped).
    With ``labels_required=False`` the label column may be left out on every line. A malformed line is
    a ``ValueError`` naming ``file:line``, what was expected and what was found."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pair list not found: {path} (expected a text file of {PAIR_LIST_FORMAT})")
    first: List[str] = []
    second: List[str] = []
    labels: List[int] = []
    with_labels: Optional[bool] = None
    expected = PAIR_LIST_FORMAT if labels_required else f"{PAIR_LIST_FORMAT}, or '<path1> <path2>'"
    with path.open() as handle:
        for lineno, line in enumerate(handle, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            labelled = len(fields) == 3 and fields[2] in _LABELS
            ok = labelled or (len(fields) == 2 and not labels_required)
            if ok and with_labels is not None and labelled != with_labels:
                ok, expected = False, ("a label on every line, as on the first" if with_labels
                                       else "no label, as on the first line")
            if not ok:
                raise ValueError(f"{path}:{lineno}: expected {expected}; got {line.strip()!r}")
            with_labels = labelled
            first.append(fields[0])
            second.append(fields[1])
            if labelled:
                labels.append(_LABELS[fields[2]])
    if not first:
        raise ValueError(f"{path}: empty pair list (expected lines of {PAIR_LIST_FORMAT})")
    return PairList(first, second, np.asarray(labels, np.int8) if with_labels else None)


def scan_identity_folder(root: PathLike, extensions: Sequence[str]) -> Tuple[List[str], List[str], int]:
    """Files ``root/<identity>/.../<file>`` with one of ``extensions``, sorted. Returns (relative paths,
    their identity = first path component, number of files directly in ``root``, which are ignored).
    ``FileNotFoundError`` for a missing folder, ``ValueError`` for fewer than 2 identities."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"folder not found: {root} (expected <folder>/<identity>/<file>)")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in extensions)
    loose = [f for f in files if "/" not in f]
    files = [f for f in files if "/" in f]
    identities = [f.split("/", 1)[0] for f in files]
    found = sorted(set(identities))
    if len(found) < 2:
        seen = f"only {found[0]!r}" if found else "none"
        raise ValueError(f"{root}: needs at least 2 identity folders <folder>/<identity>/<file> with "
                         f"{'/'.join(extensions[:3])}... files; found {seen}")
    return files, identities, len(loose)


def _blocks(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inputs sorted by identity: (order [N], identity of each sorted position, first position of each
    identity [C], count of each identity [C])."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    _, starts, counts = np.unique(sorted_labels, return_index=True, return_counts=True)
    block = np.repeat(np.arange(len(starts)), counts)
    return order, block, starts, counts


def pair_count(labels: np.ndarray, same: bool) -> int:
    """Unordered pairs of inputs with the same (``same``) or different identity labels [N]."""
    counts = np.unique(labels, return_counts=True)[1].astype(np.int64)
    n = int(counts.sum())
    same_pairs = int((counts * (counts - 1) // 2).sum())
    return same_pairs if same else n * (n - 1) // 2 - same_pairs


def all_pairs(labels: np.ndarray, same: bool) -> Pairs:
    """Every unordered pair (i < j positions in identity order) of same / different identity."""
    order, _, starts, counts = _blocks(np.asarray(labels))
    firsts, seconds = [], []
    for start, count in zip(starts, counts):
        members = order[start:start + count]
        if same:
            i, j = np.triu_indices(count, 1)
            firsts.append(members[i])
            seconds.append(members[j])
        else:
            later = order[start + count:]
            firsts.append(np.repeat(members, len(later)))
            seconds.append(np.tile(later, count))
    if not firsts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(firsts).astype(np.int64), np.concatenate(seconds).astype(np.int64)


def sample_pairs(labels: np.ndarray, same: bool, count: int, rng: np.random.Generator) -> Pairs:
    """``count`` distinct unordered pairs drawn uniformly among those of same / different identity
    (exact: the first input weighted by its number of partners, the partner uniform among them), sorted."""
    order, block, starts, counts = _blocks(np.asarray(labels))
    n = len(order)
    partners = (counts - 1 if same else n - counts)[block].astype(np.float64)
    keys = np.zeros(0, np.int64)
    while len(keys) < count:
        draw = int((count - len(keys)) * 1.2) + 64
        i = rng.choice(n, draw, p=partners / partners.sum())
        start, size = starts[block[i]], counts[block[i]]
        if same:
            r = rng.integers(0, size - 1)
            j = start + r + (r >= i - start)
        else:
            r = rng.integers(0, n - size)
            j = r + (r >= start) * size
        keys = np.union1d(keys, np.minimum(i, j).astype(np.int64) * n + np.maximum(i, j))
    keys = np.sort(rng.choice(keys, count, replace=False))
    return order[keys // n].astype(np.int64), order[keys % n].astype(np.int64)


def pairs_of(labels: np.ndarray, same: bool, cap: Optional[int],
             rng: np.random.Generator) -> Tuple[Pairs, int]:
    """All same / different-identity pairs, or ``cap`` of them drawn uniformly when there are more
    (``None``: no cap). Returns (pairs, how many exist)."""
    total = pair_count(labels, same)
    if cap is None or total <= cap:
        return all_pairs(labels, same), total
    if total <= 2 * cap:  # rejection would crawl: enumerate, then subsample
        first, second = all_pairs(labels, same)
        keep = np.sort(rng.choice(total, cap, replace=False))
        return (first[keep], second[keep]), total
    return sample_pairs(labels, same, cap, rng), total


def pair_cosines(unit: np.ndarray, first: np.ndarray, second: np.ndarray,
                 chunk: int = SCORE_CHUNK) -> np.ndarray:
    """Cosine scores [P] (float64) of rows ``first[p]`` and ``second[p]`` of L2-normalised ``unit``
    [N, D], gathered ``chunk`` pairs at a time (never a [P, D] copy)."""
    scores = np.empty(len(first), np.float64)
    for a in range(0, len(first), chunk):
        b = min(len(first), a + chunk)
        scores[a:b] = np.einsum("nd,nd->n", unit[first[a:b]], unit[second[a:b]], dtype=np.float64)
    return scores
