"""Images stored one file each: an image folder ``root/<identity>/<image>`` or a list file of
``path label`` lines (the dataset interface: :mod:`mlearn.data.images.base`)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Hashable, List, Optional, Sequence

import numpy as np

from mlearn.data.corrupt import CorruptSampleError
from mlearn.data.images.base import IdentityImageDataset, PathLike, Transform
from mlearn.data.labels import StringTable, remap_labels

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class _FileListDataset(IdentityImageDataset):
    """Samples stored as one image file each; ``_files`` holds paths relative to ``_base``."""

    _base = ""
    _files: StringTable

    def path(self, index: int) -> str:
        """File path of sample ``index``."""
        return os.path.join(self._base, self._files[int(index)])

    def describe(self, index: int) -> str:
        return self.path(index)

    def read_bytes(self, index: int) -> bytes:
        path = self.path(index)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise CorruptSampleError(f"{path}: cannot read ({exc.strerror or exc})") from None


class ImageFolderDataset(_FileListDataset):
    """``root/<identity>/<image>``: one sub-folder per identity, labels in sorted order of folder names.

    Files with an image extension (``.jpg .jpeg .png .bmp .webp .tif .tiff``, any case) count;
    hidden entries, files directly under ``root`` and empty identity folders are ignored.
    """

    format_name = "folder"

    def __init__(self, root: PathLike, transform: Optional[Transform] = None, strict: bool = False) -> None:
        super().__init__(transform, strict)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        identities = sorted(e.name for e in os.scandir(self.root)
                            if e.is_dir() and not e.name.startswith("."))
        files = StringTable()
        labels: List[np.ndarray] = []
        label_map: Dict[Hashable, int] = {}
        for name in identities:
            folder = self.root / name
            images = sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".")
                            and e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())
            if not images:
                log.warning("%s: no images, identity skipped", folder)
                continue
            label_map[name] = len(label_map)
            files.extend([os.path.join(name, image) for image in images])
            labels.append(np.full(len(images), label_map[name], dtype=np.int64))
        if not labels:
            raise ValueError(f"{self.root}: no images found; expected root/<identity>/<image> with "
                             f"extensions "
                             f"{', '.join(IMAGE_EXTENSIONS)}")
        self._base = str(self.root)
        self._files = files.freeze()
        self.labels = np.concatenate(labels)
        self.label_map = label_map


class ImageListDataset(_FileListDataset):
    """A text file of ``path label`` lines; relative paths start at the list file's folder.

    The label is the last whitespace-separated field (so paths may contain spaces); blank lines and
    lines starting with ``#`` are skipped. Integer labels are ordered numerically, others as strings;
    when at least half the labels are integers, one that is not is an error naming its line.
    """

    format_name = "list"

    def __init__(self, list_file: PathLike, transform: Optional[Transform] = None,
                 strict: bool = False) -> None:
        super().__init__(transform, strict)
        self.list_file = Path(list_file)
        if not self.list_file.is_file():
            raise FileNotFoundError(f"list file not found: {self.list_file}")
        base = self.list_file.parent
        files: List[str] = []
        raw: List[str] = []
        lines: List[int] = []
        with self.list_file.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                fields = line.rsplit(None, 1)
                if len(fields) != 2:
                    raise ValueError(f"{self.list_file}:{lineno}: expected 'path label', got {line!r}")
                path, label = fields
                files.append(path)  # absolute paths survive os.path.join(base, path)
                raw.append(label)
                lines.append(lineno)
        if not files:
            raise ValueError(f"{self.list_file}: no 'path label' lines")
        original = _list_labels(raw, self.list_file, lines)
        self._base = str(base)
        self._files = StringTable.of(files)
        self.labels, self.label_map = remap_labels(original)


def _list_labels(raw: List[str], list_file: Path, lines: List[int]) -> Sequence[Hashable]:
    """Integer labels when at least half of them are integers (a stray name among them is then an
    error naming its line, not a new class), identity names otherwise."""
    numbers: List[Optional[int]] = []
    for label in raw:
        try:
            numbers.append(int(label))
        except ValueError:
            numbers.append(None)
    bad = [i for i, n in enumerate(numbers) if n is None]
    if not bad:
        return numbers  # type: ignore[return-value]
    if 2 * len(bad) > len(raw):
        return raw
    first = bad[0]
    raise ValueError(f"{list_file}:{lines[first]}: label {raw[first]!r} is not an integer, but "
                     f"{len(raw) - len(bad)} of the {len(raw)} labels are ({len(bad)} are not); fix "
                     f"the label, or use names for every identity")
