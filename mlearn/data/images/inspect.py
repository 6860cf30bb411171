"""Check a training set (counts, class sizes, corrupt images) and convert RecordIO <-> image folder.

These back ``mlearn data inspect PATH`` and ``mlearn data convert SRC DST --to rec|folder``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mlearn.data.corrupt import CorruptSampleError
from mlearn.data.images.base import IdentityImageDataset, decode_image, image_extension
from mlearn.data.images.open import open_dataset
from mlearn.data.images.recordio import RecordIOWriter
from mlearn.data.images.recordio_dataset import RecordIODataset

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
LABEL_NAMES_FILE = "label_map.json"  # written beside train.rec by convert: identity name -> label
_MAX_LISTED = 20


class _Probe(Dataset):
    """Decodes samples and reports ``(index, (H, W) or None, error or None)`` instead of raising."""

    def __init__(self, dataset: IdentityImageDataset, indices: np.ndarray) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tuple[int, Optional[Tuple[int, int]], Optional[str]]:
        index = int(self.indices[i])
        try:
            return index, tuple(self.dataset.load_image(index).shape[:2]), None
        except CorruptSampleError as exc:
            return index, None, str(exc)


def inspect_dataset(path: PathLike, sample: Optional[int] = None, num_workers: int = 0,
                    seed: int = 0, progress: bool = True) -> Dict[str, Any]:
    """Describe a training set and find its corrupt images.

    Args:
        path: RecordIO folder or ``.rec``, image folder, or list file (see ``open_dataset``).
        sample: decode only this many randomly chosen images (``None``: all of them).
        num_workers: DataLoader workers decoding in parallel (0: in this process).
        seed: seed of the random sample.
        progress: show a tqdm progress bar.

    Returns a dict: ``format``, ``path``, ``num_images``, ``num_classes``, ``class_size``
    (``min``/``median``/``mean``/``max`` images per class), ``decoded`` (images checked), ``corrupt``
    (how many failed, plus ``dropped_at_open``: RecordIO records listed but missing or unreadable when
    the set was opened, whose causes are in ``dropped_at_open_reasons``), ``corrupt_examples`` (up to 20
    decoding errors naming the record or file),
    ``image_sizes`` (``"HxW"`` -> count among the decoded), and for RecordIO ``property_num_classes``.
    """
    dataset = open_dataset(path)
    sizes = dataset.class_sizes()
    report: Dict[str, Any] = {
        "path": str(path),
        "format": dataset.format_name,
        "num_images": len(dataset),
        "num_classes": dataset.num_classes,
        "class_size": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                       "mean": float(sizes.mean()), "max": int(sizes.max())},
    }
    if isinstance(dataset, RecordIODataset):
        report["property_num_classes"] = dataset.property_num_classes()
    dropped = int(getattr(dataset, "num_dropped_at_open", 0))
    report["dropped_at_open"] = dropped
    if sample is not None and sample < len(dataset):
        rng = np.random.default_rng(seed)
        indices = np.sort(rng.choice(len(dataset), size=max(sample, 0), replace=False))
    else:
        indices = np.arange(len(dataset))
    probe = _Probe(dataset, indices)
    if num_workers:
        loader = DataLoader(probe, batch_size=64, num_workers=num_workers, collate_fn=list)
        results: Any = (r for batch in loader for r in batch)
    else:
        results = (probe[i] for i in range(len(probe)))
    corrupt: List[str] = []
    num_corrupt = 0
    shapes: Dict[str, int] = {}
    for _, shape, error in tqdm(results, total=len(probe), desc=f"decoding {Path(path).name}", unit="img",
                                disable=not progress):
        if error is not None:
            num_corrupt += 1
            if len(corrupt) < _MAX_LISTED:
                corrupt.append(error)
        else:
            key = f"{shape[0]}x{shape[1]}"
            shapes[key] = shapes.get(key, 0) + 1
    report.update(decoded=len(probe), corrupt=num_corrupt + dropped, corrupt_examples=corrupt,
                  image_sizes=shapes, dropped_at_open_reasons=list(getattr(dataset, "dropped_at_open", [])))
    return report


def format_inspect_report(report: Dict[str, Any]) -> str:
    """Human-readable text of an :func:`inspect_dataset` result."""
    size = report["class_size"]
    lines = [
        f"dataset:      {report['path']} ({report['format']})",
        f"images:       {report['num_images']:,}",
        f"classes:      {report['num_classes']:,}",
        f"class size:   min {size['min']}, median {size['median']:g}, mean {size['mean']:.2f}, "
        f"max {size['max']}",
    ]
    declared = report.get("property_num_classes")
    if declared is not None and declared != report["num_classes"]:
        lines.append(f"WARNING:      'property' declares {declared:,} classes; the labels have "
                     f"{report['num_classes']:,}")
    sizes = ", ".join(f"{k} ({v:,})" for k, v in sorted(report["image_sizes"].items(), key=lambda kv: -kv[1]))
    lines.append(f"image sizes:  {sizes or '-'}")
    everything = report["decoded"] == report["num_images"]
    scope = "all" if everything else f"a random sample of {report['decoded']:,}"
    dropped = report.get("dropped_at_open", 0)
    if dropped:
        lines.append(f"corrupt:      {report['corrupt']:,} of {report['decoded'] + dropped:,} records: "
                     f"{dropped:,} dropped at open, {report['corrupt'] - dropped:,} of {report['decoded']:,} "
                     f"decoded ({scope})")
    else:
        lines.append(f"corrupt:      {report['corrupt']:,} of {report['decoded']:,} decoded ({scope})")
    lines.extend(f"  dropped at open: {why}" for why in report.get("dropped_at_open_reasons", []))
    lines.extend(f"  {message}" for message in report["corrupt_examples"])
    unlisted = report["corrupt"] - dropped - len(report["corrupt_examples"])
    if unlisted > 0:
        lines.append(f"  ... and {unlisted:,} more")
    return "\n".join(lines)


def _identity_names(dataset: IdentityImageDataset) -> List[str]:
    """Folder name per class index: the original names; numbers zero-padded so they sort numerically."""
    originals = sorted(dataset.label_map, key=dataset.label_map.__getitem__)
    if isinstance(dataset, RecordIODataset):
        names_file = dataset.reader.rec_path.parent / LABEL_NAMES_FILE
        if names_file.is_file():  # written by convert: the identity names of a folder converted to rec
            with names_file.open(encoding="utf-8") as f:
                by_label = {int(v): str(k) for k, v in json.load(f).items()}
            if all(isinstance(o, int) and o in by_label for o in originals):
                return [by_label[o] for o in originals]
    if all(isinstance(o, (int, np.integer)) and o >= 0 for o in originals):
        width = len(str(max(originals)))
        return [str(o).zfill(width) for o in originals]
    return [str(o) for o in originals]


FOLDER_NAMES_FILE = "folder_names.json"  # written by convert --to folder when a name had to change
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")  # separators and control characters
_MAX_NAME_BYTES = 200


def safe_folder_names(names: Sequence[str]) -> List[str]:
    """One folder name per identity name, safe to create under a destination folder and unique even
    on case-insensitive file systems: separators and control characters become ``_``, names that are
    empty, ``.``/``..`` or hidden (leading ``.``) get a leading ``_``, overlong ones are cut; a name that
    had to change, or that clashes with another, gets ``~`` and 8 hex digits of its hash. Names that
    are already safe and unique are kept as they are."""
    out: List[str] = []
    taken: set = set()
    for name in names:
        safe = _UNSAFE.sub("_", name).strip()
        if not safe or safe.startswith("."):
            safe = "_" + safe
        if len(safe.encode("utf-8")) > _MAX_NAME_BYTES:
            safe = safe.encode("utf-8")[:_MAX_NAME_BYTES].decode("utf-8", "ignore")
        if safe != name or safe.casefold() in taken:
            digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()
            base, n = f"{safe}~{digest[:8]}", 0
            safe = base
            while safe.casefold() in taken:
                n += 1
                safe = f"{base}-{n}"
        taken.add(safe.casefold())
        out.append(safe)
    return out


def _identity_folders(dst: Path, names: List[str]) -> List[Path]:
    """The folder of each identity below ``dst`` (names made safe); every one is checked to resolve
    to a direct child of ``dst``, and ``dst/folder_names.json`` maps original -> folder name when
    any name changed."""
    safe = safe_folder_names(names)
    root = dst.resolve()
    folders = [dst / name for name in safe]
    for name, folder in zip(names, folders):
        if folder.resolve().parent != root:
            raise ValueError(f"convert: identity {name!r} would be written outside {dst}")
    if safe != names:
        changed = sum(a != b for a, b in zip(names, safe))
        log.warning("convert: %d identity names are not safe folder names; the mapping is in %s", changed,
                    dst / FOLDER_NAMES_FILE)
        dst.mkdir(parents=True, exist_ok=True)
        with (dst / FOLDER_NAMES_FILE).open("w", encoding="utf-8") as f:
            json.dump(dict(zip(names, safe)), f, indent=0, ensure_ascii=False)
    return folders


def convert_dataset(src: PathLike, dst: PathLike, to: str, verify: bool = True, progress: bool = True
                    ) -> Dict[str, int]:
    """Convert a training set, copying the encoded images unchanged.

    ``to="folder"``: any format -> ``dst/<identity>/<n>.<ext>`` (identity = original name, or the
    zero-padded numeric label). ``to="rec"``: any format -> ``dst/train.rec``/``.idx``/``property``
    with insightface's header and identity records, labels ``0..C-1`` in sorted name order, and
    ``dst/label_map.json`` (name -> label) so that converting back restores the names.
    With ``verify``, images that do not decode are skipped (and counted) instead of copied.

    ``dst`` must not exist or be an empty folder (nothing is overwritten). Nothing is written outside
    it: identity names that are not safe folder names (``a/b``, ``..``, absolute paths, control
    characters) get unique safe ones (:func:`safe_folder_names`, never merged), listed as
    ``{original name: folder name}`` in ``dst/folder_names.json``.

    Returns ``{"images": written, "classes": ..., "skipped": corrupt or unreadable}``.
    """
    if to not in ("folder", "rec"):
        raise ValueError(f"convert: to must be 'folder' or 'rec', got {to!r}")
    dataset = open_dataset(src)
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        what = "is a file" if not dst.is_dir() else "is not empty"
        raise ValueError(f"convert: destination {dst} {what}; give a new or empty folder (nothing is "
                         f"overwritten)")
    order = np.argsort(dataset.labels, kind="stable")  # grouped by class, as RecordIO identity records need
    skipped = 0
    written = 0
    classes = set()
    bar = tqdm(order, desc=f"{Path(src).name} -> {dst.name} ({to})", unit="img", disable=not progress)
    names = _identity_names(dataset)
    folders = _identity_folders(dst, names) if to == "folder" else []
    writer = RecordIOWriter(dst) if to == "rec" else None
    try:
        for index in bar:
            index = int(index)
            try:
                data = dataset.read_bytes(index)
                if verify:
                    decode_image(data, dataset.describe(index))
            except CorruptSampleError as exc:
                skipped += 1
                log.warning("skipped: %s", exc)
                continue
            label = int(dataset.labels[index])
            if writer is not None:
                writer.add(data, label)
            else:
                folder = folders[label]
                if label not in classes:
                    folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{index:08d}{image_extension(data)}").write_bytes(data)
            classes.add(label)
            written += 1
    finally:
        if writer is not None:
            writer.close()
    if written == 0:
        raise ValueError(f"convert: none of the {skipped} images of {src} could be read or decoded (the "
                         f"first errors are logged above); nothing converted")
    if to == "rec":
        with (dst / LABEL_NAMES_FILE).open("w", encoding="utf-8") as f:
            json.dump({names[c]: c for c in sorted(classes)}, f, indent=0, ensure_ascii=False)
    log.info("converted %s -> %s: %d images, %d classes, %d skipped", src, dst, written, len(classes),
             skipped)
    return {"images": written, "classes": len(classes), "skipped": skipped}
