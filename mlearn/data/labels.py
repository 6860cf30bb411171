"""Labels shared by every modality: remapping to ``0..C-1``, the run's label map file, compact strings.

A label map is ``{original label or identity name: class index}``; it is written as JSON with string
keys (:func:`save_label_map`) and read back with :func:`load_label_map`. A training run writes its
map to ``<default_root_dir>/label_map.json`` (:func:`save_run_label_map`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Hashable, List, Mapping, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, Path]
LABEL_MAP_FILE = "label_map.json"


def remap_labels(original: Sequence[Hashable]) -> Tuple[np.ndarray, Dict[Hashable, int]]:
    """Map original labels to ``0..C-1`` in sorted order. Returns (int64 [N], {original: index})."""
    names = sorted(set(original))
    label_map = {name: i for i, name in enumerate(names)}
    return np.fromiter((label_map[x] for x in original), dtype=np.int64, count=len(original)), label_map


def save_label_map(label_map: Mapping[Hashable, int], path: PathLike) -> None:
    """Write ``label_map`` as JSON ``{original label: index}`` (keys as strings), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        json.dump({str(k): int(v) for k, v in label_map.items()}, f, indent=0, ensure_ascii=False)


def load_label_map(path: PathLike) -> Dict[str, int]:
    """Read a label map written by :func:`save_label_map` (keys are strings)."""
    with Path(path).open(encoding="utf-8") as f:
        return {str(k): int(v) for k, v in json.load(f).items()}


def save_run_label_map(trainer: Any, dataset: Any, stage: str) -> bool:
    """At fit start on global rank 0: ``dataset.save_label_map(<trainer.default_root_dir>/label_map.json)``.

    Returns True when it was written (the caller then logs the training set once)."""
    if stage != "fit" or trainer is None or not trainer.is_global_zero:
        return False
    run_dir = Path(trainer.default_root_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dataset.save_label_map(run_dir / LABEL_MAP_FILE)
    return True


class StringTable:
    """Many strings in two numpy arrays: no per-string Python objects, so DataLoader workers forked
    from the main process share the pages instead of copying them on reference-count writes, and
    tens of millions of paths fit in a few bytes each more than their text."""

    def __init__(self) -> None:
        self._chunks: List[bytes] = []
        self._lengths: List[np.ndarray] = []
        self._data = np.zeros(0, dtype=np.uint8)
        self._offsets = np.zeros(1, dtype=np.int64)

    def extend(self, strings: Sequence[str]) -> None:
        encoded = [x.encode("utf-8") for x in strings]
        self._chunks.append(b"".join(encoded))
        self._lengths.append(np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded)))

    @classmethod
    def of(cls, strings: Sequence[str]) -> "StringTable":
        """A frozen table of ``strings``."""
        table = cls()
        table.extend(strings)
        return table.freeze()

    def freeze(self) -> "StringTable":
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        self._offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._data = np.frombuffer(b"".join(self._chunks), dtype=np.uint8)
        self._chunks, self._lengths = [], []
        return self

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} entries")
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._data[start:end].tobytes().decode("utf-8")
