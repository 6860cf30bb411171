"""``FaceDataModule``: an identity-labelled image set (RecordIO, image folder, list file) for training."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from mlearn.data.folders import open_dataset
from mlearn.data.corrupt import collate_skip_corrupt
from mlearn.data.synthetic import make_face_dataset
from mlearn.data.transforms import build_transform

log = logging.getLogger(__name__)

LABEL_MAP_FILE = "label_map.json"


class FaceDataModule(pl.LightningDataModule):
    """Training data for face identity embeddings.

    Args:
        root: the training set: a folder with ``train.rec``/``train.idx`` (insightface RecordIO), an
            image folder ``root/<identity>/<image>``, or a list file of ``path label`` lines. With
            ``synthetic`` set, ``root`` is the synthetic corpus folder (training images in
            ``root/train``), generated there on first use.
        num_classes: expected class count; ``None`` infers it from the data (a mismatch is an error).
        batch_size: per-process batch size.
        num_workers: DataLoader worker processes.
        augmentation: a preset name (``standard``, ``low_quality``, ``eval``) or a list of
            albumentations transforms (``[{name: HorizontalFlip, p: 0.5}, ...]``).
        strict: raise on a corrupt sample instead of skipping and counting it.
        synthetic: keyword arguments of :func:`mlearn.data.synthetic.make_face_dataset`.
    """

    def __init__(
        self,
        root: str,
        num_classes: Optional[int] = None,
        batch_size: int = 128,
        num_workers: int = 2,
        augmentation: Union[str, List[Dict[str, Any]]] = "standard",
        image_size: int = 112,
        strict: bool = False,
        synthetic: Optional[Dict[str, int]] = None,
    ) -> None:
        super().__init__()
        self.root = root
        self.expected_num_classes = num_classes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augmentation = augmentation
        self.image_size = image_size
        self.strict = strict
        self.synthetic = synthetic
        self._dataset: Any = None

    @property
    def train_path(self) -> Path:
        return Path(self.root) / "train" if self.synthetic is not None else Path(self.root)

    @property
    def dataset(self) -> Any:
        if self._dataset is None:
            if self.synthetic is not None:
                make_face_dataset(self.root, image_size=self.image_size, **self.synthetic)
            transform = build_transform(self.augmentation, image_size=self.image_size)
            self._dataset = open_dataset(self.train_path, transform=transform, strict=self.strict,
                                         num_classes=self.expected_num_classes)
        return self._dataset

    @property
    def num_classes(self) -> int:
        """Number of identities in the training set (linked to ``model.num_classes``)."""
        return int(self.dataset.num_classes)

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if stage == "fit" and trainer is not None and trainer.is_global_zero:
            run_dir = Path(trainer.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self.dataset.save_label_map(run_dir / LABEL_MAP_FILE)
            log.info("training set %s: %d images, %d identities", self.train_path, len(self.dataset),
                     self.num_classes)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=collate_skip_corrupt,
            drop_last=True,
            persistent_workers=self.num_workers > 0,
        )
