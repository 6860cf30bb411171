"""``open_dataset``: open an identity-labelled image set, choosing the reader from the path."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mlearn.data.images.base import IdentityImageDataset, PathLike, Transform
from mlearn.data.images.files import ImageFolderDataset, ImageListDataset
from mlearn.data.images.recordio_dataset import RecordIODataset

FORMATS_ACCEPTED = ("a folder with train.rec + train.idx (insightface RecordIO), a .rec file, an image "
                    "folder root/<identity>/<image>, or a list file of 'path label' lines")


def open_dataset(
    path: PathLike,
    transform: Optional[Transform] = None,
    strict: bool = False,
    num_classes: Optional[int] = None,
) -> IdentityImageDataset:
    """Open a training set, detecting its format.

    A folder holding ``train.rec`` (or a ``.rec`` file) is insightface RecordIO, another folder is an
    image folder, another file is a list file. Raises ``FileNotFoundError`` for a missing path and
    ``ValueError`` when ``num_classes`` is given and differs from the data's class count.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}; expected {FORMATS_ACCEPTED}")
    dataset: IdentityImageDataset
    if (path.is_dir() and (path / "train.rec").is_file()) or (path.is_file() and path.suffix == ".rec"):
        dataset = RecordIODataset(path, transform=transform, strict=strict)
    elif path.is_dir():
        dataset = ImageFolderDataset(path, transform=transform, strict=strict)
    else:
        dataset = ImageListDataset(path, transform=transform, strict=strict)
    if num_classes is not None and int(num_classes) != dataset.num_classes:
        raise ValueError(f"{path}: the data has {dataset.num_classes} classes but num_classes={num_classes} "
                         f"was given")
    return dataset
