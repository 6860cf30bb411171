"""IJB-B / IJB-C meta files (docs/protocols.md section b): readers that name file and line on bad
input, and :func:`load_ijb_meta`, which reads and cross-checks one set's files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

PathLike = Union[str, Path]

# benchmark name -> file prefix, dataset card, 1:N gallery names (meta/<prefix>_1N_gallery_<name>.csv)
SUBSETS: Dict[str, Dict[str, Any]] = {
    "IJBB": {"prefix": "ijbb", "card": "datasets/ijbb.md", "galleries": ("S1", "S2")},
    "IJBC": {"prefix": "ijbc", "card": "datasets/ijbc.md", "galleries": ("G1", "G2")},
}


def read_face_tid_mid(path: PathLike) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``<image> <template id> <media id>`` lines -> (image names [N] str, template ids [N] int64,
    media ids [N] int64)."""
    names, values = _read_named_table(path, 2, np.int64, "<image> <template id> <media id>")
    return names, values[:, 0].copy(), values[:, 1].copy()


def read_name_5pts_score(path: PathLike) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``<image> x1 y1 ... x5 y5 <detector score>`` lines -> (image names [N] str, landmarks
    [N, 5, 2] float32 pixels of the loose crop, detector scores [N] float32)."""
    names, values = _read_named_table(path, 11, np.float32, "<image> x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 <score>")
    return names, values[:, :10].reshape(-1, 5, 2).copy(), values[:, 10].copy()


def read_template_pairs(path: PathLike) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``<template 1> <template 2> <label 1|0>`` lines -> (t1 [P] int64, t2 [P] int64, labels [P] int8)."""
    values = _read_table(path, 3, np.int64, "<template 1> <template 2> <label 1|0>")
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


def _read_lines_bytes(path: Path, layout: str) -> bytes:
    """The bytes of a non-empty text file (trailing whitespace stripped); clear errors otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    data = path.read_bytes().rstrip()
    if not data:
        raise ValueError(f"{path}: empty file; expected lines '{layout}'")
    return data


def _read_table(path: PathLike, n_values: int, dtype: Any, layout: str) -> np.ndarray:
    """Whitespace-separated lines of ``n_values`` numbers -> values [N, n_values]. Vectorised for the
    15.7M-line IJB-C pair file: token counts per line from byte masks, then one ``np.fromstring``."""
    path = Path(path)
    data = _read_lines_bytes(path, layout)
    raw = np.frombuffer(data, np.uint8)
    starts = np.concatenate([[0], np.flatnonzero(raw == 10) + 1])
    ends = np.concatenate([starts[1:] - 1, [len(raw)]])
    space = raw <= 32  # space, tab, CR, LF
    token_start = ~space
    token_start[1:] &= space[:-1]
    # uint8 counts are exact here: each line's count is n_values mod 256 and the total matches
    counts = np.add.reduceat(token_start.view(np.uint8), starts, dtype=np.uint8).astype(np.int64)
    if np.count_nonzero(token_start) != len(starts) * n_values:
        counts = np.add.reduceat(token_start, starts, dtype=np.int64)
    bad = np.flatnonzero(counts != n_values)
    if len(bad):
        line = int(bad[0])
        raise ValueError(f"{path}:{line + 1}: expected {n_values} whitespace-separated fields '{layout}', "
                         f"got {counts[line]}: {_line(data, starts, ends, line)!r}")
    try:
        values = np.fromstring(data, dtype=dtype, sep=" ")
    except ValueError:
        line = _first_unparsable_line(data, starts, ends, dtype)
        raise ValueError(f"{path}:{line + 1}: cannot parse the numbers of '{layout}' "
                         f"({np.dtype(dtype).name}): {_line(data, starts, ends, line)!r}") from None
    if values.size != len(starts) * n_values:  # defensive: token counts were checked above
        raise ValueError(f"{path}: parsed {values.size} numbers, expected {len(starts)} lines x {n_values}")
    return values.reshape(len(starts), n_values)


def _read_named_table(path: PathLike, n_values: int, dtype: Any,
                      layout: str) -> Tuple[np.ndarray, np.ndarray]:
    """Lines of a name then ``n_values`` numbers -> (names [N] str, values [N, n_values]): a plain
    split loop (these files have at most ~0.5M lines)."""
    path = Path(path)
    data = _read_lines_bytes(path, layout)
    try:
        lines = data.decode().split("\n")
    except UnicodeDecodeError as exc:
        bad = data.count(b"\n", 0, exc.start)
        text = data.split(b"\n")[bad].decode(errors="replace").strip()[:200]
        raise ValueError(f"{path}:{bad + 1}: not UTF-8 text: {text!r}") from None
    names: List[str] = []
    numbers: List[str] = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if len(fields) != n_values + 1:
            raise ValueError(f"{path}:{number}: expected {n_values + 1} whitespace-separated fields "
                             f"'{layout}', got {len(fields)}: {line.strip()[:200]!r}")
        names.append(fields[0])
        numbers.extend(fields[1:])
    try:
        values = np.fromstring(" ".join(numbers), dtype=dtype, sep=" ")
    except ValueError:
        number = next(i for i, line in enumerate(lines, 1) if not _parses(line.split(None, 1)[1], dtype))
        raise ValueError(f"{path}:{number}: cannot parse the numbers of '{layout}' "
                         f"({np.dtype(dtype).name}): {lines[number - 1].strip()[:200]!r}") from None
    return np.array(names), values.reshape(len(lines), n_values)


def _parses(text: str, dtype: Any) -> bool:
    try:
        np.fromstring(text, dtype=dtype, sep=" ")
    except ValueError:
        return False
    return True


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
    subset = subset_info(name)
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
    subset = subset_info(name)
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


def subset_info(name: str) -> Dict[str, Any]:
    """The :data:`SUBSETS` entry of ``name`` (case-insensitive); ``ValueError`` naming the known ones."""
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
