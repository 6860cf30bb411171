"""``FaceDataModule``: an identity-labelled image set (RecordIO, image folder, list file) for training."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Union

import numpy as np
from torch.utils.data import DataLoader

from mlearn.data.corrupt import Batch
from mlearn.data.images.open import open_dataset
from mlearn.data.images.transforms import build_transform, normalize_images
from mlearn.data.labels import save_run_label_map
from mlearn.data.resumable import ResumableDataModule
from mlearn.data.synthetic.faces import make_face_dataset

log = logging.getLogger(__name__)


def _check_positive(**values: Any) -> None:
    """Arguments that must be integers >= 1 (checked before anything is built or written)."""
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"data.{name}: expected an integer >= 1, got {value!r}")


class FaceDataModule(ResumableDataModule):
    """Training data for face identity embeddings, in a seeded, resumable order
    (:class:`~mlearn.data.resumable.ResumableDataModule`: ``--ckpt_path last`` resumes mid-epoch
    exactly where the run stopped, whatever the number of DataLoader workers).

    Args:
        root: the training set: a folder with ``train.rec``/``train.idx`` (insightface RecordIO), an
            image folder ``root/<identity>/<image>``, or a list file of ``path label`` lines. With
            ``synthetic`` set, ``root`` is the synthetic corpus folder (training images in
            ``root/train``), generated there on first use.
        num_classes: expected class count; ``None`` infers it from the data (a mismatch is an error).
        batch_size: per-process batch size (global batch = batch_size x processes).
        num_workers: DataLoader worker processes.
        augmentation: a preset name (``standard``, ``low_quality``, ``eval``) or a list of
            albumentations transforms (``[{name: HorizontalFlip, p: 0.5}, ...]``).
        image_size: side of the square network input (px); other sizes are resized.
        strict: raise on a corrupt sample instead of skipping and counting it.
        synthetic: keyword arguments of :func:`mlearn.data.synthetic.faces.make_face_dataset`.
        seed: seed of the sample order and of the augmentations.
        uint8_batches: ship the images as decoded (and flipped), uint8 [B, S, S, 3] (4x less memory
            traffic, no per-image transpose on the CPU): :meth:`on_after_batch_transfer` normalises and
            makes them channels-first on the training device
            (:func:`mlearn.data.images.transforms.normalize_images`);
            ``False``: float32 [B, 3, S, S] normalised on the CPU.
        pin_memory: page-locked batches for faster host-to-GPU copies.
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
        seed: int = 0,
        uint8_batches: bool = True,
        pin_memory: bool = False,
    ) -> None:
        _check_positive(image_size=image_size, batch_size=batch_size)
        if not isinstance(num_workers, (int, np.integer)) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"data.num_workers: expected an integer >= 0, got {num_workers!r}")
        super().__init__(seed)
        self.root = root
        self.expected_num_classes = num_classes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augmentation = augmentation
        self.image_size = image_size
        self.strict = strict
        self.synthetic = synthetic
        self.uint8_batches = uint8_batches
        self.pin_memory = pin_memory
        self._dataset: Any = None

    @property
    def dataset(self) -> Any:
        """The training set (augmentation attached as ``dataset.transform``)."""
        if self._dataset is None:
            if self.synthetic is not None:
                make_face_dataset(self.root, image_size=self.image_size, **self.synthetic)
            transform = build_transform(self.augmentation, image_size=self.image_size,
                                        output="uint8" if self.uint8_batches else "float")
            self._dataset = open_dataset(self.train_path, transform=transform, strict=self.strict,
                                         num_classes=self.expected_num_classes)
        return self._dataset

    @property
    def num_classes(self) -> int:
        """Number of identities in the training set (linked to ``model.num_classes``)."""
        return int(self.dataset.num_classes)

    def setup(self, stage: str) -> None:
        if save_run_label_map(self.trainer, self.dataset, stage):
            log.info("training set %s: %d images, %d identities", self.train_path, len(self.dataset),
                     self.num_classes)
            dropped = getattr(self.dataset, "num_dropped_at_open", 0)
            if dropped:  # corrupt too, but never reach a batch: the epoch's corrupt count misses them
                log.warning("training set %s: %d records dropped at open (%s)", self.train_path, dropped,
                            "; ".join(self.dataset.dropped_at_open))

    def train_dataloader(self) -> DataLoader:
        return self.seeded_dataloader(self.dataset, self.batch_size, self.num_workers, self.pin_memory)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Batch:
        """On the training device (Lightning calls it after the copy): uint8 [B, S, S, 3] images
        normalised and made channels-first, float32 [B, 3, S, S]
        (:func:`~mlearn.data.images.transforms.normalize_images`); float batches pass unchanged. Returns
        the plain ``(images, labels, num_corrupt)`` batch the module trains on."""
        images, labels, num_corrupt = batch
        return Batch(normalize_images(images), labels, num_corrupt)
